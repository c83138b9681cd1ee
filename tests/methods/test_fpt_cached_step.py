"""The lean FPT+ cached step: the fusion cross-attention (exact, no K/V gradient buffers, features read in their
stored dtype under autocast) and the Engine's fused / foreach optimizers."""

from __future__ import annotations

import torch

from fastprompt.engine.activation import LiveBytes
from fastprompt.engine.core import fast_optimizer
from fastprompt.methods.fpt_side import FusionModule, cross_attention


def features(dtype: torch.dtype = torch.float32, count: int = 300, head_dim: int = 128) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (2, 2, 2, count, head_dim)  # [B, L, H, k, Dh]
    return {name: torch.randn(shape, generator=generator).to(dtype) for name in ("keys", "values")}


def fusion(head_dim: int = 128) -> FusionModule:
    torch.manual_seed(0)
    module = FusionModule(2, 4, 2 * head_dim, 2, 32, query_projection=False, dropout=0.0)
    with torch.no_grad():
        module.prompts.normal_()  # away from the 1e-6 init, so that the attention is not uniform
    return module


def test_cross_attention_is_a_float64_softmax_attention_with_its_gradient():
    queries = torch.randn(3, 2, 4, 16, requires_grad=True)
    keys, values = torch.randn(3, 2, 50, 16), torch.randn(3, 2, 50, 16)
    out = cross_attention(queries, keys, values, torch.float32)
    q64 = queries.detach().double().requires_grad_(True)
    expected = ((q64 @ keys.double().transpose(-1, -2)) / 4.0).softmax(dim=-1) @ values.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)
    weights = torch.randn_like(expected)
    (out.double() * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(queries.grad.double(), q64.grad, atol=1e-6, rtol=1e-6)


def test_backward_allocates_no_key_or_value_gradients():
    """The backward of the fusion allocates far less than one K-sized buffer (the fused SDPA kernel's backward
    allocated dK and dV: twice the features)."""
    module, cached = fusion(), features()
    key_bytes = cached["keys"].numel() * cached["keys"].element_size()
    out = module(cached["keys"], cached["values"])
    with LiveBytes() as live:
        out.square().sum().backward()
    assert module.prompts.grad is not None
    assert live.peak < key_bytes / 2, (live.peak, key_bytes)


def test_features_in_the_autocast_dtype_are_read_without_a_copy():
    """Under bf16 autocast, bf16 cache entries are used as stored: the forward allocates no feature-sized tensor."""
    module, cached = fusion(), features(torch.bfloat16)
    key_bytes = cached["keys"].numel() * cached["keys"].element_size()
    with torch.autocast("cpu", dtype=torch.bfloat16), LiveBytes() as live:
        out = module(cached["keys"], cached["values"])
    assert live.peak < key_bytes / 2, (live.peak, key_bytes)
    reference = module(cached["keys"].float(), cached["values"].float())  # float32 compute on the same features
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)


def test_fast_optimizer_is_fused_on_cpu_and_matches_the_default_adamw():
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    runs = []
    for make in (
        lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.1),
        lambda params: fast_optimizer(torch.optim.AdamW, params, lr=0.1, weight_decay=0.1),
    ):
        params = [torch.nn.Parameter(tensor.clone()) for tensor in start]
        optimizer = make(params)
        for step in range(3):
            for param in params:
                param.grad = torch.sin(param.detach() * (step + 1))
            optimizer.step()
        runs.append((optimizer, params))
    (default, expected), (fast, got) = runs
    assert fast.defaults["fused"] is True and not default.defaults["fused"]
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fast_optimizer_falls_back_to_foreach_where_no_fused_kernel_exists():
    params = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    optimizer = fast_optimizer(torch.optim.AdamW, params, lr=0.1)  # the meta device has no fused kernel
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
