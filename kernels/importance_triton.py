"""Triton kernels for the FPT importance scores; imported on first use (triton.jit reads TRITON_INTERPRET then).

Pass 1 (_row_lse_kernel) gives each program BLOCK_M query rows and runs the online log-sum-exp over all keys.
Pass 2 (_column_mass_kernel) gives each program BLOCK_N keys and sums exp(s − lse) over all query rows, so every
output element has one owner: no atomics, deterministic. Pointer arithmetic and masks only (tiles through
sink_attention_triton's `load_tile`, whose row offsets are 64-bit); logits in log2 units. As there, the autotuning
key buckets the row and key counts (`KEY`), and EVEN_M/EVEN_N/EVEN_D drop the masks of sides without a tail.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastprompt.kernels.sink_attention_triton import (
    KEY,
    LOG2E,
    EvenTails,
    autotuned,
    block_d,
    bucket,
    launch,
    load_rows,
    load_tile,
    precision,
    program_tile,
    store_rows,
    tile_grid,
)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by the element size of q, as sink_attention_triton.SPACES: 16-bit tiles
# keep BLOCK_M >= 64 (the M side of q kᵀ: wgmma), fp32 tiles are smaller; what does not fit is pruned at launch.
SPACE = {
    2: [
        (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3),
        (128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 4),
    ],
    4: [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)],
}  # fmt: skip


def attention_importance(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, rows: int, scale: float
) -> torch.Tensor:
    """Column means of exp(q kᵀ·scale − lse) over the first `rows` query rows, [B, H, N] fp32 (inputs pre-validated)."""
    batch, heads, tokens, dim = q.shape
    options = dict(BLOCK_D=block_d(dim), PRECISION=precision(q))
    buckets = (bucket(rows), bucket(tokens))
    qk_scale = scale * LOG2E
    if lse is None:
        lse = torch.empty(batch, heads, rows, dtype=torch.float32, device=q.device)
        launch(
            _row_lse, tile_grid(batch * heads, rows, "BLOCK_M"),
            q, k, lse, *q.stride(), *k.stride(), *lse.stride(), heads, rows, tokens, dim, qk_scale, *buckets,
            **options,
        )  # fmt: skip
    scores = torch.empty(batch, heads, tokens, dtype=torch.float32, device=q.device)
    launch(
        _column_mass, tile_grid(batch * heads, tokens, "BLOCK_N"),
        q, k, lse, scores, *q.stride(), *k.stride(), *lse.stride(), *scores.stride(), heads, rows, tokens, dim,
        qk_scale, 1.0 / rows, *buckets, **options,
    )  # fmt: skip
    return scores


@triton.jit(do_not_specialize=["N_Q_BUCKET", "N_K_BUCKET"])
def _row_lse_kernel(
    Q, K, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_ln,
    H, ROWS, N, D, qk_scale, N_Q_BUCKET, N_K_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Pass 1: each program owns BLOCK_M query rows and runs the online log-sum-exp over every key block."""
    pid_bh, first = program_tile(ROWS, BLOCK_M)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < ROWS
    mask_d = offs_d < D
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    q = load_tile(q_base, offs_m, offs_d, stride_qn, stride_qd, mask_m, mask_d, EVEN_M, EVEN_D)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        k = load_tile(k_base, cols, offs_d, stride_kn, stride_kd, mask_n, mask_d, EVEN_N, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if not EVEN_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    store_rows(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ln, lse, mask_m, EVEN_M)


@triton.jit(do_not_specialize=["N_Q_BUCKET", "N_K_BUCKET"])
def _column_mass_kernel(
    Q, K, LSE, OUT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_ln,
    stride_ob, stride_oh, stride_on,
    H, ROWS, N, D, qk_scale, inv_rows, N_Q_BUCKET, N_K_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Pass 2: each program owns BLOCK_N keys and sums exp(s − lse) over every query block (no atomics)."""
    pid_bh, first = program_tile(N, BLOCK_N)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = first + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    k_base = K + off_b * stride_kb + off_h * stride_kh
    k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, mask_n, mask_d, EVEN_N, EVEN_D)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    lse_base = LSE + off_b * stride_lb + off_h * stride_lh
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, ROWS, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < ROWS
        q = load_tile(q_base, rows, offs_d, stride_qn, stride_qd, mask_m, mask_d, EVEN_M, EVEN_D)
        lse = load_rows(lse_base + rows * stride_ln, mask_m, EVEN_M).to(tl.float32) * 1.4426950408889634
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if not EVEN_M:
            p = tl.where(mask_m[:, None], p, 0.0)
        total += tl.sum(p, axis=0)
    out_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + offs_n * stride_on
    store_rows(out_ptrs, total * inv_rows, mask_n, EVEN_N)


SIDES = dict(EVEN_M=("ROWS", "BLOCK_M"), EVEN_N=("N", "BLOCK_N"), EVEN_D=("D", "BLOCK_D"))
_row_lse = autotuned(EvenTails(_row_lse_kernel, **SIDES), SPACE, KEY)  # KEY: the query rows' and keys' buckets, D
_column_mass = autotuned(EvenTails(_column_mass_kernel, **SIDES), SPACE, KEY)
