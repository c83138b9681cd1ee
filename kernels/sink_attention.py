"""EPT sink attention: softmax over [sink, q kᵀ·scale] with the sink column dropped, times V, in O(N) memory.

The forward keeps only O and the row normaliser lse' = logaddexp(lse, g); the backward is the flash-attention
backward run with (O, lse'), which gives exact dq, dk, dv, plus one reduction for the sink:
dg = −exp(g − lse')·Δ with Δ = rowsum(dO ⊙ O). Backends: Triton on CUDA, PyTorch's CPU flash attention on CPU,
and a query-chunked PyTorch implementation on any other device.

Each backend runs inside three PyTorch custom ops (`fastprompt::sink_attention_forward`, `…_row_delta`,
`…_backward`) with fake implementations and a registered autograd formula, so `torch.compile` sees one opaque op
per call (no graph break, no tracing into Triton's launch code) and `fullgraph=True` works.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from fastprompt.kernels.dispatch import triton_importable, use_triton
from fastprompt.kernels.layout import as_heads_last, empty_heads_last

_CHUNK_ELEMENTS = 1 << 24  # logits materialised at once by the chunked backend
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 128


def _check_tensor(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}; convert it with .float()")
    return tensor


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor | None, scale: float | None
) -> float:
    """Validate shapes, dtypes and devices; return the softmax scale."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, tensor)
        if tensor.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(tensor.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and D")
    if q.shape[-1] == 0 or q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"q and k need at least one token and one channel, got {tuple(q.shape)}, {tuple(k.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if sink is not None:
        _check_tensor("sink", sink)
        if sink.device != q.device:
            raise ValueError(f"sink is on {sink.device} but q is on {q.device}; move it with .to(q.device)")
        rows = q.shape[:-1]
        if sink.dim() > 3 or any(s not in (1, r) for s, r in zip(reversed(sink.shape), reversed(rows))):
            raise ValueError(f"sink of shape {tuple(sink.shape)} does not broadcast to [B, H, N] = {tuple(rows)}")
    if scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _stat_dtype(q: torch.Tensor) -> torch.dtype:
    """dtype of the row statistics (lse', scale map, sink): fp32, or fp64 for fp64 inputs."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _triton_supports(q: torch.Tensor) -> bool:
    return q.dtype in _TRITON_DTYPES and q.shape[-1] <= _TRITON_MAX_HEAD_DIM


def _auto_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    if use_triton(q, k, v) and _triton_supports(q):
        return "triton"
    return "flash_cpu" if q.device.type == "cpu" else "chunked"


def _unit_last_stride(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PyTorch's CPU flash op silently misreads a head dim that is not unit-stride: copy those inputs."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _flash_cpu_forward(q, k, v, g, scale):
    q, k, v = _unit_last_stride(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    lse = lse.to(g.dtype)
    keep = torch.sigmoid(lse - g)
    return (out * keep.unsqueeze(-1)).to(q.dtype), torch.logaddexp(lse, g), keep


def _flash_cpu_backward(dout, q, k, v, out, lse_p, scale):
    dout, q, k, v, out = _unit_last_stride(dout, q, k, v, out)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse_p, 0.0, False, scale=scale
    )


def _query_chunks(q: torch.Tensor, k: torch.Tensor) -> range:
    batch, heads, n_q, _ = q.shape
    step = max(1, _CHUNK_ELEMENTS // (batch * heads * k.shape[-2]))
    return range(0, n_q, step)


def _chunked_forward(q, k, v, g, scale):
    acc = torch.promote_types(q.dtype, torch.float32)
    k_acc, v_acc = k.to(acc), v.to(acc)
    out = empty_heads_last(q)
    lse = torch.empty(q.shape[:-1], dtype=g.dtype, device=q.device)
    chunks = _query_chunks(q, k)
    for start in chunks:
        rows = slice(start, start + chunks.step)
        logits = q[:, :, rows].to(acc) @ k_acc.transpose(-2, -1) * scale
        lse[:, :, rows] = torch.logsumexp(logits, dim=-1).to(g.dtype)
        lse_p = torch.logaddexp(lse[:, :, rows], g[:, :, rows]).to(acc)
        out[:, :, rows] = (torch.exp(logits - lse_p.unsqueeze(-1)) @ v_acc).to(q.dtype)
    return out, torch.logaddexp(lse, g), torch.sigmoid(lse - g)


def _chunked_backward(dout, q, k, v, lse_p, delta, scale):
    acc = torch.promote_types(q.dtype, torch.float32)
    k_acc, v_acc = k.to(acc), v.to(acc)
    dq = empty_heads_last(q)
    dk = torch.zeros_like(k_acc, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v_acc, memory_format=torch.contiguous_format)
    chunks = _query_chunks(q, k)
    for start in chunks:
        rows = slice(start, start + chunks.step)
        q_c, do_c = q[:, :, rows].to(acc), dout[:, :, rows].to(acc)
        probs = torch.exp(q_c @ k_acc.transpose(-2, -1) * scale - lse_p[:, :, rows].to(acc).unsqueeze(-1))
        dv += probs.transpose(-2, -1) @ do_c
        dlogits = probs * (do_c @ v_acc.transpose(-2, -1) - delta[:, :, rows].to(acc).unsqueeze(-1)) * scale
        dq[:, :, rows] = (dlogits @ k_acc).to(q.dtype)
        dk += dlogits.transpose(-2, -1) @ q_c
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _triton_module():
    """The Triton kernels' module, imported on first use (it imports triton)."""
    return importlib.import_module("fastprompt.kernels.sink_attention_triton")


def _forward(backend: str, q, k, v, g, scale):
    """(O, lse', σ(lse − g)) for g already expanded to [B, H, N] in the statistics dtype."""
    if backend == "triton":
        return _triton_module().forward(q, k, v, g, scale)
    if backend == "flash_cpu":
        return _flash_cpu_forward(q, k, v, g, scale)
    return _chunked_forward(q, k, v, g, scale)


def _row_delta(backend: str, dout, out):
    """Δ = rowsum(dO ⊙ O) [B, H, N] in fp32 (fp64 for fp64 inputs)."""
    if backend == "triton":
        return _triton_module().row_delta(out, dout)
    stat = torch.promote_types(out.dtype, torch.float32)
    return (dout.to(stat) * out.to(stat)).sum(-1)


def _backward(backend: str, dout, q, k, v, out, lse_p, delta, scale):
    """(dq, dk, dv): the flash-attention backward with the sink-aware normaliser lse'."""
    if backend == "triton":
        return _triton_module().backward(dout, q, k, v, lse_p, delta, scale)
    if backend == "flash_cpu":
        return _flash_cpu_backward(dout, q, k, v, out, lse_p, scale)
    return _chunked_backward(dout, q, k, v, lse_p, delta, scale)


# The custom ops. Outputs have fixed layouts (O, dq, dk, dv heads-last; row statistics contiguous) on every backend,
# so the fake implementations below describe exactly what the real ones return.


@torch.library.custom_op("fastprompt::sink_attention_forward", mutates_args=())
def _forward_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(O, lse', σ(lse − g)) on `backend` ("triton", "flash_cpu" or "chunked"); g is [B, H, N] in the stat dtype."""
    out, lse_p, keep = _forward(backend, q, k, v, g, scale)
    return as_heads_last(out), lse_p.contiguous(), keep.contiguous()


@_forward_op.register_fake
def _(q, k, v, g, scale, backend):
    stat = torch.float32 if backend == "triton" else g.dtype
    rows = q.new_empty(q.shape[:-1], dtype=stat)
    return empty_heads_last(q), rows, torch.empty_like(rows)


@torch.library.custom_op("fastprompt::sink_attention_row_delta", mutates_args=())
def _row_delta_op(dout: Tensor, out: Tensor, backend: str) -> Tensor:
    """Δ = rowsum(dO ⊙ O), [B, H, N] in fp32 (fp64 for fp64 inputs)."""
    return _row_delta(backend, dout, out).contiguous()


@_row_delta_op.register_fake
def _(dout, out, backend):
    return out.new_empty(out.shape[:-1], dtype=torch.promote_types(out.dtype, torch.float32))


@torch.library.custom_op("fastprompt::sink_attention_backward", mutates_args=())
def _backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse_p: Tensor, delta: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the flash-attention backward run with the sink-aware normaliser lse'."""
    grads = _backward(backend, dout, q, k, v, out, lse_p, delta, scale)
    return tuple(as_heads_last(grad.to(like.dtype)) for grad, like in zip(grads, (q, k, v)))


@_backward_op.register_fake
def _(dout, q, k, v, out, lse_p, delta, scale, backend):
    return tuple(empty_heads_last(t) for t in (q, k, v))


def _sink_weight(g: torch.Tensor, lse_p: torch.Tensor) -> torch.Tensor:
    """Probability mass on the sink, exp(g − lse'), defined as 1 where both are +inf."""
    return torch.where(g == lse_p, torch.ones_like(g), torch.exp(g - lse_p))


def _setup_context(ctx, inputs, output) -> None:
    """Save O, lse', the expanded sink and (when they need gradients) q, k, v: nothing with N×N elements."""
    q, k, v, g, scale, backend = inputs
    out, lse_p, keep = output
    saved = (q, k, v) if any(ctx.needs_input_grad[:3]) else (None, None, None)
    ctx.save_for_backward(*saved, g, out, lse_p)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse_p, keep)


def _backward_formula(ctx, dout, _dlse, _dkeep):
    """dq, dk, dv from the flash backward with (O, lse'); dg = −exp(g − lse')·Δ (lse' and the scale carry none)."""
    q, k, v, g, out, lse_p = ctx.saved_tensors
    delta = _row_delta_op(dout, out, ctx.backend)
    dg = -_sink_weight(g, lse_p) * delta.to(g.dtype) if ctx.needs_input_grad[3] else None
    dq = dk = dv = None
    if any(ctx.needs_input_grad[:3]):
        dq, dk, dv = _backward_op(dout, q, k, v, out, lse_p, delta, ctx.scale, ctx.backend)
    return dq, dk, dv, dg, None, None


_forward_op.register_autograd(_backward_formula, setup_context=_setup_context)


def _sink_attention(q, k, v, sink, scale, return_scale, backend):
    scale = _check_inputs(q, k, v, sink, scale)
    if backend == "triton" and not _triton_supports(q):
        raise ValueError(
            f"the Triton kernels take fp16/bf16/fp32 and head dims up to {_TRITON_MAX_HEAD_DIM}, got {q.dtype} and "
            f"D = {q.shape[-1]}; call sink_attention, which falls back to PyTorch"
        )
    g = sink.to(_stat_dtype(q)).expand(q.shape[:-1])
    out, _, keep = _forward_op(q, k, v, g, scale, backend or _auto_backend(q, k, v))
    return (out, keep) if return_scale else out


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    *,
    scale: float | None = None,
    return_scale: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention with one extra sink logit per query row (EPT): softmax([g, q kᵀ·scale]) minus the sink column, @ V.

    q, k, v are [B, H, N, D] (any strides); `sink` broadcasts to [B, H, N] (EPT passes logsumexp(prompt, -1) of
    shape [N]). Returns O [B, H, N, D] in q's dtype, and with `return_scale=True` also the non-differentiable
    patch-wise scaling σ(lse − g) [B, H, N]. Differentiable in q, k, v and sink; saves O(N) memory for backward.
    """
    return _sink_attention(q, k, v, sink, scale, return_scale, None)


def sink_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    *,
    scale: float | None = None,
    return_scale: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """sink_attention forced through the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    if not triton_importable():
        raise RuntimeError("sink_attention_triton needs triton; call sink_attention for the PyTorch path")
    return _sink_attention(q, k, v, sink, scale, return_scale, "triton")


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor | None = None, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad forward returning (O, lse') with lse' = logaddexp(lse, sink) per row, fp32 [B, H, N] (fp64 inputs: fp64).

    With sink=None this is plain attention and lse' its log-sum-exp.
    """
    scale = _check_inputs(q, k, v, sink, scale)
    stat = _stat_dtype(q)
    if sink is None:
        g = torch.full((1, 1, 1), float("-inf"), dtype=stat, device=q.device).expand(q.shape[:-1])
    else:
        g = sink.to(stat).expand(q.shape[:-1])
    with torch.no_grad():
        out, lse_p, _ = _forward_op(q, k, v, g, scale, _auto_backend(q, k, v))
    return out, lse_p
