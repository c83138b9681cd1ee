"""Triton kernels for sink attention: a forward seeded with the sink and a two-kernel flash backward.

Imported only when Triton is used (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). All kernels take
explicit strides, mask every tail (tokens and the head dimension padded to a power of two) and keep row statistics
in fp32, in log2 units inside the kernels and natural units outside.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastprompt.kernels.dispatch import deterministic, interpreting

LOG2E = math.log2(math.e)
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)  # the same constants, usable inside kernels
LN2_C: tl.constexpr = tl.constexpr(math.log(2.0))


def _configs(kind: str) -> list[triton.Config]:
    """One small config under the interpreter, one fixed config in deterministic mode, else a handful to autotune."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=1)]
    if deterministic():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
    if kind == "forward":
        shapes = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 4)]
    else:
        shapes = [(64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 128, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _precision(q: torch.Tensor) -> str:
    """fp32 inputs: full-precision products (3×TF32 on a GPU, IEEE in the interpreter); ignored for fp16/bf16."""
    return "tf32x3" if q.dtype == torch.float32 and not interpreting() else "ieee"


@triton.jit
def _tile_ptrs(base, idx, dims, stride_n, stride_d):
    """`base` plus the offsets of the [len(idx), len(dims)] tile of rows `idx` and columns `dims`."""
    return base + idx[:, None] * stride_n + dims[None, :] * stride_d


@triton.jit
def _load_tile(base, idx, dims, stride_n, stride_d, mask):
    """The strided tile at rows `idx`, columns `dims`; zero where `mask` is false (ragged tails, padded D)."""
    return tl.load(_tile_ptrs(base, idx, dims, stride_n, stride_d), mask=mask, other=0.0)


@triton.autotune(configs=_configs("forward"), key=["N_Q", "N_K", "BLOCK_D"])
@triton.jit
def _forward_kernel(
    Q, K, V, G, Out, LSE, KEEP,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, N_K, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    dim_ok = dims < D
    q = _load_tile(
        Q + b * stride_qb + h * stride_qh, rows, dims, stride_qm, stride_qd, row_ok[:, None] & dim_ok[None, :]
    )
    sink = tl.load(G + b * stride_gb + h * stride_gh + rows * stride_gm, mask=row_ok, other=0.0).to(tl.float32)
    sink = sink * LOG2E_C
    row_max = sink  # the online softmax is seeded with the sink logit
    key_mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for start in range(0, N_K, BLOCK_N):
        keys = start + cols
        key_ok = keys < N_K
        tile_ok = key_ok[:, None] & dim_ok[None, :]
        k = _load_tile(k_base, keys, dims, stride_kn, stride_kd, tile_ok)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        alpha = tl.where(new_max == row_max, 1.0, tl.exp2(row_max - new_max))
        p = tl.exp2(s - new_max[:, None])
        key_mass = key_mass * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, keys, dims, stride_vn, stride_vd, tile_ok)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max
    sink_mass = tl.where(sink == row_max, 1.0, tl.exp2(sink - row_max))
    total = key_mass + sink_mass
    out = acc / total[:, None]
    o_ptrs = _tile_ptrs(Out + b * stride_ob + h * stride_oh, rows, dims, stride_om, stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    stat = pid_bh.to(tl.int64) * N_Q + rows
    tl.store(LSE + stat, (row_max + tl.log2(total)) * LN2_C, mask=row_ok)
    tl.store(KEEP + stat, key_mass / total, mask=row_ok)


@triton.jit
def _delta_kernel(
    Out, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    H, N_Q, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    mask = row_ok[:, None] & (dims < D)[None, :]
    o = _load_tile(Out + b * stride_ob + h * stride_oh, rows, dims, stride_om, stride_od, mask)
    do = _load_tile(DO + b * stride_db + h * stride_dh, rows, dims, stride_dm, stride_dd, mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_Q + rows, delta, mask=row_ok)


@triton.jit
def _tile_grads(q, k, v, do, lse, delta, valid, qk_scale, PRECISION: tl.constexpr):
    """One tile's recomputed probabilities P' = exp2(s·log2e − lse'·log2e) and score gradients P' ⊙ (dO Vᵀ − Δ)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - delta[:, None])


@triton.autotune(configs=_configs("backward"), key=["N_Q", "N_K", "BLOCK_D"])
@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    H, N_Q, N_K, D, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows0 = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < N_K
    dim_ok = dims < D
    kv_mask = key_ok[:, None] & dim_ok[None, :]
    k = _load_tile(K + b * stride_kb + h * stride_kh, keys, dims, stride_kn, stride_kd, kv_mask)
    v = _load_tile(V + b * stride_vb + h * stride_vh, keys, dims, stride_vn, stride_vd, kv_mask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_db + h * stride_dh
    stat_base = pid_bh.to(tl.int64) * N_Q
    for start in range(0, N_Q, BLOCK_M):
        rows = start + rows0
        row_ok = rows < N_Q
        tile_ok = row_ok[:, None] & dim_ok[None, :]
        q = _load_tile(q_base, rows, dims, stride_qm, stride_qd, tile_ok)
        do = _load_tile(do_base, rows, dims, stride_dm, stride_dd, tile_ok)
        lse = tl.load(LSE + stat_base + rows, mask=row_ok, other=0.0) * LOG2E_C
        delta = tl.load(DELTA + stat_base + rows, mask=row_ok, other=0.0)
        p, ds = _tile_grads(q, k, v, do, lse, delta, row_ok[:, None] & key_ok[None, :], qk_scale, PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    offsets = _tile_ptrs(b * stride_gb + h * stride_gh, keys, dims, stride_gn, stride_gd)
    tl.store(DK + offsets, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_configs("backward"), key=["N_Q", "N_K", "BLOCK_D"])
@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, N_Q, N_K, D, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    dim_ok = dims < D
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, dims, stride_qm, stride_qd, q_mask)
    do = _load_tile(DO + b * stride_db + h * stride_dh, rows, dims, stride_dm, stride_dd, q_mask)
    stat = pid_bh.to(tl.int64) * N_Q + rows
    lse = tl.load(LSE + stat, mask=row_ok, other=0.0) * LOG2E_C
    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for start in range(0, N_K, BLOCK_N):
        keys = start + cols
        key_ok = keys < N_K
        tile_ok = key_ok[:, None] & dim_ok[None, :]
        k = _load_tile(k_base, keys, dims, stride_kn, stride_kd, tile_ok)
        v = _load_tile(v_base, keys, dims, stride_vn, stride_vd, tile_ok)
        _, ds = _tile_grads(q, k, v, do, lse, delta, key_ok[None, :], qk_scale, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq_ptrs = _tile_ptrs(DQ + b * stride_gb + h * stride_gh, rows, dims, stride_gm, stride_gd)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _like_heads_last(x: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, N, D] tensor laid out as [B, N, H, D], the layout timm reshapes attention outputs from."""
    batch, heads, tokens, dim = x.shape
    return torch.empty(batch, tokens, heads, dim, dtype=x.dtype, device=x.device).transpose(1, 2)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O, lse', σ(lse − g)) for fp32 sink logits g of shape [B, H, N] (any strides, e.g. broadcast)."""
    batch, heads, n_q, dim = q.shape
    out = _like_heads_last(q)
    lse = torch.empty(batch, heads, n_q, dtype=torch.float32, device=q.device)
    keep = torch.empty_like(lse)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)
    _forward_kernel[grid](
        q, k, v, g, out, lse, keep,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *out.stride(),
        heads, n_q, k.shape[2], dim, scale * LOG2E,
        BLOCK_D=_block_d(dim), PRECISION=_precision(q),
    )  # fmt: skip
    return out, lse, keep


def row_delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """Δ = rowsum(dO ⊙ O) as fp32 [B, H, N], without an fp32 copy of either tensor."""
    batch, heads, n_q, dim = out.shape
    delta = torch.empty(batch, heads, n_q, dtype=torch.float32, device=out.device)
    _delta_kernel[(triton.cdiv(n_q, 32), batch * heads)](
        out, dout, delta, *out.stride(), *dout.stride(), heads, n_q, dim, BLOCK_M=32, BLOCK_D=_block_d(dim)
    )
    return delta


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): the flash-attention backward with the sink-aware normaliser lse' and Δ (fp32 [B, H, N])."""
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    lse, delta = lse.contiguous(), delta.contiguous()
    block_d = _block_d(dim)
    dq, dk, dv = _like_heads_last(q), _like_heads_last(k), _like_heads_last(v)
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    sizes = (heads, n_q, n_k, dim, scale, scale * LOG2E)
    _dkdv_kernel[lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), batch * heads)](
        q, k, v, dout, lse, delta, dk, dv, *common, *dk.stride(), *sizes, BLOCK_D=block_d, PRECISION=_precision(q)
    )
    _dq_kernel[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)](
        q, k, v, dout, lse, delta, dq, *common, *dq.stride(), *sizes, BLOCK_D=block_d, PRECISION=_precision(q)
    )
    return dq, dk, dv
