"""`fastprompt explain`: PNG figures of what a trained EPT or FPT model looks at."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fastprompt.cli.common import add_common


def add_parser(commands: Any) -> None:
    """Register the `explain` subcommand."""
    parser = commands.add_parser("explain", help="PNG overlays of EPT scaling maps / FPT selected tokens")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--output-dir", required=True)
    add_common(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> list[Path]:
    """`fastprompt explain`: PNG overlays of EPT scaling maps or FPT selected tokens, one per image."""
    from fastprompt.cli.runs import backbone_of, load_run
    from fastprompt.data import transforms_for_model
    from fastprompt.explain import explain_images

    model, _, config, _ = load_run(args.checkpoint)
    backbone = backbone_of(model)
    eval_tf = transforms_for_model(backbone, config["img_size"], train=False)
    written = explain_images(model, [Path(p) for p in args.images], Path(args.output_dir), eval_tf, batch_size=4)
    for path in written:
        print(path)
    return written
