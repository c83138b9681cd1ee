"""Contracts of fastprompt's custom ops that the numerical kernel tests do not see: the fake (meta) implementations
match the real outputs in every dtype an op takes (torch.library.opcheck in fp16, bf16, fp64), the importance scores
are fp32 whatever the input dtype, and sink attention keeps q, k, v for backward only when one of them needs a
gradient."""

from __future__ import annotations

import pytest
import torch

import fastprompt.kernels as fk
from fastprompt.kernels.dispatch import triton_importable

needs_triton = pytest.mark.skipif(not triton_importable(), reason="needs triton (the interpreter on CPU)")
LOW = (torch.float16, torch.bfloat16)
SINK_BACKENDS = ("flash_cpu", "chunked", "triton")
SCALE = 0.25


def backend_param(backend: str, dtype: torch.dtype):
    marks = [needs_triton] if backend == "triton" else []
    return pytest.param(backend, dtype, marks=marks, id=f"{backend}-{str(dtype).removeprefix('torch.')}")


def sink_cases():
    """(backend, dtype) pairs the sink-attention ops take: Triton fp16/bf16 (fp32 is in test_compile), the PyTorch
    paths fp16/bf16/fp64."""
    cases = []
    for backend in SINK_BACKENDS:
        for dtype in (*LOW, *(() if backend == "triton" else (torch.float64,))):
            cases.append(backend_param(backend, dtype))
    return cases


def qkv(dtype: torch.dtype, *, grad: bool = True, n: int = 11):
    generator = torch.Generator().manual_seed(0)
    tensors = torch.randn(3, 2, 3, n, 16, generator=generator).to(dtype).unbind(0)
    return tuple(t.clone().requires_grad_(grad) for t in tensors)


@pytest.mark.parametrize(("backend", "dtype"), sink_cases())
def test_sink_attention_ops_pass_opcheck_in_every_dtype_they_take(backend, dtype):
    q, k, v = qkv(dtype)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    g = (torch.randn(11, generator=torch.Generator().manual_seed(1)) * 2).to(stat).expand(2, 3, 11).requires_grad_()
    forward = torch.ops.fastprompt.sink_attention_forward.default
    torch.library.opcheck(forward, (q, k, v, g, SCALE, backend))
    with torch.no_grad():
        out, lse_p, _ = forward(q, k, v, g, SCALE, backend)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    torch.library.opcheck(torch.ops.fastprompt.sink_attention_row_delta.default, (dout, out, backend))
    delta = torch.ops.fastprompt.sink_attention_row_delta.default(dout, out, backend)
    args = (dout, q.detach(), k.detach(), v.detach(), out, lse_p, delta, SCALE, backend)
    torch.library.opcheck(torch.ops.fastprompt.sink_attention_backward.default, args)


@pytest.mark.parametrize(
    ("backend", "dtype"), [backend_param(b, d) for b in ("torch", "triton") for d in LOW]
)  # fp64: attention_importance refuses it (fp16, bf16, fp32 only)
def test_importance_op_passes_opcheck_in_low_precision(backend, dtype):
    q, k, _ = qkv(dtype, grad=False)
    lse = torch.logsumexp(q.float() @ k.float().transpose(-2, -1) * SCALE, dim=-1)
    op = torch.ops.fastprompt.attention_importance.default
    for rows, row_lse in ((11, None), (1, lse)):
        torch.library.opcheck(op, (q, k, row_lse, rows, SCALE, backend))


@pytest.mark.parametrize("dtype", [*LOW, torch.float32])
def test_importance_scores_are_fp32_on_meta_as_for_real(dtype):
    """The fake implementation (what torch.compile and meta-device planning see) says fp32, as the real op returns."""
    q, k, _ = qkv(dtype, grad=False)
    real = fk.attention_importance(q, k)
    meta = fk.attention_importance(q.to("meta"), k.to("meta"))
    assert real.dtype == torch.float32  # the real op: fp32 scores for any input dtype
    assert (meta.dtype, meta.shape, meta.device.type) == (torch.float32, real.shape, "meta")
    torch.testing.assert_close(real.sum(dim=-1), torch.ones(real.shape[:2]), atol=2e-3, rtol=0)  # each row sums to 1


def saved_storages(q, k, v, sink) -> set[int]:
    """Data pointers of every tensor sink_attention saves for backward."""
    pointers: set[int] = set()

    def pack(tensor):
        pointers.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fk.sink_attention(q, k, v, sink, scale=SCALE)
    out.sum().backward()
    return pointers


@pytest.mark.parametrize("needs", ["none", "q", "k", "v"])
def test_sink_attention_saves_q_k_v_only_when_one_needs_a_gradient(needs):
    """EPT's first prompted layer has frozen q, k, v and a trainable sink: keeping q, k, v there is memory wasted."""
    q, k, v = (t.detach().requires_grad_(name == needs) for name, t in zip("qkv", qkv(torch.float32)))
    sink = torch.randn(11, generator=torch.Generator().manual_seed(1)).requires_grad_()
    saved = saved_storages(q, k, v, sink)
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    if needs == "none":
        assert not saved & inputs, "q, k or v was saved although none of them needs a gradient"
        assert sink.grad is not None and sink.grad.abs().sum() > 0
    else:
        assert inputs <= saved  # all three are needed for any of dq, dk, dv
        assert dict(zip("qkv", (q, k, v)))[needs].grad is not None


def test_an_infinite_sink_takes_all_the_mass_and_gradients_stay_finite():
    """A row whose sink is +inf puts every probability on the sink: its output is 0 and its sink gradient 0
    (exp(g − lse') is 1 there, not inf − inf); rows with a -inf sink are plain attention."""
    q, k, v = qkv(torch.float32, n=5)
    sink = torch.tensor([float("inf"), 0.0, 1.0, float("-inf"), 2.0], requires_grad=True)
    out = fk.sink_attention(q, k, v, sink, scale=SCALE)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * weights).sum().backward()
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    plain = torch.softmax(q.detach().double() @ k.detach().double().transpose(-2, -1) * SCALE, -1) @ v.detach().double()
    torch.testing.assert_close(out[:, :, 3].double(), plain[:, :, 3], atol=1e-5, rtol=0)
    for name, tensor in {"sink": sink, "q": q, "k": k, "v": v}.items():
        assert torch.isfinite(tensor.grad).all(), name
    assert sink.grad[0] == 0 and sink.grad[3] == 0 and (sink.grad[[1, 2, 4]] != 0).all()
