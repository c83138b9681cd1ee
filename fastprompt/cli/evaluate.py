"""`fastprompt evaluate`: metrics of a trained run on a dataset."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastprompt.cli.common import (
    CSV_FORMAT,
    UsageError,
    add_command,
    add_common,
    add_positive_class,
    add_run_checkpoint,
    format_metrics,
    non_negative_int,
    positive_class_for,
    positive_int,
    unused_path,
    write_json,
)
from fastprompt.io import atomic_write_bytes


def add_parser(commands: Any) -> None:
    """Register the `evaluate` subcommand."""
    parser = add_command(
        commands,
        "evaluate",
        "metrics of a trained run on a dataset",
        f"{CSV_FORMAT}\n\nPrints the metrics table and the confusion matrix; writes the metrics JSON and the confusion "
        "matrix PNG beside it.",
    )
    add_run_checkpoint(parser)
    parser.add_argument("--data", required=True, metavar="PATH", help="folder of <class>/<image> files or a CSV list")
    parser.add_argument(
        "--batch-size", type=positive_int, help="images per batch (default: the run's training batch size)"
    )
    parser.add_argument("--workers", type=non_negative_int, default=2, help="data loading processes (0: in-process)")
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="metrics JSON (default: RUN/evaluate_<data name>.json, numbered when it exists)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument(
        "--skip-unknown-classes",
        action="store_true",
        help="leave out images of classes the run was not trained on (default: refuse them, naming the classes)",
    )
    add_positive_class(parser, recorded=True)
    add_common(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`fastprompt evaluate`: metrics of a trained checkpoint on a dataset."""
    from fastprompt.cli.runs import (
        TransformedSubset,
        backbone_of,
        drop_small_images,
        load_trained,
        make_loader,
        open_dataset,
        patch_size_of,
    )
    from fastprompt.data import transforms_for_model
    from fastprompt.engine import Engine
    from fastprompt.run_folders import recorded_option

    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not args.overwrite:
        raise UsageError(f"{output} exists (an earlier evaluation); pass --overwrite to replace it or another --output")
    run = load_trained(args.checkpoint, trust=args.trust_checkpoint)
    config, classes = run.config, run.classes
    recorded = recorded_option(config, "positive_class")
    positive_class = positive_class_for(
        classes, args.positive_class, multilabel=bool(config.get("multilabel")), recorded=recorded
    )
    backbone = backbone_of(run.model)
    data = open_dataset(args.data, classes=classes, skip_unknown=args.skip_unknown_classes)
    drop_small_images(data, patch_size_of(backbone))
    eval_tf = transforms_for_model(backbone, config["img_size"], train=False)
    loader = make_loader(
        TransformedSubset(data, range(len(data)), eval_tf), args.batch_size or config["batch_size"], args.workers,
        shuffle=False,
    )  # fmt: skip
    engine = Engine(
        run.model, output_dir=None, backend="torch", progress=False, class_names=classes, positive_class=positive_class
    )
    metrics = engine.evaluate(loader)
    if output is None:
        output = unused_path(run.run_dir / f"evaluate_{Path(args.data).stem}.json")
    record = {
        "checkpoint": str(run.checkpoint.resolve()),
        "epoch": run.epoch,
        "step_in_epoch": run.step_in_epoch,
        "data": str(Path(args.data).resolve()),
        "images": len(data),
        "skipped_unknown_classes": dict(getattr(data, "skipped_classes", {}) or {}),
        "classes": classes,
        **metrics,
    }
    write_json(output, record)
    print(format_metrics(metrics, classes))
    if "confusion_matrix" in metrics:
        print(format_confusion(metrics["confusion_matrix"], classes))
        picture = output.with_name(f"{output.stem}_confusion.png")
        atomic_write_bytes(picture, confusion_png(metrics["confusion_matrix"], classes, title=output.stem))
        print(f"confusion matrix drawn in {picture}", file=sys.stderr)
    print(f"metrics written to {output}", file=sys.stderr)
    return metrics


def format_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    """The confusion matrix as text: rows are the true classes, columns the predicted ones."""
    width = max(len(str(value)) for row in matrix for value in row)
    label = max(len(name) for name in classes)
    columns = [max(width, len(name)) for name in classes]
    lines = ["confusion matrix (rows: true class, columns: predicted class)"]
    lines.append(" " * (label + 2) + "  ".join(f"{name:>{w}}" for name, w in zip(classes, columns)))
    for name, row in zip(classes, matrix):
        lines.append(f"{name:<{label}}  " + "  ".join(f"{value:>{w}}" for value, w in zip(row, columns)))
    return "\n".join(lines)


def confusion_png(matrix: Sequence[Sequence[int]], classes: Sequence[str], *, title: str) -> bytes:
    """A PNG of the confusion matrix: counts in each cell, shaded by the share of the true class (row)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.6 + 0.7 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    shown = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (row, column), value in np.ndenumerate(counts):
        colour = "white" if share[row, column] > 0.5 else "black"
        ax.text(column, row, str(value), ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}: confusion matrix", fontsize=10)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
