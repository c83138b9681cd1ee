"""`fastprompt bench SUITE ARGS...`: run one suite of the benchmarks package (from a checkout)."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

from fastprompt.cli.common import UsageError, add_command


def benchmarks_root() -> Path | None:
    """The folder holding `benchmarks/` (the current directory or this checkout's root), or None from a wheel."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "benchmarks" / "__init__.py").is_file():
            return root
    return None


def make_importable(root: Path) -> None:
    """Put `root` (the folder holding benchmarks/) on this process's sys.path and on PYTHONPATH for the processes
    a suite starts. A multiprocessing fork server preloads its modules without the parent's sys.path (Python 3.11
    passes it and drops it): outside the repository root `benchmarks.models` failed to preload, timm was imported
    without fastprompt's torchvision repair, and the server died on its first task (benchmarks.memory now also
    preloads fastprompt first)."""
    import os

    folder = str(root)
    if folder not in sys.path:
        sys.path.append(folder)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if folder not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, folder])


def suite_summaries(root: Path | None) -> dict[str, str]:
    """Suite name -> the first line of its docstring, for the modules of `root/benchmarks` that define main()."""
    suites: dict[str, str] = {}
    if root is None:
        return suites
    for path in sorted((root / "benchmarks").glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            suites[path.stem] = (ast.get_docstring(tree) or "").strip().split("\n", 1)[0]
    return suites


def add_parser(commands: Any) -> None:
    """Register the `bench` subcommand."""
    suites = suite_summaries(benchmarks_root())
    listing = "\n".join(f"  {name:<12} {summary}" for name, summary in suites.items())
    description = (
        f"suites:\n{listing}\n\n" if suites else "No benchmarks/ folder here: run from a checkout of fastprompt.\n\n"
    )
    description += (
        "`fastprompt bench SUITE --help` shows a suite's options. Results go to ./benchmark-results/<device>/ under "
        "the current directory unless the suite is given --output FILE or --output DIR (e.g. --output "
        "benchmarks/results to add them to the repository's committed results)."
    )
    parser = add_command(commands, "bench", "run a benchmark suite: fastprompt bench SUITE [ARGS...]", description)
    parser.add_argument("suite", metavar="SUITE", help=f"one of: {', '.join(suites) or 'see above'}")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the suite")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def suite_help(suite: str, argv: list[str]) -> int | None:
    """Print a suite's --help from `benchmarks.options.<suite>_parser` (no torch import); None when it has none."""
    import importlib

    try:
        options = importlib.import_module("benchmarks.options")
    except ImportError:
        return None
    build = getattr(options, f"{suite}_parser", None)
    if build is None:
        return None
    try:
        build().parse_args(argv)
    except SystemExit as exit_:  # --help prints and exits 0
        return exit_.code if isinstance(exit_.code, int) else 0
    return 0


def run(args: argparse.Namespace) -> Any:
    """`fastprompt bench SUITE ARGS...`: run `benchmarks.SUITE`'s main with the remaining arguments."""
    import importlib
    import pkgutil

    root = benchmarks_root()
    if root is not None:
        make_importable(root)
    if {"-h", "--help"} & set(args.args) and root is not None:
        helped = suite_help(args.suite, list(args.args))
        if helped is not None:
            return helped
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
