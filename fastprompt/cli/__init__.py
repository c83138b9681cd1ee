"""The `fastprompt` command line: train, evaluate, predict, preload, bench, explain and demo.

A training run directory (``--output-dir``) holds ``config.yaml`` (every train flag of the run, resolved: ``train
--config RUN/config.yaml`` repeats it), ``config.json`` (everything needed to rebuild the model),
``metrics.json`` (final validation metrics), the Engine's ``metrics.jsonl``, ``curves.png`` and
``checkpoints/{best,last}.pt``, ``unreadable.csv`` (every image that could not be read, if any), and, for a
randomly initialised backbone, ``backbone.safetensors`` (its frozen weights, which checkpoints do not hold); with
``--copy-weights``, ``weights/<file>`` (the --weights file; otherwise its path and SHA-256 are recorded).
``--weights FILE`` (train, preload) is a backbone weight file and ``--run RUN`` (evaluate, predict, explain) a run
folder or one of its checkpoints; ``--checkpoint`` is the older name of both.
``metrics.json`` is measured with the model as it ends training (the ``last`` checkpoint); ``evaluate`` takes
either checkpoint. FPT methods can train from the feature cache (``--cache DIR``, filled by ``preload`` or on the
fly): the frozen branch then runs once per image. Without ``--val`` a stratified ``--val-fraction`` of ``--data``
(20 % by default, per class, fixed by ``--seed``) is held out for validation. Mistakes a user can fix end with one
message and exit code 2 (paths and method names are checked before torch is imported, `preflight`); ``--debug``
shows the traceback. Each command lives in its own module (parser and work
together); `common` holds what --help needs (no torch), `runs` the helpers the commands share once they run.
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import fastprompt
from fastprompt.cli import bench, demo, evaluate, explain, predict, preload, train
from fastprompt.cli.common import EXIT_FAILURE, EXIT_USAGE, Parser, UsageError
from fastprompt.cli.config import CONFIG_FLAG, expand_config, resolved_settings
from fastprompt.cli.preflight import check_arguments

__all__ = ["UsageError", "build_parser", "main"]

COMMANDS = (train, evaluate, predict, preload, bench, explain, demo)
OUT_OF_MEMORY_HINT = (
    "; lower --batch-size (with --grad-accum to keep the effective batch), use --precision bf16, --zero-stage 2/3, "
    "or FPT+ with --cache"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = Parser(prog="fastprompt", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--version", action="version", version=f"fastprompt {fastprompt.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types shown as a one-line message (exit code 2) rather than a traceback."""
    from fastprompt.data import CorruptImageError
    from fastprompt.engine.checkpoint import CheckpointError
    from fastprompt.runlock import RunLockedError

    return (
        ValueError, TypeError, FileNotFoundError, NotADirectoryError, CorruptImageError, CheckpointError,
        RunLockedError,
    )  # fmt: skip


_OS_ERROR_FIXES = {
    errno.ENOSPC: "free disk space, or write to another disk",
    errno.EDQUOT: "free space in your quota, or write to another disk",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EACCES: "you may not write there: choose a location you own, or fix its permissions",
    errno.EPERM: "you may not write there: choose a location you own, or fix its permissions",
    errno.EISDIR: "it is a folder: pass a file name inside it (e.g. FOLDER/results.csv)",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
}


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: the path, what went wrong, and the fix."""
    path = err.filename if err.filename is not None else "a file"
    reason = err.strerror or str(err)
    fix = _OS_ERROR_FIXES.get(err.errno, "check the path and the disk, then run the command again")
    return f"cannot use {path}: {reason}; {fix}"


def _write(line: str) -> None:
    """One line on stderr, above any progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def _is_out_of_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")  # never imported just to classify an error
    return isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError))


_SHOWN_WARNINGS: set[str] = set()


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Library warnings as one line each (no source excerpt), above any progress bar; each text once per run."""
    text = str(message)
    if text in _SHOWN_WARNINGS:
        return
    _SHOWN_WARNINGS.add(text)
    _write(f"fastprompt: warning: {text}")


def _command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser | None:
    """The subcommand's parser named in `argv` (its first non-option word), or None."""
    name = next((arg for arg in argv if not arg.startswith("-")), None)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices.get(name) if name is not None else None


def _accepts_config(parser: argparse.ArgumentParser | None) -> bool:
    return parser is not None and any(CONFIG_FLAG in action.option_strings for action in parser._actions)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastprompt` console script; returns the exit code.

    Before the command runs (and imports torch), `--config FILE` is expanded into flags and the arguments are
    checked as far as no torch is needed (`fastprompt.cli.preflight`): such mistakes answer in well under a second.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = _command_parser(parser, argv)
    try:
        if _accepts_config(command):
            position = argv.index(command.prog.split()[-1])
            argv = [*argv[: position + 1], *expand_config(command, argv[position + 1 :])]
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a flag argparse rejected (it printed why)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except UsageError as err:  # a config file's unknown key or bad value
        print(f"{command.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    args.argv = argv  # for the exact --resume command after an interrupt
    try:
        if _accepts_config(command):
            args.settings = resolved_settings(command, args)  # also checks --model-kwargs / --option key=value
        check_arguments(args)
    except UsageError as err:
        if getattr(args, "debug", False):
            raise
        print(f"fastprompt {args.command}: error: {err}", file=sys.stderr)  # torch not imported yet: no tqdm.write
        return EXIT_USAGE
    _SHOWN_WARNINGS.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # every warning reaches _show_warning, which prints each text once
            warnings.showwarning = _show_warning
            args.handler(args)
    except KeyboardInterrupt:
        print("fastprompt: interrupted", file=sys.stderr)
        return 130
    except user_errors() as err:
        if args.debug:
            raise
        _write(f"fastprompt {args.command}: error: {err}")
        return EXIT_USAGE
    except OSError as err:  # disk full, read-only or missing output location, a directory given as a file
        if args.debug:
            raise
        _write(f"fastprompt {args.command}: error: {describe_os_error(err)}")
        return EXIT_USAGE
    except Exception as err:
        if args.debug or not (isinstance(err, FloatingPointError) or _is_out_of_memory(err)):
            raise
        hint = OUT_OF_MEMORY_HINT if _is_out_of_memory(err) else ""
        _write(f"fastprompt {args.command}: failed: {type(err).__name__}: {err}{hint}")
        return EXIT_FAILURE
    return 0
