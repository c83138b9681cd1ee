"""`python -m benchmarks`: the default set — memory and throughput at 224 (CPU), then the kernel suite.

On CPU (the default) it finishes in a few minutes on two cores; `--device cuda` runs each suite's GPU defaults.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import kernels, memory, throughput


def main(argv: list[str] | None = None) -> None:
    """Run the three suites with their defaults on `--device`, writing one result file each."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument(
        "--output",
        help="folder for the result files, <folder>/<device>/<name>.json (default: ./benchmark-results; "
        "benchmarks/results adds them to the repository's committed results)",
    )
    args = parser.parse_args(argv)
    output = ["--output", args.output] if args.output else []
    written = []
    start = time.perf_counter()
    resolutions = ["--resolutions", "224"] if args.device == "cpu" else ["--resolutions", "224", "512", "1024"]
    precision = [] if args.device == "cpu" else ["--precision", "bf16"]
    written.append(memory.main(["--device", args.device, *resolutions, *precision, *output]))
    written.append(throughput.main(["--device", args.device, *resolutions, *precision, *output]))
    written.append(kernels.main(["--device", args.device, *output]))
    print(f"default set done in {time.perf_counter() - start:.0f} s; results:")
    for path in written:
        print(f"  {path}")
    print(
        "to publish them: rerun with --output benchmarks/results, commit, then render the README tables and plots "
        "with python -m benchmarks.report"
    )


if __name__ == "__main__":
    main()
