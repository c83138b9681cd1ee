"""Command-line start-up: wall time of `fastprompt [COMMAND] --help` in a fresh interpreter, and what it imports;
also a mistyped --data (an error that needs no torch) and `fastprompt bench memory --help`.

python -m benchmarks.cli_startup                          # this checkout, 5 runs per command
python -m benchmarks.cli_startup --checkout /tmp/old      # another checkout (e.g. a worktree of an older commit)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import results

COMMANDS = tuple(
    [*command, "--help"] for command in ([], ["train"], ["evaluate"], ["predict"], ["preload"], ["bench"], ["explain"])
) + (
    ["demo", "--help"],
    ["bench", "memory", "--help"],
    ["train", "--data=no-such-folder", "--model=vit_base_patch16_384", "--output-dir=no-such-run"],  # exits 2
)
HEAVY = ("torch", "timm", "torchvision")
# Runs the CLI's --help exactly as the console script does, then reports which heavy modules it imported.
PROBE = (
    "import sys\n"
    "try:\n"
    "    from fastprompt.cli import main\n"
    "    code = main(sys.argv[1:])\n"
    "except SystemExit as exit_:  # older versions let argparse exit\n"
    "    code = exit_.code\n"
    "finally:\n"
    f"    print('IMPORTED', ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    "sys.exit(code)\n"
)


def measure(checkout: Path, command: list[str], repeats: int) -> dict:
    """Median/min wall seconds of `fastprompt *command` (fresh process each time) and its heavy imports."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    times, imported, code = [], "", 0
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", PROBE, *command], cwd=checkout, env=env, capture_output=True, text=True
        )
        times.append(time.perf_counter() - started)
        code = done.returncode
        lines = [line for line in done.stdout.splitlines() if line.startswith("IMPORTED")]
        imported = lines[-1].removeprefix("IMPORTED").strip() if lines else "?"
    return {
        "command": " ".join(["fastprompt", *command]),
        "exit_code": code,
        "seconds_median": statistics.median(times),
        "seconds_min": min(times),
        "repeats": repeats,
        "heavy_modules_imported": [name for name in imported.split(",") if name],
    }


def main(argv: list[str] | None = None) -> Path:
    """Measure every --help screen and the fast error, print the table and write the result JSON; return its path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=results.REPO_ROOT, help="fastprompt source tree to run")
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per command")
    parser.add_argument("--output", type=Path, help="result JSON file or folder (default: ./benchmark-results/)")
    args = parser.parse_args(argv)
    checkout = args.checkout.resolve()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()
    rows = []
    for command in COMMANDS:
        row = measure(checkout, command, args.repeats)
        row["checkout_commit"] = commit
        rows.append(row)
        heavy = ", ".join(row["heavy_modules_imported"]) or "none"
        print(f"{row['command']:<40} {row['seconds_median']:7.2f} s  (exit {row['exit_code']}; imports {heavy})")
    args.checkout = str(checkout)
    notes = [
        "wall time of a fresh `python -c` process running fastprompt.cli.main(command), median of "
        f"{args.repeats}; the interpreter start is included",
        "a command that did not exist in the measured checkout exits 2 (argparse's invalid choice); the train row "
        "with a missing --data exits 2 by design",
    ]
    stem = f"cli_startup_{commit[:7] or 'unknown'}"
    return results.save_suite_run("cli_startup", "cpu", args, rows, notes, stem)


if __name__ == "__main__":
    main(sys.argv[1:])
