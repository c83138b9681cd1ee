"""FPT important tokens: the attention each key receives, in two passes without an N×N matrix, and the top-k gather.

Pass 1 finds every query row's normaliser lse (or takes the attention forward's); pass 2 gives each key block
the column sums of exp(s − lse) over the query rows. 'global' averages over all N rows, 'cls' uses row 0 only.
Both backends run inside the custom op `fastprompt::attention_importance` (with a fake implementation), so
`torch.compile` sees one opaque op per call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastprompt.kernels.dispatch import triton_importable, use_triton
from fastprompt.kernels.sink_attention import attention_forward

MODES = ("global", "cls")
CHUNK_ROWS = 128  # query rows of q kᵀ the PyTorch path holds at once
MAX_TRITON_HEAD_DIM = 128
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, mode: str, scale: float | None, lse: torch.Tensor | None
) -> tuple[float, int]:
    """Validate attention_importance's arguments; return the softmax scale and the number of query rows used."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError(f"q and k must be torch.Tensors, got {type(q).__name__} and {type(k).__name__}")
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            f"q and k must both be [B, H, N, D] with the same shape, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"q and k need at least one token and one channel, got shape {tuple(q.shape)}")
    if q.dtype != k.dtype or q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q and k must share one dtype of float16, bfloat16, float32; got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None (meaning D**-0.5), got {scale!r}")
    if lse is not None:
        if not isinstance(lse, torch.Tensor) or lse.shape != q.shape[:3]:
            shape = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
            raise ValueError(f"lse must be a [B, H, N] = {tuple(q.shape[:3])} tensor of row log-sum-exps, got {shape}")
        if lse.device != q.device or not lse.is_floating_point():
            raise ValueError(f"lse must be a floating tensor on {q.device}, got {lse.dtype} on {lse.device}")
    return float(scale), q.shape[2] if mode == "global" else 1


def _importance_torch(
    q: torch.Tensor, k: torch.Tensor, rows: int, scale: float, lse: torch.Tensor | None
) -> torch.Tensor:
    """Chunked PyTorch two-pass scores: holds at most CHUNK_ROWS × N logits per (batch, head)."""
    keys_t = k.float().transpose(-2, -1)

    def logits(start: int) -> torch.Tensor:
        return torch.matmul(q[:, :, start : min(start + CHUNK_ROWS, rows)].float(), keys_t) * scale

    starts = range(0, rows, CHUNK_ROWS)
    if lse is None:
        lse = torch.cat([torch.logsumexp(logits(start), dim=-1) for start in starts], dim=-1)
    lse = lse[..., :rows].float()
    total = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
    for start in starts:
        total += torch.exp(logits(start) - lse[..., start : start + CHUNK_ROWS, None]).sum(dim=-2)
    return total / rows


@torch.library.custom_op(
    "fastprompt::attention_importance",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor? lse, int rows, float scale, str backend) -> Tensor",  # not inferred: stable
)
def _importance_op(q: Tensor, k: Tensor, lse: Tensor | None, rows: int, scale: float, backend: str) -> Tensor:
    """Scores [B, H, N] fp32 over the first `rows` query rows, on `backend` ("triton" or "torch"); inputs validated."""
    if backend == "triton":
        from fastprompt.kernels import importance_triton  # imported late: triton.jit reads TRITON_INTERPRET at import

        return importance_triton.attention_importance(q, k, lse, rows, scale).contiguous()
    return _importance_torch(q, k, rows, scale, lse).contiguous()


@_importance_op.register_fake
def _(q, k, lse, rows, scale, backend):
    return q.new_empty(k.shape[:3], dtype=torch.float32)


@torch.no_grad()
def attention_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mode: str = "global",
    scale: float | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention each key receives, [B, H, N] fp32: softmax(q kᵀ·scale) row mean ('global') or row 0 ('cls').

    `lse` ([B, H, N], natural log) is every query row's log-sum-exp, e.g. from the attention forward; when given,
    only the column pass runs. No N×N tensor is formed on any device; the scores carry no gradient (they only rank).
    CUDA runs the Triton kernels (head dim D <= 128); elsewhere, or for larger D, a chunked PyTorch path runs.
    """
    scale, rows = _check_attention_inputs(q, k, mode, scale, lse)
    backend = "triton" if q.shape[-1] <= MAX_TRITON_HEAD_DIM and use_triton(q, k) else "torch"
    return _importance_op(q, k, lse, rows, scale, backend)


@torch.no_grad()
def attention_with_importance(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mode: str = "global", scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen block's attention: (O [B, H, N, D], scores [B, H, N]) from one forward and a score pass on its lse."""
    scale, _ = _check_attention_inputs(q, k, mode, scale, None)
    out, lse = attention_forward(q, k, v, scale=scale)
    return out, attention_importance(q, k, mode=mode, scale=scale, lse=lse)


@torch.no_grad()
def attention_importance_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mode: str = "global",
    scale: float | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """attention_importance through the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    scale, rows = _check_attention_inputs(q, k, mode, scale, lse)
    if not triton_importable():
        raise RuntimeError("attention_importance_triton needs triton; call attention_importance for the PyTorch path")
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"the Triton path takes head dim D <= {MAX_TRITON_HEAD_DIM}, got D={q.shape[-1]}")
    return _importance_op(q, k, lse, rows, scale, "triton")


def _check_selection_inputs(k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, ratio: float) -> int:
    """Validate select_tokens' arguments; return the number of tokens to keep."""
    for name, tensor in (("k", k), ("v", v), ("scores", scores)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must be [B, H, N, D] with equal B, H, N, got {tuple(k.shape)} and {tuple(v.shape)}")
    if scores.shape != k.shape[:3]:
        raise ValueError(f"scores must be [B, H, N] = {tuple(k.shape[:3])}, got {tuple(scores.shape)}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a number in (0, 1], got {type(ratio).__name__}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    count = int(k.shape[2] * ratio)
    if count == 0:
        raise ValueError(
            f"ratio={ratio} keeps int(N·ratio) = 0 of N={k.shape[2]} tokens; use ratio >= {1 / k.shape[2]:.4g}"
        )
    return count


def select_tokens(
    k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, ratio: float, *, return_indices: bool = False
) -> tuple[torch.Tensor, ...]:
    """Per (b, h), the keys and values [B, H, int(N·ratio), D] of the highest-scoring tokens, best first.

    Equal scores go to the lower token index (stable sort). With return_indices, also the [B, H, k] int64 indices.
    """
    count = _check_selection_inputs(k, v, scores, ratio)
    indices = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]
    rows = indices.unsqueeze(-1)
    k_sel = k.gather(2, rows.expand(*indices.shape, k.shape[-1]))
    v_sel = v.gather(2, rows.expand(*indices.shape, v.shape[-1]))
    return (k_sel, v_sel, indices) if return_indices else (k_sel, v_sel)
