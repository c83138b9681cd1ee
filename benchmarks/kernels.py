"""Attention kernels against SDPA, xformers and the materialised references: time, TFLOP/s and peak memory.

python -m benchmarks.kernels                    # CPU: tiny sizes, fp32 — a functional check, not a speed claim
python -m benchmarks.kernels --device cuda      # N in {197, 577, 1025, 2305, 4097}, D in {64, 128}, bf16
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from benchmarks import harness, results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULTS = {
    "cpu": {"ns": [65, 197], "head_dims": [64], "batch": 1, "width": 128, "dtype": "fp32", "counts": (3, 20)},
    "cuda": {
        "ns": [197, 577, 1025, 2305, 4097],
        "head_dims": [64, 128],
        "batch": 4,
        "width": 768,
        "dtype": "bf16",
        "counts": (5, 20),
    },
}
PROMPT_LENGTH = 100  # EPT's P
SELECT_RATIO = 0.2  # FPT's token ratio
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}
Inputs = dict[str, torch.Tensor]


def load_fastprompt_kernels() -> tuple[object | None, str | None]:
    """(fastprompt.kernels, None), or (None, why) when it does not import yet."""
    try:
        return importlib.import_module("fastprompt.kernels"), None
    except ImportError as error:
        return None, f"fastprompt.kernels does not import: {error}"


def load_xformers() -> tuple[Callable | None, str | None]:
    """(xformers memory_efficient_attention, None), or (None, why) when xformers is missing."""
    try:
        from xformers.ops import memory_efficient_attention
    except ImportError as error:
        return None, f"xformers not installed ({error})"
    return memory_efficient_attention, None


def attention_impls(device: torch.device) -> dict[str, Callable[[Inputs], torch.Tensor] | str]:
    """Attention implementations by name (a string where one is unavailable: the reason)."""
    fp_kernels, why = load_fastprompt_kernels()
    reference = importlib.import_module("fastprompt.kernels.reference") if fp_kernels else None
    impls: dict[str, Callable[[Inputs], torch.Tensor] | str] = {}
    if fp_kernels is not None and hasattr(fp_kernels, "sink_attention"):
        impls["sink_attention"] = lambda x: fp_kernels.sink_attention(x["q"], x["k"], x["v"], ept_sink(x["prompt"]))
    else:
        impls["sink_attention"] = why or "fastprompt.kernels has no sink_attention yet"
    for name, backend in SDPA_BACKENDS.items():
        impls[name] = sdpa_with(backend)
    xformers_attention, why_x = load_xformers()
    if xformers_attention is None:
        impls["xformers"] = why_x
    elif device.type != "cuda":
        impls["xformers"] = "xformers has no CPU kernels"
    else:
        impls["xformers"] = lambda x: xformers_attention(
            x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2)
        ).transpose(1, 2)
    if reference is not None:
        impls["ept_reference"] = lambda x: reference.ept_attention_reference(x["q"], x["k"], x["v"], x["prompt"])
    else:
        impls["ept_reference"] = why
    return impls


def sdpa_with(backend: SDPBackend) -> Callable[[Inputs], torch.Tensor]:
    """SDPA restricted to one backend (no sink: the baseline a plain ViT would run)."""

    def run(x: Inputs) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"])

    return run


def importance_impls() -> dict[str, Callable[[Inputs], object] | str]:
    """Token-importance implementations (scores + top-k gather), or the reason one is unavailable."""
    fp_kernels, why = load_fastprompt_kernels()
    if fp_kernels is None:
        return {"attention_importance+select_tokens": why, "importance_reference": why}
    reference = importlib.import_module("fastprompt.kernels.reference")
    impls: dict[str, Callable[[Inputs], object] | str] = {}
    if hasattr(fp_kernels, "attention_importance") and hasattr(fp_kernels, "select_tokens"):

        def fused(x: Inputs) -> object:
            scores = fp_kernels.attention_importance(x["q"], x["k"], mode="global")
            return fp_kernels.select_tokens(x["k"], x["v"], scores, SELECT_RATIO)

        impls["attention_importance+select_tokens"] = fused
    else:
        impls["attention_importance+select_tokens"] = "fastprompt.kernels has no attention_importance/select_tokens"

    def materialised(x: Inputs) -> object:
        scores = reference.attention_importance_reference(x["q"], x["k"], mode="global")
        return reference.select_tokens_reference(x["k"], x["v"], scores, SELECT_RATIO)

    impls["importance_reference"] = materialised
    return impls


def make_inputs(batch: int, heads: int, n: int, d: int, dtype: torch.dtype, device: torch.device, grad: bool) -> Inputs:
    """Random q, k, v [B, H, N, D] and an EPT prompt [N, P]; all require grad when `grad`."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, heads, n, d)
    inputs = {name: torch.randn(shape, generator=generator) for name in ("q", "k", "v")}
    inputs["prompt"] = 0.02 * torch.randn(n, PROMPT_LENGTH, generator=generator)
    return {name: t.to(device=device, dtype=dtype).requires_grad_(grad) for name, t in inputs.items()}


def ept_sink(prompt: torch.Tensor) -> torch.Tensor:
    """EPT's per-token sink logit g = logsumexp over the prompt length (part of the timed work, as in training)."""
    return torch.logsumexp(prompt.float(), dim=-1)


def forward_backward(fn: Callable[[Inputs], torch.Tensor], inputs: Inputs) -> Callable[[], object]:
    """A closure running `fn` forward and backward (gradients for every leaf that requires them)."""
    leaves = [t for t in inputs.values() if t.requires_grad]
    grad_out = torch.randn_like(inputs["q"])

    def run() -> object:
        out = fn(inputs)
        return torch.autograd.grad(out, leaves, grad_out, allow_unused=True)

    return run


def attention_flops(batch: int, heads: int, n: int, d: int, kind: str) -> float:
    """Nominal FLOPs: 4·B·H·N²·D forward (QKᵀ and PV); backward counted as 2.5× forward."""
    forward = 4.0 * batch * heads * n * n * d
    return forward * (3.5 if kind == "fwd+bwd" else 1.0)


def measure_one(fn: Callable[[], object], device: torch.device, args: argparse.Namespace) -> dict:
    """Time `fn` and (on a GPU) its peak memory above what was allocated before it."""
    row: dict = {}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    stats = harness.time_fn(fn, device, warmup=args.warmup, repeats=args.repeats)
    row["time_seconds"] = stats.as_dict()
    return row


def run_case(
    op: str, impl: str, fn: Callable | str, kind: str, n: int, d: int, args: argparse.Namespace, device: torch.device
) -> dict:
    """One row: an implementation at one shape and pass, measured or skipped with the reason."""
    heads = max(1, args.width // d)
    row = {"op": op, "impl": impl, "n": n, "d": d, "batch": args.batch, "heads": heads, "dtype": args.dtype}
    row["pass"] = kind
    if isinstance(fn, str):
        return {**row, "skipped": fn}
    inputs = make_inputs(args.batch, heads, n, d, DTYPES[args.dtype], device, grad=kind == "fwd+bwd")
    if kind == "fwd+bwd":
        call = forward_backward(fn, inputs)
    else:

        def call() -> object:
            with torch.no_grad():
                return fn(inputs)

    try:
        row.update(measure_one(call, device, args))
    except (RuntimeError, NotImplementedError, ValueError) as error:  # backend unavailable, shape unsupported, OOM
        reason = str(error).strip().split("\n")[0][:200]
        return {**row, "skipped": f"{type(error).__name__}: {reason}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["flops"] = attention_flops(args.batch, heads, n, d, kind)
    row["tflops"] = row["flops"] / row["time_seconds"]["median"] / 1e12
    return row


def cases(args: argparse.Namespace, device: torch.device) -> list[tuple]:
    """Every (op, impl, fn, pass, N, D) the run measures."""
    attention = attention_impls(device)
    importance = importance_impls()
    todo = []
    for d in args.head_dims:
        for n in args.ns:
            for kind in ("fwd", "fwd+bwd"):
                todo += [("attention", name, fn, kind, n, d) for name, fn in attention.items()]
            todo += [("importance", name, fn, "fwd", n, d) for name, fn in importance.items()]
    return todo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults depend on the device (tiny fp32 on CPU, the full grid in bf16 on GPU)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--ns", type=int, nargs="+", help="sequence lengths N")
    parser.add_argument("--head-dims", type=int, nargs="+", help="head dimensions D")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--width", type=int, help="model width: heads = width // D")
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument(
        "--output",
        type=Path,
        help="result JSON file, or a folder for <device>/<name>.json (default: ./benchmark-results/)",
    )
    args = parser.parse_args(argv)
    defaults = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    for key in ("ns", "head_dims", "batch", "width", "dtype"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.warmup = defaults["counts"][0] if args.warmup is None else args.warmup
    args.repeats = defaults["counts"][1] if args.repeats is None else args.repeats
    try:
        harness.check_counts(args.warmup, args.repeats)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> Path:
    """Run the kernel suite, print its rows and write the result JSON; return the JSON path."""
    args = parse_args(argv)
    device = harness.device_or_exit(args.device)
    rows = []
    print(f"{'op':<10} {'impl':<34} {'N':>5} {'D':>4} {'pass':<8} {'ms':>9} {'TFLOP/s':>9}", flush=True)
    for op, impl, fn, kind, n, d in tqdm(cases(args, device), desc="kernels", file=sys.stderr):
        row = run_case(op, impl, fn, kind, n, d, args, device)
        rows.append(row)
        if "skipped" in row:
            tqdm.write(f"{op:<10} {impl:<34} {n:>5} {d:>4} {kind:<8} skipped: {row['skipped']}")
        else:
            ms = 1e3 * row["time_seconds"]["median"]
            tqdm.write(f"{op:<10} {impl:<34} {n:>5} {d:>4} {kind:<8} {ms:>9.3f} {row['tflops']:>9.5f}")
    notes = [
        f"timing: {args.warmup} warm-up calls, {args.repeats} timed calls, median and IQR; "
        + ("CUDA events" if device.type == "cuda" else "time.perf_counter"),
        "tflops: nominal 4·B·H·N²·D per forward (×3.5 for forward+backward), the same count for every "
        "implementation of an op, so TFLOP/s compare like with like",
        f"importance: global mean attention received, then top int(N·{SELECT_RATIO}) tokens per head; forward only",
        f"ept_reference: official-style materialised attention with a [N, {PROMPT_LENGTH}] prompt",
    ]
    if device.type != "cuda":
        notes.append("CPU run: tiny sizes in fp32 — checks the harness and the code paths, not a speed claim")
    stem = f"kernels_{args.dtype}_n{'-'.join(map(str, args.ns))}_d{'-'.join(map(str, args.head_dims))}"
    return results.save_suite_run("kernels", device, args, rows, notes, stem)


if __name__ == "__main__":
    main()
