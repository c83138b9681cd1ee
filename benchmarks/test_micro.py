"""Kernel micro-benchmarks under pytest-benchmark, outside the default test run (testpaths is tests/ only).

    pytest benchmarks/test_micro.py --benchmark-only                          # CPU: small shapes, fp32
    pytest benchmarks/test_micro.py --benchmark-only --benchmark-autosave     # keep this run (.benchmarks/)
    pytest benchmarks/test_micro.py --benchmark-only --benchmark-compare      # against the last saved run

On a GPU (bf16, B 32, H 12, N 1025, D 64, the shape of the kernel goals) sink attention runs through the Triton
kernels, in both backward variants: the default fused one and deterministic mode (two kernels, fixed blocks). On a
CPU both variants run PyTorch's CPU flash path, so there they measure the same code. Every GPU call is synchronised,
so a round's time is the kernels' time.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from benchmarks.kernels import SDPA_BACKENDS, deterministic_mode, ept_sink, make_inputs, sdpa_with
from fastprompt.kernels import attention_importance, sink_attention
from fastprompt.kernels.reference import attention_importance_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SHAPE = (32, 12, 1025, 64) if CUDA else (1, 2, 197, 64)  # B, H, N, D
DTYPE = torch.bfloat16 if CUDA else torch.float32


def synchronised(fn):
    """`fn` followed by a device synchronisation (GPU work is asynchronous)."""

    def run():
        result = fn()
        if CUDA:
            torch.cuda.synchronize(DEVICE)
        return result

    return run


def attention(name: str):
    """(q, k, v, prompt) -> output of one implementation, and whether it runs in deterministic mode."""
    if name in SDPA_BACKENDS:
        return sdpa_with(SDPA_BACKENDS[name]), False
    if name == "sdpa":
        return lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"]), False
    return lambda x: sink_attention(x["q"], x["k"], x["v"], ept_sink(x["prompt"])), name.endswith("deterministic")


# SDPA's flash and efficient backends are CUDA-only; on a CPU, SDPA's own choice (its CPU flash kernel).
IMPLS = ["sink_attention", "sink_attention_deterministic", *(SDPA_BACKENDS if CUDA else ["sdpa"])]


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_forward(benchmark, impl):
    fn, deterministic = attention(impl)
    inputs = make_inputs(*SHAPE, DTYPE, DEVICE, grad=False)
    benchmark.group = f"attention forward {SHAPE} {DTYPE}"
    with deterministic_mode() if deterministic else contextlib.nullcontext(), torch.no_grad():
        benchmark(synchronised(lambda: fn(inputs)))


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_forward_backward(benchmark, impl):
    fn, deterministic = attention(impl)
    inputs = make_inputs(*SHAPE, DTYPE, DEVICE, grad=True)
    leaves = [t for t in inputs.values() if t.requires_grad]
    grad_out = torch.randn_like(inputs["q"])
    benchmark.group = f"attention forward+backward {SHAPE} {DTYPE}"

    def step():
        return torch.autograd.grad(fn(inputs), leaves, grad_out, allow_unused=True)

    with deterministic_mode() if deterministic else contextlib.nullcontext():
        benchmark(synchronised(step))


@pytest.mark.parametrize("impl", ["attention_importance", "reference"])
def test_importance(benchmark, impl):
    inputs = make_inputs(*SHAPE, DTYPE, DEVICE, grad=False)
    fn = attention_importance if impl == "attention_importance" else attention_importance_reference
    benchmark.group = f"importance (global) {SHAPE} {DTYPE}"
    with torch.no_grad():
        benchmark(synchronised(lambda: fn(inputs["q"], inputs["k"], mode="global")))
