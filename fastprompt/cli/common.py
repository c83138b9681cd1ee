"""What every command shares and what `--help` needs: errors, option parsing, common flags, JSON output.

Nothing here imports torch or timm, so that the parser builds (and `--help` answers) at once; the heavy helpers the
commands share sit in `fastprompt.cli.runs`, imported when a command runs.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastprompt.io import atomic_write_bytes

EXIT_USAGE = 2
EXIT_FAILURE = 1
CONFIG_NAME = "config.json"
BACKBONE_FILE = "backbone.safetensors"
FPT_METHODS = ("fpt", "fpt+")
METHOD_FLAGS = {  # convenience flags -> method option names (anything else: --option key=value)
    "prompt_length": "--prompt-length",
    "rank": "--rank",
    "num_tokens": "--num-tokens",
    "num_prompts": "--num-prompts",
    "token_ratio": "--token-ratio",
}


class UsageError(ValueError):
    """A mistake in the command line or the data that the user can fix."""


# ---------------------------------------------------------------------------------------------- option parsing


def parse_key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """`key=value` strings to a dict; values are Python literals (2, 0.5, True, [6, 7]) or plain strings."""
    result: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UsageError(f"{flag} expects key=value (e.g. {flag} depth=2), got {item!r}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        result[key] = value
    return result


def flatten(groups: Sequence[Sequence[str]] | None) -> list[str]:
    """The items of `action="append", nargs="+"` groups as one list."""
    return [item for group in groups or () for item in group]


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options given by the convenience flags and --option key=value."""
    options = {name: getattr(args, name) for name in METHOD_FLAGS if getattr(args, name, None) is not None}
    for key, value in parse_key_values(flatten(args.option), "--option").items():
        if key in options:
            raise UsageError(f"method option {key!r} is given twice ({METHOD_FLAGS[key]} and --option); keep one")
        options[key] = value
    return options


def check_method(name: str) -> str:
    """The registered method name, or a UsageError listing the valid ones."""
    from fastprompt.methods.registry import get_method

    return get_method(name).name


# ---------------------------------------------------------------------------------------------- output


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (NaN written as null)."""
    atomic_write_bytes(path, (json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n").encode())


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():  # numpy scalars
        return _json_safe(value.item())
    return value


def unused_path(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... — the first that does not exist yet."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def format_metrics(metrics: dict[str, Any], classes: Sequence[str]) -> str:
    """A two-column text table of the scalar metrics and the per-class AUC/AP."""
    rows: list[tuple[str, str]] = []
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            rows.append((key, f"{value:.4f}" if math.isfinite(value) else "n/a"))
    for key in ("per_class_auc", "per_class_ap"):
        for name, value in (metrics.get(key) or {}).items():
            label = classes[int(name)] if name.isdigit() and int(name) < len(classes) else name
            rows.append((f"{key.removeprefix('per_class_')}[{label}]", f"{value:.4f}"))
    skipped = metrics.get("skipped_classes") or []
    if skipped:
        rows.append(("skipped classes", ", ".join(classes[int(s)] if s.isdigit() else s for s in skipped)))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- shared flags


def available_methods_for_help() -> str:
    """The method names for --help, without importing torch (the registry imports every method)."""
    from fastprompt.methods.registry import available_methods

    return ", ".join(available_methods())


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Backbone, weights and method flags (train and preload)."""
    parser.add_argument("--model", required=True, help="timm model name, e.g. vit_base_patch16_384")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights")
    weights.add_argument("--checkpoint", help="local weight file (safetensors/PyTorch state_dict) loaded through timm")
    parser.add_argument(
        "--model-kwargs",
        action="append",
        nargs="+",
        metavar="KEY=VALUE",
        help="timm constructor overrides, e.g. depth=2",
    )
    parser.add_argument("--img-size", type=int, default=512, help="input resolution (default 512)")
    parser.add_argument("--method", default="ept", help=f"one of {available_methods_for_help()} (default: %(default)s)")
    parser.add_argument("--prompt-length", dest="prompt_length", type=int, help="EPT prompt length")
    parser.add_argument("--rank", type=int, help="LoRA rank")
    parser.add_argument("--num-tokens", dest="num_tokens", type=int, help="VPT prompt tokens")
    parser.add_argument("--num-prompts", dest="num_prompts", type=int, help="FPT prompts per layer")
    parser.add_argument("--token-ratio", dest="token_ratio", type=float, help="FPT share of tokens kept")
    parser.add_argument(
        "--option", action="append", nargs="+", metavar="KEY=VALUE", help="any other method option, e.g. deep=True"
    )
    parser.add_argument("--seed", type=int, default=0)


def add_common(parser: argparse.ArgumentParser) -> None:
    """--debug and --quiet."""
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
