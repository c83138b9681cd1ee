"""`fastprompt train`: build a backbone, apply a method, train it with the Engine and write the run folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fastprompt.cli.common import (
    BACKBONE_FILE,
    CONFIG_NAME,
    CSV_FORMAT,
    FPT_METHODS,
    UsageError,
    add_command,
    add_common,
    add_model_args,
    check_method,
    flatten,
    format_metrics,
    fraction,
    method_options,
    non_negative_float,
    non_negative_int,
    parse_key_values,
    positive_float,
    positive_int,
    write_json,
)


def add_parser(commands: Any) -> None:
    """Register the `train` subcommand."""
    parser = add_command(
        commands,
        "train",
        "train a method on an image folder or CSV list",
        f"{CSV_FORMAT}\n\nThe run folder (--output-dir) gets config.json, metrics.json, metrics.jsonl, curves.png and "
        "checkpoints/{best,last}.pt. Ctrl-C saves a checkpoint mid-epoch and prints the --resume command.",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="training images: a folder of <class>/<image> files or a CSV list (format above)",
    )
    parser.add_argument(
        "--val", metavar="PATH", help="validation folder/CSV (default: hold out --val-fraction of --data)"
    )
    parser.add_argument(
        "--skip-unknown-classes",
        action="store_true",
        help="leave out --val images of classes --data does not have (default: refuse them, naming the classes)",
    )
    parser.add_argument(
        "--val-fraction", type=fraction, default=0.2, help="held-out share without --val, stratified per class"
    )
    parser.add_argument(
        "--shots", type=positive_int, help="train on K images per class, drawn with --seed (default: all images)"
    )
    add_model_args(parser)
    parser.add_argument("--epochs", type=positive_int, default=20, help="passes over the training images")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per micro-batch")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate (cosine schedule)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="decoupled weight decay")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="optimizer")
    parser.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear warm-up optimizer steps")
    parser.add_argument(
        "--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step (gradient accumulation)"
    )
    parser.add_argument(
        "--clip-grad", type=positive_float, help="clip the global gradient L2 norm to this value (default: no clipping)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="auto: bf16 on a GPU that supports it, else fp32",
    )
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (0: off)")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "deepspeed", "torch"),
        help="auto: DeepSpeed when installed and useful (GPU, several ranks or ZeRO), else plain PyTorch",
    )
    parser.add_argument(
        "--activation-memory",
        metavar="SIZE",
        help="fit each training step into SIZE (e.g. 8GB; auto: the device's free memory) by recomputing the fewest "
        "activations in backward (chosen from a measured step; any backend) (default: keep them all)",
    )
    parser.add_argument("--workers", type=non_negative_int, default=2, help="data loading processes (0: in-process)")
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="run folder to write")
    parser.add_argument(
        "--copy-weights",
        action="store_true",
        help="copy the --checkpoint FILE into RUN/weights/ (evaluate and explain then read the copy; by default the "
        "run records the file's path and SHA-256 and checks it on every load)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its checkpoints/last.pt"
    )
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="FPT feature cache folder: frozen-branch features computed once, see `preload` (default: no cache)",
    )
    add_common(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`fastprompt train`: build, train, evaluate; returns the final validation metrics."""
    import numpy as np
    import torch

    import fastprompt
    from fastprompt.cli.runs import (
        CachedForward,
        TransformedSubset,
        cached_fpt_sets,
        drop_small_images,
        make_backbone,
        make_loader,
        open_dataset,
        patch_size_of,
        save_backbone,
    )
    from fastprompt.data import make_few_shot_splits, train_val_split, transforms_for_model, write_unreadable
    from fastprompt.engine import Engine, TrainingInterrupted

    method = check_method(args.method)
    if args.cache is not None and method not in FPT_METHODS:
        raise UsageError(f"--cache holds FPT frozen-branch features; use it with --method fpt+ or fpt, not {method!r}")
    options = method_options(args)
    model_kwargs = parse_key_values(flatten(args.model_kwargs), "--model-kwargs")
    out = Path(args.output_dir)
    if not args.resume and (out / "checkpoints" / "last.pt").is_file():
        raise UsageError(
            f"{out} already holds a training run (checkpoints/last.pt); pass --resume to continue it, or choose "
            "another --output-dir"
        )
    if args.copy_weights and args.checkpoint is None:
        raise UsageError("--copy-weights copies the --checkpoint FILE into the run; pass --checkpoint FILE with it")
    digest = check_weights_file(args, out)
    data = open_dataset(args.data)  # data mistakes (a train/val/test root, one class) before any model is built
    val_data = None
    if args.val is not None:
        val_data = open_dataset(args.val, classes=data.classes, skip_unknown=args.skip_unknown_classes)
    torch.manual_seed(args.seed)
    saved_backbone = out / BACKBONE_FILE
    random_init = not args.pretrained and args.checkpoint is None
    weights_file = saved_backbone if random_init and args.resume and saved_backbone.is_file() else args.checkpoint
    backbone = make_backbone(
        args.model, args.img_size, pretrained=args.pretrained, checkpoint=weights_file, model_kwargs=model_kwargs
    )
    patch = patch_size_of(backbone)
    drop_small_images(data, patch)
    if val_data is not None:
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
    unreadable = write_unreadable(out / UNREADABLE_FILE, data, *([val_data] if val_data is not None else []))
    if unreadable:
        print(f"the {unreadable} unreadable image(s) are listed in {out / UNREADABLE_FILE}", file=sys.stderr)
    if random_init:
        save_backbone(frozen_state, saved_backbone)
        weights = {"source": "random", "file": BACKBONE_FILE}
    elif args.pretrained:
        weights = {"source": "pretrained", "file": None}
    elif args.copy_weights:
        copied = copy_weights(Path(args.checkpoint), out / WEIGHTS_DIR, digest)
        weights = {"source": "file", "file": copied.relative_to(out).as_posix(), "sha256": digest}
        weights["copied_from"] = str(Path(args.checkpoint).resolve())
    else:
        weights = {"source": "file", "file": str(Path(args.checkpoint).resolve()), "sha256": digest}

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
        activation_memory=args.activation_memory,
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
    engine = Engine(trained, output_dir=out, progress=not args.quiet, class_names=data.classes, **engine_options)
    try:
        history = engine.fit(
            train_loader, val_loader, resume=args.resume, on_epoch_end=lambda record: print_epoch(record, engine)
        )
    except TrainingInterrupted as interrupt:
        print(f"fastprompt train: {interrupt}", file=sys.stderr)
        if interrupt.checkpoint:
            print(f"resume with: {resume_command(args)}", file=sys.stderr)
        raise
    metrics = engine.evaluate(val_loader)
    write_json(out / "metrics.json", metrics)
    print(f"final model (checkpoints/last.pt, epoch {len(history)}):")
    print(format_metrics(metrics, data.classes))
    print(best_summary(engine, out))
    print(f"run written to {out}", file=sys.stderr)
    return metrics


WEIGHTS_DIR = "weights"
UNREADABLE_FILE = "unreadable.csv"


def check_weights_file(args: argparse.Namespace, out: Path) -> str | None:
    """The --checkpoint file's SHA-256; on --resume, an error when it is not the file the run started with."""
    import json

    from fastprompt.io import sha256_file

    if args.checkpoint is None:
        return None
    if not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint} is not a file; pass a safetensors/PyTorch weight file")
    digest = sha256_file(args.checkpoint)
    config = out / CONFIG_NAME
    if args.resume and config.is_file():
        recorded = json.loads(config.read_text()).get("weights", {}).get("sha256")
        if recorded is not None and recorded != digest:
            raise UsageError(
                f"--checkpoint {args.checkpoint} is not the weight file this run started with (SHA-256 "
                f"{digest[:16]}…, the run recorded {recorded[:16]}…); resume with the original file"
            )
    return digest


def copy_weights(source: Path, folder: Path, digest: str) -> Path:
    """Copy the weight file into the run (atomically, verified by its digest); returns the copy's path."""
    import os
    import shutil
    import tempfile

    from fastprompt.io import sha256_file

    target = folder / source.name
    if target.is_file() and sha256_file(target) == digest:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{source.name}.", suffix=".tmp")
    os.close(handle)
    try:
        shutil.copyfile(source, temporary)
        if sha256_file(temporary) != digest:
            raise OSError(f"copying {source} to {target} produced different bytes; check the disk and retry")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


SHOWN_METRICS = ("train_loss", "val_loss", "val_acc", "val_auc", "val_map")


def epoch_line(record: dict[str, Any], epochs: int, best_epoch: int | None) -> str:
    """One line per epoch: losses and validation metrics, the best epoch marked."""
    values = "  ".join(f"{key} {record[key]:.4f}" for key in SHOWN_METRICS if isinstance(record.get(key), float))
    mark = "  * best" if best_epoch == record["epoch"] else ""
    return f"epoch {record['epoch']}/{epochs}  {values}  ({record.get('time_s', 0.0):.1f} s){mark}"


def print_epoch(record: dict[str, Any], engine: Any) -> None:
    """Print an epoch's line above the progress bars."""
    from tqdm.auto import tqdm

    best = engine.state.get("best")
    tqdm.write(epoch_line(record, engine.config["epochs"], best["epoch"] if best else None))


def best_summary(engine: Any, out: Path) -> str:
    """Which checkpoint is best, at which epoch, with its validation metrics."""
    best = engine.state.get("best")
    path = out / "checkpoints" / "best.pt"
    if not best or not path.is_file():
        return "no best checkpoint (no finite validation metric); use checkpoints/last.pt"
    record = next((r for r in engine.history if r.get("epoch") == best["epoch"]), {})
    values = ", ".join(f"{key} {record[key]:.4f}" for key in SHOWN_METRICS if isinstance(record.get(key), float))
    return f"best checkpoint: {path} (epoch {best['epoch']}, best {best['metric']}; {values})"


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run."""
    import shlex

    argv = list(getattr(args, "argv", None) or ["train"])
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["fastprompt", *argv])
