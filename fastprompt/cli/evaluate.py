"""`fastprompt evaluate`: metrics of a trained run on a dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fastprompt.cli.common import add_common, format_metrics, write_json


def add_parser(commands: Any) -> None:
    """Register the `evaluate` subcommand."""
    parser = commands.add_parser("evaluate", help="metrics of a trained checkpoint on a dataset")
    parser.add_argument("--checkpoint", required=True, help="OUT/checkpoints/best.pt of a train run (or OUT)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", help="metrics JSON (default: RUN/evaluate_<data name>.json)")
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
