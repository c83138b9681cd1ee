"""Tuning keys and tail masks of the Triton kernels, through the interpreter (TRITON_INTERPRET=1 on CPU).

The autotuners key on token counts in buckets of 32 (cdiv), so resolutions within a bucket reuse one tuning; the
EVEN_M / EVEN_N / EVEN_D flags drop the masks of sides that divide their blocks. Every input here is a view into a
buffer poisoned with NaN past its last token and head-dim channel: a load that skips a mask it needs reads NaN, so
a wrongly set flag (or a dropped mask) shows up as NaN or a wrong value against the float64 reference. The sm_90
compile counts and the selects the even path drops are in tests/test_sm90_tuning.py.
"""

from __future__ import annotations

import pytest
import torch

from fastprompt.kernels.dispatch import triton_importable
from fastprompt.kernels.reference import attention_importance_reference, sink_attention_reference

needs_triton = pytest.mark.skipif(not triton_importable(), reason="needs triton (the interpreter on CPU)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 64  # the interpreter's BLOCK_M = BLOCK_N (sink_attention_triton._INTERPRETER_CONFIG)
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # relative to the largest reference value


def poisoned(batch: int, heads: int, tokens: int, dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A [B, H, N, D] heads-last view whose buffer holds NaN in the BLOCK rows after the last token of every head
    and in the channels after D up to twice the padded head dim: reachable by any unmasked tile load."""
    generator = torch.Generator().manual_seed(seed)
    wide = 2 * max(16, 1 << (dim - 1).bit_length())
    buffer = torch.full((batch, tokens + BLOCK, heads, wide), float("nan"), dtype=dtype)
    buffer[:, :tokens, :, :dim] = torch.randn(batch, tokens, heads, dim, generator=generator).to(dtype)
    return buffer.to(DEVICE).transpose(1, 2)[:, :, :tokens, :dim]


def sink_case(tokens: int, dim: int, dtype: torch.dtype, seed: int = 0):
    q, k, v = (poisoned(2, 2, tokens, dim, dtype, seed + i) for i in range(3))
    sink = (torch.randn(tokens, generator=torch.Generator().manual_seed(seed + 3)) * 2 + 1).to(DEVICE)
    dout = poisoned(2, 2, tokens, dim, dtype, seed + 4)
    return q, k, v, sink, dout


def grads(function, q, k, v, sink, dout):
    """The output and d(out·dout)/d(q, k, v, sink) of `function` on leaf copies of the inputs' values."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v, sink)]
    out = function(*leaves)
    out.backward(dout)
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    got, want = got.double().cpu(), want.cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values (a tail read without its mask)"
    error = (got - want).abs().max().item() / want.abs().max().item()
    assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e}"


SHAPES = [  # (tokens, head dim): even and ragged in the tokens (blocks of 64) and in the head dim (padded to 128)
    (128, 64),
    (256, 16),
    (197, 64),
    (577, 32),
    (33, 80),
    (1, 64),
    (64, 80),
]


@needs_triton
@pytest.mark.parametrize("path", ["fused", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "dim"), SHAPES)
def test_sink_attention_even_and_ragged_shapes_match_float64(monkeypatch, tokens, dim, dtype, path):
    from fastprompt.kernels.sink_attention import sink_attention_triton

    monkeypatch.setenv("FASTPROMPT_DETERMINISTIC", "1" if path == "deterministic" else "0")
    q, k, v, sink, dout = sink_case(tokens, dim, dtype)
    out, got = grads(sink_attention_triton, q, k, v, sink, dout)
    want_out, want = grads(
        sink_attention_reference, *(t.detach().cpu().double() for t in (q, k, v, sink, dout))
    )  # fmt: skip
    assert_close(out, want_out, dtype, "out")
    for name, g, w in zip(("dq", "dk", "dv", "dsink"), got, want):
        assert_close(g, w, dtype, name)


@needs_triton
@pytest.mark.parametrize("mode", ["global", "cls"])
@pytest.mark.parametrize(("tokens", "dim"), SHAPES)
def test_importance_even_and_ragged_shapes_match_float64(tokens, dim, mode):
    from fastprompt.kernels.importance import attention_importance_triton

    q, k, _, _, _ = sink_case(tokens, dim, torch.float32)
    got = attention_importance_triton(q, k, mode=mode)
    assert_close(
        got, attention_importance_reference(q.cpu().double(), k.cpu().double(), mode=mode), torch.float32, mode
    )


def launched_flags(monkeypatch, run) -> dict[str, dict[str, object]]:
    """{kernel: its constexpr flags and tuning-key arguments} of every kernel launch `run` makes."""
    from fastprompt.kernels import sink_attention_triton as kernels

    seen = {}
    runner = type(kernels._delta_kernel)  # JITFunction on a GPU, InterpretedFunction under the interpreter
    real_run = runner.run

    def spy(self, *args, **kwargs):
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        wanted = ("EVEN_M", "EVEN_N", "EVEN_D", "N_Q_BUCKET", "N_K_BUCKET")
        seen[self.__name__] = {name: named[name] for name in wanted if name in named}
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(runner, "run", spy)
    run()
    monkeypatch.undo()
    return seen


@needs_triton
@pytest.mark.parametrize(("tokens", "dim", "even_tokens", "even_dim"), [(128, 64, True, True), (197, 80, False, False)])
def test_even_flags_follow_the_launch_sizes(monkeypatch, tokens, dim, even_tokens, even_dim):
    """Each kernel gets EVEN_* true exactly where its size divides the block it runs with (here 64 and the padded
    head dim): the flags are not forced either way."""
    from fastprompt.kernels.importance import attention_importance_triton
    from fastprompt.kernels.sink_attention import sink_attention_triton

    q, k, v, sink, dout = sink_case(tokens, dim, torch.float32)

    def run():
        grads(sink_attention_triton, q, k, v, sink, dout)
        attention_importance_triton(q, k)

    seen = launched_flags(monkeypatch, run)
    assert set(seen) == {
        "_forward_kernel",
        "_delta_kernel",
        "_backward_kernel",
        "_row_lse_kernel",
        "_column_mass_kernel",
    }
    delta_even = tokens % 32 == 0  # the delta kernel's fixed 32-row blocks
    for name, flags in seen.items():
        rows = delta_even if name == "_delta_kernel" else even_tokens
        assert flags["EVEN_M"] == rows and flags["EVEN_D"] == even_dim, (name, flags)
        assert flags.get("EVEN_N", even_tokens) == even_tokens, (name, flags)


@needs_triton
def test_tuning_keys_bucket_the_token_counts(monkeypatch):
    """The autotuners key on cdiv(N, 32), the head dim and the dtypes: 40 and 50 tokens (bucket 2) share every
    kernel's key, 70 (bucket 3) does not; the kernels ignore the bucket arguments."""
    from triton.runtime.autotuner import Autotuner

    from fastprompt.kernels.importance import attention_importance_triton
    from fastprompt.kernels.sink_attention import sink_attention_triton

    keys = {}
    real_run = Autotuner.run

    def spy(self, *args, **kwargs):
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        key = tuple(named[name] for name in self.keys)
        keys.setdefault(self.fn.__name__, []).append(key + tuple(str(a.dtype) for a in args if hasattr(a, "dtype")))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", spy)
    for tokens in (40, 50, 70):
        q, k, v, sink, dout = sink_case(tokens, 16, torch.float32)
        grads(sink_attention_triton, q, k, v, sink, dout)
        attention_importance_triton(q, k)
    monkeypatch.undo()
    assert set(keys) == {"_forward_kernel", "_backward_kernel", "_row_lse_kernel", "_column_mass_kernel"}
    for name, (forty, fifty, seventy) in keys.items():
        assert forty == fifty != seventy, (name, keys[name])
        assert forty[:3] == (2, 2, 16) and seventy[:3] == (3, 3, 16), (name, forty, seventy)


def test_the_deterministic_config_is_chosen_per_head_dim_not_per_padded_block(monkeypatch):
    """D = 80 and D = 128 share BLOCK_D = 128 but compile apart (EVEN_D) and spill differently: each head dim gets
    the first config that fits it, whichever was asked first in the process."""
    from fastprompt.kernels import sink_attention_triton as kernels

    fits = {80: [(16, 16, 4, 1)], 128: [(32, 32, 4, 1), (16, 16, 4, 1)]}  # what compiles spill-free, per head dim

    def fitting(kernel, configs, args, kwargs):
        return [(config, 0) for config in configs if kernels._shape(config) in fits[args[0].shape[-1]]]

    monkeypatch.setattr(kernels, "_fitting", fitting)
    monkeypatch.setattr(kernels, "_DETERMINISTIC_CHOICE", {})
    chosen = {}
    for dim in (80, 128, 80):
        q = torch.empty(1, 2, 40, dim)
        config = kernels.deterministic_config(kernels._dq_kernel, None, q, BLOCK_D=128)
        chosen.setdefault(dim, kernels._shape(config))
        assert kernels._shape(config) == chosen[dim] == fits[dim][0]
