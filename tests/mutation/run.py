"""Mutation audit: apply one behaviour-changing mutant at a time in a scratch copy of the tree, run the tests that own
the behaviour, and report which mutants the tests kill.

Run from the repository root (see tests/mutation/README.md)::

    OMP_NUM_THREADS=1 .venv/bin/python tests/mutation/run.py            # every mutant
    .venv/bin/python tests/mutation/run.py --list                       # the mutants, without running anything
    .venv/bin/python tests/mutation/run.py --only predict-row-index     # some mutants (ids or id prefixes)
    .venv/bin/python tests/mutation/run.py --json audit.json            # also write the outcome as JSON

The scratch copy holds the tracked and untracked (not ignored) files of the working tree, so uncommitted tests take
part; the working tree itself is never modified. `fastprompt.kernels` is mapped onto kernels/ there by a symlink, and
PYTHONPATH points at the copy, so the owning tests (and the subprocesses they start) import the mutated code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from mutants import DESELECT, MUTANTS, Mutant  # noqa: E402


def scratch_copy(root: Path) -> Path:
    """A copy of the working tree's tracked and untracked, not ignored files under a new temporary folder."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, check=True, timeout=120,
    ).stdout.decode().split("\0")  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="fastprompt-mutation-"))
    for name in filter(None, listed):
        source = root / name
        if not source.is_file():  # deleted in the working tree but still tracked
            continue
        target = scratch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    (scratch / "fastprompt" / "kernels").symlink_to(Path("..") / "kernels")  # package_dir's mapping, uninstalled
    return scratch


def run_tests(scratch: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, output tail) of `pytest -x` on `tests` in the scratch copy."""
    env = {**os.environ, "PYTHONPATH": str(scratch), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    deselect = [f"--deselect={node}" for node in DESELECT]
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *deselect, *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, ""
    output = done.stdout + done.stderr
    failed = [line.split(" - ")[0] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    status = "passed" if done.returncode == 0 else "failed"
    return status, time.monotonic() - start, "\n".join(failed) or output[-1500:]


def apply(scratch: Path, mutant: Mutant) -> str:
    """Write the mutant into the scratch copy; returns the original text (to restore)."""
    path = scratch / mutant.file
    text = path.read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise LookupError(f"{mutant.id}: the original snippet occurs {count} times in {mutant.file} (stale mutant)")
    path.write_text(text.replace(mutant.original, mutant.replacement))
    return text


def select(ids: list[str] | None) -> list[Mutant]:
    if not ids:
        return list(MUTANTS)
    chosen = [m for m in MUTANTS if any(m.id == i or m.id.startswith(i) for i in ids)]
    if not chosen:
        raise SystemExit(f"no mutant matches {ids}; see --list")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="mutant ids or id prefixes (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--baseline", action="store_true", help="first run each owning test set unmutated")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's test run (default 600)")
    parser.add_argument("--json", type=Path, help="write the outcome as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = parser.parse_args(argv)
    mutants = select(args.only)
    if args.list:
        for m in mutants:
            count = (REPO / m.file).read_text().count(m.original)
            state = "ok" if count == 1 else f"STALE ({count} matches)"
            print(f"{m.id:36s} {state:6s} {m.file}: {m.what}")
        return 0
    scratch = scratch_copy(REPO)
    print(f"scratch copy: {scratch}", flush=True)
    outcomes = []
    try:
        if args.baseline:
            for tests in sorted({m.tests for m in mutants}):
                status, seconds, output = run_tests(scratch, tests, args.timeout)
                print(f"baseline {status:8s} {seconds:6.1f}s {' '.join(tests)}", flush=True)
                if status != "passed":
                    print(output)
                    return 2
        for m in mutants:
            try:
                original = apply(scratch, m)
            except LookupError as error:
                outcomes.append({"id": m.id, "file": m.file, "status": "stale", "seconds": 0.0, "what": m.what})
                print(f"STALE    {error}", flush=True)
                continue
            try:
                status, seconds, output = run_tests(scratch, m.tests, args.timeout)
            finally:
                (scratch / m.file).write_text(original)
            verdict = "SURVIVED" if status == "passed" else "killed"
            caught_by = output.splitlines()[0] if status == "failed" and output else ""
            outcomes.append(
                {"id": m.id, "file": m.file, "status": verdict, "how": status, "seconds": round(seconds, 1),
                 "what": m.what, "tests": list(m.tests), "caught_by": caught_by}
            )  # fmt: skip
            print(f"{verdict:8s} {seconds:6.1f}s {m.id}: {m.what}" + (f"  [{caught_by}]" if caught_by else ""),
                  flush=True)  # fmt: skip
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    counted = [o for o in outcomes if o["status"] != "stale"]
    killed = sum(o["status"] == "killed" for o in counted)
    survivors = [o["id"] for o in counted if o["status"] == "SURVIVED"]
    stale = [o["id"] for o in outcomes if o["status"] == "stale"]
    share = killed / len(counted) if counted else 0.0
    print(f"\n{killed}/{len(counted)} mutants killed ({share:.0%}); survivors: {survivors or 'none'}")
    if stale:
        print(f"stale (the code moved; update their snippets): {stale}")
    if args.json:
        args.json.write_text(json.dumps({"killed": killed, "counted": len(counted), "outcomes": outcomes}, indent=1))
    return 0 if not survivors and not stale else 1


if __name__ == "__main__":
    raise SystemExit(main())
