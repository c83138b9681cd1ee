"""Triton kernels for sink attention: a forward seeded with the sink and FlashAttention-2's fused backward.

The backward is one kernel (5 products and 1 exp2 per tile, dq through fp32 atomic adds) by default, and the
atomic-free two-kernel pass (dK/dV, then dQ) in deterministic mode.

Imported only when Triton is used (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). All kernels take
explicit strides, mask every tail (tokens and the head dimension padded to a power of two) unless their EVEN_* flags
say the sizes divide the blocks, and keep row statistics in fp32, in log2 units inside the kernels and natural
units outside. Autotuning keys on the token counts in buckets of 32 (see `KEY`).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from fastprompt.kernels.dispatch import deterministic, interpreting
from fastprompt.kernels.layout import empty_heads_last

LOG2E = math.log2(math.e)
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)  # the same constants, usable inside kernels
LN2_C: tl.constexpr = tl.constexpr(math.log(2.0))


# Autotuning spaces, (BLOCK_M, BLOCK_N, num_warps, num_stages) by the element size of q. 16-bit tiles are at least
# 64 rows wherever they are the M side of a tl.dot, so that every product is a Hopper wgmma (an M of 32 falls back to
# mma.sync). fp32 tiles hold twice the bytes, so fp32 gets smaller tiles and fewer stages: at head dim 128 the
# 16-bit configs would need up to 524 KB of shared memory in fp32. What does not fit the device is pruned at launch.
Shapes = list[tuple[int, int, int, int]]
Space = dict[int, Shapes | dict[int, Shapes]]  # by element size; optionally by padded head dim below that
SPACES: dict[str, Space] = {
    "forward": {
        2: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 4)],
        4: [(64, 64, 4, 2), (128, 32, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 1), (32, 32, 4, 1)],
    },
    "backward": {
        2: [(64, 64, 4, 2), (64, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2), (128, 128, 8, 2)],
        4: [(64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 1), (32, 32, 4, 1)],
    },
    # The fused backward: BLOCK_N keys per program are the M side of Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, dV and dK, BLOCK_M
    # query rows that of dQ, so 16-bit tiles keep both at 64 or more (wgmma). Configs that spill registers (128-row
    # tiles at head dim 128) are pruned at launch; 64×64 with 8 warps is spill-free at both head dims.
    # Listed by padded head dim (the smallest key at least BLOCK_D). Compiled for sm_90 (tests/sm90_kernels.py):
    # at 64, 128-key tiles spill; at 128 the dK and dV accumulators fill the registers and only 64×64 with one stage
    # and 32×64 with 8 warps (an M of 32: mma.sync for dQ) are spill-free. fp32 (3×TF32) spills in every tile that
    # fits (72 B per thread at best at head dim 64, about 1 KB at 128): the pruning takes the least-spilling one.
    "backward_fused": {
        2: {
            64: [(64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2)],
            128: [(64, 64, 8, 2), (64, 64, 8, 1), (32, 64, 4, 2), (32, 64, 8, 2), (32, 64, 4, 1)],
        },
        4: [(32, 32, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1), (16, 16, 4, 1), (32, 64, 4, 2)],
    },
}
# Deterministic mode: the first of these that fits, for every kernel, dtype and head dim (the block sizes set the
# summation order, so they are fixed instead of autotuned).
DETERMINISTIC_ORDER = [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=1)


def _config(shape: tuple[int, int, int, int]) -> triton.Config:
    block_m, block_n, warps, stages = shape
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def _shape(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on `device` (232,448 on an H100/H200, 166,912 on an A100)."""
    return _device_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _device_shared_memory(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def _spills(compiled) -> int:
    """Register spills of a compiled kernel: Triton's `n_spills` (local memory per thread, stack frame included, in
    4-byte words, as the driver reports it); 0 where it cannot say."""
    with contextlib.suppress(AttributeError):
        compiled._init_handles()  # loads the cubin (a GPU) and reads its attributes, n_spills among them
    return int(getattr(compiled, "n_spills", 0) or 0)


def _fitting(kernel, configs, args: tuple, kwargs: dict) -> list[tuple[triton.Config, int]]:
    """(config, spill bytes) of the `configs` whose compiled `kernel` fits the device of args[0], spill-free first.

    Compiles each config for these very arguments (Triton's `warmup`: the launch's specialisation, cached, nothing
    runs), so the figures are the compiler's own, not estimates. The autotuner compiles these configs anyway. If
    every fitting config spills registers (fp32 at large head dims), only the least-spilling ones are returned.
    """
    limit = shared_memory_limit(args[0].device)
    fit = []
    for config in configs:
        compiled = kernel.warmup(*args, **kwargs, **config.all_kwargs())
        if compiled.metadata.shared <= limit:
            fit.append((config, _spills(compiled)))
    least = min((spills for _, spills in fit), default=0)
    return [(config, spills) for config, spills in fit if spills == least]


def _no_config_fits(kernel, args: tuple, kwargs: dict) -> RuntimeError:
    q = args[0]
    return RuntimeError(
        f"no block configuration of {kernel.__name__} fits the "
        f"{shared_memory_limit(q.device)} bytes of shared memory per program on {q.device} for {q.dtype} at head dim "
        f"padded to {kwargs.get('BLOCK_D')}; set FASTPROMPT_DISABLE_TRITON=1 to use the PyTorch path"
    )


def space_shapes(space: Space, element_size: int, head_dim: int | None = None) -> Shapes:
    """The (BLOCK_M, BLOCK_N, warps, stages) `space` lists for this element size and padded head dim (every head
    dim's, when `head_dim` is None)."""
    shapes = space[element_size]
    if not isinstance(shapes, dict):
        return shapes
    if head_dim is None:
        return [shape for listed in shapes.values() for shape in listed]
    return next(listed for limit, listed in sorted(shapes.items()) if head_dim <= limit)


def autotuned(kernel, space: Space, key: list[str]):
    """`kernel` autotuned over `space` (configs by element size of the first argument), pruned to what fits.

    Under the interpreter, one small config (it cannot benchmark). On a GPU, the launch keeps the configs listed for
    q's element size (and padded head dim, where the space says) whose compiled shared memory fits the device and
    that spill no registers (or, where all spill, those that spill least), and raises a clear error if none fits.
    """
    if interpreting():
        return triton.autotune(configs=[_INTERPRETER_CONFIG], key=key)(kernel)
    shapes = list(dict.fromkeys(shape for size in space for shape in space_shapes(space, size)))

    def prune(configs, named_args, **kwargs):
        args = tuple(named_args.values())
        wanted = set(space_shapes(space, args[0].element_size(), kwargs.get("BLOCK_D")))
        launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        candidates = [config for config in configs if _shape(config) in wanted]
        fit = [config for config, _ in _fitting(kernel, candidates, args, {"grid": kwargs["grid"], **launch})]
        if not fit:
            raise _no_config_fits(kernel, args, launch)
        return fit

    return triton.autotune(
        configs=[_config(s) for s in shapes], key=key, prune_configs_by={"early_config_prune": prune}
    )(kernel)


_DETERMINISTIC_CHOICE: dict[tuple, triton.Config] = {}


def deterministic_config(kernel, grid, *args, **kwargs) -> triton.Config:
    """The first config of DETERMINISTIC_ORDER whose compiled `kernel` fits the device and spills no registers, for
    these arguments (where every fitting config spills: the first of those that spill least).

    Chosen once per (kernel, dtype, head dim, device) and kept for the process, so every launch of a case sums in
    the same order. The head dim itself, not its padded block: D = 80 and 128 share BLOCK_D = 128 but compile apart
    (EVEN_D), and spill differently.
    """
    q = args[0]
    case = (kernel, q.dtype, q.shape[-1], q.device)
    if case not in _DETERMINISTIC_CHOICE:
        fit = _fitting(kernel, [_config(shape) for shape in DETERMINISTIC_ORDER], args, {"grid": grid, **kwargs})
        if not fit:
            raise _no_config_fits(kernel, args, kwargs)
        _DETERMINISTIC_CHOICE[case] = fit[0][0]
    return _DETERMINISTIC_CHOICE[case]


def _device_guard(tensor: torch.Tensor):
    """Run on `tensor`'s CUDA device (a cuda:1 tensor launches on GPU 1 whatever the current device is)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def launch(tuned, grid, *args, **kwargs) -> None:
    """Launch autotuned kernel `tuned` on the device of its first argument (a tensor).

    Deterministic mode (read at each launch) bypasses the autotuner: the fixed config of `deterministic_config`.
    """
    with _device_guard(args[0]):
        if deterministic() and not interpreting():
            config = deterministic_config(tuned.fn, grid, *args, **kwargs)
            tuned.fn[grid](*args, **kwargs, **config.all_kwargs())
        else:
            tuned[grid](*args, **kwargs)


def block_d(dim: int) -> int:
    """The head dimension padded to a power of two (at least 16, the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(dim))


def precision(q: torch.Tensor) -> str:
    """fp32 inputs: full-precision products (3×TF32 on a GPU, IEEE in the interpreter); ignored for fp16/bf16."""
    return "tf32x3" if q.dtype == torch.float32 and not interpreting() else "ieee"


@triton.jit
def program_tile(N, BLOCK: tl.constexpr):
    """(batch·head, first row) of this program's BLOCK rows of N.

    One grid axis of B·H·cdiv(N, BLOCK) programs (axis 0 allows 2**31 − 1; axes 1 and 2 stop at 65,535), with the
    tiles of one batch·head consecutive, so programs that run together read the same K and V (L2 reuse).
    """
    tiles = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    return pid // tiles, (pid % tiles) * BLOCK


@triton.jit
def tile_ptrs(base, idx, dims, stride_n, stride_d):
    """`base` plus the offsets of the [len(idx), len(dims)] tile of rows `idx` and columns `dims`.

    Row offsets are 64-bit: N × stride passes 2**31 at about 932k tokens of ViT-B's packed qkv (row stride 2304).
    """
    return base + idx.to(tl.int64)[:, None] * stride_n + dims[None, :] * stride_d


@triton.jit
def tile_mask(idx_ok, dim_ok, EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """The [rows, dims] mask of a tile whose rows (idx_ok) or head dims (dim_ok) have a tail; a side whose flag says
    it divides its block evenly is left out. Call only where at least one side has a tail."""
    if EVEN_ROWS:
        mask = dim_ok[None, :]
    elif EVEN_D:
        mask = idx_ok[:, None]
    else:
        mask = idx_ok[:, None] & dim_ok[None, :]
    return mask


@triton.jit
def load_tile(base, idx, dims, stride_n, stride_d, idx_ok, dim_ok, EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """The strided tile at rows `idx`, columns `dims`: zero in rows past the end (idx_ok false) and in the padding of
    the head dim (dim_ok false). Unmasked where both sides divide their blocks (EVEN_ROWS, EVEN_D)."""
    ptrs = tile_ptrs(base, idx, dims, stride_n, stride_d)
    if EVEN_ROWS and EVEN_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=tile_mask(idx_ok, dim_ok, EVEN_ROWS, EVEN_D), other=0.0)
    return tile


@triton.jit
def store_tile(
    base, idx, dims, stride_n, stride_d, value, idx_ok, dim_ok, EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr
):
    """Store `value` at the tile of `load_tile`, skipping rows past the end and head-dim padding (unless even)."""
    ptrs = tile_ptrs(base, idx, dims, stride_n, stride_d)
    if EVEN_ROWS and EVEN_D:
        tl.store(ptrs, value)
    else:
        tl.store(ptrs, value, mask=tile_mask(idx_ok, dim_ok, EVEN_ROWS, EVEN_D))


@triton.jit
def load_rows(ptrs, ok, EVEN: tl.constexpr):
    """One value per row (a sink logit, lse', Δ): zero past the end, unmasked when the rows divide their block."""
    if EVEN:
        values = tl.load(ptrs)
    else:
        values = tl.load(ptrs, mask=ok, other=0.0)
    return values


@triton.jit
def store_rows(ptrs, values, ok, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, values)
    else:
        tl.store(ptrs, values, mask=ok)


@triton.jit(do_not_specialize=["N_Q_BUCKET", "N_K_BUCKET"])
def _forward_kernel(
    Q, K, V, G, Out, LSE, KEEP,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, N_K, D, qk_scale, N_Q_BUCKET, N_K_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """O, lse' and the keep fraction for BLOCK_M query rows. G is the sink logits (strides stride_g*, per row)."""
    pid_bh, first = program_tile(N_Q, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = first + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    dim_ok = dims < D
    q = load_tile(Q + b * stride_qb + h * stride_qh, rows, dims, stride_qm, stride_qd, row_ok, dim_ok, EVEN_M, EVEN_D)
    sink = load_rows(G + b * stride_gb + h * stride_gh + rows * stride_gm, row_ok, EVEN_M).to(tl.float32)
    sink = sink * LOG2E_C
    row_max = sink  # the online softmax is seeded with the sink logit
    key_mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for start in range(0, N_K, BLOCK_N):
        keys = start + cols
        key_ok = keys < N_K
        k = load_tile(k_base, keys, dims, stride_kn, stride_kd, key_ok, dim_ok, EVEN_N, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if not EVEN_N:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        alpha = tl.where(new_max == row_max, 1.0, tl.exp2(row_max - new_max))
        p = tl.exp2(s - new_max[:, None])
        key_mass = key_mass * alpha + tl.sum(p, 1)
        v = load_tile(v_base, keys, dims, stride_vn, stride_vd, key_ok, dim_ok, EVEN_N, EVEN_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max
    sink_mass = tl.where(sink == row_max, 1.0, tl.exp2(sink - row_max))
    total = key_mass + sink_mass
    out = (acc / total[:, None]).to(Out.dtype.element_ty)
    store_tile(
        Out + b * stride_ob + h * stride_oh, rows, dims, stride_om, stride_od, out, row_ok, dim_ok, EVEN_M, EVEN_D
    )
    stat = pid_bh.to(tl.int64) * N_Q + rows
    store_rows(LSE + stat, (row_max + tl.log2(total)) * LN2_C, row_ok, EVEN_M)
    store_rows(KEEP + stat, key_mass / total, row_ok, EVEN_M)


@triton.jit
def _delta_kernel(
    Out, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, N_Q, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Δ = rowsum(dO ⊙ O) for BLOCK_M rows; dO has the strides stride_do*."""
    pid_bh, first = program_tile(N_Q, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = first + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    dim_ok = dims < D
    o = load_tile(Out + b * stride_ob + h * stride_oh, rows, dims, stride_om, stride_od, row_ok, dim_ok, EVEN_M, EVEN_D)
    do = load_tile(
        DO + b * stride_dob + h * stride_doh, rows, dims, stride_dom, stride_dod, row_ok, dim_ok, EVEN_M, EVEN_D
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    store_rows(DELTA + pid_bh.to(tl.int64) * N_Q + rows, delta, row_ok, EVEN_M)


@triton.jit
def _tile_grads(q, k, v, do, lse, delta, valid, qk_scale, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One tile's recomputed probabilities P' = exp2(s·log2e − lse'·log2e) and score gradients P' ⊙ (dO Vᵀ − Δ);
    P' is zeroed outside `valid` where the tile is MASKED (a padded key's logit is 0, whose exp2 can overflow)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(valid, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit(do_not_specialize=["N_Q_BUCKET", "N_K_BUCKET"])
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    H, N_Q, N_K, D, scale, qk_scale, N_Q_BUCKET, N_K_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Deterministic backward, pass 1: dK and dV of BLOCK_N keys. dO has the strides stride_do*; the outputs DK and
    DV share the strides stride_dk* (both heads-last, of one shape)."""
    pid_bh, first = program_tile(N_K, BLOCK_N)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    keys = first + tl.arange(0, BLOCK_N)
    rows0 = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < N_K
    dim_ok = dims < D
    k = load_tile(K + b * stride_kb + h * stride_kh, keys, dims, stride_kn, stride_kd, key_ok, dim_ok, EVEN_N, EVEN_D)
    v = load_tile(V + b * stride_vb + h * stride_vh, keys, dims, stride_vn, stride_vd, key_ok, dim_ok, EVEN_N, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    stat_base = pid_bh.to(tl.int64) * N_Q
    for start in range(0, N_Q, BLOCK_M):
        rows = start + rows0
        row_ok = rows < N_Q
        q = load_tile(q_base, rows, dims, stride_qm, stride_qd, row_ok, dim_ok, EVEN_M, EVEN_D)
        do = load_tile(do_base, rows, dims, stride_dom, stride_dod, row_ok, dim_ok, EVEN_M, EVEN_D)
        lse = load_rows(LSE + stat_base + rows, row_ok, EVEN_M) * LOG2E_C
        delta = load_rows(DELTA + stat_base + rows, row_ok, EVEN_M)
        valid = row_ok[:, None] & key_ok[None, :]
        p, ds = _tile_grads(q, k, v, do, lse, delta, valid, qk_scale, PRECISION, not EVEN_N)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    grads = b * stride_dkb + h * stride_dkh
    dk = (dk * scale).to(DK.dtype.element_ty)
    store_tile(DK + grads, keys, dims, stride_dkn, stride_dkd, dk, key_ok, dim_ok, EVEN_N, EVEN_D)
    store_tile(
        DV + grads, keys, dims, stride_dkn, stride_dkd, dv.to(DV.dtype.element_ty), key_ok, dim_ok, EVEN_N, EVEN_D
    )


@triton.jit(do_not_specialize=["N_Q_BUCKET", "N_K_BUCKET"])
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_K, D, scale, qk_scale, N_Q_BUCKET, N_K_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Deterministic backward, pass 2: dQ of BLOCK_M query rows. dO has the strides stride_do*, DQ stride_dq*."""
    pid_bh, first = program_tile(N_Q, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = first + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    dim_ok = dims < D
    q = load_tile(Q + b * stride_qb + h * stride_qh, rows, dims, stride_qm, stride_qd, row_ok, dim_ok, EVEN_M, EVEN_D)
    do = load_tile(
        DO + b * stride_dob + h * stride_doh, rows, dims, stride_dom, stride_dod, row_ok, dim_ok, EVEN_M, EVEN_D
    )
    stat = pid_bh.to(tl.int64) * N_Q + rows
    lse = load_rows(LSE + stat, row_ok, EVEN_M) * LOG2E_C
    delta = load_rows(DELTA + stat, row_ok, EVEN_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for start in range(0, N_K, BLOCK_N):
        keys = start + cols
        key_ok = keys < N_K
        k = load_tile(k_base, keys, dims, stride_kn, stride_kd, key_ok, dim_ok, EVEN_N, EVEN_D)
        v = load_tile(v_base, keys, dims, stride_vn, stride_vd, key_ok, dim_ok, EVEN_N, EVEN_D)
        _, ds = _tile_grads(q, k, v, do, lse, delta, key_ok[None, :], qk_scale, PRECISION, not EVEN_N)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = (dq * scale).to(DQ.dtype.element_ty)
    store_tile(
        DQ + b * stride_dqb + h * stride_dqh, rows, dims, stride_dqm, stride_dqd, dq, row_ok, dim_ok, EVEN_M, EVEN_D
    )


@triton.jit
def _backward_tile(
    dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, start, dims, key_ok, dim_ok, ragged_keys,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd, N_Q, qk_scale,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, RAGGED_ROWS: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    """One Q tile of the fused backward, transposed (keys are rows): 5 products and 1 exp2.

    Sᵀ = K Qᵀ, P'ᵀ = exp2(Sᵀ·qk_scale − lse'·log2e) (one FMA and one exp2 per element), dV += P'ᵀ dO, dPᵀ = V dOᵀ,
    dSᵀ = P'ᵀ ⊙ (dPᵀ − Δ), dK += dSᵀ Q, and dQ += dS K added atomically to the fp32 buffer. Rows past N_Q (only in
    the RAGGED_ROWS tile) load as zeros, so they add nothing anywhere; padded keys are zeroed only in the program
    whose key tile is ragged (a padded key's logit is 0, whose exp2 can overflow against a very negative lse'), and
    in none when N_K divides BLOCK_N (EVEN_N). Masks only where a side has a tail: none for an even tile.
    """
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < N_Q
    lse = load_rows(lse_base + rows, row_ok, not RAGGED_ROWS)
    delta = load_rows(delta_base + rows, row_ok, not RAGGED_ROWS)
    q = load_tile(q_base, rows, dims, stride_qm, stride_qd, row_ok, dim_ok, not RAGGED_ROWS, EVEN_D)
    do = load_tile(do_base, rows, dims, stride_dom, stride_dod, row_ok, dim_ok, not RAGGED_ROWS, EVEN_D)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    p_t = tl.exp2(s_t * qk_scale - (lse * LOG2E_C)[None, :])
    if not EVEN_N:
        if ragged_keys:
            p_t = tl.where(key_ok[:, None], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk += tl.dot(ds_t, q, input_precision=PRECISION)
    dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION)
    dq_ptrs = tile_ptrs(dq_base, rows, dims, stride_dqm, stride_dqd)
    if RAGGED_ROWS or not EVEN_D:
        tl.atomic_add(dq_ptrs, dq, mask=tile_mask(row_ok, dim_ok, not RAGGED_ROWS, EVEN_D), sem="relaxed")
    else:
        tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["N_Q_BUCKET", "N_K_BUCKET"])
def _backward_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    H, N_Q, N_K, D, scale, qk_scale, N_Q_BUCKET, N_K_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Fused single-pass backward (FlashAttention-2's): one program per (batch·head, key tile), looping over Q tiles.

    dO has the strides stride_do*. DQ is an fp32 accumulator (strides stride_dq*) that the programs add to
    atomically, scaled and cast afterwards; DK and DV share the strides stride_dk*. Only the last Q tile is masked,
    and none when N_Q divides BLOCK_M (EVEN_M).
    """
    pid_bh, first = program_tile(N_K, BLOCK_N)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    keys = first + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < N_K
    dim_ok = dims < D
    k = load_tile(K + b * stride_kb + h * stride_kh, keys, dims, stride_kn, stride_kd, key_ok, dim_ok, EVEN_N, EVEN_D)
    v = load_tile(V + b * stride_vb + h * stride_vh, keys, dims, stride_vn, stride_vd, key_ok, dim_ok, EVEN_N, EVEN_D)
    ragged_keys = first + BLOCK_N > N_K
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dq_base = DQ + b * stride_dqb + h * stride_dqh
    stat_base = pid_bh.to(tl.int64) * N_Q
    full = (N_Q // BLOCK_M) * BLOCK_M
    for start in range(0, full, BLOCK_M):
        dk, dv = _backward_tile(
            dk, dv, k, v, q_base, do_base, dq_base, LSE + stat_base, DELTA + stat_base, start, dims, key_ok, dim_ok,
            ragged_keys, stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd, N_Q, qk_scale,
            BLOCK_M, PRECISION, False, EVEN_N, EVEN_D,
        )  # fmt: skip
    if not EVEN_M:
        if full < N_Q:
            dk, dv = _backward_tile(
                dk, dv, k, v, q_base, do_base, dq_base, LSE + stat_base, DELTA + stat_base, full, dims, key_ok,
                dim_ok, ragged_keys, stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd, N_Q,
                qk_scale, BLOCK_M, PRECISION, True, EVEN_N, EVEN_D,
            )  # fmt: skip
    grads = b * stride_dkb + h * stride_dkh
    dk = (dk * scale).to(DK.dtype.element_ty)
    store_tile(DK + grads, keys, dims, stride_dkn, stride_dkd, dk, key_ok, dim_ok, EVEN_N, EVEN_D)
    store_tile(
        DV + grads, keys, dims, stride_dkn, stride_dkd, dv.to(DV.dtype.element_ty), key_ok, dim_ok, EVEN_N, EVEN_D
    )


def _divides(size: str, block: str, args: dict) -> bool:
    return args[size] % args[block] == 0


class EvenTails(triton.runtime.Heuristics):
    """`kernel` launched with constexpr flags telling which sides have no tail to mask.

    `sides` maps a flag to (size, block) argument names, e.g. EVEN_M=("N_Q", "BLOCK_M"): the flag is set when the
    size is a multiple of the block the launch runs with (the autotuner's chosen config included), so the kernel
    drops that side's masks and selects (flash-attention's EVEN_M/EVEN_N/EVEN_HEADDIM). Sizes that share their
    remainders' evenness share one compiled kernel: 1025 and 1030 tokens both take the ragged path. Also a
    `warmup` (a compile, what the config pruning calls) like a JITFunction's.
    """

    def __init__(self, kernel, **sides: tuple[str, str]) -> None:
        rules = {flag: functools.partial(_divides, size, block) for flag, (size, block) in sides.items()}
        super().__init__(kernel, kernel.arg_names, rules)
        self.__name__ = kernel.__name__

    def warmup(self, *args, grid, **kwargs):
        return self.run(*args, grid=grid, warmup=True, **kwargs)


# Autotuning keys: the token counts in buckets of 32 (extra integer arguments, never specialised, that the kernels
# ignore), the head dim, and (added by Triton) the tensors' dtypes. cdiv rather than floor: every N of a bucket runs
# the same number of tiles at BLOCK 32, 64 and 128, so one tuning serves a grid of the same shape; new resolutions
# within a bucket reuse the tuning (and, ragged or even alike, the compiled kernels) instead of benchmarking again.
BUCKET = 32
KEY = ["N_Q_BUCKET", "N_K_BUCKET", "D"]
SIDES = dict(EVEN_M=("N_Q", "BLOCK_M"), EVEN_N=("N_K", "BLOCK_N"), EVEN_D=("D", "BLOCK_D"))
_forward = autotuned(EvenTails(_forward_kernel, **SIDES), SPACES["forward"], KEY)
_dkdv = autotuned(EvenTails(_dkdv_kernel, **SIDES), SPACES["backward"], KEY)
_dq = autotuned(EvenTails(_dq_kernel, **SIDES), SPACES["backward"], KEY)
_backward_fused = autotuned(EvenTails(_backward_kernel, **SIDES), SPACES["backward_fused"], KEY)
_delta = EvenTails(_delta_kernel, EVEN_M=("N_Q", "BLOCK_M"), EVEN_D=("D", "BLOCK_D"))


def bucket(tokens: int) -> int:
    """The autotuning key of a token count: cdiv(tokens, BUCKET)."""
    return triton.cdiv(tokens, BUCKET)


def tile_grid(programs_per_row: int, tokens: int, block: str):
    """Launch grid of `program_tile`: one axis of programs_per_row · cdiv(tokens, meta[block]) programs."""
    return lambda meta: (programs_per_row * triton.cdiv(tokens, meta[block]),)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O, lse', σ(lse − g)) for fp32 sink logits g of shape [B, H, N] (any strides, e.g. broadcast)."""
    batch, heads, n_q, dim = q.shape
    out = empty_heads_last(q)
    lse = torch.empty(batch, heads, n_q, dtype=torch.float32, device=q.device)
    keep = torch.empty_like(lse)
    launch(
        _forward, tile_grid(batch * heads, n_q, "BLOCK_M"),
        q, k, v, g, out, lse, keep,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *out.stride(),
        heads, n_q, k.shape[2], dim, scale * LOG2E, bucket(n_q), bucket(k.shape[2]),
        BLOCK_D=block_d(dim), PRECISION=precision(q),
    )  # fmt: skip
    return out, lse, keep


def row_delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """Δ = rowsum(dO ⊙ O) as fp32 [B, H, N], without an fp32 copy of either tensor."""
    batch, heads, n_q, dim = out.shape
    delta = torch.empty(batch, heads, n_q, dtype=torch.float32, device=out.device)
    with _device_guard(out):
        _delta[tile_grid(batch * heads, n_q, "BLOCK_M")](
            out, dout, delta, *out.stride(), *dout.stride(), heads, n_q, dim, BLOCK_M=32, BLOCK_D=block_d(dim)
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
    """(dq, dk, dv): the flash-attention backward with the sink-aware normaliser lse' and Δ (fp32 [B, H, N]).

    By default one fused kernel (`_backward_kernel`: 5 products, 1 exp2 per tile, dq through fp32 atomics);
    in deterministic mode (`dispatch.deterministic()`) the two-kernel path, dK/dV then dQ, which has no atomics and
    so sums in the same order on every run.
    """
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    lse, delta = lse.contiguous(), delta.contiguous()
    dk, dv = empty_heads_last(k), empty_heads_last(v)
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    sizes = (heads, n_q, n_k, dim, scale, scale * LOG2E, bucket(n_q), bucket(n_k))
    options = dict(BLOCK_D=block_d(dim), PRECISION=precision(q))
    grid = tile_grid(batch * heads, n_k, "BLOCK_N")
    if not deterministic():
        dq = torch.zeros(batch, n_q, heads, dim, dtype=torch.float32, device=q.device).transpose(1, 2)
        args = (q, k, v, dout, lse, delta, dq, dk, dv, *common, *dq.stride(), *dk.stride(), *sizes)
        launch(_backward_fused, grid, *args, **options)
        return dq.mul_(scale).to(q.dtype), dk, dv
    dq = empty_heads_last(q)
    launch(_dkdv, grid, q, k, v, dout, lse, delta, dk, dv, *common, *dk.stride(), *sizes, **options)
    grid = tile_grid(batch * heads, n_q, "BLOCK_M")
    launch(_dq, grid, q, k, v, dout, lse, delta, dq, *common, *dq.stride(), *sizes, **options)
    return dq, dk, dv
