"""Argument checks that need no torch, run before a command imports it (a mistyped path fails at once).

The commands check everything again when they run (data contents, model names, sizes against the patch); this
module only moves the checks that a file system look-up or a static list can answer in front of the seconds-long
torch import. Nothing here imports torch, timm or fastprompt's heavy modules.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from fastprompt.cli.common import FPT_METHODS, METHOD_NAMES, UsageError

__all__ = ["check_arguments"]

_DATA_HINT = "pass a folder of <class>/<image> files or a CSV list"
_RUN_HINT = "pass a `fastprompt train` run folder or one of its checkpoints/*.pt files"


def _method(name: str, allowed: tuple[str, ...]) -> None:
    if name.lower() in allowed:
        return
    close = difflib.get_close_matches(name.lower(), allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if name.lower() in METHOD_NAMES:  # a real method this command does not take (preload: FPT only)
        raise UsageError(f"method {name!r} is not one this command takes; valid methods: {', '.join(allowed)}")
    raise UsageError(f"unknown method {name!r}; valid methods: {', '.join(allowed)}{hint}")


def _exists(path: str, flag: str, hint: str) -> None:
    if not Path(path).exists():
        raise UsageError(f"{flag} {path} does not exist; {hint}")


def _weight_file(path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"--checkpoint {path} is not a file; pass a safetensors/PyTorch weight file")


def _folder(path: str | None, flag: str) -> None:
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag} {path} is a file; pass a folder (it is created when missing)")


def check_arguments(args: argparse.Namespace) -> None:
    """Raise a UsageError for a missing input path, a file where a folder belongs, or an unknown method name."""
    command = args.command
    if command in ("train", "preload"):
        _method(args.method, METHOD_NAMES if command == "train" else FPT_METHODS)
        _exists(args.data, "--data", _DATA_HINT)
        _weight_file(args.checkpoint)
        _folder(args.cache, "--cache")
    if command == "train":
        if args.val is not None:
            _exists(args.val, "--val", _DATA_HINT)
        if args.cache is not None and args.method.lower() not in FPT_METHODS:
            raise UsageError(
                f"--cache holds FPT frozen-branch features; use it with --method fpt+ or fpt, not {args.method!r}"
            )
        _folder(args.output_dir, "--output-dir")
    if command in ("evaluate", "predict", "explain"):
        _exists(args.checkpoint, "--checkpoint", _RUN_HINT)
    if command == "evaluate":
        _exists(args.data, "--data", _DATA_HINT)
    if command == "predict":
        for path in args.data:
            _exists(path, "--data", "pass a folder of images or existing image files")
    if command == "explain":
        for path in args.images:
            _exists(path, "image", "pass existing image files")
        _folder(args.output_dir, "--output-dir")
    if command == "demo":
        _method(args.method, METHOD_NAMES)
