"""Reliability of the public kernels: random shapes, dtypes, strides and bad arguments (hypothesis), extreme inputs.

Every call either matches kernels/reference.py (computed in float64 from the same inputs) within the dtype's
tolerance, or raises ValueError/TypeError whose message names the offending argument.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastprompt.kernels import attention_forward, attention_importance, select_tokens, sink_attention
from fastprompt.kernels.importance import attention_importance_triton
from fastprompt.kernels.reference import (
    attention_importance_reference,
    select_tokens_reference,
    sink_attention_reference,
)
from fastprompt.kernels.sink_attention import sink_attention_triton

sink_module = importlib.import_module("fastprompt.kernels.sink_attention")  # the package attribute is the function

# (output atol, gradient atol) against a float64 reference computed from the same rounded inputs
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 2e-2),
    torch.bfloat16: (3e-2, 1.5e-1),
}
FLOATS = list(TOLERANCE)
LAYOUTS = ("contiguous", "heads_transposed", "tokens_sliced", "batch_sliced")
CHANNEL_STRIDED = ("channels_sliced", "last_two_swapped")  # views whose last dimension is not unit-stride
PROPERTY = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None, derandomize=True
)
INTERPRETER = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None, derandomize=True
)


def make(shape: tuple[int, ...], dtype: torch.dtype, layout: str, seed: int, scale: float = 1.0) -> torch.Tensor:
    """A [B, H, N, D] tensor of the given values with a non-contiguous memory layout (a view, not a copy)."""
    batch, heads, tokens, dim = shape
    generator = torch.Generator().manual_seed(seed)
    if layout == "heads_transposed":  # stored [B, N, H, D], as timm's qkv reshape produces
        base = torch.randn(batch, tokens, heads, dim, generator=generator) * scale
        return base.to(dtype).transpose(1, 2)
    if layout == "tokens_sliced":  # every other token of a longer sequence
        base = torch.randn(batch, heads, 2 * tokens, dim, generator=generator) * scale
        return base.to(dtype)[:, :, ::2]
    if layout == "batch_sliced":  # the second half of a larger batch: a non-zero storage offset
        base = torch.randn(2 * batch, heads, tokens, dim, generator=generator) * scale
        return base.to(dtype)[batch:]
    if layout == "channels_sliced":  # every other channel of a wider tensor
        base = torch.randn(batch, heads, tokens, 2 * dim, generator=generator) * scale
        return base.to(dtype)[..., ::2]
    if layout == "last_two_swapped":  # stored [B, H, D, N]
        base = torch.randn(batch, heads, dim, tokens, generator=generator) * scale
        return base.to(dtype).transpose(-1, -2)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def f64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Float64 leaf copies (for the reference and its gradients)."""
    return [t.detach().double().requires_grad_() for t in tensors]


@st.composite
def attention_case(draw, dtypes=FLOATS, max_tokens: int = 17, max_dim: int = 19):
    """Random (B, H, Nq, Nk, D), dtype, a layout per tensor, and a sink shape broadcastable to [B, H, Nq]."""
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n_q, n_k = draw(st.integers(1, max_tokens)), draw(st.integers(1, max_tokens))
    dim = draw(st.integers(1, max_dim))
    dtype = draw(st.sampled_from(dtypes))
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    sink_shape = draw(st.sampled_from([(n_q,), (1,), (batch, heads, n_q), (heads, 1), (heads, n_q)]))
    seed = draw(st.integers(0, 2**16))
    return batch, heads, n_q, n_k, dim, dtype, layouts, sink_shape, seed


def build(case):
    """q, k, v (in the case's layouts and dtype) and an fp32 sink."""
    batch, heads, n_q, n_k, dim, dtype, layouts, sink_shape, seed = case
    q = make((batch, heads, n_q, dim), dtype, layouts[0], seed)
    k = make((batch, heads, n_k, dim), dtype, layouts[1], seed + 1)
    v = make((batch, heads, n_k, dim), dtype, layouts[2], seed + 2)
    sink = torch.randn(*sink_shape, generator=torch.Generator().manual_seed(seed + 3)) * 2
    return q, k, v, sink


def check_sink_attention(function, case) -> None:
    """Output, scaling map and all four gradients against the float64 reference."""
    q, k, v, sink = build(case)
    dtype = q.dtype
    out_tol, grad_tol = TOLERANCE[dtype]
    leaves = [t.detach().requires_grad_() for t in (q, k, v, sink)]
    out, keep = function(*leaves, return_scale=True)
    assert out.shape == q.shape and out.dtype == dtype and keep.shape == q.shape[:-1]
    ref_leaves = f64(q, k, v, sink)
    ref_out, ref_keep = sink_attention_reference(*ref_leaves, return_scale=True)
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=out_tol, rtol=out_tol)
    torch.testing.assert_close(keep.double(), ref_keep.detach(), atol=out_tol, rtol=out_tol)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    out.backward(grad_out)
    ref_out.backward(grad_out.double())
    for name, leaf, ref in zip("q k v sink".split(), leaves, ref_leaves):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape, name
        tol = max(grad_tol, 1e-5) if name == "sink" else grad_tol  # the sink is an fp32 leaf for every input dtype
        torch.testing.assert_close(leaf.grad.double(), ref.grad, atol=tol, rtol=tol, msg=f"d{name}")


@PROPERTY
@given(attention_case())
def test_sink_attention_matches_reference(case):
    check_sink_attention(sink_attention, case)


def sink_attention_chunked(q, k, v, sink, *, return_scale=False):
    """sink_attention forced onto the query-chunked PyTorch backend (the one non-CPU, non-Triton devices use)."""
    return sink_module._sink_attention(q, k, v, sink, None, return_scale, "chunked")


@PROPERTY
@given(attention_case(), st.sampled_from([1, 40, 1 << 24]))
def test_sink_attention_chunked_backend_matches_reference(case, chunk_elements):
    """Output, scaling map σ(lse − g) and gradients of the chunked backend, with one query row per chunk, a few
    rows per chunk, or everything in one chunk."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sink_module, "_CHUNK_ELEMENTS", chunk_elements)
        check_sink_attention(sink_attention_chunked, case)


@INTERPRETER
@given(attention_case(dtypes=[torch.float32, torch.float16], max_tokens=9, max_dim=12))
def test_sink_attention_triton_interpreter_matches_reference(case):
    check_sink_attention(sink_attention_triton, case)


@PROPERTY
@given(attention_case(), st.booleans())
def test_attention_forward_matches_reference(case, with_sink):
    q, k, v, sink = build(case)
    out, lse = attention_forward(q, k, v, sink if with_sink else None)
    rq, rk, rv, rs = (t.double() for t in (q, k, v, sink))
    logits = rq @ rk.transpose(-2, -1) * q.shape[-1] ** -0.5
    ref_lse = torch.logsumexp(logits, dim=-1)
    if with_sink:
        ref_out = sink_attention_reference(rq, rk, rv, rs)
        ref_lse = torch.logaddexp(ref_lse, rs.expand(ref_lse.shape))
    else:
        ref_out = torch.softmax(logits, dim=-1) @ rv
    out_tol, _ = TOLERANCE[q.dtype]
    assert out.dtype == q.dtype and lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), ref_out, atol=out_tol, rtol=out_tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=out_tol * 10, rtol=out_tol)


@st.composite
def importance_case(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16), max_tokens: int = 17):
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    tokens, dim = draw(st.integers(1, max_tokens)), draw(st.integers(1, 19))
    dtype = draw(st.sampled_from(dtypes))
    layouts = (draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS)))
    mode = draw(st.sampled_from(["global", "cls"]))
    seed = draw(st.integers(0, 2**16))
    q = make((batch, heads, tokens, dim), dtype, layouts[0], seed)
    k = make((batch, heads, tokens, dim), dtype, layouts[1], seed + 1)
    return q, k, mode, draw(st.booleans())


def check_importance(function, q, k, mode, pass_lse) -> None:
    lse = None
    if pass_lse:
        lse = torch.logsumexp(q.double() @ k.double().transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1).float()
    scores = function(q, k, mode=mode, lse=lse)
    reference = attention_importance_reference(q, k, mode=mode).double()  # computed in fp32 from the inputs
    assert scores.shape == q.shape[:3] and scores.dtype == torch.float32
    out_tol, _ = TOLERANCE[q.dtype]
    torch.testing.assert_close(scores.double(), reference, atol=out_tol, rtol=out_tol)


@PROPERTY
@given(importance_case())
def test_attention_importance_matches_reference(case):
    check_importance(attention_importance, *case)


@INTERPRETER
@given(importance_case(dtypes=(torch.float32, torch.float16), max_tokens=9))
def test_attention_importance_triton_interpreter_matches_reference(case):
    check_importance(attention_importance_triton, *case)


@PROPERTY
@given(
    st.integers(1, 2),
    st.integers(1, 3),
    st.integers(1, 20),
    st.integers(1, 9),
    st.sampled_from(FLOATS),
    st.floats(0.01, 1.0),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_select_tokens_matches_reference(batch, heads, tokens, dim, dtype, ratio, ties, seed):
    k = make((batch, heads, tokens, dim), dtype, "heads_transposed", seed)
    v = make((batch, heads, tokens, dim), dtype, "channels_sliced", seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    scores = (
        torch.randint(0, 3, (batch, heads, tokens), generator=generator).float()
        if ties
        else torch.rand(batch, heads, tokens, generator=generator)
    )
    if int(tokens * ratio) == 0:
        with pytest.raises(ValueError, match="ratio"):
            select_tokens(k, v, scores, ratio)
        return
    got_k, got_v, got_idx = select_tokens(k, v, scores, ratio, return_indices=True)
    ref_k, ref_v, ref_idx = select_tokens_reference(k, v, scores, ratio)
    assert torch.equal(got_idx, ref_idx) and torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)


@pytest.mark.parametrize("layout", CHANNEL_STRIDED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("function", [sink_attention, sink_attention_triton, attention_forward])
def test_channel_strided_views_match_reference(function, dtype, layout):
    """q, k, v whose last dimension is not unit-stride (x[..., ::2], x.transpose(-1, -2)) give the reference output."""
    if function is sink_attention_triton and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp16/bf16/fp32")
    q, k, v = (make((2, 3, 5, 8), dtype, layout, seed) for seed in (11, 12, 13))
    sink = torch.randn(5, generator=torch.Generator().manual_seed(14))
    out = function(q, k, v, sink)
    out = out[0] if isinstance(out, tuple) else out
    reference = sink_attention_reference(q.double(), k.double(), v.double(), sink.double())
    torch.testing.assert_close(out.double(), reference, atol=TOLERANCE[dtype][0], rtol=TOLERANCE[dtype][0])


# ---------------------------------------------------------------------------------------- bad arguments


def valid_qkv(dtype=torch.float32):
    return (
        torch.randn(1, 2, 4, 8, dtype=dtype),
        torch.randn(1, 2, 6, 8, dtype=dtype),
        torch.randn(1, 2, 6, 8, dtype=dtype),
    )


BAD_SINK_ATTENTION = [  # (which argument is broken, how, error type, regex the message must match)
    ("q", lambda q, k, v, s: (q.long(), k, v, s), TypeError, r"\bq\b"),
    ("k", lambda q, k, v, s: (q, k.int(), v, s), TypeError, r"\bk\b"),
    ("v", lambda q, k, v, s: (q, k, v.to(torch.int16), s), TypeError, r"\bv\b"),
    ("sink", lambda q, k, v, s: (q, k, v, s.long()), TypeError, r"\bsink\b"),
    ("q", lambda q, k, v, s: (q[0], k, v, s), ValueError, r"\bq\b"),
    ("k", lambda q, k, v, s: (q, k[..., :5], v, s), ValueError, r"\bk\b"),
    ("v", lambda q, k, v, s: (q, k, v[:, :, :3], s), ValueError, r"\bv\b"),
    ("k", lambda q, k, v, s: (q, k[:, :1], v[:, :1], s), ValueError, r"\bk\b"),
    ("sink", lambda q, k, v, s: (q, k, v, torch.zeros(5)), ValueError, r"\bsink\b"),
    ("sink", lambda q, k, v, s: (q, k, v, torch.zeros(1, 1, 1, 4)), ValueError, r"\bsink\b"),
    ("q", lambda q, k, v, s: (q.double(), k, v, s), TypeError, r"\bq\b"),
    ("k", lambda q, k, v, s: (q, k.to("meta"), v.to("meta"), s), ValueError, r"device"),
    ("sink", lambda q, k, v, s: (q, k, v, s.to("meta")), ValueError, r"\bsink\b"),
    ("q", lambda q, k, v, s: (q[:, :, :0], k, v, s), ValueError, r"\bq\b"),
    ("q", lambda q, k, v, s: (q.numpy(), k, v, s), TypeError, r"\bq\b"),
]


@pytest.mark.parametrize("function", [sink_attention, attention_forward, sink_attention_triton])
@pytest.mark.parametrize("argument, corrupt, error, match", BAD_SINK_ATTENTION)
def test_sink_attention_rejects_bad_arguments_by_name(function, argument, corrupt, error, match):
    q, k, v = valid_qkv()
    with pytest.raises(error, match=match):
        function(*corrupt(q, k, v, torch.zeros(4)))


@pytest.mark.parametrize("scale", ["0.5", [1.0], True])
def test_sink_attention_rejects_bad_scale(scale):
    q, k, v = valid_qkv()
    with pytest.raises(TypeError, match="scale"):
        sink_attention(q, k, v, torch.zeros(4), scale=scale)


BAD_IMPORTANCE = [
    (lambda q, k: (q.long(), k), {}, TypeError, r"\bq\b"),
    (lambda q, k: (q, k.double()), {}, TypeError, r"\bk\b"),
    (lambda q, k: (q.double(), k.double()), {}, TypeError, r"float16, bfloat16, float32"),
    (lambda q, k: (q, k[:, :, :3]), {}, ValueError, r"\bk\b"),
    (lambda q, k: (q[0], k[0]), {}, ValueError, r"\[B, H, N, D\]"),
    (lambda q, k: (q, k.to("meta")), {}, ValueError, r"device"),
    (lambda q, k: (q, k), {"mode": "max"}, ValueError, r"\bmode\b"),
    (lambda q, k: (q, k), {"scale": float("nan")}, ValueError, r"\bscale\b"),
    (lambda q, k: (q, k), {"scale": "1"}, ValueError, r"\bscale\b"),
    (lambda q, k: (q, k), {"lse": torch.zeros(1, 2, 3)}, ValueError, r"\blse\b"),
    (lambda q, k: (q, k), {"lse": torch.zeros(1, 2, 4, dtype=torch.long)}, ValueError, r"\blse\b"),
    (lambda q, k: (q, [k]), {}, TypeError, r"\bk\b"),
]


@pytest.mark.parametrize("function", [attention_importance, attention_importance_triton])
@pytest.mark.parametrize("corrupt, options, error, match", BAD_IMPORTANCE)
def test_attention_importance_rejects_bad_arguments_by_name(function, corrupt, options, error, match):
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(error, match=match):
        function(*corrupt(q, k), **options)


BAD_SELECT = [
    (lambda k, v, s: (k, v, s[..., :3]), 0.5, ValueError, r"\bscores\b"),
    (lambda k, v, s: (k, v[:, :, :3], s), 0.5, ValueError, r"\bv\b"),
    (lambda k, v, s: (k[0], v, s), 0.5, ValueError, r"\bk\b"),
    (lambda k, v, s: (k, v, s.tolist()), 0.5, TypeError, r"\bscores\b"),
    (lambda k, v, s: (k, v, s), 0.0, ValueError, r"\bratio\b"),
    (lambda k, v, s: (k, v, s), 1.5, ValueError, r"\bratio\b"),
    (lambda k, v, s: (k, v, s), float("nan"), ValueError, r"\bratio\b"),
    (lambda k, v, s: (k, v, s), 0.1, ValueError, r"\bratio\b"),
    (lambda k, v, s: (k, v, s), "0.5", TypeError, r"\bratio\b"),
    (lambda k, v, s: (k, v, s), True, TypeError, r"\bratio\b"),
]


@pytest.mark.parametrize("corrupt, ratio, error, match", BAD_SELECT)
def test_select_tokens_rejects_bad_arguments_by_name(corrupt, ratio, error, match):
    k, v, scores = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.rand(1, 2, 4)
    with pytest.raises(error, match=match):
        select_tokens(*corrupt(k, v, scores), ratio)


# ---------------------------------------------------------------------------------------- extreme inputs


def finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


FP32_EPS = torch.finfo(torch.float32).eps


def extreme_inputs(logit_size: float, sink: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v [1, 2, 7, 16] in `dtype` whose logits q·kᵀ·d^-½ reach ±logit_size, and an fp32 sink.

    Keys 0 and 1 are equal and queries 0-2 point along them, so those rows split their attention exactly between two
    tied keys even at logits of 1e4: their q, k and v gradients are of the size of the inputs, not underflowed to 0.
    `sink` is a number, or "row_max": per row, the row's largest logit (the sink then carries real weight and gets a
    real gradient at the logits' own magnitude).
    """
    generator = torch.Generator().manual_seed(3)
    dim, tokens = 16, 7
    radius = (logit_size * dim**0.5) ** 0.5  # |q| = |k| = radius gives logits of logit_size · cos(q, k)
    k = torch.randn(1, 2, tokens, dim, generator=generator)
    k[:, :, 1] = k[:, :, 0]
    q = torch.randn(1, 2, tokens, dim, generator=generator)
    q[:, :, :3] = k[:, :, :1]
    q, k = (t / t.norm(dim=-1, keepdim=True) * radius for t in (q, k))
    v = torch.randn(1, 2, tokens, dim, generator=generator)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if sink == "row_max":
        logits = q.double() @ k.double().transpose(-2, -1) * dim**-0.5
        return q, k, v, logits.amax(-1).float()
    return q, k, v, torch.full((tokens,), float(sink))


def gradients(function, q, k, v, sink, grad_out: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and (dq, dk, dv, dsink) of `function` for the upstream gradient `grad_out`."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v, sink)]
    out = function(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sink", ["-inf", "80", "1e4", "-1e4", "row_max"])
@pytest.mark.parametrize("logit_size", [1e4, 1e-4])
def test_extreme_logits_and_sinks_match_the_float64_reference(backend, dtype, sink, logit_size):
    """Logits up to ±1e4 (q scaled), tiny logits, sinks far above/below every logit or level with the row maximum:
    the output and all four gradients equal the float64 reference wherever the reference is finite.

    Tolerance (flash-attention's rule): 2× the error of PyTorch's own computation in the same dtype, plus the
    rounding of O, stored in the input dtype, in the terms the backward cancels (Δ = rowsum(dO ⊙ O) against dO·v_j),
    scaled by their size, plus the fp32 rounding of lse' at the logits' magnitude (the backward recomputes
    P = exp(s − lse')) times the gradient.
    """
    function = sink_attention_triton if backend == "triton" else sink_attention
    q, k, v, sink_tensor = extreme_inputs(logit_size, sink, dtype)
    grad_out = 2 * sink_attention_reference(q.double(), k.double(), v.double(), sink_tensor.double())
    out, grads = gradients(function, q, k, v, sink_tensor, grad_out)
    ref_out, ref_grads = gradients(sink_attention_reference, *(t.double() for t in (q, k, v, sink_tensor)), grad_out)
    same_out, same_grads = gradients(sink_attention_reference, q, k, v, sink_tensor, grad_out)

    norm = lambda t: float(t.double().norm(dim=-1).max())  # noqa: E731
    size_do, size_v, scale = norm(grad_out), norm(v), q.shape[-1] ** -0.5
    cancelled = {  # the size of the largest term each gradient is a difference of
        "out": norm(v),
        "dq": scale * norm(k) * size_do * size_v,
        "dk": scale * norm(q) * size_do * size_v,
        "dv": size_do,
        "dsink": size_do * size_v,
    }
    logit_max = float((q.double() @ k.double().transpose(-2, -1)).abs().max()) * scale
    pairs = [("out", out, ref_out, same_out)] + list(zip(("dq", "dk", "dv", "dsink"), grads, ref_grads, same_grads))
    for name, got, ref, same in pairs:
        assert got is not None and got.shape == ref.shape, name
        where = torch.isfinite(ref)
        assert where.any(), f"{name}: the float64 reference is nowhere finite"
        assert torch.isfinite(got[where]).all(), f"{name} is not finite where the float64 reference is"
        got, ref, same = got.detach().double(), ref.detach(), same.detach().double()
        error = float((got - ref)[where].abs().max())
        same_error = float((same - ref)[where].abs().nan_to_num(float("inf")).max())
        lse_rounding = FP32_EPS * max(1.0, logit_max) * float(ref[where].abs().max())
        bound = 2 * same_error + torch.finfo(dtype).eps * cancelled[name] + 2 * lse_rounding
        assert error <= bound, f"{name}: error {error:.3g} against float64 > {bound:.3g} (|ref| {ref.abs().max():.3g})"


@pytest.mark.parametrize("function", [sink_attention, sink_attention_triton])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_variance_tokens_and_fp16_range(function, dtype):
    """All tokens identical (uniform attention) and values at the fp16 limit: finite, equal to the reference."""
    token = torch.randn(1, 1, 1, 8, generator=torch.Generator().manual_seed(4))
    same = token.expand(2, 3, 11, 8).contiguous()
    big = torch.full((2, 3, 11, 8), 6.0e4)  # near fp16's max (65504); q·k overflows fp16 if accumulated in it
    for q, k, v in ((same, same, same), (same, same, big), (big / 100, big / 100, big)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        sink = torch.zeros(11, requires_grad=True)
        out = function(*leaves, sink)
        out.float().mean().backward()
        assert finite(out, *(leaf.grad for leaf in leaves), sink.grad)
        reference = sink_attention_reference(*(leaf.detach().double() for leaf in leaves), sink.detach().double())
        torch.testing.assert_close(out.double(), reference, rtol=2e-3, atol=1e-3 * float(v.abs().max().detach()))


@pytest.mark.parametrize("function", [attention_importance, attention_importance_triton])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("logit_size", [1e4, 0.0])
def test_importance_at_extreme_logits_is_finite_and_sums_to_one(function, dtype, logit_size):
    """Scores stay a probability distribution per query row (global mean sums to 1) at ±1e4 and at zero variance."""
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 13, 16, generator=generator)
    k = torch.randn(2, 2, 13, 16, generator=generator)
    if logit_size:
        q = q / q.norm(dim=-1, keepdim=True) * (logit_size * 4) ** 0.5
        k = k / k.norm(dim=-1, keepdim=True) * (logit_size * 4) ** 0.5
    else:
        k = k[:, :, :1].expand_as(k)
    scores = function(q.to(dtype), k.to(dtype))
    assert finite(scores)
    torch.testing.assert_close(scores.sum(-1), torch.ones(2, 2), atol=1e-4, rtol=0)
    reference = attention_importance_reference(q.to(dtype), k.to(dtype)).double()
    torch.testing.assert_close(scores.double(), reference, atol=2e-3, rtol=0)
