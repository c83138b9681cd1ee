"""What an H100/H200 would show about the kernels' resources, proved without a GPU.

tests/sm90_kernels.py compiles every Triton kernel for sm_90 as its launches would (the JIT's own specialisation,
the autotuner's own pruning) for fp16, bf16 and fp32 at head dims 64, 80 and 128, in the autotuned and the
deterministic mode; these tests read its records. The first run compiles a few hundred kernels (minutes); later runs
reuse its cache (~/.cache/fastprompt-sm90, or $FASTPROMPT_SM90_CACHE) and recompile only what a change touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastprompt.kernels.dispatch import triton_importable

SCRIPT = Path(__file__).with_name("sm90_kernels.py")
LIMIT = 232_448  # bytes of shared memory per program on sm_90
AUTOTUNED = ("_forward_kernel", "_dkdv_kernel", "_dq_kernel", "_row_lse_kernel", "_column_mass_kernel")
DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = (64, 80, 128)


def nvidia_tools() -> bool:
    """Whether Triton ships its NVIDIA backend with ptxas and cuobjdump (Linux x86-64 and aarch64 wheels do)."""
    if not triton_importable():
        return False
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (tools / "ptxas").exists() and (tools / "cuobjdump").exists()


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not nvidia_tools(), reason="needs triton's NVIDIA backend tools")]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sm90") / "records.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "FASTPROMPT_DETERMINISTIC": "0"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=3600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    payload = json.loads(out.read_text())
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
        for kernel in (*AUTOTUNED, "_delta_kernel"):
            for dtype in DTYPES:
                for dim in HEAD_DIMS:
                    assert (kernel, dtype, dim) in cases, (kernel, dtype, dim, deterministic)


def test_autotuning_keeps_exactly_the_configs_that_fit(records):
    """At least one config fits every case, and the pruning keeps those that fit and only those."""
    for (kernel, dtype, dim), launches in by_kernel(records, deterministic=False).items():
        for record in launches:
            if kernel == "_delta_kernel":
                continue
            assert record["kept"], f"{kernel} {dtype} D={dim}: no config fits"
            for compiled in record["compiled"]:
                fits = compiled["shared"] <= LIMIT
                kept = compiled["config"] in record["kept"]
                assert fits == kept, (
                    f"{kernel} {dtype} D={dim} {compiled['config']}: {compiled['shared']} B, kept={kept}"
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
    assert checked >= 2 * (6 + 6 + 6 + 8 + 8 + 8 + 6)  # the autotune spaces (column pass twice), both 16-bit dtypes


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
            block = block_n if record["kernel"] in ("_dkdv_kernel", "_column_mass_kernel") else block_m
            assert grid == [2 * 12 * -(-1025 // block)], (record["kernel"], config, grid)
