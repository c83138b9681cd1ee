"""Training-step time and images/s per method and resolution (and model FLOPs utilisation on a GPU).

python -m benchmarks.throughput                                  # CPU, ViT-B/16 at 224, batch 1, small counts
python -m benchmarks.throughput --device cuda --precision bf16 --batch-size 16 --resolutions 512 1024
python -m benchmarks.throughput --resolutions 512 --methods ept --checkpointing none selective full --interleave
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from benchmarks import harness, models, results
from fastprompt import count_parameters

# Dense bf16 tensor-core peaks from the vendors' data sheets, matched in order against the CUDA device name.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, "NVIDIA H100 PCIe dense bf16 peak, 756 TFLOP/s"),
    ("H100", 989.0, "NVIDIA H100 SXM dense bf16 peak, 989 TFLOP/s"),
    ("H200", 989.0, "NVIDIA H200 dense bf16 peak, 989 TFLOP/s (same tensor cores as H100 SXM)"),
)
DEFAULT_COUNTS = {"cpu": (1, 3), "cuda": (5, 20)}  # (warm-up, repetitions)


def bf16_peak(name: str) -> tuple[float, str] | None:
    """(peak FLOP/s, description) of a device from the table above, or None for a device not in it."""
    for pattern, tflops, source in BF16_PEAK_TFLOPS:
        if pattern.lower() in name.lower():
            return tflops * 1e12, source
    return None


def step_flops(step: models.TrainingStep) -> int:
    """FLOPs of one training step as counted by torch's FlopCounterMode (matmuls and attention; custom kernels
    it cannot see count zero)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def prepare(
    variant: models.Variant, resolution: int, args: argparse.Namespace, device: torch.device, policy: str = "none"
) -> tuple[models.TrainingStep, dict]:
    """The training step of one (method, resolution, checkpointing policy) row and the row's fixed fields."""
    model = models.model_for(variant, resolution, args, device, policy)
    trainable, total = count_parameters(model)
    step = models.synthetic_step(model, args.batch_size, resolution, args, device, variant.cached_features)
    row = {
        "model": args.model,
        "method": variant.label,
        "apply_method": variant.method,
        "options": variant.options,
        "cached_features": variant.cached_features,
        "resolution": resolution,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "grad_checkpointing": args.grad_checkpointing,
        "checkpointing": policy,
        "trainable_pct": 100.0 * trainable / total,
    }
    return step, row


def finish(step: models.TrainingStep, row: dict, stats: harness.Stats, args: argparse.Namespace) -> dict:
    """Add the timing, images/s and (with `args.flops`) FLOPs and MFU of `step` to `row`."""
    device = step.images.device
    row["step_seconds"] = stats.as_dict()
    row["images_per_second"] = args.batch_size / stats.median
    if args.flops:
        flops = step_flops(step)
        row["flops_per_step"] = flops
        row["achieved_tflops"] = flops / stats.median / 1e12
        peak = bf16_peak(results.device_name(device)) if device.type == "cuda" else None
        row["mfu"] = flops / stats.median / peak[0] if peak else None
        row["peak_tflops_source"] = peak[1] if peak else None
    return row


def release(device: torch.device) -> None:
    """Free what the last rows left behind."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    variant: models.Variant, resolution: int, args: argparse.Namespace, device: torch.device, policy: str = "none"
) -> dict:
    """Step-time statistics, images/s, FLOPs and (GPU) MFU of one (method, resolution, policy) row."""
    step, row = prepare(variant, resolution, args, device, policy)
    row = finish(step, row, harness.time_fn(step, device, warmup=args.warmup, repeats=args.repeats), args)
    del step
    release(device)
    return row


def measure_interleaved(
    variant: models.Variant, resolution: int, args: argparse.Namespace, device: torch.device
) -> list[dict]:
    """One row per checkpointing policy of (method, resolution), their steps timed round-robin (a warm-up round,
    then `args.repeats` rounds) so that a load change on the machine affects every policy alike."""
    prepared = [prepare(variant, resolution, args, device, policy) for policy in args.checkpointing]
    samples: list[list[float]] = [[] for _ in prepared]
    for round_index in range(args.warmup + args.repeats):
        for (step, _), times in zip(prepared, samples):
            stats = harness.time_fn(step, device, warmup=0, repeats=1)
            if round_index >= args.warmup:
                times.append(stats.median)
    rows = [finish(step, row, harness.summarize(times), args) for (step, row), times in zip(prepared, samples)]
    del prepared
    release(device)
    return rows


def output_stem(args: argparse.Namespace) -> str:
    """The default result file name: suite, model, resolutions, precision, batch and flags."""
    parts = ["throughput", args.model, "r" + "-".join(map(str, args.resolutions)), args.precision]
    parts.append(f"b{args.batch_size}")
    if args.grad_checkpointing:
        parts.append("gc")
    if args.checkpointing != ["none"]:
        parts.append("ck-" + "-".join(args.checkpointing))
    if args.methods:
        parts.append("m-" + "-".join(args.methods))
    return "_".join(re.sub(r"[^A-Za-z0-9._+-]+", "", part) for part in parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the throughput suite."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0])
    models.add_row_arguments(parser, resolutions=[224])
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time the policies of each method round-robin (fair ratios on a busy machine; holds one model per policy)",
    )
    parser.add_argument("--warmup", type=int, help="untimed steps (default: 1 on CPU, 5 on GPU)")
    parser.add_argument("--repeats", type=int, help="timed steps (default: 3 on CPU, 20 on GPU)")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip counting FLOPs (and MFU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        type=Path,
        help="result JSON file, or a folder for <device>/<name>.json (default: ./benchmark-results/)",
    )
    args = parser.parse_args(argv)
    warmup, repeats = DEFAULT_COUNTS["cuda" if args.device.startswith("cuda") else "cpu"]
    args.warmup = warmup if args.warmup is None else args.warmup
    args.repeats = repeats if args.repeats is None else args.repeats
    try:
        harness.check_counts(args.warmup, args.repeats)
    except ValueError as error:
        parser.error(str(error))
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Run the throughput suite, print its table and write the result JSON; return the JSON path."""
    args = parse_args(argv)
    device = harness.device_or_exit(args.device)
    variants = models.select_variants(args.methods)
    torch.manual_seed(args.seed)
    rows = []
    print(f"{'method':<14} {'ckpt':<9} {'res':>5} {'step ms':>10} {'IQR ms':>8} {'img/s':>8} {'MFU %':>6}", flush=True)
    cells = [(resolution, variant) for resolution in args.resolutions for variant in variants]
    for resolution, variant in tqdm(cells, desc="throughput", file=sys.stderr):
        if args.interleave:
            new_rows = measure_interleaved(variant, resolution, args, device)
        else:
            new_rows = [measure(variant, resolution, args, device, policy) for policy in args.checkpointing]
        for row in new_rows:
            rows.append(row)
            mfu = f"{100 * row['mfu']:6.1f}" if row.get("mfu") is not None else f"{'n/a':>6}"
            step = row["step_seconds"]
            tqdm.write(
                f"{row['method']:<14} {row['checkpointing']:<9} {resolution:>5} {1e3 * step['median']:>10.1f} "
                f"{1e3 * step['iqr']:>8.1f} {row['images_per_second']:>8.2f} {mfu}"
            )
    notes = [
        f"timing: {args.warmup} warm-up steps, {args.repeats} timed steps; median and IQR of one full training "
        "step (forward, backward, AdamW) — " + ("CUDA events" if device.type == "cuda" else "time.perf_counter")
    ]
    if args.interleave:
        notes.append("--interleave: the policies of each method were timed round-robin, one step each per round")
    if args.flops:
        notes.append(
            "flops_per_step: torch.utils.flop_counter.FlopCounterMode over one step; custom (Triton) kernels "
            "are invisible to it, so MFU of methods that use them is understated"
        )
    return results.save_suite_run("throughput", device, args, rows, notes, output_stem(args))


if __name__ == "__main__":
    main()
