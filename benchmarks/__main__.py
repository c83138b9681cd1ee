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
    args = parser.parse_args(argv)
    written = []
    start = time.perf_counter()
    resolutions = ["--resolutions", "224"] if args.device == "cpu" else ["--resolutions", "224", "512", "1024"]
    precision = [] if args.device == "cpu" else ["--precision", "bf16"]
    written.append(memory.main(["--device", args.device, *resolutions, *precision]))
    written.append(throughput.main(["--device", args.device, *resolutions, *precision]))
    written.append(kernels.main(["--device", args.device]))
    print(f"default set done in {time.perf_counter() - start:.0f} s; results:")
    for path in written:
        print(f"  {path}")
    print("render the README tables and plots with: python -m benchmarks.report (after committing the results)")


if __name__ == "__main__":
    main()
