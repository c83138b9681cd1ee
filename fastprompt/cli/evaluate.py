"""`fastprompt evaluate`: metrics of a trained run on a dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fastprompt.cli.common import (
    CSV_FORMAT,
    add_command,
    add_common,
    format_metrics,
    non_negative_int,
    positive_int,
    write_json,
)


def add_parser(commands: Any) -> None:
    """Register the `evaluate` subcommand."""
    parser = add_command(
        commands,
        "evaluate",
        "metrics of a trained run on a dataset",
        f"{CSV_FORMAT}\n\nPrints the metrics table and the confusion matrix; writes the metrics JSON and the confusion "
        "matrix PNG beside it.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN",
        help="a `fastprompt train` run folder (its best checkpoint) or one of its checkpoints/*.pt files",
    )
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
    add_common(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`fastprompt evaluate`: metrics of a trained checkpoint on a dataset."""
    from fastprompt.cli.runs import (
        TransformedSubset,
        backbone_of,
        drop_small_images,
        load_run,
        make_loader,
        open_dataset,
        patch_size_of,
    )
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
