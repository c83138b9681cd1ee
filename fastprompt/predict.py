"""Predictions of a trained run on new images: one row per image with its path, the predicted class name and the
probability of every class (softmax; per-class sigmoid for a multi-label run).

`predict_images` is what `fastprompt predict` writes to CSV, as Python rows::

    rows = fastprompt.predict_images("runs/ept", "new_scans/")
    rows[0]  # {'path': '/.../a.png', 'predicted': 'malignant', 'probability': 0.91,
             #  'prob_benign': 0.09, 'prob_malignant': 0.91}
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

__all__ = ["PROBABILITY_PREFIX", "backbone_of", "class_probabilities", "image_files", "predict_images", "rows_to_csv"]

PROBABILITY_PREFIX = "prob_"  # column of each class's probability: prob_<class name>


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The timm ViT inside a patched model or an FPT wrapper (what sets the input transform and the patch grid)."""
    from fastprompt.methods.fpt import FPT

    return model.backbone if isinstance(model, FPT) else model


def class_probabilities(logits: torch.Tensor, *, multilabel: bool = False) -> torch.Tensor:
    """`[B, C]` class probabilities (float32): softmax over classes, or per-class sigmoid for a multi-label run."""
    logits = logits.float()
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


def image_files(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The images to predict: every image file under a folder (recursively, sorted), or the given files in order."""
    from fastprompt.data.datasets import ImageFolderDataset
    from fastprompt.data.images import IMAGE_EXTENSIONS

    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise ValueError("no images given; pass a folder of images or image files")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = ImageFolderDataset._scan(item, IMAGE_EXTENSIONS)  # the training folders' rule: no hidden files
            if not found:
                raise ValueError(f"{item} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} does not exist; pass a folder of images or existing image files")
    return files


class _Images(Dataset):
    """(index, transformed image, None) for admitted files; (index, None, (kind, reason)) for the others.

    kind is "unreadable" or "too small" (train's admission rule); either gives a row without a score.
    """

    def __init__(self, paths: Sequence[Path], transform: Any, patch: int) -> None:
        self.paths, self.transform, self.patch = list(paths), transform, patch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Any, tuple[str, str] | None]:
        from fastprompt.data.images import CorruptImageError, image_size, load_image, too_small

        try:
            image = load_image(self.paths[index])
        except CorruptImageError as err:  # also an image too large to decode (PIL's decompression-bomb guard)
            return index, None, ("unreadable", err.reason)
        reason = too_small(image_size(image), self.patch)
        if reason is not None:
            return index, None, ("too small", reason)
        return index, self.transform(image), None


def _collate(
    items: list[tuple[int, Any, tuple[str, str] | None]],
) -> tuple[list[int], torch.Tensor | None, dict[int, tuple[str, str]]]:
    good = [(index, image) for index, image, _ in items if image is not None]
    errors = {index: error for index, _, error in items if error is not None}
    images = torch.stack([image for _, image in good]) if good else None
    return [index for index, _ in good], images, errors


def predict_images(
    run: str | os.PathLike | Any,
    data: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    positive_class: str | None = None,
) -> list[dict[str, Any]]:
    """Predict every image of `data` (a folder, searched recursively, or image files) with a trained run.

    `run`: a `fastprompt train` run folder or checkpoint file (its best checkpoint), or a
    `fastprompt.serialization.LoadedRun`. Returns one dict per decodable image, in input order: ``path``,
    ``predicted`` (class name; for a multi-label run the names with probability >= 0.5 joined by ``;``),
    ``probability`` (of the predicted class; multi-label: the highest), ``prob_<class>`` for every class and
    ``error``: empty, or why the image has no prediction: it could not be read (too large to decode, corrupt, not
    an image) or train would not admit it (smaller than one patch). Such rows have an empty prediction and no
    probabilities, and are named in a SkippedImageWarning. With `positive_class` (a class name of a single-label
    run; default: the run's recorded one) rows also hold ``positive_class`` and ``positive_probability``, the
    probability of that class.
    """
    from fastprompt.data import SkippedImageWarning, transforms_for_model
    from fastprompt.run_folders import recorded_option
    from fastprompt.serialization import load_run

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    loaded = run if hasattr(run, "model") and hasattr(run, "classes") else load_run(run)
    paths = image_files(data)
    model, classes = loaded.model, list(loaded.classes)
    multilabel = bool(loaded.config.get("multilabel"))
    if positive_class is None:
        positive_class = recorded_option(loaded.config, "positive_class")
    if positive_class is not None and (multilabel or positive_class not in classes):
        raise ValueError(
            f"positive_class {positive_class!r} must be one of the classes {classes} of a single-label run"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model.to(device).eval()
    transform = transforms_for_model(backbone_of(model), loaded.config["img_size"], train=False)
    patch = int(max(backbone_of(model).patch_embed.patch_size))
    loader = DataLoader(
        _Images(paths, transform, patch), batch_size=batch_size, num_workers=workers, shuffle=False,
        collate_fn=_collate,
    )  # fmt: skip
    probabilities: dict[int, torch.Tensor] = {}
    unreadable: dict[int, str] = {}
    refused: dict[int, str] = {}
    with torch.no_grad(), tqdm(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
        for indices, images, errors in loader:
            for index, (kind, reason) in errors.items():
                (unreadable if kind == "unreadable" else refused)[index] = reason
            if images is not None:
                probs = class_probabilities(model(images.to(device)), multilabel=multilabel)
                probabilities.update(zip(indices, probs.cpu()))
            bar.update(len(indices) + len(errors))
    if unreadable:
        listed = "; ".join(f"{paths[index]}: {unreadable[index]}" for index in sorted(unreadable))
        warnings.warn(f"{len(unreadable)} image(s) could not be read and have no prediction: {listed}",
                      SkippedImageWarning, stacklevel=2)  # fmt: skip
    if refused:
        warnings.warn(
            f"{len(refused)} image(s) are too small for the model (train leaves such images out); their rows have "
            "no prediction and say why in the 'error' column",
            SkippedImageWarning,
            stacklevel=2,
        )
    rows = []
    for index in range(len(paths)):
        reason = unreadable.get(index, refused.get(index))
        if reason is not None:
            row = {"path": str(paths[index].resolve()), "predicted": "", "probability": None}
            row.update({f"{PROBABILITY_PREFIX}{name}": None for name in classes})
            if positive_class is not None:
                row.update(positive_class=positive_class, positive_probability=None)
            rows.append({**row, "error": reason})
            continue
        probs = probabilities[index]
        if multilabel:
            chosen = [name for name, p in zip(classes, probs.tolist()) if p >= 0.5]
            predicted, probability = ";".join(chosen), float(probs.max())
        else:
            best = int(probs.argmax())
            predicted, probability = classes[best], float(probs[best])
        row = {"path": str(paths[index].resolve()), "predicted": predicted, "probability": probability}
        row.update({f"{PROBABILITY_PREFIX}{name}": float(p) for name, p in zip(classes, probs.tolist())})
        if positive_class is not None:
            row.update(positive_class=positive_class, positive_probability=float(probs[classes.index(positive_class)]))
        rows.append({**row, "error": ""})
    return rows


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV text with a header (columns in row order)."""
    if not rows:
        raise ValueError("no predictions to write (no image could be read)")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
