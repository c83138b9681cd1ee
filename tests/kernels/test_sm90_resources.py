"""What an H100/H200 would show about the kernels' resources, proved without a GPU.

tests/sm90_kernels.py compiles every Triton kernel for sm_90 as its launches would (the JIT's own specialisation,
the autotuner's own pruning) for fp16, bf16 and fp32 at head dims 64, 80 and 128, in the autotuned and the
deterministic mode; these tests read its records. The first run compiles a few hundred kernels (minutes); later runs
reuse its cache (~/.cache/fastprompt-sm90, or $FASTPROMPT_SM90_CACHE) and recompile only what a change touched.
"""

from __future__ import annotations

import json

import pytest
from helpers import nvidia_tools, sm90_compile_check

LIMIT = 232_448  # bytes of shared memory per program on sm_90
LAUNCHED = {  # the kernels a forward + backward + importance run launches, by mode
    False: ("_forward_kernel", "_delta_kernel", "_backward_kernel", "_row_lse_kernel", "_column_mass_kernel"),
    True: ("_forward_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel", "_row_lse_kernel", "_column_mass_kernel"),
}
DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = (64, 80, 128)


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not nvidia_tools(), reason="needs triton's NVIDIA backend tools")]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    payload = sm90_compile_check(tmp_path_factory.mktemp("sm90") / "records.json")
    assert payload["limit"] == LIMIT
    print(f"sm_90 compile check: {payload['seconds']:.1f} s")
    return payload["records"]


def by_kernel(records, deterministic: bool) -> dict[tuple[str, str, int], list[dict]]:
    cases: dict[tuple[str, str, int], list[dict]] = {}
    for record in records:
        if record["deterministic"] == deterministic:
            cases.setdefault((record["kernel"], record["dtype"], record["head_dim"]), []).append(record)
    return cases


def test_every_kernel_dtype_and_head_dim_is_covered(records):
    for deterministic in (False, True):
        cases = by_kernel(records, deterministic)
        assert {kernel for kernel, _, _ in cases} == set(LAUNCHED[deterministic])
        for kernel in LAUNCHED[deterministic]:
            for dtype in DTYPES:
                for dim in HEAD_DIMS:
                    assert (kernel, dtype, dim) in cases, (kernel, dtype, dim, deterministic)


def spills(compiled: dict) -> int:
    """Spilled bytes per thread: ptxas's stack frame plus local memory (cuobjdump)."""
    return compiled["stack"] + compiled["local"]


def test_autotuning_keeps_exactly_the_fitting_configs_that_spill_least(records):
    """At least one config fits every case; the pruning keeps, of those that fit, the ones that spill least (none,
    wherever a spill-free config fits), and only those."""
    for (kernel, dtype, dim), launches in by_kernel(records, deterministic=False).items():
        for record in launches:
            if kernel == "_delta_kernel":
                continue
            assert record["kept"], f"{kernel} {dtype} D={dim}: no config fits"
            fitting = [compiled for compiled in record["compiled"] if compiled["shared"] <= LIMIT]
            least = min(spills(compiled) for compiled in fitting)
            for compiled in record["compiled"]:
                wanted = compiled in fitting and spills(compiled) == least
                kept = compiled["config"] in record["kept"]
                assert wanted == kept, (
                    f"{kernel} {dtype} D={dim} {compiled['config']}: {compiled['shared']} B, "
                    f"{spills(compiled)} B spilled, kept={kept}"
                )


def test_deterministic_config_fits_every_case(records):
    for (kernel, dtype, dim), launches in by_kernel(records, deterministic=True).items():
        for record in launches:
            (compiled,) = record["compiled"]
            assert compiled["shared"] <= LIMIT, f"{kernel} {dtype} D={dim}: {compiled['shared']} B"


def test_16_bit_head_dim_64_uses_wgmma_and_spills_nothing(records):
    """Every fp16/bf16 D=64 config (autotuned and deterministic) runs every product on Hopper's wgmma, no spills."""
    checked = 0
    for record in records:
        if record["dtype"] == "float32" or record["head_dim"] != 64 or record["kernel"] == "_delta_kernel":
            continue
        for compiled in record["compiled"]:
            name = f"{record['kernel']} {record['dtype']} {compiled['config']}"
            assert compiled["wgmma"] and not compiled["mma_sync"], f"{name}: not every tl.dot is a wgmma"
            assert compiled["local"] == 0 and compiled["stack"] == 0, f"{name}: spills ({compiled})"
            checked += 1
    assert checked >= 2 * (6 + 4 + 8 + 8 + 8 + 6)  # forward, fused backward, importance (column pass twice), and
    # the deterministic launches (forward, dK/dV, dQ, row lse, column mass twice), for both 16-bit dtypes


def test_compiled_with_launch_specialisation(records):
    """As a launch compiles them: unit strides are constants, 16-divisible pointers and integers carry the hint."""
    for record in records:  # every head-dim stride (stride_*d) is the constant 1, in every kernel
        for compiled in record["compiled"]:
            assert not [name for name in compiled["signature"] if name.startswith("stride_") and name.endswith("d")]
    (record,) = by_kernel(records, deterministic=True)[("_forward_kernel", "bfloat16", 80)]
    (compiled,) = record["compiled"]
    for unit_stride in ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_gm"):
        assert compiled["constexprs"][unit_stride] == "1" and unit_stride not in compiled["signature"]
    assert compiled["signature"]["Q"] == "*bf16" and compiled["signature"]["G"] == "*fp32"
    hinted = set(compiled["divisible_by_16"])
    assert {"Q", "K", "V", "Out", "LSE", "stride_qh", "stride_qm", "D"} <= hinted  # D = 80, row stride 3·12·80
    assert "N_Q" not in hinted and "H" not in hinted  # 1025 tokens, 12 heads


def test_grids_use_one_axis(records):
    """B·H rides on grid axis 0 (up to 2**31 − 1 programs), never on axes 1/2 (65,535): B·H × tiles programs."""
    for record in records:
        for config, grid in record["grids"].items():
            block_m, block_n = json.loads(config)[:2]
            by_keys = ("_dkdv_kernel", "_backward_kernel", "_column_mass_kernel")  # one program per key tile
            block = block_n if record["kernel"] in by_keys else block_m
            assert grid == [2 * 12 * -(-1025 // block)], (record["kernel"], config, grid)


def selected(records, deterministic: bool):
    """(record, compiled) of every config a launch may run: the pruning's survivors, or the deterministic choice."""
    for record in records:
        if record["deterministic"] == deterministic:
            for compiled in record["compiled"]:
                if compiled["config"] in record["kept"]:
                    yield record, compiled


def test_default_backward_has_5_products_and_1_exp2_per_tile(records):
    """FlashAttention-2's structure, read from the TTGIR of every compiled `_backward_kernel`: per Q tile 5 matrix
    products (Sᵀ, dV, dPᵀ, dK, dQ), 1 exp2, 4 loads (q, dO, lse', Δ) and 1 atomic add (dQ); the two-kernel
    deterministic path has 4 + 3 products."""
    compiled = [(r["dtype"], c) for r in records if r["kernel"] == "_backward_kernel" for c in r["compiled"]]
    from fastprompt.kernels.sink_attention_triton import SPACES, block_d, space_shapes

    space = SPACES["backward_fused"]
    listed = [space_shapes(space, 4 if t == "float32" else 2, block_d(d)) for t in DTYPES for d in HEAD_DIMS]
    assert len(compiled) == sum(map(len, listed))  # every config of the fused space, every dtype and head dim
    for dtype, c in compiled:
        mmas = 3 if dtype == "float32" else 1  # fp32 products run as 3×TF32 (tf32x3): three MMAs each
        assert c["loop"] == {"dots": 5 * mmas, "exp2": 1, "loads": 4, "atomics": 1}, c
    two_pass = {
        r["kernel"]: r["compiled"][0]["loop"]["dots"] for r in records if r["deterministic"] and r["dtype"] != "float32"
    }
    assert two_pass["_dkdv_kernel"] == 4 and two_pass["_dq_kernel"] == 3


def test_selectable_16_bit_configs_spill_nothing(records):
    """fp16/bf16 at every head dim: no config the autotuner may select, nor any deterministic choice, spills."""
    checked = set()
    for deterministic in (False, True):
        for record, compiled in selected(records, deterministic):
            if record["dtype"] != "float32":
                name = f"{record['kernel']} {record['dtype']} D={record['head_dim']} {compiled['config']}"
                assert spills(compiled) == 0, f"{name}: {spills(compiled)} B spilled"
                checked.add(record["kernel"])
    assert checked >= set(LAUNCHED[False]) | set(LAUNCHED[True])  # importance kernels included


def test_fp32_spills_only_where_no_config_avoids_them(records, capsys):
    """fp32: each launch runs spill-free configs where its space has one, else the least-spilling; the cases that
    spill are printed (the report of which fp32 kernels cannot avoid spills)."""
    spilling = []
    for record, compiled in selected(records, deterministic=False):
        if record["dtype"] == "float32" and spills(compiled):
            others = [spills(c) for c in record["compiled"] if c["shared"] <= LIMIT]
            assert spills(compiled) == min(others)
            spilling.append(f"{record['kernel']} D={record['head_dim']} {compiled['config']}: {spills(compiled)} B")
    with capsys.disabled():
        print("fp32 configs that cannot avoid spills:", spilling or "none")
