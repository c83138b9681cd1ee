"""Attention kernels against SDPA, flash-attn, xformers and the materialised references: time, TFLOP/s, peak memory.

python -m benchmarks.kernels                    # CPU: tiny sizes, fp32 — a functional check, not a speed claim
python -m benchmarks.kernels --device cuda      # N in {197, 577, 1025, 2305, 4097}, D in {64, 128}, bf16

sink_attention runs twice: with its default fused backward and in deterministic mode (FASTPROMPT_DETERMINISTIC=1:
the two-kernel backward and fixed block configs). Each timed row carries its ratio to SDPA flash at the same shape and
pass, and the result file is rewritten after every row, so a run stopped at a time limit keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import sys
from collections.abc import Callable, Iterator
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


def load_flash_attn() -> tuple[Callable | None, str | None]:
    """(flash_attn.flash_attn_func, None), or (None, why) when flash-attn is missing."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as error:
        return None, f"flash-attn not installed ({error})"
    return flash_attn_func, None


@contextlib.contextmanager
def deterministic_mode() -> Iterator[None]:
    """FASTPROMPT_DETERMINISTIC=1 for the duration (the kernels read it at each launch), then the previous value."""
    before = os.environ.get("FASTPROMPT_DETERMINISTIC")
    os.environ["FASTPROMPT_DETERMINISTIC"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["FASTPROMPT_DETERMINISTIC"]
        else:
            os.environ["FASTPROMPT_DETERMINISTIC"] = before


def sink_attention_impl(fp_kernels, deterministic: bool) -> Callable[[Inputs], torch.Tensor]:
    """sink_attention with the EPT sink; `deterministic`: forward (here) and backward (`forward_backward` reads the
    function's `deterministic` mark) in deterministic mode."""

    def run(x: Inputs) -> torch.Tensor:
        with deterministic_mode() if deterministic else contextlib.nullcontext():
            return fp_kernels.sink_attention(x["q"], x["k"], x["v"], ept_sink(x["prompt"]))

    run.deterministic = deterministic
    return run


def heads_last_impl(
    attention: Callable | None, why: str | None, library: str, device: torch.device
) -> Callable | str | None:
    """A [B, N, H, D] CUDA attention library as a [B, H, N, D] impl, or the reason it cannot run (a skipped row)."""
    if attention is None:
        return why
    if device.type != "cuda":
        return f"{library} has no CPU kernels"
    return lambda x: attention(x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2)).transpose(1, 2)


def attention_impls(device: torch.device) -> dict[str, Callable[[Inputs], torch.Tensor] | str]:
    """Attention implementations by name (a string where one is unavailable: the reason), SDPA flash first: every
    other row's ratio refers to it."""
    fp_kernels, why = load_fastprompt_kernels()
    reference = importlib.import_module("fastprompt.kernels.reference") if fp_kernels else None
    impls: dict[str, Callable[[Inputs], torch.Tensor] | str] = {}
    for name, backend in SDPA_BACKENDS.items():
        impls[name] = sdpa_with(backend)
    if fp_kernels is not None and hasattr(fp_kernels, "sink_attention"):
        impls["sink_attention"] = sink_attention_impl(fp_kernels, deterministic=False)
        impls["sink_attention_deterministic"] = sink_attention_impl(fp_kernels, deterministic=True)
    else:
        impls["sink_attention"] = impls["sink_attention_deterministic"] = why or "no sink_attention yet"
    impls["flash_attn"] = heads_last_impl(*load_flash_attn(), "flash-attn", device)
    impls["xformers"] = heads_last_impl(*load_xformers(), "xformers", device)
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
    """A closure running `fn` forward and backward (gradients for every leaf that requires them); an `fn` marked
    `deterministic` runs its backward in deterministic mode too."""
    leaves = [t for t in inputs.values() if t.requires_grad]
    grad_out = torch.randn_like(inputs["q"])
    mode = deterministic_mode if getattr(fn, "deterministic", False) else contextlib.nullcontext

    def run() -> object:
        out = fn(inputs)
        with mode():
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


def add_flash_ratio(row: dict, rows: list[dict]) -> None:
    """row["vs_sdpa_flash"]: its median time over SDPA flash's at the same op, shape and pass (when both are timed)."""
    if "time_seconds" not in row:
        return
    for other in [*rows, row]:
        same = all(other.get(key) == row.get(key) for key in ("op", "n", "d", "batch", "heads", "dtype", "pass"))
        if same and other["impl"] == "sdpa_flash" and "time_seconds" in other:
            row["vs_sdpa_flash"] = row["time_seconds"]["median"] / other["time_seconds"]["median"]


def output_path(args: argparse.Namespace, record: dict, stem: str) -> Path:
    """args.output when it names a .json file, else <args.output or ./benchmark-results>/<device>/<stem>.json."""
    if args.output is not None and Path(args.output).suffix.lower() == ".json":
        return Path(args.output)
    return results.default_path(record, stem, args.output)


def main(argv: list[str] | None = None) -> Path:
    """Run the kernel suite, print its rows and write the result JSON after every row; return the JSON path."""
    args = parse_args(argv)
    device = harness.device_or_exit(args.device)
    rows: list[dict] = []
    notes = suite_notes(args, device)
    config = {key: value for key, value in vars(args).items() if key != "output"}
    stem = f"kernels_{args.dtype}_n{'-'.join(map(str, args.ns))}_d{'-'.join(map(str, args.head_dims))}"
    record = results.run_record("kernels", device, config, rows, notes)  # provenance read once, rows added below
    path = output_path(args, record, stem)
    print(f"{'op':<10} {'impl':<34} {'N':>5} {'D':>4} {'pass':<8} {'ms':>9} {'TFLOP/s':>9} {'/flash':>7}", flush=True)
    for op, impl, fn, kind, n, d in tqdm(cases(args, device), desc="kernels", file=sys.stderr):
        row = run_case(op, impl, fn, kind, n, d, args, device)
        add_flash_ratio(row, rows)
        rows.append(row)
        results.write_record(record, path)  # row by row: `record` holds the `rows` list itself
        if "skipped" in row:
            tqdm.write(f"{op:<10} {impl:<34} {n:>5} {d:>4} {kind:<8} skipped: {row['skipped']}")
        else:
            ms = 1e3 * row["time_seconds"]["median"]
            ratio = f"{row['vs_sdpa_flash']:>7.3f}" if "vs_sdpa_flash" in row else ""
            tqdm.write(f"{op:<10} {impl:<34} {n:>5} {d:>4} {kind:<8} {ms:>9.3f} {row['tflops']:>9.5f} {ratio}")
    print(f"wrote {path}")
    return path


def suite_notes(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The notes every kernels record carries: how it timed and counted."""
    notes = [
        f"timing: {args.warmup} warm-up calls, {args.repeats} timed calls, median and IQR; "
        + ("CUDA events" if device.type == "cuda" else "time.perf_counter"),
        "tflops: nominal 4·B·H·N²·D per forward (×3.5 for forward+backward), the same count for every "
        "implementation of an op, so TFLOP/s compare like with like",
        f"importance: global mean attention received, then top int(N·{SELECT_RATIO}) tokens per head; forward only",
        f"ept_reference: official-style materialised attention with a [N, {PROMPT_LENGTH}] prompt",
    ]
    notes += [
        "vs_sdpa_flash: median time / SDPA flash's median at the same shape and pass",
        "sink_attention: default fused backward (fp32 atomic dQ); sink_attention_deterministic: "
        "FASTPROMPT_DETERMINISTIC=1 (two-kernel backward, fixed block configs)",
    ]
    if device.type != "cuda":
        notes.append("CPU run: tiny sizes in fp32 — checks the harness and the code paths, not a speed claim")
    return notes


if __name__ == "__main__":
    main()
