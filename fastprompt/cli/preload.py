"""`fastprompt preload`: fill the FPT feature cache for every image of a dataset (resumable)."""

from __future__ import annotations

import argparse
from typing import Any

from fastprompt.cli.common import (
    CSV_FORMAT,
    FPT_METHODS,
    UsageError,
    add_command,
    add_common,
    add_model_args,
    check_method,
    flatten,
    method_options,
    parse_key_values,
    positive_int,
)


def add_parser(commands: Any) -> None:
    """Register the `preload` subcommand."""
    parser = add_command(
        commands,
        "preload",
        "fill the FPT feature cache (resumable)",
        f"{CSV_FORMAT}\n\nRuns FPT's frozen branch once per image and stores the selected keys and values in "
        "--cache, so that `train --cache` runs only the small trainable part. Use the --model, weights, --img-size, "
        "--seed and FPT options of the later `train`.",
    )
    parser.add_argument("--data", required=True, metavar="PATH", help="folder of <class>/<image> files or a CSV list")
    add_model_args(parser, methods=FPT_METHODS, default_method="fpt+", method_flags=("token_ratio",))
    parser.add_argument("--cache", required=True, metavar="DIR", help="cache folder (created when missing)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per frozen forward pass")
    parser.add_argument(
        "--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="stored feature precision"
    )
    add_common(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> Any:
    """`fastprompt preload`: fill the FPT feature cache for every image of a dataset (resumable)."""
    import torch

    import fastprompt
    from fastprompt.cli.runs import TransformedSubset, drop_small_images, make_backbone, open_dataset, patch_size_of
    from fastprompt.data import FeatureCache, preload, transforms_for_model

    method = check_method(args.method)
    if method not in FPT_METHODS:
        raise UsageError(f"preload fills the FPT feature cache; use --method fpt+ or fpt, not {method!r}")
    options = method_options(args)
    model_kwargs = parse_key_values(flatten(args.model_kwargs), "--model-kwargs")
    torch.manual_seed(args.seed)
    backbone = make_backbone(
        args.model, args.img_size, pretrained=args.pretrained, checkpoint=args.checkpoint, model_kwargs=model_kwargs
    )
    data = open_dataset(args.data)
    drop_small_images(data, patch_size_of(backbone))
    model = fastprompt.apply(backbone, method, num_classes=len(data.classes), **options)
    eval_tf = transforms_for_model(backbone, args.img_size, train=False)
    cache = FeatureCache(args.cache, dtype=getattr(torch, args.dtype))
    paths = [path for path, _ in data.samples]
    return preload(
        model,
        TransformedSubset(data, range(len(data)), eval_tf),
        cache,
        batch_size=args.batch_size,
        paths=paths,
        preprocess=repr(eval_tf),
        progress=not args.quiet,
    )
