"""`fastprompt predict`: a CSV row per image with its path, the predicted class and every class probability."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fastprompt.cli.common import (
    UsageError,
    add_command,
    add_common,
    add_positive_class,
    add_run_checkpoint,
    non_negative_int,
    positive_class_for,
    positive_int,
)


def add_parser(commands: Any) -> None:
    """Register the `predict` subcommand."""
    parser = add_command(
        commands,
        "predict",
        "predict the class of new images with a trained run",
        "Writes one CSV row per image: path, predicted (the class name; multi-label: the names with probability "
        ">= 0.5, joined by ';'), probability (of the predicted class), prob_<class> for every class, for a "
        "single-label run with a positive class positive_class and positive_probability, and error (empty, or why "
        "the image has no prediction: it could not be decoded or is smaller than one patch). The same rows come "
        "from Python: fastprompt.predict_images(RUN, DATA).",
    )
    add_run_checkpoint(parser)
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="PATH",
        help="a folder of images (searched recursively; class sub-folders are fine) or image files",
    )
    parser.add_argument("--output", required=True, metavar="FILE", help="CSV file to write, e.g. preds.csv")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per batch")
    parser.add_argument("--workers", type=non_negative_int, default=2, help="data loading processes (0: in-process)")
    add_positive_class(parser, recorded=True)
    add_common(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`fastprompt predict`: write the predictions CSV; returns its rows."""
    from fastprompt.cli.runs import load_trained
    from fastprompt.io import atomic_write_bytes
    from fastprompt.predict import image_files, predict_images, rows_to_csv
    from fastprompt.run_folders import recorded_option

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise UsageError(f"{output} exists; pass --overwrite to replace it, or another --output")
    files = image_files(args.data)  # a missing folder or file is reported before the model is built
    loaded = load_trained(args.checkpoint, trust=args.trust_checkpoint)
    config = loaded.config
    positive = positive_class_for(
        loaded.classes, args.positive_class, multilabel=bool(config.get("multilabel")),
        recorded=recorded_option(config, "positive_class"),
    )  # fmt: skip
    rows = predict_images(
        loaded, files, batch_size=args.batch_size, workers=args.workers, progress=not args.quiet,
        positive_class=positive,
    )  # fmt: skip
    atomic_write_bytes(output, rows_to_csv(rows).encode())
    print(f"{len(rows)} prediction(s) written to {output}", file=sys.stderr)
    return rows
