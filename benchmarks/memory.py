"""Memory per method and resolution: trainable %, bytes saved for backward, peak RSS / GPU peak, batch budget.

python -m benchmarks.memory                       # ViT-B/16 at 224 and 512, batch 1, CPU, every method
python -m benchmarks.memory --device cuda --precision bf16 --resolutions 512 1024 --budget 24GB
python -m benchmarks.memory --model vit_base_patch16_384 --resolutions 512 --methods ept lora fpt+ \
    --hf-model vit-base-patch16-384         # timm rows and Hugging Face ViT-B/16 rows side by side
python -m benchmarks.memory --resolutions 512 --methods ept-official ept --checkpointing none selective full

CPU rows run in fresh processes under glibc with MALLOC_MMAP_THRESHOLD_ fixed (131072 unless set), so that freed
activations leave the resident set and the peak RSS shows what recomputation saves.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import multiprocessing
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks import budget, harness, models, options, results
from fastprompt import count_parameters
from fastprompt.engine.activation import LiveBytes
from fastprompt.profiling import saved_tensor_bytes

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
MB = 1e6
MMAP_THRESHOLD = "131072"  # glibc's default initial value, fixed: no dynamic raise that keeps freed blocks resident


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where that is not possible."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def read_rss() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process in bytes, from /proc/self/status."""
    text = STATUS.read_text()
    current = re.search(r"^VmRSS:\s+(\d+) kB", text, flags=re.MULTILINE)
    peak = re.search(r"^VmHWM:\s+(\d+) kB", text, flags=re.MULTILINE)
    if current is None or peak is None:
        raise OSError("/proc/self/status has no VmRSS/VmHWM lines")
    return int(current.group(1)) * 1024, int(peak.group(1)) * 1024


def measure_step_cpu(step: models.TrainingStep) -> dict[str, int | None]:
    """Run one training step and return the process's RSS before it and its peak RSS during it (None where the peak
    cannot be reset), and its peak of live tensor bytes."""
    gc.collect()
    rss = reset_peak_rss()
    before = read_rss()[0] if rss else None
    with LiveBytes() as live:
        step()
    peak = read_rss()[1] if rss else None
    return {"rss_before_bytes": before, "peak_rss_bytes": peak, "step_peak_bytes": live.peak}


def measure_step_cuda(step: models.TrainingStep) -> dict[str, int]:
    """Run one training step and return the CUDA peak allocated and reserved bytes during it."""
    device = step.images.device
    gc.collect()
    torch.cuda.empty_cache()
    with models.fresh_cuda_peak(device) as peak:
        step()
        torch.cuda.synchronize(device)
        return {"peak_allocated_bytes": peak(), "peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}


def saved_bytes_at(
    model: torch.nn.Module,
    args: argparse.Namespace,
    resolution: int,
    batch_size: int,
    device: torch.device,
    cached: bool,
) -> int:
    """Bytes saved for backward by the forward pass and loss at `batch_size`."""
    step = models.synthetic_step(model, batch_size, resolution, args, device, cached)
    return saved_tensor_bytes(step.forward_loss, exclude=model)


def cpu_budget_model(fixed: int, saved1: int, saved2: int) -> Callable[[int], int]:
    """Bytes of a training step at batch b: `fixed` + saved bytes, linear through the measurements at b=1 and b=2."""
    slope = saved2 - saved1
    return lambda batch: fixed + saved1 + (batch - 1) * slope


def gpu_fits(
    model: torch.nn.Module, args: argparse.Namespace, resolution: int, device: torch.device, limit: int, cached: bool
) -> Callable[[int], bool]:
    """A predicate: does one full training step at batch b stay within `limit` bytes of CUDA memory?"""

    def fits(batch: int) -> bool:
        step = None
        try:
            step = models.synthetic_step(model, batch, resolution, args, device, cached)
            figures = measure_step_cuda(step)
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del step
            model.zero_grad(set_to_none=True)  # the next probe starts without this one's gradients
            gc.collect()
            torch.cuda.empty_cache()
        return figures["peak_allocated_bytes"] <= limit

    return fits


def measure(
    variant: models.Variant, resolution: int, args: argparse.Namespace, device: torch.device, policy: str = "none"
) -> dict:
    """All memory figures of one (method, resolution, checkpointing policy) row."""
    model = models.model_for(variant, resolution, args, device, policy)
    trainable, total = count_parameters(model)
    cached = variant.cached_features
    saved = saved_bytes_at(model, args, resolution, args.batch_size, device, cached)
    step = models.synthetic_step(model, args.batch_size, resolution, args, device, cached)
    figures = measure_step_cuda(step) if device.type == "cuda" else measure_step_cpu(step)
    row: dict[str, Any] = {
        "model": args.model,
        "method": variant.label,
        "apply_method": variant.method,
        "options": variant.options,
        "cached_features": cached,
        "resolution": resolution,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "grad_checkpointing": args.grad_checkpointing,
        "checkpointing": policy,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "saved_bytes": saved,
        "param_bytes": models.parameter_bytes(model),
        "grad_bytes": models.parameter_bytes(model, trainable_only=True),
        "optimizer_bytes": models.optimizer_state_bytes(step.optimizer),
        **figures,
    }
    if device.type == "cpu":
        row["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    del step
    if args.budget is not None:
        row.update(search_budget(model, row, args, device))
    del model
    gc.collect()
    return row


def run_row(
    variant: models.Variant, resolution: int, args: argparse.Namespace, device: torch.device, policy: str = "none"
) -> dict:
    """Measure one row; on CPU with `args.isolate`, in a process forked from a clean fork server, so that heap
    kept by earlier rows (the allocator does not hand all freed memory back) cannot inflate its peak RSS."""
    if device.type != "cpu" or not args.isolate:
        return measure(variant, resolution, args, device, policy)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)  # read by glibc when the fork server starts
    context = multiprocessing.get_context("forkserver")  # a server that never ran torch: forking it is safe
    # fastprompt first: its import installs the torchvision repair (fastprompt._compat) before timm imports torchvision
    context.set_forkserver_preload(["fastprompt", "benchmarks.models", "timm"])
    target = importlib.import_module("benchmarks.memory").measure  # picklable by name even when run as __main__
    with context.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(target, (variant, resolution, args, device, policy))


def search_budget(model: torch.nn.Module, row: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """The largest batch whose training step fits `args.budget` bytes (GPU: measured; CPU: a memory model)."""
    limit = budget.parse_bytes(args.budget)
    if device.type == "cuda":
        fits = gpu_fits(model, args, row["resolution"], device, limit, row["cached_features"])
        how = "measured: torch.cuda.max_memory_allocated over one full training step"
    elif not row["cached_features"] and not row["model"].startswith(models.HF_PREFIX):
        fits = budget.meta_fits(model.to("meta"), row["resolution"], limit)  # the model's last use
        how = budget.METHOD
    else:
        fixed = row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
        saved1 = saved_bytes_at(model, args, row["resolution"], 1, device, row["cached_features"])
        saved2 = saved_bytes_at(model, args, row["resolution"], 2, device, row["cached_features"])
        total_at = cpu_budget_model(fixed, saved1, saved2)
        fits = lambda batch: total_at(batch) <= limit
        how = "model: parameters + gradients + AdamW state + saved-for-backward bytes (linear fit at batch 1 and 2)"
    batch, probes = budget.largest_fitting(fits, limit=args.budget_limit)
    return {"budget_bytes": limit, "max_batch": batch, "budget_probes": probes, "budget_method": how}


def format_row(row: dict) -> str:
    """One printed line of the memory table."""
    peak = row.get("peak_allocated_bytes", row.get("peak_rss_bytes"))
    parts = [
        f"{row['method'] + (' (hf)' if row['model'].startswith(models.HF_PREFIX) else ''):<14}",
        f"{row.get('checkpointing', 'none'):<9}",
        f"{row['resolution']:>5}",
        f"{row['trainable_pct']:>9.3f}",
        f"{row['saved_bytes'] / MB:>11.1f}",
        f"{peak / MB:>10.1f}" if peak is not None else f"{'n/a':>10}",
    ]
    if "max_batch" in row:
        parts.append(f"{row['max_batch']:>9}")
    return " ".join(parts)


def header(device: torch.device, with_budget: bool) -> str:
    """The printed table's header line."""
    peak = "GPU peak MB" if device.type == "cuda" else "peak RSS MB"
    columns = [f"{'method':<14}", f"{'ckpt':<9}", f"{'res':>5}", f"{'train %':>9}", f"{'saved MB':>11}", f"{peak:>10}"]
    if with_budget:
        columns.append(f"{'max batch':>9}")
    return " ".join(columns)


def output_stem(args: argparse.Namespace) -> str:
    """The default result file name: suite, model, resolutions, precision, batch and flags."""
    parts = ["memory", args.model, "r" + "-".join(map(str, args.resolutions)), args.precision, f"b{args.batch_size}"]
    if args.grad_checkpointing:
        parts.append("gc")
    if args.checkpointing != ["none"]:
        parts.append("ck-" + "-".join(args.checkpointing))
    if args.methods:
        parts.append("m-" + "-".join(args.methods))
    if args.budget:
        parts.append(f"budget{args.budget}")
    if args.hf_model:
        parts.append("hf-" + args.hf_model)
    return "_".join(re.sub(r"[^A-Za-z0-9._+-]+", "", part) for part in parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the memory suite."""
    parser = options.memory_parser()  # torch-free, so that `fastprompt bench memory --help` answers at once
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.budget is not None:
        try:
            budget.parse_bytes(args.budget)
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> Path:
    """Run the memory suite, print its table and write the result JSON; return the JSON path."""
    args = parse_args(argv)
    device = harness.device_or_exit(args.device)
    variants = models.select_variants(args.methods)
    torch.manual_seed(args.seed)
    rows = []
    print(header(device, args.budget is not None))
    cells = [(resolution, variant, args) for resolution in args.resolutions for variant in variants]
    if args.hf_model:  # the same cells on the Hugging Face model, in the same run
        hf_args = argparse.Namespace(**{**vars(args), "model": models.HF_PREFIX + args.hf_model})
        hf_variants = models.select_variants(args.hf_methods)
        cells += [(resolution, variant, hf_args) for resolution in args.resolutions for variant in hf_variants]
    cells = [(*cell, policy) for cell in cells for policy in args.checkpointing]
    for resolution, variant, cell_args, policy in tqdm(cells, desc="memory", file=sys.stderr):
        rows.append(run_row(variant, resolution, cell_args, device, policy))
        tqdm.write(format_row(rows[-1]))
    notes = [
        "saved_bytes: tensors autograd keeps for backward (forward + loss), de-duplicated by storage, "
        "parameters excluded; device-independent"
    ]
    if device.type == "cpu":
        notes.append(
            "each CPU row runs in a fresh process (unless --no-isolate); peak_rss_bytes: that process's peak RSS "
            "(VmHWM, reset before the step) over one full training step (forward, backward, AdamW); includes the "
            "model, the interpreter and the libraries; rss_before_bytes: the RSS just before that step. glibc "
            f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')} in the measuring processes"
        )
        notes.append(
            "step_peak_bytes: peak of live tensor bytes above the level before the step, over the same step "
            "(fastprompt.engine.activation.LiveBytes)"
        )
    return results.save_suite_run("memory", device, args, rows, notes, output_stem(args))


if __name__ == "__main__":
    main()
