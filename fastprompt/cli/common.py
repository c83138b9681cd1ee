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

from fastprompt.io import atomic_write_bytes, json_safe

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


def check_method_options(method: str, options: dict[str, Any]) -> None:
    """A UsageError for options the method does not take, spelled as command-line flags (--prompt-length, or
    --option key=VALUE), with the closest valid one."""
    import difflib

    from fastprompt.methods.registry import get_method

    spec = get_method(method)
    unknown = sorted(set(options) - set(spec.options))
    if not unknown:
        return
    spelled = lambda name: METHOD_FLAGS.get(name, f"--option {name}=VALUE")
    close = [c for key in unknown for c in difflib.get_close_matches(key, spec.options, n=1, cutoff=0.6)]
    hint = f" (did you mean {' or '.join(spelled(name) for name in dict.fromkeys(close))}?)" if close else ""
    valid = ", ".join(spelled(name) for name in spec.options) or "none (it has no options)"
    raise UsageError(f"unknown option(s) {unknown} for method {spec.name!r}{hint}; valid options: {valid}")


def check_method(name: str) -> str:
    """The registered method name, or a UsageError listing the valid ones."""
    from fastprompt.methods.registry import get_method

    return get_method(name).name


# ---------------------------------------------------------------------------------------------- output


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (NaN written as null)."""
    atomic_write_bytes(path, (json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n").encode())


def unused_path(path: Path) -> Path:
    """`path`, or `<stem>-2<suffix>`, `<stem>-3<suffix>`, ... — the first that does not exist yet (never overwrite)."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def format_metrics(metrics: dict[str, Any], classes: Sequence[str]) -> str:
    """A two-column text table of the scalar metrics and the per-class AUC/AP."""
    rows: list[tuple[str, str]] = []
    if metrics.get("positive_class") is not None:  # the class that sensitivity, specificity, PPV and NPV describe
        rows.append(("positive class", str(metrics["positive_class"])))
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            rows.append((key, f"{value:.4f}" if math.isfinite(value) else "n/a"))
    for key in ("per_class_auc", "per_class_ap", "per_class_sensitivity", "per_class_specificity"):
        for name, value in (metrics.get(key) or {}).items():
            label = classes[int(name)] if name.isdigit() and int(name) < len(classes) else name
            shown = f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"
            rows.append((f"{key.removeprefix('per_class_')}[{label}]", shown))
    skipped = metrics.get("skipped_classes") or []
    if skipped:
        rows.append(("skipped classes", ", ".join(classes[int(s)] if s.isdigit() else s for s in skipped)))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- shared flags

# The registered methods, for --help without importing torch (the registry imports every method module);
# tests/cli/test_cli.py checks that this equals fastprompt.available_methods().
METHOD_NAMES = ("adapter", "bitfit", "ept", "fpt", "fpt+", "full", "linear", "lora", "partial", "vpt")

CSV_FORMAT = (
    "Data: a folder of <class>/<image> files, or a CSV list with a header row. Single-label CSV: `path,label`, "
    "one image per row, the label a class name (or a class index 0..K-1). Multi-label CSV: `path,<class 1>,"
    "<class 2>,...` with a 0/1 column per class. Paths are relative to the CSV's folder (or absolute)."
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `fastprompt train: error: argument --lr: ...` and where to look."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, or says that it is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "(default" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if action.default is None or action.default is False:
            return f"{text} (default: off)" if action.nargs == 0 else text
        return f"{text} (default: %(default)s)"


def _checked_number(kind: type, text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _checked_number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _checked_number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _checked_number(float, text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number greater than 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _checked_number(float, text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = _checked_number(float, text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def share(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = _checked_number(float, text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be greater than 0 and at most 1, got {text}")
    return value


def add_command(commands: Any, name: str, summary: str, description: str = "") -> argparse.ArgumentParser:
    """A subcommand parser with fastprompt's help formatter; description paragraphs are wrapped, indented lines kept."""
    import textwrap

    paragraphs = [f"{summary}."] + [part for part in description.split("\n\n") if part]
    text = "\n\n".join(
        "\n".join(line if line.startswith(" ") else textwrap.fill(line, 100) for line in part.split("\n"))
        for part in paragraphs
    )
    return commands.add_parser(name, help=summary, description=text, formatter_class=HelpFormatter)


def add_model_args(
    parser: argparse.ArgumentParser,
    *,
    methods: Sequence[str] = METHOD_NAMES,
    default_method: str = "ept",
    method_flags: Sequence[str] = tuple(METHOD_FLAGS),
) -> None:
    """Backbone, weights and method flags (train: every method; preload: the FPT ones)."""
    parser.add_argument("--model", required=True, help="timm model name, e.g. vit_base_patch16_384")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--pretrained", action="store_true", help="timm's pretrained weights (local cache or the Hugging Face hub)"
    )
    weights.add_argument(
        "--weights",
        "--checkpoint",
        dest="checkpoint",
        metavar="FILE",
        help="local backbone weight file (safetensors/PyTorch state_dict) loaded through timm; --checkpoint is the "
        "older name (default: random init unless --pretrained)",
    )
    parser.add_argument(
        "--model-kwargs",
        action="append",
        nargs="+",
        metavar="KEY=VALUE",
        help="timm constructor overrides, e.g. depth=2 (default: none)",
    )
    parser.add_argument("--img-size", type=positive_int, default=512, help="input resolution in pixels")
    parser.add_argument("--method", default=default_method, metavar="METHOD", help=f"one of {', '.join(methods)}")
    flags = {
        "prompt_length": dict(type=positive_int, help="EPT prompt length (default: the method's, 100)"),
        "rank": dict(type=positive_int, help="LoRA rank (default: the method's, 8)"),
        "num_tokens": dict(type=positive_int, help="VPT prompt tokens (default: the method's, 10)"),
        "num_prompts": dict(type=positive_int, help="FPT prompts per layer (default: the method's, 16)"),
        "token_ratio": dict(type=share, help="FPT share of tokens kept per head (default: the method's, 0.2)"),
    }
    for name in method_flags:
        parser.add_argument(METHOD_FLAGS[name], **flags[name])
    parser.add_argument(
        "--option",
        action="append",
        nargs="+",
        metavar="KEY=VALUE",
        help="any other method option, e.g. layers=[6,7] (default: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (initialisation, splits, shuffling)")


def crop_scale(text: str) -> tuple[float, float]:
    """argparse type: `MIN,MAX`, the share of the image a training crop keeps (0 < MIN <= MAX <= 1)."""
    from fastprompt.augmentations import check_scale

    try:
        return check_scale(text.replace(" ", "").split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_augment_args(parser: argparse.ArgumentParser) -> None:
    """--augment PRESET, --hflip/--no-hflip and --crop-scale MIN,MAX (train)."""
    from fastprompt.augmentations import AUGMENTATIONS, DEFAULT_AUGMENT

    presets = "; ".join(
        f"{name}: "
        + ("resize only" if o["scale"] is None else f"crop {o['scale'][0]:g}-{o['scale'][1]:g}")
        + (f", flip {o['hflip']:g}" if o["hflip"] else ", no flip")
        + (f", rotate ±{o['rotation']:g}°" if o["rotation"] else "")
        + (f", brightness/contrast {o['color_jitter']:g}" if o["color_jitter"] else "")
        for name, o in AUGMENTATIONS.items()
    )
    parser.add_argument(
        "--augment",
        default=DEFAULT_AUGMENT,
        choices=tuple(AUGMENTATIONS),
        metavar="PRESET",
        help=f"training augmentation preset ({presets}); ept/fpt are the papers' recipes",
    )
    parser.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips (p=0.5) on or off; off suits chest X-rays, whose left and right differ "
        "(default: the preset's)",
    )
    parser.add_argument(
        "--crop-scale",
        type=crop_scale,
        metavar="MIN,MAX",
        help="share of the image area a random training crop keeps, e.g. 0.7,1.0 (default: the preset's)",
    )


def add_run_checkpoint(parser: argparse.ArgumentParser) -> None:
    """--run RUN (or --checkpoint RUN): the trained run that evaluate, predict and explain read."""
    parser.add_argument(
        "--run",
        "--checkpoint",
        dest="checkpoint",
        required=True,
        metavar="RUN",
        help="a `fastprompt train` run folder (its best checkpoint) or one of its checkpoints/*.pt files; "
        "--checkpoint is the older name",
    )
    add_trust_checkpoint(parser)


def add_trust_checkpoint(parser: argparse.ArgumentParser) -> None:
    """--trust-checkpoint: read a checkpoint that holds more than plain data (an older fastprompt's)."""
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="also read a checkpoint that holds Python objects besides plain data (one written by an older "
        "fastprompt): this can run code its author chose, so only for files from a source you trust",
    )


def add_positive_class(parser: argparse.ArgumentParser, *, recorded: bool) -> None:
    """--positive-class NAME: the class whose sensitivity, specificity, PPV and NPV are reported."""
    default = (
        "the run's"
        if recorded
        else "for two classes the partner of a negative name (normal, healthy, negative, benign, control, no "
        "finding), else the second class"
    )
    parser.add_argument(
        "--positive-class",
        metavar="NAME",
        help="the class (e.g. the disease) whose sensitivity, specificity, PPV, NPV and sensitivity at 90/95 %% "
        f"specificity are the headline metrics (default: {default})",
    )


def positive_class_for(
    classes: Sequence[str], given: str | None, *, multilabel: bool, recorded: str | None = None
) -> str | None:
    """The positive class name for `classes` (single-label), printing a line that names it and how to change it.

    `given`: --positive-class; `recorded`: the run's choice (evaluate, predict, a resumed train), used when `given`
    is None.
    """
    import sys

    name, line = positive_class_choice(classes, given, multilabel=multilabel, recorded=recorded)
    if line is not None:
        print(line, file=sys.stderr)
    return name


def positive_class_choice(
    classes: Sequence[str], given: str | None, *, multilabel: bool, recorded: str | None = None
) -> tuple[str | None, str | None]:
    """`positive_class_for` without printing: the class name (None: none) and the line that names it (or None)."""
    if multilabel:
        if given is not None:
            raise UsageError("--positive-class applies to single-label data; multi-label runs report every label")
        return None, None
    from fastprompt.metrics import resolve_positive_class

    try:
        index, line = resolve_positive_class(list(classes), given if given is not None else recorded)
    except ValueError as error:
        raise UsageError(f"--positive-class: {error}") from None
    if given is None and recorded is not None:
        line = line.replace("(chosen by the user)", "(recorded by the run; change it with --positive-class NAME)")
    return (None, None) if index is None else (str(classes[index]), line)


def add_common(parser: argparse.ArgumentParser) -> None:
    """--debug and --quiet."""
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
