"""`fastprompt bench SUITE ARGS...`: run one suite of the benchmarks package (from a checkout)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fastprompt.cli.common import UsageError


def add_parser(commands: Any) -> None:
    """Register the `bench` subcommand."""
    parser = commands.add_parser("bench", help="run a benchmark suite: fastprompt bench SUITE [ARGS...]")
    parser.add_argument("suite", help="module of the benchmarks package, e.g. memory")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the suite")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> Any:
    """`fastprompt bench SUITE ARGS...`: run `benchmarks.SUITE`'s main with the remaining arguments."""
    import importlib
    import pkgutil

    import fastprompt

    for root in (Path.cwd(), Path(fastprompt.__file__).resolve().parent.parent):  # a checkout / editable install
        if (root / "benchmarks" / "__init__.py").is_file() and str(root) not in sys.path:
            sys.path.append(str(root))
            break
    try:
        benchmarks = importlib.import_module("benchmarks")
    except ImportError:
        raise UsageError(
            "the benchmarks package is not importable: it ships with the source repository, not the wheel; run "
            "`fastprompt bench` from a checkout of fastprompt (its root folder holds benchmarks/)"
        ) from None
    suites = sorted(info.name for info in pkgutil.iter_modules(benchmarks.__path__) if not info.name.startswith("_"))
    if args.suite not in suites:
        raise UsageError(f"unknown benchmark suite {args.suite!r}; available: {', '.join(suites)}")
    module = importlib.import_module(f"benchmarks.{args.suite}")
    if not hasattr(module, "main"):
        raise UsageError(f"benchmarks.{args.suite} is a helper module, not a suite; available: {', '.join(suites)}")
    return module.main(list(args.args))
