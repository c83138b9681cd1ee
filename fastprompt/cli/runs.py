"""Helpers the commands share once they run: datasets and loaders, building and rebuilding models, run folders.

Imported by a command's `run` (never at parser time): it imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fastprompt.cli.common import CONFIG_NAME, UsageError
from fastprompt.io import atomic_write_bytes
from fastprompt.predict import backbone_of  # noqa: F401  (re-exported for the commands)

# ---------------------------------------------------------------------------------------------- data


class TransformedSubset(Dataset):
    """Items `indices` of a dataset (which returns decoded images), passed through `transform`."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Any) -> None:
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, target = self.dataset[self.indices[index]]
        return self.transform(image), target


def open_dataset(path: str | Path, classes: Sequence[str] | None = None, *, skip_unknown: bool = False) -> Any:
    """An image folder (`root/<class>/<image>`) or a CSV list, decoded but not transformed; unreadable files dropped.

    With `classes` (the trained class list) classes map by name; images of other classes are refused, naming them,
    unless `skip_unknown`. A root of train/val/test split folders is refused, naming the folders to pass instead.
    """
    from fastprompt.data import CsvDataset, ImageFolderDataset, SkippedImageWarning

    path = Path(path)
    if not path.exists():
        raise UsageError(f"data path {path} does not exist; pass a folder of <class>/<image> files or a CSV list")
    mapping = {} if classes is None else {"classes": classes, "unknown_classes": "skip" if skip_unknown else "error"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        if path.is_file() and path.suffix.lower() == ".csv":
            dataset = CsvDataset(path, **mapping)
        else:
            dataset = ImageFolderDataset(path, **mapping)
        dataset.verify(progress=len(dataset) > 200)  # adds every unreadable image to dataset.skipped
    if dataset.skipped:
        first, reason = next(iter(sorted(dataset.skipped.items())))
        count = len(dataset.skipped)
        print(f"skipped {count} unreadable image(s) in {path}, e.g. {first}: {reason}", file=sys.stderr)
    return dataset


def drop_small_images(dataset: Any, patch: int) -> int:
    """Remove images smaller than one patch on either side (`fastprompt.data.images.too_small`); print how many."""
    from fastprompt.data.images import too_small

    small: list[tuple[str, tuple[int, int]]] = []
    kept = []
    samples = dataset.samples
    for path, target in tqdm(samples, desc="checking image sizes", unit="img", disable=len(samples) <= 200):
        try:
            with Image.open(path) as image:
                size = image.size
        except Exception:  # not a PIL format (e.g. DICOM): decodable, checked by verify()
            size = None
        if size is not None and too_small(size, patch):
            small.append((path, size))
        else:
            kept.append((path, target))
    if small:
        path, (width, height) = small[0]
        print(
            f"skipped {len(small)} image(s) smaller than one {patch}-pixel patch, e.g. {path} ({width}x{height})",
            file=sys.stderr,
        )
        if not kept:
            raise UsageError(
                f"every image in {dataset.source} is smaller than one {patch}-pixel patch; use larger images"
            )
        dataset.samples = kept
    return len(small)


def make_loader(dataset: Dataset, batch_size: int, workers: int, *, shuffle: bool) -> DataLoader:
    """A DataLoader with the CLI's settings."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers)


# ---------------------------------------------------------------------------------------------- FPT feature cache


class CachedFPTItems(Dataset):
    """`((features, side_image), target)` items for training FPT from its feature cache."""

    def __init__(self, features: Dataset) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> tuple[tuple[dict[str, torch.Tensor], torch.Tensor], Any]:
        features, side_image, target = self.features[index]
        return (features, side_image), target


class CachedForward(nn.Module):
    """Runs an FPT model from cached frozen features: `forward(features, side_images)`.

    It holds the FPT's trainable parts under their own names (`fusion`, `side`), so checkpoints load into the FPT.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.fusion, self.side = model.fusion, model.side
        self._run = model.forward_features_cached

    def forward(self, features: dict[str, torch.Tensor], side_images: torch.Tensor) -> torch.Tensor:
        """Logits from cached features and side-branch images."""
        return self._run(features, side_images)


def cached_fpt_sets(
    model: nn.Module, args: argparse.Namespace, train: tuple[Any, Sequence[int]], val: tuple[Any, Sequence[int]]
) -> tuple[Dataset, Dataset]:
    """Fill the cache for the training and validation images (resumable), then datasets that read it."""
    from fastprompt.data import FeatureCache, FeatureDataset, preload, transforms_for_model

    backbone = model.backbone
    frozen_tf = transforms_for_model(backbone, args.img_size, train=False)
    augmentation = getattr(args, "augmentation", None) or {"augment": "fpt"}  # train resolves --augment
    side_train = transforms_for_model(backbone, model.side_input_size, train=True, **augmentation)
    side_eval = transforms_for_model(backbone, model.side_input_size, train=False)
    cache = FeatureCache(args.cache)
    sets = []
    for (source, indices), side_tf in ((train, side_train), (val, side_eval)):
        paths = [source.samples[i][0] for i in indices]
        frozen = TransformedSubset(source, indices, frozen_tf)
        report = preload(
            model, frozen, cache, batch_size=args.batch_size, paths=paths, preprocess=repr(frozen_tf),
            progress=not args.quiet,
        )  # fmt: skip
        sets.append(CachedFPTItems(FeatureDataset(cache, report.keys, TransformedSubset(source, indices, side_tf))))
    return sets[0], sets[1]


# ---------------------------------------------------------------------------------------------- model


def patch_size_of(backbone: nn.Module) -> int:
    """The larger side of the backbone's patch."""
    return int(max(backbone.patch_embed.patch_size))


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers (`fastprompt.models.hub_reachable`: one ≤ 3 s probe per process)."""
    from fastprompt.models import hub_reachable as probe

    return probe()


def use_offline_hub() -> None:
    """Switch huggingface_hub to offline mode (cached files only): no minutes of retries without a network."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # for subprocesses (data loader workers, DeepSpeed launchers)
    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub.is_offline_mode()


def make_backbone(
    name: str, img_size: int, *, pretrained: bool, checkpoint: str | Path | None, model_kwargs: dict[str, Any]
) -> nn.Module:
    """`create_backbone`, saying first where hub weights come from (a download can take minutes to time out)."""
    from fastprompt.models import create_backbone

    if pretrained and not hub_reachable():
        use_offline_hub()  # the local cache or one clear error, at once
    elif pretrained:
        print(
            f"loading timm's pretrained weights for {name} (local cache or the Hugging Face hub; without internet, "
            "use --weights FILE)",
            file=sys.stderr,
        )
    return create_backbone(name, img_size=img_size, pretrained=pretrained, checkpoint=checkpoint, **model_kwargs)


def save_backbone(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write the frozen backbone's state_dict (safetensors, atomically) so that evaluate/explain can rebuild it."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}))


# ---------------------------------------------------------------------------------------------- run folders


def prepare_hub_for(checkpoint: str | Path) -> None:
    """Before rebuilding a run trained with --pretrained: without a network, use the hub offline (cache only)."""
    path = Path(checkpoint)
    folders = (path,) if path.is_dir() else (path.parent, path.parent.parent)
    config = next((folder / CONFIG_NAME for folder in folders if (folder / CONFIG_NAME).is_file()), None)
    if config is None:
        return  # load_run explains what is missing
    try:
        source = json.loads(config.read_text()).get("weights", {}).get("source")
    except (OSError, ValueError, AttributeError):
        return
    if source == "pretrained" and not hub_reachable():
        use_offline_hub()


def load_trained(checkpoint: str | Path, *, trust: bool = False) -> Any:
    """The `fastprompt.serialization.LoadedRun` of a run folder or one of its checkpoints; says which checkpoint.

    A run folder means its best checkpoint (last, with a warning, when the run never had one); the run's frozen
    weight file is verified against the digest recorded at training. `trust`: see ``--trust-checkpoint``.
    """
    from fastprompt.serialization import load_run

    prepare_hub_for(checkpoint)
    run = load_run(checkpoint, trust=trust)
    print(f"checkpoint: {describe_checkpoint(run)}", file=sys.stderr)
    return run


def describe_checkpoint(run: Any) -> str:
    """`RUN/checkpoints/best.pt (epoch 3)`: the file and the training position its weights come from."""
    where = f"epoch {run.epoch}" + (f" + {run.step_in_epoch} steps" if run.step_in_epoch else "")
    return f"{run.checkpoint} ({where})"
