"""`fastprompt explain`: PNG figures of what a trained model looks at (any method)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fastprompt.cli.common import add_command, add_common, add_run_checkpoint, unused_path, write_json


def add_parser(commands: Any) -> None:
    """Register the `explain` subcommand."""
    parser = add_command(
        commands,
        "explain",
        "PNG figures of what a trained model looks at",
        "One PNG per image: the image with its predicted class and probability, a class-discriminative map (where "
        "the evidence for that class is), and the method's own internals (EPT's per-layer patch-wise scale, or the "
        "tokens FPT keeps, or for other methods the attention each patch receives at the last layer).",
    )
    add_run_checkpoint(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to explain")
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="folder for the PNG files")
    add_common(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> list[Path]:
    """`fastprompt explain`: PNG overlays (EPT scales, FPT selected tokens, last-layer attention), one per image."""
    from fastprompt.cli.runs import backbone_of, load_trained
    from fastprompt.data import transforms_for_model
    from fastprompt.explain import explain_images

    run = load_trained(args.checkpoint, trust=args.trust_checkpoint)
    backbone = backbone_of(run.model)
    eval_tf = transforms_for_model(backbone, run.config["img_size"], train=False)
    written = explain_images(
        run.model,
        [Path(p) for p in args.images],
        Path(args.output_dir),
        eval_tf,
        batch_size=4,
        classes=run.classes,
        multilabel=bool(run.config.get("multilabel")),
    )
    record = {
        "checkpoint": str(run.checkpoint.resolve()),
        "epoch": run.epoch,
        "step_in_epoch": run.step_in_epoch,
        "images": {str(Path(image).resolve()): str(path) for image, path in zip(args.images, written)},
    }
    write_json(unused_path(Path(args.output_dir) / "explain.json"), record)
    for path in written:
        print(path)
    return written
