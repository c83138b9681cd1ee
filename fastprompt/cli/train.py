"""`fastprompt train`: build a backbone, apply a method, train it with the Engine and write the run folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastprompt.cli.common import (
    BACKBONE_FILE,
    CONFIG_NAME,
    CSV_FORMAT,
    FPT_METHODS,
    UsageError,
    add_augment_args,
    add_command,
    add_common,
    add_model_args,
    add_positive_class,
    add_trust_checkpoint,
    check_method,
    check_method_options,
    flatten,
    format_metrics,
    fraction,
    method_options,
    non_negative_float,
    non_negative_int,
    parse_key_values,
    positive_class_choice,
    positive_float,
    positive_int,
    write_json,
)
from fastprompt.cli.config import CONFIG_FLAG, RESOLVED_CONFIG, resolved_settings, write_settings

if TYPE_CHECKING:
    from fastprompt.engine import Engine


def add_parser(commands: Any) -> None:
    """Register the `train` subcommand."""
    parser = add_command(
        commands,
        "train",
        "train a method on an image folder or CSV list",
        f"{CSV_FORMAT}\n\nThe run folder (--output-dir) gets config.yaml (the resolved flags), config.json, "
        "metrics.json, metrics.jsonl, curves.png and checkpoints/{best,last}.pt. Ctrl-C saves a checkpoint mid-epoch "
        "and prints the --resume command.",
    )
    parser.add_argument(
        CONFIG_FLAG,
        metavar="FILE",
        help="YAML or TOML file of train flags (keys: the flag names, e.g. batch-size: 16); flags given on the "
        f"command line override it. Every run writes its resolved flags to RUN/{RESOLVED_CONFIG}, which repeats "
        "the run: fastprompt train --config RUN/config.yaml --output-dir NEW (default: none)",
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
    add_augment_args(parser)
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
        help="copy the --weights FILE into RUN/weights/ (evaluate and explain then read the copy; by default the "
        "run records the file's path and SHA-256 and checks it on every load)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its checkpoints/last.pt; a larger --epochs extends a finished run "
        "(the learning-rate schedule is recomputed for the new length)",
    )
    add_trust_checkpoint(parser)
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="FPT feature cache folder: frozen-branch features computed once, see `preload` (default: no cache)",
    )
    add_training_options(parser)
    add_common(parser)
    parser.set_defaults(handler=run)


def class_weights_option(text: str) -> str | list[float] | None:
    """argparse type of --class-weights: auto, none, or comma-separated non-negative numbers."""
    import argparse

    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or numbers like 1,3.5, got {text!r}") from None
    if any(not value >= 0 for value in values):
        raise argparse.ArgumentTypeError(f"class weights must be numbers of 0 or more, got {text!r}")
    return values


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Clinical reporting, logging, early stopping and class-imbalance flags (issue 20)."""
    add_positive_class(parser, recorded=False)
    parser.add_argument(
        "--logger",
        action="append",
        nargs="+",
        choices=("csv", "tensorboard"),
        help="metric logs besides metrics.jsonl: csv (metrics.csv, always written) and/or tensorboard "
        "(RUN/tensorboard; pip install 'fastprompt[tensorboard]') (default: csv)",
    )
    parser.add_argument(
        "--patience",
        type=positive_int,
        metavar="N",
        help="stop when the validation metric (AUC) has not improved for N epochs; checkpoints/best.pt keeps the "
        "best epoch (default: train every epoch)",
    )
    parser.add_argument(
        "--class-weights",
        type=class_weights_option,
        metavar="auto|none|W1,W2,...",
        help="weighted cross-entropy: auto (N / (classes x images of the class), from the training images) or one "
        "weight per class in class order (default: none)",
    )
    parser.add_argument(
        "--balanced-sampler",
        action="store_true",
        help="draw training images with replacement so that every class is seen equally often",
    )


def resolve_class_weights(weights: str | list[float] | None, labels: Any, classes: list[str]) -> list[float] | None:
    """--class-weights as one weight per class (auto: from the training labels); a wrong count names the classes."""
    from fastprompt.engine.data import balanced_class_weights

    if weights is None:
        return None
    if weights == "auto":
        return balanced_class_weights(labels, classes)
    if len(weights) != len(classes):
        raise UsageError(
            f"--class-weights has {len(weights)} values but the data has {len(classes)} classes "
            f"({', '.join(classes)}); give one weight per class, in that order"
        )
    return weights


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`fastprompt train`: build, train, evaluate; returns the final validation metrics."""
    from fastprompt.runlock import run_lock

    method = check_method(args.method)
    if args.cache is not None and method not in FPT_METHODS:
        raise UsageError(f"--cache holds FPT frozen-branch features; use it with --method fpt+ or fpt, not {method!r}")
    options = method_options(args)
    check_method_options(method, options)
    loggers = flatten(args.logger) or ["csv"]
    if "tensorboard" in loggers:
        from fastprompt.engine.report import check_loggers

        try:
            check_loggers(loggers)
        except ImportError as missing:
            raise UsageError(f"--logger tensorboard: {missing}") from None
    model_kwargs = parse_key_values(flatten(args.model_kwargs), "--model-kwargs")
    out = Path(args.output_dir)
    if args.copy_weights and args.checkpoint is None:
        raise UsageError("--copy-weights copies the --weights FILE into the run; pass --weights FILE with it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file; pass a folder (new or a run folder)")
    with run_lock(out):  # one writer per run folder, from the first check to the last write
        return _train(args, method, options, loggers, model_kwargs, out)


def _train(
    args: argparse.Namespace,
    method: str,
    options: dict[str, Any],
    loggers: list[str],
    model_kwargs: dict[str, Any],
    out: Path,
) -> dict[str, Any]:
    """The body of `run`, with the run folder locked."""
    import numpy as np
    import torch

    import fastprompt
    from fastprompt.augmentations import resolve_augmentation
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
    from fastprompt.data.transforms import describe_transforms
    from fastprompt.engine import Engine, EngineConfig, TrainingInterrupted
    from fastprompt.io import sha256_file
    from fastprompt.run_folders import recorded_option

    if not args.resume and (out / "checkpoints" / "last.pt").is_file():
        raise UsageError(
            f"{out} already holds a training run (checkpoints/last.pt); pass --resume to continue it, or choose "
            "another --output-dir"
        )
    recorded = read_recorded_config(out) if args.resume else None
    digest = check_weights_file(args, out)
    data = open_dataset(args.data)  # data mistakes (a train/val/test root, one class) before any model is built
    val_data = None
    if args.val is not None:
        val_data = open_dataset(args.val, classes=data.classes, skip_unknown=args.skip_unknown_classes)
    if data.multilabel and (args.class_weights is not None or args.balanced_sampler):
        raise UsageError("--class-weights and --balanced-sampler need single-label data (one class per image)")
    same_classes = recorded is not None and recorded_option(recorded, "class_names") == data.classes
    positive_class, positive_line = positive_class_choice(
        data.classes,
        args.positive_class,
        multilabel=bool(data.multilabel),
        recorded=recorded_option(recorded, "positive_class") if same_classes else None,
    )  # a resume with other classes is refused by check_resume below, naming the classes
    torch.manual_seed(args.seed)
    saved_backbone = out / BACKBONE_FILE
    random_init = not args.pretrained and args.checkpoint is None
    resumed_backbone = random_init and recorded is not None and saved_backbone.is_file()
    if resumed_backbone:
        check_saved_backbone(saved_backbone, recorded)
    weights_file = saved_backbone if resumed_backbone else args.checkpoint
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
    train_labels = None if data.multilabel else np.asarray(data.targets)[np.asarray(train_idx, dtype=np.int64)]
    class_weights = resolve_class_weights(args.class_weights, train_labels, list(data.classes))
    if class_weights is not None:
        shown = ", ".join(f"{name} {weight:.3g}" for name, weight in zip(data.classes, class_weights))
        print(f"class weights{' (auto: N / (classes x n))' if args.class_weights == 'auto' else ''}: {shown}",
              file=sys.stderr)  # fmt: skip

    frozen_state = backbone.state_dict()  # before the method patches the model; values are not changed by it
    model = fastprompt.apply(backbone, method, num_classes=len(data.classes), **options)
    trainable, total = fastprompt.count_parameters(model)
    if random_init:
        weights = {"source": "random", "file": BACKBONE_FILE}
        if resumed_backbone:
            weights["sha256"] = sha256_file(saved_backbone)
    elif args.pretrained:
        weights = {"source": "pretrained", "file": None}
    elif args.copy_weights:
        copied = out / WEIGHTS_DIR / Path(args.checkpoint).name
        weights = {"source": "file", "file": copied.relative_to(out).as_posix(), "sha256": digest}
        weights["copied_from"] = str(Path(args.checkpoint).resolve())
    else:
        weights = {"source": "file", "file": str(Path(args.checkpoint).resolve()), "sha256": digest}

    args.augmentation = resolve_augmentation(args.augment, hflip=args.hflip, scale=args.crop_scale)
    train_size = model.side_input_size if args.cache is not None else args.img_size  # FPT's side branch is augmented
    train_tf = transforms_for_model(backbone, train_size, train=True, **args.augmentation)
    augmentation = {**args.augmentation, "pipeline": describe_transforms(train_tf)}
    if args.cache is not None:
        train_set, val_set = cached_fpt_sets(model, args, (data, train_idx), (val_source, val_idx))
        trained = CachedForward(model)
    else:
        eval_tf = transforms_for_model(backbone, args.img_size, train=False)
        train_set, val_set = (
            TransformedSubset(data, train_idx, train_tf),
            TransformedSubset(val_source, val_idx, eval_tf),
        )
        trained = model
    if args.balanced_sampler and not hasattr(train_set, "dataset"):
        train_set.targets = train_labels.tolist()  # the cached FPT items: the labels the balanced sampler reads
    train_loader = make_loader(train_set, args.batch_size, args.workers, shuffle=True)
    val_loader = make_loader(val_set, args.batch_size, args.workers, shuffle=False)

    engine_config = EngineConfig(
        output_dir=out,
        progress=not args.quiet,
        class_names=data.classes,
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
        positive_class=positive_class,
        loggers=loggers,
        patience=args.patience,
        class_weights=class_weights,
        balanced_sampler=args.balanced_sampler,
    )
    config = {
        "fastprompt_version": fastprompt.__version__,
        "model": args.model,
        "model_kwargs": model_kwargs,
        "img_size": args.img_size,
        "weights": weights,
        "method": method,
        "method_options": options,
        "multilabel": bool(data.multilabel),
        "data": str(Path(args.data).resolve()),
        "val": str(Path(args.val).resolve()) if args.val is not None else None,
        "val_fraction": None if args.val is not None else args.val_fraction,
        "shots": args.shots,
        "batch_size": args.batch_size,
        "train_size": len(train_idx),
        "val_size": len(val_idx),
        "cache": str(Path(args.cache).resolve()) if args.cache is not None else None,
        "augmentation": augmentation,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "engine": engine_config.to_dict(),  # the Engine's options: seed, class_names, positive_class, ...
    }
    changes = check_resume(recorded, config) if recorded is not None else None
    if positive_line is not None:
        print(positive_line, file=sys.stderr)
    # Every check is done: from here on the run folder is written.
    if changes is None:
        unreadable = write_unreadable(out / UNREADABLE_FILE, data, *([val_data] if val_data is not None else []))
        if unreadable:
            print(f"the {unreadable} unreadable image(s) are listed in {out / UNREADABLE_FILE}", file=sys.stderr)
        if random_init:
            save_backbone(frozen_state, saved_backbone)
            weights["sha256"] = sha256_file(saved_backbone)
        write_json(out / CONFIG_NAME, config)
        write_settings(out / RESOLVED_CONFIG, getattr(args, "settings", None) or settings_of(args))
    if args.copy_weights:
        copy_weights(Path(args.checkpoint), out / WEIGHTS_DIR, digest)
    del frozen_state  # it shares the backbone's tensors
    if args.cache is not None:
        model.release_backbone()  # training and validation read only the cache: free the frozen weights
    print(
        f"{method} on {args.model}: {trainable:,} trainable of {total:,} parameters; "
        f"{len(train_idx)} training and {len(val_idx)} validation images, {len(data.classes)} classes",
        file=sys.stderr,
    )
    engine = Engine(trained, config=engine_config)
    pending = {"changes": changes}  # a resume is recorded once the Engine has accepted its checkpoint

    def record_once(epoch: int) -> None:
        changes, pending["changes"] = pending["changes"], None
        if changes is not None:
            record_resume(out, changes, epoch, list(getattr(args, "argv", None) or []))

    def on_epoch_end(record: dict[str, Any]) -> None:
        record_once(record["epoch"] - 1)
        print_epoch(record, engine)

    try:
        history = engine.fit(
            train_loader,
            val_loader,
            resume=args.resume,
            trust_checkpoint=args.trust_checkpoint,
            on_epoch_end=on_epoch_end,
        )
    except TrainingInterrupted as interrupt:
        record_once(interrupt.epoch)
        print(f"fastprompt train: {interrupt}", file=sys.stderr)
        if interrupt.checkpoint:
            print(f"resume with: {resume_command(args)}", file=sys.stderr)
        raise
    record_once(len(history))
    metrics = engine.evaluate(val_loader)
    write_json(out / "metrics.json", metrics)
    print(f"final model (checkpoints/last.pt, epoch {len(history)}):")
    print(format_metrics(metrics, data.classes))
    print(best_summary(engine, out))
    print(f"run written to {out}", file=sys.stderr)
    return metrics


WEIGHTS_DIR = "weights"
UNREADABLE_FILE = "unreadable.csv"
RESUME_HISTORY = "resume_history.jsonl"
# What may change on --resume (recorded in RESUME_HISTORY; config.json keeps the original): more epochs, another
# activation-memory budget (recomputation only), the feature cache folder (entries are keyed by content). Derived
# or informational entries are not compared. Everything else defines the run and must match.
SAFE_ON_RESUME = ("engine.epochs", "engine.activation_memory", "cache", "fastprompt_version")
NOT_COMPARED = (
    "trainable_parameters",
    "total_parameters",
    "weights.file",
    "weights.copied_from",
    "engine.output_dir",  # the run folder itself, however it was named on the command line
    "engine.progress",  # --quiet
)


def read_recorded_config(out: Path) -> dict[str, Any] | None:
    """The run's config.json on --resume (None for a folder without one: a fresh run), or a one-line error."""
    import json

    path = out / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(
            f"cannot read {path} ({error}); restore it from a backup, or train into a new --output-dir"
        ) from error


def check_saved_backbone(path: Path, recorded: dict[str, Any]) -> None:
    """Refuse a random-init run's backbone.safetensors that is not the one training wrote (digest recorded)."""
    from fastprompt.io import sha256_file

    expected = (recorded.get("weights") or {}).get("sha256")
    if expected is not None and sha256_file(path) != expected:
        raise UsageError(
            f"{path} changed since the run started (its SHA-256 differs from the one in {CONFIG_NAME}); restore the "
            "original file, or train into a new --output-dir"
        )


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("engine", "weights"):
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def check_resume(recorded: dict[str, Any], config: dict[str, Any]) -> dict[str, list[Any]]:
    """The changes of a --resume that are allowed (name: [recorded, now]); a UsageError naming any other change.

    Runs before anything in the run folder is written, so a refused resume changes nothing.
    """
    import json

    old, new = _flat(json.loads(json.dumps(recorded))), _flat(json.loads(json.dumps(config)))
    changed = [key for key in sorted({*old, *new}) if key not in NOT_COMPARED and old.get(key) != new.get(key)]
    # A setting only one side has (added or dropped by another fastprompt version, e.g. the backbone digest of a
    # random-init run) cannot be compared: it is recorded, not refused.
    unsafe = [key for key in changed if key not in SAFE_ON_RESUME and key in old and key in new]
    if unsafe:
        shown = "; ".join(f"{key}: the run has {old.get(key)!r}, now {new.get(key)!r}" for key in unsafe[:4])
        more = f" and {len(unsafe) - 4} more" if len(unsafe) > 4 else ""
        raise UsageError(
            f"--resume would change what defines the run ({shown}{more}); nothing was written. Resume with the "
            "run's settings (see its config.json), or train into a new --output-dir"
        )
    return {key: [old.get(key), new.get(key)] for key in changed}


def record_resume(out: Path, changes: dict[str, list[Any]], epoch: int, argv: list[str]) -> None:
    """Append this resume (when, from which epoch, what changed, the command) to RESUME_HISTORY."""
    import datetime
    import json

    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "from_epoch": epoch,
        "changes": changes,
        "argv": argv,
    }
    with open(out / RESUME_HISTORY, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The train settings of a namespace built without the command line (e.g. by `fastprompt demo`)."""
    commands = argparse.ArgumentParser().add_subparsers()
    add_parser(commands)
    return resolved_settings(commands.choices["train"], args)


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


def print_epoch(record: dict[str, Any], engine: Engine) -> None:
    """Print an epoch's line above the progress bars."""
    from tqdm.auto import tqdm

    best = engine.state.best
    tqdm.write(epoch_line(record, engine.config.epochs, best.epoch if best else None))


def best_summary(engine: Engine, out: Path) -> str:
    """Which checkpoint is best, at which epoch, with its validation metrics."""
    best = engine.state.best
    path = out / "checkpoints" / "best.pt"
    if best and not path.is_file():
        return f"the best checkpoint (epoch {best.epoch}) is missing from {path}; use checkpoints/last.pt"
    if not best:
        return (
            "no best checkpoint (no epoch had a finite monitored metric, or the best was lost: see the warnings "
            "above); use checkpoints/last.pt"
        )
    record = next((r for r in engine.history if r.get("epoch") == best.epoch), {})
    values = ", ".join(f"{key} {record[key]:.4f}" for key in SHOWN_METRICS if isinstance(record.get(key), float))
    return f"best checkpoint: {path} (epoch {best.epoch}, best {best.metric}; {values})"


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run."""
    import shlex

    argv = list(getattr(args, "argv", None) or ["train"])
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["fastprompt", *argv])
