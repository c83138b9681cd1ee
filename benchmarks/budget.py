"""Memory budgets: parse '24GB'-style sizes, the meta-device memory model, and the largest batch that fits.

The memory model (CPU, or sizes no machine here can run): a training step's bytes are the model's tensors, their
gradients and AdamW state, plus the step's peak of live tensor bytes (`fastprompt.engine.activation.LiveBytes`),
traced on PyTorch's meta device, where ops allocate shapes but do no arithmetic, so ViT-L at 1024 costs seconds.
On the meta device `scaled_dot_product_attention` would take its materialising math path; the trace routes it to
the op it reaches on CPU (`_scaled_dot_product_flash_attention_for_cpu`), so the trace allocates what a CPU step
allocates (tests/engine/test_activation_memory.py checks equality with a real CPU step for every policy).

python -m benchmarks.budget --model vit_large_patch16_224 --resolution 1024 --methods ept --budget 24GB
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fastprompt.checkpointing import POLICIES, checkpoint_activations
from fastprompt.engine.activation import parse_bytes, step_peak

__all__ = ["largest_fitting", "meta_step_bytes", "parse_bytes"]


def largest_fitting(fits: Callable[[int], bool], *, limit: int = 1 << 16) -> tuple[int, int]:
    """The largest batch size b <= `limit` with `fits(b)`, assuming `fits` is monotone (true up to a threshold).

    Doubles from 1 until a size fails, then bisects between the last success and the first failure.
    Returns (batch, number of `fits` calls); batch is 0 when even a batch of 1 does not fit.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    calls = 0

    def probe(batch: int) -> bool:
        nonlocal calls
        calls += 1
        return fits(batch)

    if not probe(1):
        return 0, calls
    good, bad = 1, None
    while bad is None:
        candidate = min(good * 2, limit)
        if candidate == good:
            return good, calls
        if probe(candidate):
            good = candidate
        else:
            bad = candidate
    while bad - good > 1:
        middle = (good + bad) // 2
        if probe(middle):
            good = middle
        else:
            bad = middle
    return good, calls


@contextlib.contextmanager
def _cpu_attention_on_meta() -> Iterator[None]:
    """Route unmasked, dropout-free F.scaled_dot_product_attention on meta tensors to the CPU flash op.

    A patch of the module attribute (timm looks it up at each call), not a TorchFunctionMode: checkpoint recomputation
    runs inside autograd's backward, where the ops must be the same as in the forward.
    """
    original = F.scaled_dot_product_attention

    def routed(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if q.device.type == "meta" and attn_mask is None and not dropout_p and not kwargs.get("enable_gqa"):
            out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, is_causal=is_causal, scale=scale
            )
            return out
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    F.scaled_dot_product_attention = routed
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def fixed_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, plus gradients and AdamW's two state tensors for every trainable parameter."""
    tensors = [*model.parameters(), *model.buffers()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return total + 3 * trainable


def meta_step_bytes(model: torch.nn.Module, batch: int, resolution: int) -> int:
    """Peak live tensor bytes of one forward + cross-entropy + backward of `model` (on the meta device) at `batch`."""
    if next(model.parameters()).device.type != "meta":
        raise ValueError("meta_step_bytes needs a model on the meta device: model.to('meta')")
    images = torch.empty(batch, 3, resolution, resolution, device="meta")
    labels = torch.zeros(batch, dtype=torch.long, device="meta")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()

    with _cpu_attention_on_meta():
        return step_peak(step, "meta")


def meta_fits(model: torch.nn.Module, resolution: int, limit: int) -> Callable[[int], bool]:
    """A predicate for `largest_fitting`: does the memory model's step at batch b stay within `limit` bytes?"""
    fixed = fixed_bytes(model)
    return lambda batch: fixed + meta_step_bytes(model, batch, resolution) <= limit


METHOD = (
    "memory model: parameters + gradients + AdamW state + peak live tensor bytes of one step traced on the meta "
    "device (fastprompt.engine.activation.LiveBytes; SDPA routed to the CPU flash op)"
)


def main(argv: list[str] | None = None) -> Path:
    """Largest batch within a budget per method and checkpointing policy, by the meta-device memory model."""
    from benchmarks import models, results

    parser = argparse.ArgumentParser(prog="python -m benchmarks.budget", description=main.__doc__)
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["ept"], help="method labels (benchmarks.models variants)")
    parser.add_argument("--checkpointing", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--budget", default="24GB")
    parser.add_argument("--budget-limit", type=int, default=4096, help="largest batch the search tries")
    parser.add_argument("--check-batch", type=int, help="also report whether this batch fits, per row")
    parser.add_argument(
        "--output",
        type=Path,
        help="result JSON file, or a folder for <device>/<name>.json (default: ./benchmark-results/)",
    )
    args = parser.parse_args(argv)
    try:
        limit = parse_bytes(args.budget)
    except ValueError as error:
        parser.error(str(error))
    rows: list[dict[str, Any]] = []
    for variant in models.select_variants(args.methods):
        for policy in args.checkpointing:
            model = models.build_model(
                variant,
                args.model,
                args.resolution,
                num_classes=args.num_classes,
                grad_checkpointing=False,
                device=torch.device("cpu"),
            )
            checkpoint_activations(model, policy)
            model = model.to("meta")
            fits = meta_fits(model, args.resolution, limit)
            batch, probes = largest_fitting(fits, limit=args.budget_limit)
            row = {
                "model": args.model,
                "method": variant.label,
                "apply_method": variant.method,
                "options": variant.options,
                "resolution": args.resolution,
                "checkpointing": policy,
                "fixed_bytes": fixed_bytes(model),
                "step_bytes_b1": meta_step_bytes(model, 1, args.resolution),
                "budget_bytes": limit,
                "max_batch": batch,
                "budget_probes": probes,
                "budget_method": METHOD,
            }
            if args.check_batch:
                need = row["fixed_bytes"] + meta_step_bytes(model, args.check_batch, args.resolution)
                row.update({"check_batch": args.check_batch, "check_bytes": need, "check_fits": need <= limit})
            rows.append(row)
            fit_note = f", batch {args.check_batch}: {row['check_bytes'] / 1e9:.2f} GB" if args.check_batch else ""
            print(f"{variant.label:<12} {policy:<9} max batch {batch}{fit_note}")
    stem = "_".join(
        re.sub(r"[^A-Za-z0-9._+-]+", "", part)
        for part in ("budget", args.model, f"r{args.resolution}", "m-" + "-".join(args.methods), f"{args.budget}")
    )
    notes = [METHOD, "budget_bytes counts everything: model, gradients, optimizer state and the step's peak"]
    return results.save_suite_run("budget", torch.device("cpu"), args, rows, notes, stem)


if __name__ == "__main__":
    main()
