"""The `fastprompt` command line: train, evaluate, preload, bench, explain and demo.

A training run directory (``--output-dir``) holds ``config.json`` (everything needed to rebuild the model),
``metrics.json`` (final validation metrics), the Engine's ``metrics.jsonl``, ``curves.png`` and
``checkpoints/{best,last}.pt``, and, for a randomly initialised backbone, ``backbone.safetensors`` (its frozen
weights, which checkpoints do not hold). ``metrics.json`` is measured with the model as it ends training (the
``last`` checkpoint); ``evaluate`` takes either checkpoint. FPT methods can train from the feature cache
(``--cache DIR``, filled by ``preload`` or on the fly): the frozen branch then runs once per image. Without
``--val`` a stratified ``--val-fraction`` of ``--data`` (20 % by default, per class, fixed by ``--seed``) is held
out for validation. Mistakes a user can fix end with one message and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import fastprompt
from fastprompt.io import atomic_write_bytes

EXIT_USAGE = 2
EXIT_FAILURE = 1
OUT_OF_MEMORY_HINT = (
    "; lower --batch-size (with --grad-accum to keep the effective batch), use --precision bf16, --zero-stage 2/3, "
    "or FPT+ with --cache"
)
CONFIG_NAME = "config.json"
BACKBONE_FILE = "backbone.safetensors"
FPT_METHODS = ("fpt", "fpt+")
METHOD_FLAGS = {  # convenience flags -> method option names (anything else: --option key=value)
    "prompt_length": "--prompt-length",
    "rank": "--rank",
    "num_tokens": "--num-tokens",
    "num_prompts": "--num-prompts",
    "token_ratio": "--token-ratio",
}


class UsageError(ValueError):
    """A mistake in the command line or the data that the user can fix."""


# ---------------------------------------------------------------------------------------------- option parsing


def parse_key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """`key=value` strings to a dict; values are Python literals (2, 0.5, True, [6, 7]) or plain strings."""
    result: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UsageError(f"{flag} expects key=value (e.g. {flag} depth=2), got {item!r}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        result[key] = value
    return result


def _flatten(groups: Sequence[Sequence[str]] | None) -> list[str]:
    return [item for group in groups or () for item in group]


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options given by the convenience flags and --option key=value."""
    options = {name: getattr(args, name) for name in METHOD_FLAGS if getattr(args, name, None) is not None}
    for key, value in parse_key_values(_flatten(args.option), "--option").items():
        if key in options:
            raise UsageError(f"method option {key!r} is given twice ({METHOD_FLAGS[key]} and --option); keep one")
        options[key] = value
    return options


def check_method(name: str) -> str:
    """The registered method name, or a UsageError listing the valid ones."""
    from fastprompt.methods.registry import get_method

    return get_method(name).name


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


def open_dataset(path: str | Path, classes: Sequence[str] | None = None) -> Any:
    """An image folder (`root/<class>/<image>`) or a CSV list, decoded but not transformed; unreadable files dropped."""
    from fastprompt.data import CsvDataset, ImageFolderDataset, SkippedImageWarning

    path = Path(path)
    if not path.exists():
        raise UsageError(f"data path {path} does not exist; pass a folder of <class>/<image> files or a CSV list")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        if path.is_file() and path.suffix.lower() == ".csv":
            dataset = CsvDataset(path, classes=classes)
        else:
            dataset = ImageFolderDataset(path, classes=classes)
        dropped = dict(dataset.skipped)
        dropped.update(dataset.verify(progress=len(dataset) > 200))
    if dropped:
        first, reason = next(iter(dropped.items()))
        print(f"skipped {len(dropped)} unreadable image(s) in {path}, e.g. {first}: {reason}", file=sys.stderr)
    return dataset


def drop_small_images(dataset: Any, patch: int) -> int:
    """Remove images smaller than one patch on either side; print and return how many."""
    small: list[tuple[str, tuple[int, int]]] = []
    kept = []
    samples = dataset.samples
    for path, target in tqdm(samples, desc="checking image sizes", unit="img", disable=len(samples) <= 200):
        try:
            with Image.open(path) as image:
                size = image.size
        except Exception:  # not a PIL format (e.g. DICOM): decodable, checked by verify()
            size = None
        if size is not None and min(size) < patch:
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
    side_train = transforms_for_model(backbone, model.side_input_size, train=True, augment="fpt")
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


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm ViT inside a patched model or an FPT wrapper."""
    return model.backbone if isinstance(model, fastprompt.FPT) else model


def make_backbone(
    name: str, img_size: int, *, pretrained: bool, checkpoint: str | Path | None, model_kwargs: dict[str, Any]
) -> nn.Module:
    """`create_backbone`, saying first where hub weights come from (a download can take minutes to time out)."""
    from fastprompt.models import create_backbone

    if pretrained:
        print(
            f"loading timm's pretrained weights for {name} (local cache or the Hugging Face hub; without internet, "
            "use --checkpoint FILE)",
            file=sys.stderr,
        )
    return create_backbone(name, img_size=img_size, pretrained=pretrained, checkpoint=checkpoint, **model_kwargs)


def build_model(config: dict[str, Any], run_dir: Path | None = None) -> nn.Module:
    """Rebuild the backbone and apply the method exactly as `config` (a run's config.json) describes."""
    weights = config["weights"]
    checkpoint = weights.get("file")
    if checkpoint is not None and run_dir is not None and not Path(checkpoint).is_absolute():
        checkpoint = run_dir / checkpoint
    torch.manual_seed(config["seed"])
    backbone = make_backbone(
        config["model"],
        config["img_size"],
        pretrained=weights["source"] == "pretrained",
        checkpoint=checkpoint,
        model_kwargs=config["model_kwargs"],
    )
    return fastprompt.apply(backbone, config["method"], num_classes=len(config["classes"]), **config["method_options"])


def save_backbone(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write the frozen backbone's state_dict (safetensors, atomically) so that evaluate/explain can rebuild it."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}))


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (NaN written as null)."""
    atomic_write_bytes(path, (json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n").encode())


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (np.integer, np.floating)):
        return _json_safe(value.item())
    return value


def find_run(checkpoint: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """(checkpoint file, run directory, config) for a checkpoint file or a run directory written by `train`."""
    path = Path(checkpoint)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist; pass OUT/checkpoints/best.pt of a `fastprompt train` run")
    if path.is_dir():
        candidates = [path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UsageError(f"{path} holds no checkpoints/best.pt or checkpoints/last.pt; train first")
        path = found
    for folder in (path.parent, path.parent.parent):
        if (folder / CONFIG_NAME).is_file():
            config = json.loads((folder / CONFIG_NAME).read_text())
            return path, folder, config
    raise UsageError(
        f"no {CONFIG_NAME} next to {path} or in its parent folder; pass a checkpoint written by `fastprompt train` "
        "(OUT/checkpoints/best.pt), whose run folder holds the config to rebuild the model"
    )


def load_run(checkpoint: str | Path) -> tuple[nn.Module, Any, dict[str, Any], Path]:
    """Rebuild a trained model: (model with trained parameters, its Engine, config, run directory)."""
    from fastprompt.engine import Engine

    path, run_dir, config = find_run(checkpoint)
    model = build_model(config, run_dir)
    engine = Engine.load(path, model, output_dir=None, backend="torch", zero_stage=0, progress=False)
    return model, engine, config, run_dir


# ---------------------------------------------------------------------------------------------- reporting


def format_metrics(metrics: dict[str, Any], classes: Sequence[str]) -> str:
    """A two-column text table of the scalar metrics and the per-class AUC/AP."""
    rows: list[tuple[str, str]] = []
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            rows.append((key, f"{value:.4f}" if math.isfinite(value) else "n/a"))
    for key in ("per_class_auc", "per_class_ap"):
        for name, value in (metrics.get(key) or {}).items():
            label = classes[int(name)] if name.isdigit() and int(name) < len(classes) else name
            rows.append((f"{key.removeprefix('per_class_')}[{label}]", f"{value:.4f}"))
    skipped = metrics.get("skipped_classes") or []
    if skipped:
        rows.append(("skipped classes", ", ".join(classes[int(s)] if s.isdigit() else s for s in skipped)))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- commands


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """`fastprompt train`: build, train, evaluate; returns the final validation metrics."""
    from fastprompt.data import make_few_shot_splits, train_val_split, transforms_for_model
    from fastprompt.engine import Engine

    method = check_method(args.method)
    if args.cache is not None and method not in FPT_METHODS:
        raise UsageError(f"--cache holds FPT frozen-branch features; use it with --method fpt+ or fpt, not {method!r}")
    options = method_options(args)
    model_kwargs = parse_key_values(_flatten(args.model_kwargs), "--model-kwargs")
    out = Path(args.output_dir)
    if not args.resume and (out / "checkpoints" / "last.pt").is_file():
        raise UsageError(
            f"{out} already holds a training run (checkpoints/last.pt); pass --resume to continue it, or choose "
            "another --output-dir"
        )
    torch.manual_seed(args.seed)
    saved_backbone = out / BACKBONE_FILE
    random_init = not args.pretrained and args.checkpoint is None
    weights_file = saved_backbone if random_init and args.resume and saved_backbone.is_file() else args.checkpoint
    backbone = make_backbone(
        args.model, args.img_size, pretrained=args.pretrained, checkpoint=weights_file, model_kwargs=model_kwargs
    )
    data = open_dataset(args.data)
    patch = patch_size_of(backbone)
    drop_small_images(data, patch)
    if args.val is not None:
        val_data = open_dataset(args.val, classes=data.classes)
        drop_small_images(val_data, patch)
        train_idx, val_idx, val_source = list(range(len(data))), list(range(len(val_data))), val_data
    else:
        train_idx, val_idx = train_val_split(data.targets, args.val_fraction, args.seed)
        val_source = data
    if args.shots is not None:
        labels = np.asarray(data.targets)
        exclude = None if args.val is not None else val_idx
        train_idx = make_few_shot_splits(labels, args.shots, args.seed, exclude=exclude)[(args.shots, args.seed)]

    frozen_state = backbone.state_dict()  # before the method patches the model; values are not changed by it
    model = fastprompt.apply(backbone, method, num_classes=len(data.classes), **options)
    trainable, total = fastprompt.count_parameters(model)
    out.mkdir(parents=True, exist_ok=True)
    if random_init:
        save_backbone(frozen_state, saved_backbone)
        weights = {"source": "random", "file": BACKBONE_FILE}
    elif args.pretrained:
        weights = {"source": "pretrained", "file": None}
    else:
        weights = {"source": "file", "file": str(Path(args.checkpoint).resolve())}

    if args.cache is not None:
        train_set, val_set = cached_fpt_sets(model, args, (data, train_idx), (val_source, val_idx))
        trained = CachedForward(model)
    else:
        augment = "fpt" if method in FPT_METHODS else "ept"
        train_tf = transforms_for_model(backbone, args.img_size, train=True, augment=augment)
        eval_tf = transforms_for_model(backbone, args.img_size, train=False)
        train_set, val_set = (
            TransformedSubset(data, train_idx, train_tf),
            TransformedSubset(val_source, val_idx, eval_tf),
        )
        trained = model
    train_loader = make_loader(train_set, args.batch_size, args.workers, shuffle=True)
    val_loader = make_loader(val_set, args.batch_size, args.workers, shuffle=False)

    engine_options = dict(
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        warmup_steps=args.warmup_steps,
        precision=args.precision,
        zero_stage=args.zero_stage,
        grad_accum=args.grad_accum,
        clip_grad=args.clip_grad,
        backend=args.backend,
        seed=args.seed,
    )
    config = {
        "fastprompt_version": fastprompt.__version__,
        "model": args.model,
        "model_kwargs": model_kwargs,
        "img_size": args.img_size,
        "weights": weights,
        "method": method,
        "method_options": options,
        "classes": list(data.classes),
        "multilabel": bool(data.multilabel),
        "data": str(Path(args.data).resolve()),
        "val": str(Path(args.val).resolve()) if args.val is not None else None,
        "val_fraction": None if args.val is not None else args.val_fraction,
        "shots": args.shots,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "train_size": len(train_idx),
        "val_size": len(val_idx),
        "cache": str(Path(args.cache).resolve()) if args.cache is not None else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "engine": engine_options,
    }
    write_json(out / CONFIG_NAME, config)
    print(
        f"{method} on {args.model}: {trainable:,} trainable of {total:,} parameters; "
        f"{len(train_idx)} training and {len(val_idx)} validation images, {len(data.classes)} classes",
        file=sys.stderr,
    )
    engine = Engine(trained, output_dir=out, progress=not args.quiet, **engine_options)
    engine.fit(train_loader, val_loader, resume=args.resume)
    metrics = engine.evaluate(val_loader)
    write_json(out / "metrics.json", metrics)
    print(format_metrics(metrics, data.classes))
    print(f"run written to {out}", file=sys.stderr)
    return metrics


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """`fastprompt evaluate`: metrics of a trained checkpoint on a dataset."""
    from fastprompt.data import transforms_for_model

    model, engine, config, run_dir = load_run(args.checkpoint)
    backbone = backbone_of(model)
    data = open_dataset(args.data, classes=config["classes"])
    drop_small_images(data, patch_size_of(backbone))
    eval_tf = transforms_for_model(backbone, config["img_size"], train=False)
    loader = make_loader(
        TransformedSubset(data, range(len(data)), eval_tf), args.batch_size or config["batch_size"], args.workers,
        shuffle=False,
    )  # fmt: skip
    metrics = engine.evaluate(loader)
    output = Path(args.output) if args.output else run_dir / f"evaluate_{Path(args.data).stem}.json"
    write_json(output, {"checkpoint": str(Path(args.checkpoint).resolve()), "data": str(args.data), **metrics})
    print(format_metrics(metrics, config["classes"]))
    print(f"metrics written to {output}", file=sys.stderr)
    return metrics


def run_preload(args: argparse.Namespace) -> Any:
    """`fastprompt preload`: fill the FPT feature cache for every image of a dataset (resumable)."""
    from fastprompt.data import FeatureCache, preload, transforms_for_model

    method = check_method(args.method)
    if method not in FPT_METHODS:
        raise UsageError(f"preload fills the FPT feature cache; use --method fpt+ or fpt, not {method!r}")
    options = method_options(args)
    model_kwargs = parse_key_values(_flatten(args.model_kwargs), "--model-kwargs")
    torch.manual_seed(args.seed)
    backbone = make_backbone(
        args.model, args.img_size, pretrained=args.pretrained, checkpoint=args.checkpoint, model_kwargs=model_kwargs
    )
    data = open_dataset(args.data)
    drop_small_images(data, patch_size_of(backbone))
    model = fastprompt.apply(backbone, method, num_classes=len(data.classes), **options)
    eval_tf = transforms_for_model(backbone, args.img_size, train=False)
    cache = FeatureCache(args.cache, dtype=getattr(torch, args.dtype))
    paths = [path for path, _ in data.samples]
    return preload(
        model,
        TransformedSubset(data, range(len(data)), eval_tf),
        cache,
        batch_size=args.batch_size,
        paths=paths,
        preprocess=repr(eval_tf),
        progress=not args.quiet,
    )


def run_bench(args: argparse.Namespace) -> Any:
    """`fastprompt bench SUITE ARGS...`: run `benchmarks.SUITE`'s main with the remaining arguments."""
    import importlib
    import pkgutil

    for root in (Path.cwd(), Path(fastprompt.__file__).resolve().parent.parent):  # a checkout / editable install
        if (root / "benchmarks" / "__init__.py").is_file() and str(root) not in sys.path:
            sys.path.append(str(root))
            break
    try:
        benchmarks = importlib.import_module("benchmarks")
    except ImportError:
        raise UsageError(
            "the benchmarks package is not importable: it ships with the source repository, not the wheel; run "
            "`fastprompt bench` from a checkout of fastprompt (its root folder holds benchmarks/)"
        ) from None
    suites = sorted(info.name for info in pkgutil.iter_modules(benchmarks.__path__) if not info.name.startswith("_"))
    if args.suite not in suites:
        raise UsageError(f"unknown benchmark suite {args.suite!r}; available: {', '.join(suites)}")
    module = importlib.import_module(f"benchmarks.{args.suite}")
    if not hasattr(module, "main"):
        raise UsageError(f"benchmarks.{args.suite} is a helper module, not a suite; available: {', '.join(suites)}")
    return module.main(list(args.args))


def run_explain(args: argparse.Namespace) -> list[Path]:
    """`fastprompt explain`: PNG overlays of EPT scaling maps or FPT selected tokens, one per image."""
    from fastprompt.data import transforms_for_model
    from fastprompt.explain import explain_images

    model, _, config, _ = load_run(args.checkpoint)
    backbone = backbone_of(model)
    eval_tf = transforms_for_model(backbone, config["img_size"], train=False)
    written = explain_images(model, [Path(p) for p in args.images], Path(args.output_dir), eval_tf, batch_size=4)
    for path in written:
        print(path)
    return written


def unused_path(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... — the first that does not exist yet."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """`fastprompt demo`: generate the synthetic task, then train and evaluate on it through `train`."""
    from fastprompt.demo import demo_train_args, write_synthetic_dataset

    output = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="fastprompt-demo-"))
    data_dir, run_dir = unused_path(output / "data"), unused_path(output / "run")  # never mix with an earlier demo
    write_synthetic_dataset(
        data_dir, images_per_class=args.images_per_class, size=args.size, seed=args.seed, progress=not args.quiet
    )
    method = args.method or ("ept" if "ept" in fastprompt.available_methods() else "lora")
    train_argv = demo_train_args(
        data_dir, run_dir, method=method, epochs=args.epochs, img_size=args.img_size, seed=args.seed
    )
    train_argv += [f"--option={item}" for item in _flatten(args.option)]
    if args.quiet:
        train_argv.append("--quiet")
    print(f"demo: fastprompt {' '.join(train_argv)}", file=sys.stderr)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # tiny ops: extra threads only wait on each other on a busy CPU
    try:
        return run_train(build_parser().parse_args(train_argv))
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------- parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="timm model name, e.g. vit_base_patch16_384")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights")
    weights.add_argument("--checkpoint", help="local weight file (safetensors/PyTorch state_dict) loaded through timm")
    parser.add_argument(
        "--model-kwargs",
        action="append",
        nargs="+",
        metavar="KEY=VALUE",
        help="timm constructor overrides, e.g. depth=2",
    )
    parser.add_argument("--img-size", type=int, default=512, help="input resolution (default 512)")
    parser.add_argument(
        "--method", default="ept", help=f"one of {', '.join(fastprompt.available_methods())} (default: %(default)s)"
    )
    parser.add_argument("--prompt-length", dest="prompt_length", type=int, help="EPT prompt length")
    parser.add_argument("--rank", type=int, help="LoRA rank")
    parser.add_argument("--num-tokens", dest="num_tokens", type=int, help="VPT prompt tokens")
    parser.add_argument("--num-prompts", dest="num_prompts", type=int, help="FPT prompts per layer")
    parser.add_argument("--token-ratio", dest="token_ratio", type=float, help="FPT share of tokens kept")
    parser.add_argument(
        "--option", action="append", nargs="+", metavar="KEY=VALUE", help="any other method option, e.g. deep=True"
    )
    parser.add_argument("--seed", type=int, default=0)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fastprompt", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--version", action="version", version=f"fastprompt {fastprompt.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a method on an image folder")
    train.add_argument("--data", required=True, help="folder of <class>/<image> files, or a CSV list")
    train.add_argument("--val", help="validation folder/CSV (default: hold out --val-fraction of --data)")
    train.add_argument(
        "--val-fraction", type=float, default=0.2, help="held-out share without --val (stratified per class; 0.2)"
    )
    train.add_argument("--shots", type=int, help="train on K images per class (few-shot), drawn with --seed")
    _add_model_args(train)
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--clip-grad", type=float)
    train.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    train.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    train.add_argument("--backend", default="auto", choices=("auto", "deepspeed", "torch"))
    train.add_argument("--workers", type=int, default=2, help="data loading processes")
    train.add_argument("--output-dir", required=True)
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    train.add_argument("--cache", help="FPT feature cache folder: frozen features computed once (see preload)")
    _add_common(train)
    train.set_defaults(handler=run_train)

    evaluate = commands.add_parser("evaluate", help="metrics of a trained checkpoint on a dataset")
    evaluate.add_argument("--checkpoint", required=True, help="OUT/checkpoints/best.pt of a train run (or OUT)")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument("--workers", type=int, default=2)
    evaluate.add_argument("--output", help="metrics JSON (default: RUN/evaluate_<data name>.json)")
    _add_common(evaluate)
    evaluate.set_defaults(handler=run_evaluate)

    preload = commands.add_parser("preload", help="fill the FPT feature cache (resumable)")
    preload.add_argument("--data", required=True)
    _add_model_args(preload)
    preload.set_defaults(method="fpt+")
    preload.add_argument("--cache", required=True, help="cache folder")
    preload.add_argument("--batch-size", type=int, default=8)
    preload.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    _add_common(preload)
    preload.set_defaults(handler=run_preload)

    bench = commands.add_parser("bench", help="run a benchmark suite: fastprompt bench SUITE [ARGS...]")
    bench.add_argument("suite", help="module of the benchmarks package, e.g. memory")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the suite")
    bench.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    bench.set_defaults(handler=run_bench)

    explain = commands.add_parser("explain", help="PNG overlays of EPT scaling maps / FPT selected tokens")
    explain.add_argument("--checkpoint", required=True)
    explain.add_argument("images", nargs="+", metavar="IMAGE")
    explain.add_argument("--output-dir", required=True)
    _add_common(explain)
    explain.set_defaults(handler=run_explain)

    demo = commands.add_parser("demo", help="train on a built-in synthetic high-resolution task (a few minutes, CPU)")
    demo.add_argument("--method", help="default: ept (lora when EPT is unavailable)")
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--images-per-class", type=int, default=30)
    demo.add_argument("--size", type=int, default=256, help="generated image size")
    demo.add_argument("--img-size", type=int, default=256, help="model input size")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the model is tiny)")
    demo.add_argument("--option", action="append", nargs="+", metavar="KEY=VALUE", help="method options")
    demo.add_argument("--output-dir", help="default: a new temporary folder")
    _add_common(demo)
    demo.set_defaults(handler=run_demo)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types shown as a one-line message (exit code 2) rather than a traceback."""
    from fastprompt.data import CorruptImageError
    from fastprompt.engine.checkpoint import CheckpointError

    return (ValueError, TypeError, FileNotFoundError, NotADirectoryError, CorruptImageError, CheckpointError)


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Library warnings as one line each (no source excerpt), above any progress bar."""
    tqdm.write(f"fastprompt: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastprompt` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args.handler(args)
    except KeyboardInterrupt:
        print("fastprompt: interrupted", file=sys.stderr)
        return 130
    except user_errors() as err:
        if args.debug:
            raise
        tqdm.write(f"fastprompt {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (FloatingPointError, MemoryError, torch.OutOfMemoryError) as err:
        if args.debug:
            raise
        hint = OUT_OF_MEMORY_HINT if not isinstance(err, FloatingPointError) else ""
        tqdm.write(f"fastprompt {args.command}: failed: {type(err).__name__}: {err}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    return 0
