"""`fastprompt demo`: a synthetic high-resolution task, trained and evaluated through `train`."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from fastprompt.cli.common import add_common, flatten, unused_path


def add_parser(commands: Any) -> None:
    """Register the `demo` subcommand."""
    parser = commands.add_parser("demo", help="train on a built-in synthetic high-resolution task (a few minutes, CPU)")
    parser.add_argument("--method", help="default: ept (lora when EPT is unavailable)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images-per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=256, help="generated image size")
    parser.add_argument("--img-size", type=int, default=256, help="model input size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the model is tiny)")
    parser.add_argument("--option", action="append", nargs="+", metavar="KEY=VALUE", help="method options")
    parser.add_argument("--output-dir", help="default: a new temporary folder")
    add_common(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`fastprompt demo`: generate the synthetic task, then train and evaluate on it through `train`."""
    import torch

    import fastprompt
    from fastprompt.cli import build_parser
    from fastprompt.cli.train import run as run_train
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
    train_argv += [f"--option={item}" for item in flatten(args.option)]
    if args.quiet:
        train_argv.append("--quiet")
    print(f"demo: fastprompt {' '.join(train_argv)}", file=sys.stderr)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # tiny ops: extra threads only wait on each other on a busy CPU
    try:
        return run_train(build_parser().parse_args(train_argv))
    finally:
        torch.set_num_threads(previous)
