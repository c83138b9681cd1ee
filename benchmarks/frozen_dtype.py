"""Frozen weights in the compute dtype: step time and peak memory of LoRA and EPT in fp32, in bf16 autocast with fp32
frozen weights, and in bf16 with the frozen weights stored once in bf16 (what `Engine(precision="bf16")` does,
`fastprompt.engine.precision.store_frozen_in`), beside peft's LoRA (same rank, alpha and target, trainable head) in
fp32 and bf16 autocast, in one run.

python -m benchmarks.frozen_dtype --resolutions 384 512 --output benchmarks/results

Step times: every row of a resolution is built first, then timed round-robin (one step each per round), so the rows
see the same machine load; medians. Memory: the tensor bytes a step holds at its peak (parameters, gradients,
optimizer state, and the step's live tensors, counted op by op by LiveBytes).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from benchmarks import harness, models, results
from fastprompt.engine.activation import LiveBytes, resident_bytes
from fastprompt.engine.precision import cpu_bf16_support, store_frozen_in

MODES = ("fp32", "autocast", "bf16-frozen")
PEFT_MODES = ("fp32", "autocast")
LORA = {"r": 8, "alpha": 8.0, "target": "qkv"}  # fastprompt's LoRA defaults, given to peft too


def peft_lora(model_name: str, resolution: int, num_classes: int) -> torch.nn.Module:
    """peft's LoRA on a timm ViT: rank 8, alpha 8, on each block's qkv, with the new head trainable."""
    import timm
    from peft import LoraConfig, get_peft_model

    backbone = timm.create_model(model_name, pretrained=False, img_size=resolution, num_classes=num_classes)
    config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=0.0,
        target_modules=[LORA["target"]],
        modules_to_save=["head"],
    )
    return get_peft_model(backbone, config).train()


def build_step(library: str, method: str, mode: str, resolution: int, args: argparse.Namespace) -> models.TrainingStep:
    """One training step (AdamW, batch `args.batch_size`) of a row."""
    torch.manual_seed(args.seed)
    if library == "peft":
        model = peft_lora(args.model, resolution, args.num_classes)
    else:
        (variant,) = models.select_variants([method])
        model = models.build_model(
            variant, args.model, resolution, num_classes=args.num_classes, grad_checkpointing=False, device="cpu"
        )
    if mode == "bf16-frozen":
        store_frozen_in(model, torch.bfloat16)
    step_args = argparse.Namespace(num_classes=args.num_classes, seed=args.seed, precision=_precision(mode))
    return models.synthetic_step(model, args.batch_size, resolution, step_args, torch.device("cpu"), False)


def _precision(mode: str) -> str:
    return "fp32" if mode == "fp32" else "bf16"


def row_keys(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(library, method, mode) of every row of a resolution."""
    keys = [("fastprompt", method, mode) for method in args.methods for mode in MODES]
    if "lora" in args.methods and not args.no_peft:
        keys += [("peft", "lora", mode) for mode in PEFT_MODES]
    return keys


def measure_rows(resolution: int, args: argparse.Namespace) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Memory and step-time figures of every row at `resolution`: each row's warm-up steps, one step under LiveBytes
    (after the warm-up, so the optimizer state exists), then the timed steps, round-robin across rows."""
    steps = {key: build_step(*key, resolution, args) for key in row_keys(args)}
    figures: dict[tuple[str, str, str], dict[str, Any]] = {}
    for key, step in steps.items():
        for _ in range(args.warmup):
            step()
        with LiveBytes() as live:
            step()
        resident = resident_bytes(step.model, step.optimizer)
        figures[key] = {
            "resident_bytes": resident,
            "step_peak_bytes": live.peak,
            "peak_bytes": resident + live.peak,
            "param_bytes": models.parameter_bytes(step.model),
            "param_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in step.model.parameters()}),
        }
    samples: dict[tuple[str, str, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            samples[key].append(time.perf_counter() - start)
    for key, values in samples.items():
        figures[key]["step_seconds"] = harness.summarize(values).as_dict()
    return figures


def ratios(rows: list[dict]) -> list[dict]:
    """Per resolution: bf16-frozen against fp32, autocast and peft (time and peak RSS), from the rows."""
    found = {(r["library"], r["method"], r["mode"], r["resolution"]): r for r in rows}
    out = []
    for (library, method, mode, resolution), row in found.items():
        if library != "fastprompt" or mode != "bf16-frozen":
            continue
        against = {
            "fp32": found.get(("fastprompt", method, "fp32", resolution)),
            "autocast": found.get(("fastprompt", method, "autocast", resolution)),
        }
        if method == "lora":
            against["peft_fp32"] = found.get(("peft", "lora", "fp32", resolution))
            against["peft_autocast"] = found.get(("peft", "lora", "autocast", resolution))
        for name, other in against.items():
            if other is None:
                continue
            out.append(
                {
                    "method": method,
                    "resolution": resolution,
                    "bf16_frozen_vs": name,
                    "time_ratio": row["step_seconds"]["median"] / other["step_seconds"]["median"],
                    "peak_ratio": row["peak_bytes"] / other["peak_bytes"],
                    "step_peak_ratio": row["step_peak_bytes"] / other["step_peak_bytes"],
                }
            )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frozen_dtype", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[384, 512])
    parser.add_argument("--methods", nargs="+", default=["lora", "ept"], choices=["lora", "ept"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per row, round-robin (default: 3)")
    parser.add_argument("--no-peft", action="store_true", help="leave out peft's LoRA rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="result JSON file, or a folder for <device>/<name>.json")
    args = parser.parse_args(argv)
    harness.check_counts(args.warmup, args.repeats)
    if not args.no_peft and "lora" in args.methods:
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("peft is not installed: pip install peft (the dev extra has it), or pass --no-peft")
    native, reason = cpu_bf16_support()
    if not native:
        print(f"note: {reason}; bf16 rows will be slow here (Engine would train fp32)", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> Any:
    """Time every row, measure its memory in a fresh process, print a table and write the result JSON."""
    args = parse_args(argv)
    rows = []
    print(f"{'library':11}{'method':7}{'mode':13}{'res':>5}{'step ms':>10}{'peak MB':>10}{'step peak MB':>14}")
    for resolution in tqdm(args.resolutions, desc="resolutions", file=sys.stderr):
        for (library, method, mode), figures in measure_rows(resolution, args).items():
            row = {
                "model": args.model,
                "library": library,
                "method": method,
                "mode": mode,
                "precision": _precision(mode),
                "resolution": resolution,
                "batch_size": args.batch_size,
                **figures,
            }
            rows.append(row)
            tqdm.write(
                f"{library:11}{method:7}{mode:13}{resolution:>5}{1000 * row['step_seconds']['median']:>10.0f}"
                f"{row['peak_bytes'] / 1e6:>10.0f}{row['step_peak_bytes'] / 1e6:>14.0f}"
            )
        gc.collect()
    summary = ratios(rows)
    for item in summary:
        print(
            f"{item['method']} {item['resolution']}: bf16-frozen / {item['bf16_frozen_vs']}: time "
            f"{item['time_ratio']:.2f}x, peak {item['peak_ratio']:.2f}x, "
            f"step peak {item['step_peak_ratio']:.2f}x"
        )
    notes = [
        "modes: fp32; autocast = torch.autocast(bf16) with fp32 frozen weights; bf16-frozen = the same autocast with "
        "the frozen weights stored in bf16 (fastprompt.engine.precision.store_frozen_in); trainable weights, grads "
        "and AdamW state fp32 in every mode",
        f"peft rows: peft LoRA r={LORA['r']}, alpha={LORA['alpha']}, target {LORA['target']}, modules_to_save head",
        "step_seconds: rows of a resolution timed round-robin in one process, one AdamW step each per round",
        "peak_bytes: tensor bytes the step holds at its peak = resident_bytes (parameters, gradients, AdamW state; "
        "fastprompt.engine.activation.resident_bytes) + step_peak_bytes (live tensor bytes above that level during "
        "one step after the warm-up, LiveBytes); device-independent, no allocator or interpreter overhead",
        f"cpu bf16: {cpu_bf16_support()[1]}",
    ]
    record_rows = rows + [{"summary": True, **item} for item in summary]
    stem = f"frozen_dtype_{args.model}_r{'-'.join(map(str, args.resolutions))}_b{args.batch_size}"
    return results.save_suite_run("frozen_dtype", torch.device("cpu"), args, record_rows, notes, stem)


if __name__ == "__main__":
    main()
