"""FPT important tokens: the attention each key receives, in two passes without an N×N matrix, and the top-k gather.

Pass 1 finds every query row's normaliser lse (or takes the attention forward's); pass 2 gives each key block
the column sums of exp(s − lse) over the query rows. 'global' averages over all N rows, 'cls' uses row 0 only.
"""

from __future__ import annotations

import math

import torch

from .dispatch import interpreting, triton_importable, use_triton

MODES = ("global", "cls")
CHUNK_ROWS = 128  # query rows of q kᵀ the PyTorch path holds at once
MAX_TRITON_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
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
    only the column pass runs. No N×N tensor is formed on any device.
    """
    scale, rows = _check_attention_inputs(q, k, mode, scale, lse)
    if q.shape[-1] <= MAX_TRITON_HEAD_DIM and use_triton(q, k):
        return attention_importance_triton(q, k, mode=mode, scale=scale, lse=lse)
    return _importance_torch(q, k, rows, scale, lse)


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
    batch, heads, tokens, dim = q.shape
    block_d = max(16, triton.next_power_of_2(dim))
    precision = "tf32x3" if q.dtype == torch.float32 and not interpreting() else "ieee"
    qk_scale = scale * _LOG2E
    if lse is None:
        lse = torch.empty(batch, heads, rows, dtype=torch.float32, device=q.device)
        _row_lse_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), batch * heads)](
            q, k, lse, *q.stride(), *k.stride(), *lse.stride(), heads, rows, tokens, dim, qk_scale,
            BLOCK_D=block_d, PRECISION=precision,
        )  # fmt: skip
    scores = torch.empty(batch, heads, tokens, dtype=torch.float32, device=q.device)
    _column_mass_kernel[lambda meta: (triton.cdiv(tokens, meta["BLOCK_N"]), batch * heads)](
        q, k, lse, scores, *q.stride(), *k.stride(), *lse.stride(), *scores.stride(), heads, rows, tokens, dim,
        qk_scale, 1.0 / rows, BLOCK_D=block_d, PRECISION=precision,
    )  # fmt: skip
    return scores


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


if triton_importable():
    import triton
    import triton.language as tl

    def _configs() -> list[triton.Config]:
        """Autotuning space on CUDA; one small config under the interpreter (which cannot benchmark)."""
        if interpreting():
            return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=1)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [
                (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3),
                (128, 128, 8, 3), (128, 64, 8, 2), (32, 64, 4, 4), (64, 32, 4, 4),
            ]
        ]  # fmt: skip

    @triton.autotune(configs=_configs(), key=["ROWS", "N", "BLOCK_D"])
    @triton.jit
    def _row_lse_kernel(
        Q, K, LSE,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_lb, stride_lh, stride_ln,
        H, ROWS, N, D, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Pass 1: each program owns BLOCK_M query rows and runs the online log-sum-exp over every key block."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < ROWS
        mask_d = offs_d < D
        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        k_base = K + off_b * stride_kb + off_h * stride_kh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < N
            k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
            k = tl.load(k_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
            m_i = m_new
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ln, lse, mask=mask_m)

    @triton.autotune(configs=_configs(), key=["ROWS", "N", "BLOCK_D"])
    @triton.jit
    def _column_mass_kernel(
        Q, K, LSE, OUT,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_lb, stride_lh, stride_ln,
        stride_ob, stride_oh, stride_on,
        H, ROWS, N, D, qk_scale, inv_rows,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Pass 2: each program owns BLOCK_N keys and sums exp(s − lse) over every query block (no atomics)."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < N
        mask_d = offs_d < D
        k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        k = tl.load(k_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        lse_base = LSE + off_b * stride_lb + off_h * stride_lh
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start_m in range(0, ROWS, BLOCK_M):
            rows = start_m + offs_m
            mask_m = rows < ROWS
            q_ptrs = q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd
            q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            lse = tl.load(lse_base + rows * stride_ln, mask=mask_m, other=0.0).to(tl.float32) * 1.4426950408889634
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None])
            total += tl.sum(tl.where(mask_m[:, None], p, 0.0), axis=0)
        out_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + offs_n * stride_on
        tl.store(out_ptrs, total * inv_rows, mask=mask_n)
