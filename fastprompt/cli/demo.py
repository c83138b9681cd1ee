"""`fastprompt demo`: a synthetic high-resolution task, trained and evaluated through `train`."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from fastprompt.cli.common import add_command, add_common, flatten, positive_int, unused_path


def add_parser(commands: Any) -> None:
    """Register the `demo` subcommand."""
    parser = add_command(
        commands,
        "demo",
        "train on a built-in synthetic high-resolution task (a few minutes, CPU)",
        "Writes three classes of synthetic grayscale scans, then runs `fastprompt train` on them with a small "
        "randomly initialised ViT.",
    )
    parser.add_argument("--method", default="ept", help="method to train")
    parser.add_argument("--epochs", type=positive_int, default=10, help="training epochs")
    parser.add_argument("--images-per-class", type=positive_int, default=30, help="generated images per class")
    parser.add_argument("--size", type=positive_int, default=256, help="generated image size in pixels")
    parser.add_argument("--img-size", type=positive_int, default=256, help="model input size in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and the training")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads (1: the model is tiny)")
    parser.add_argument(
        "--option", action="append", nargs="+", metavar="KEY=VALUE", help="method options (default: none)"
    )
    parser.add_argument("--output-dir", metavar="DIR", help="where data/ and run/ go (default: a new temporary folder)")
    add_common(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`fastprompt demo`: generate the synthetic task, then train and evaluate on it through `train`."""
    import torch

    from fastprompt.cli import build_parser
    from fastprompt.cli.train import run as run_train
    from fastprompt.demo import demo_train_args, write_synthetic_dataset

    output = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="fastprompt-demo-"))
    data_dir, run_dir = unused_path(output / "data"), unused_path(output / "run")  # never mix with an earlier demo
    write_synthetic_dataset(
        data_dir, images_per_class=args.images_per_class, size=args.size, seed=args.seed, progress=not args.quiet
    )
    train_argv = demo_train_args(
        data_dir, run_dir, method=args.method, epochs=args.epochs, img_size=args.img_size, seed=args.seed
    )
    train_argv += [f"--option={item}" for item in flatten(args.option)]
    if args.quiet:
        train_argv.append("--quiet")
    print(f"demo: fastprompt {' '.join(train_argv)}", file=sys.stderr)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # tiny ops: extra threads only wait on each other on a busy CPU
    try:
        train_args = build_parser().parse_args(train_argv)
        train_args.argv = train_argv
        return run_train(train_args)
    finally:
        torch.set_num_threads(previous)
