"""`fastprompt demo` end to end: wall time of the command in a fresh process and the validation metrics it reaches.

python -m benchmarks.cli_demo                                 # the demo's defaults, one run
python -m benchmarks.cli_demo --output benchmarks/results     # write into the committed results folder
python -m benchmarks.cli_demo --demo-args --epochs 3          # pass options through to `fastprompt demo`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import results


def run_demo(demo_args: list[str]) -> dict:
    """Run `python -m fastprompt demo --quiet --output-dir TMP *demo_args` in a fresh interpreter; one result row."""
    with tempfile.TemporaryDirectory(prefix="fastprompt-demo-bench-") as folder:
        command = [sys.executable, "-m", "fastprompt", "demo", "--quiet", f"--output-dir={folder}", *demo_args]
        load_before = os.getloadavg()
        started = time.perf_counter()
        done = subprocess.run(command, cwd=results.REPO_ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        load_after = os.getloadavg()
        if done.returncode != 0:
            raise SystemExit(f"fastprompt demo exited with {done.returncode}:\n{done.stderr[-2000:]}")
        run = Path(folder) / "run"
        metrics = json.loads((run / "metrics.json").read_text())
        config = json.loads((run / "config.json").read_text())
    return {
        "command": " ".join(["fastprompt", "demo", "--quiet", "--output-dir=TMP", *demo_args]),
        "exit_code": done.returncode,
        "wall_seconds_including_imports": seconds,
        "val_acc": metrics.get("acc"),
        "val_auc": metrics.get("auc"),
        "val_loss": metrics.get("loss"),
        "method": config.get("method"),
        "model": config.get("model"),
        "img_size": config.get("img_size"),
        "epochs": config.get("engine", {}).get("epochs"),
        "train_size": config.get("train_size"),
        "val_size": config.get("val_size"),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
    }


def main(argv: list[str] | None = None) -> Path:
    """Run the demo once, print its figures and write the result JSON; return its path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="result JSON file or folder (default: ./benchmark-results/)")
    parser.add_argument(
        "--demo-args", nargs=argparse.REMAINDER, default=[], help="options passed on to `fastprompt demo` (last)"
    )
    args = parser.parse_args(argv)
    row = run_demo(args.demo_args)
    print(
        f"{row['command']}: {row['wall_seconds_including_imports']:.1f} s, val acc {row['val_acc']:.3f}, "
        f"auc {row['val_auc']:.3f}, loss {row['val_loss']:.3f} (load {row['load_average_before'][0]:.1f})"
    )
    notes = [
        "wall time of one `python -m fastprompt demo` process, interpreter start and imports included, on a CPU "
        "shared with other work (see the load averages); metrics: the demo run's final validation metrics",
    ]
    return results.save_suite_run("cli_demo", "cpu", args, [row], notes, "cli_demo")


if __name__ == "__main__":
    main()
