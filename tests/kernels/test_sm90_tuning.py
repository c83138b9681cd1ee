"""Compiles per resolution and the cost of tail masks, from the offline sm_90 compile check (tests/sm90_kernels.py).

- Token counts within one tuning bucket whose tails are alike (1025 and 1030: ragged for every block) launch the very
  same compiled kernels: one compile per kernel, config, dtype and head dim, counted as distinct compile keys (the
  harness's cache key: kernel source, specialisation, constexprs and options).
- The even path (1024 tokens, head dim 64: every block divides) drops the tail masks: fewer TTGIR selects, PTX
  `selp`s and predicated global memory operations than the ragged path (1025), kernel by kernel and config by config
  (the 'cls' importance pass has one query row, ragged at any size: only its key side drops masks).

Both runs use the compile check's cache; with it warm from tests/test_sm90_resources.py, only the even compiles of
bf16 at head dim 64 are new (about 50).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from helpers import nvidia_tools, sm90_compile_check

MASK_OPS = ("selects", "selp", "predicated")


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not nvidia_tools(), reason="needs triton's NVIDIA backend tools")]


def compile_check(tmp_path: Path, name: str, *options: str) -> list[dict]:
    return sm90_compile_check(tmp_path / f"{name}.json", *options)["records"]


def launch_compiles(records: list[dict], tokens: int) -> list[tuple[tuple, dict]]:
    """(launch id, compile record) of every compile for launches at `tokens`, in launch order; a launch id is the
    kernel, dtype, head dim, mode and how many launches of that kernel came before it in that case."""
    seen: dict[tuple, int] = defaultdict(int)
    found = []
    for record in records:
        if record["tokens"] != tokens:
            continue
        case = (record["kernel"], record["dtype"], record["head_dim"], record["deterministic"])
        launch = (*case, seen[case])
        seen[case] += 1
        found += [((*launch, tuple(compiled["config"])), compiled) for compiled in record["compiled"]]
    return found


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sm90-tuning")


def test_token_counts_within_a_bucket_share_every_compile(tmp):
    """1025 and 1030 tokens (bucket 33, ragged for every block) launch one compile per kernel, config, dtype and
    head dim, in both modes: a new resolution in the bucket compiles nothing. So does 993 (bucket 32, a multiple of
    16 that Triton would specialise if the bucket arguments were not exempt)."""
    records = compile_check(tmp, "bucket", "--tokens", "1025", "1030", "993")
    runs = [launch_compiles(records, tokens) for tokens in (1025, 1030, 993)]
    assert len({tuple(launch for launch, _ in run) for run in runs}) == 1  # the same launches and configs
    assert len(runs[0]) > 300  # every config of every autotuned kernel, dtype and head dim, both modes
    keys: dict[tuple, set] = defaultdict(set)
    for run in runs:
        for launch, compiled in run:
            keys[(*launch[:3], *launch[4:])].add(compiled["key"])  # kernel, dtype, head dim, launch #, config
    split = {case: len(found) for case, found in keys.items() if len(found) > 1}
    assert not split, f"compiled more than once: {split}"


def test_even_sizes_drop_the_tail_masks(tmp, capsys):
    """bf16, head dim 64: 1024 tokens compile without tail masks, 1025 with them; per kernel and config the even
    compile has at most the ragged one's TTGIR selects and strictly fewer PTX selp + predicated memory operations
    (printed: the measurement)."""
    records = compile_check(tmp, "even", "--tokens", "1025", "1024", "--dtypes", "bfloat16", "--head-dims", "64")
    ragged, even = launch_compiles(records, 1025), launch_compiles(records, 1024)
    assert [launch for launch, _ in ragged] == [launch for launch, _ in even]
    kernels = set()
    lines = []
    for (launch, r), (_, e) in zip(ragged, even):
        kernel, mode, config = launch[0], "deterministic" if launch[3] else "autotuned", launch[-1]
        lines.append(
            f"{kernel} #{launch[4]} {mode} {list(config)}: " + ", ".join(f"{op} {r[op]}→{e[op]}" for op in MASK_OPS)
        )
        assert r["key"] != e["key"], launch  # the even path is its own compile
        assert e["selects"] <= r["selects"], lines[-1]
        assert e["selp"] + e["predicated"] < r["selp"] + r["predicated"], lines[-1]
        kernels.add(kernel)
    assert kernels == {
        "_forward_kernel", "_delta_kernel", "_backward_kernel", "_dkdv_kernel", "_dq_kernel", "_row_lse_kernel",
        "_column_mass_kernel",
    }  # fmt: skip
    with capsys.disabled():
        print("\nmask operations, ragged (1025) → even (1024), bf16 D=64:\n" + "\n".join(lines))
