"""EPT sink attention: every backend against the materialised reference, forward and backward."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import assert_matches, make_qkv, outputs_and_grads, sink_of_shape

from fastprompt.kernels import attention_forward, sink_attention
from fastprompt.kernels.dispatch import triton_importable
from fastprompt.kernels.reference import ept_attention_reference, sink_attention_reference

sink_module = importlib.import_module("fastprompt.kernels.sink_attention")  # the package attribute is the function
sink_attention_triton = sink_module.sink_attention_triton

# Triton runs on CUDA tensors on a GPU and on CPU tensors through the interpreter (tests/conftest.py).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_importable(), reason="needs triton")


@pytest.mark.parametrize("tokens", [1, 17, 65])
@pytest.mark.parametrize("sink_shape", ["n", "bhn", "1h1"])
def test_cpu_path_matches_reference_fp64(tokens, sink_shape):
    q, k, v = make_qkv(2, 2, tokens, 32, torch.float64)
    shape = {"n": (tokens,), "bhn": (2, 2, tokens), "1h1": (1, 2, 1)}[sink_shape]
    assert_matches(sink_attention, q, k, v, sink_of_shape(shape), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_path_low_precision(dtype):
    q, k, v = make_qkv(2, 2, 33, 64)
    assert_matches(sink_attention, q, k, v, sink_of_shape((33,)), dtype)


def test_cpu_path_long_sequence():
    q, k, v = make_qkv(1, 2, 1025, 32)
    assert_matches(sink_attention, q, k, v, sink_of_shape((1025,)), torch.float32, scale=0.3)


def test_chunked_backend_matches_reference(monkeypatch):
    monkeypatch.setattr(sink_module, "_CHUNK_ELEMENTS", 2 * 2 * 40 * 7)  # 7 query rows per chunk: ragged chunks
    q, k, v = make_qkv(2, 2, 40, 16, torch.float64)

    def chunked(q, k, v, sink):
        return sink_module._sink_attention(q, k, v, sink, None, False, "chunked")

    assert_matches(chunked, q, k, v, sink_of_shape((2, 1, 40)), torch.float64)


def test_ept_reference_is_a_sink():
    q, k, v = make_qkv(2, 3, 17, 16, torch.float64)
    torch.manual_seed(3)
    prompt = (torch.randn(17, 5, dtype=torch.float64) * 0.5).requires_grad_()
    dout = torch.randn(q.shape, dtype=torch.float64)
    official = ept_attention_reference(q, k, v, prompt)
    ours = sink_attention(q, k, v, torch.logsumexp(prompt, dim=-1))
    torch.testing.assert_close(ours, official)
    want = torch.autograd.grad(official, (q, k, v, prompt), dout)
    got = torch.autograd.grad(ours, (q, k, v, prompt), dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_return_scale_is_patchwise_scaling():
    q, k, v = make_qkv(1, 2, 17, 32, torch.float64)
    sink = sink_of_shape((17,)).double()
    out, scale = sink_attention(q, k, v, sink, return_scale=True)
    want_out, want_scale = sink_attention_reference(q, k, v, sink, return_scale=True)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(scale, want_scale)
    assert not scale.requires_grad
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, plain * scale.unsqueeze(-1))


def test_saves_no_quadratic_tensor():
    tokens = 256
    q, k, v = make_qkv(1, 2, tokens, 16)
    sink = sink_of_shape((tokens,))
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sink_attention(q, k, v, sink)
    assert shapes and max(torch.Size(s).numel() for s in shapes) < tokens * tokens, shapes
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sink_attention_reference(q, k, v, sink)
    assert max(torch.Size(s).numel() for s in shapes) >= tokens * tokens  # the check can fail


@pytest.mark.parametrize("backend", ["flash_cpu", "chunked", pytest.param("triton", marks=needs_triton)])
def test_sink_only_gradient_saves_no_inputs(backend):
    """A first prompted layer: frozen q, k, v need no gradient, so only O, lse' and the sink are kept."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    q, k, v = (t.detach() for t in make_qkv(1, 2, 17, 32, device=device))
    sink = sink_of_shape((17,), device=device)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = sink_module._sink_attention(q, k, v, sink, None, False, backend)
    assert not any(t.untyped_storage().data_ptr() == q.untyped_storage().data_ptr() for t in saved)
    dout = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, sink, dout)
    ref_sink = sink.detach().double().requires_grad_()
    ref = sink_attention_reference(q.double(), k.double(), v.double(), ref_sink)
    (want,) = torch.autograd.grad(ref, ref_sink, dout.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_negative_infinite_sink_is_plain_attention():
    q, k, v = make_qkv(2, 2, 17, 32)
    sink = torch.full((17,), float("-inf"), requires_grad=True)
    out = sink_attention(q, k, v, sink)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert torch.equal(sink.grad, torch.zeros_like(sink))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_sink_gives_near_zero_output_and_finite_grads(dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in make_qkv(1, 2, 17, 32))
    sink = torch.full((17,), 80.0, requires_grad=True)
    out = sink_attention(q, k, v, sink)
    assert out.abs().max().item() < 1e-20
    out.float().sum().backward()
    for t in (q, k, v, sink):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_huge_logits_stay_finite(dtype):
    q, k, v = make_qkv(1, 2, 17, 32)
    q = (q.detach() * 60).to(dtype).requires_grad_()  # logits of magnitude ~1e4
    k, v = k.detach().to(dtype).requires_grad_(), v.detach().to(dtype).requires_grad_()
    sink = sink_of_shape((17,))
    out = sink_attention(q, k, v, sink)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    for t in (q, k, v, sink):
        assert torch.isfinite(t.grad).all()


def test_attention_forward_returns_normaliser():
    q, k, v = make_qkv(2, 2, 17, 32)
    logits = q @ k.transpose(-2, -1) * 32**-0.5
    out, lse = attention_forward(q, k, v)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 17) and not out.requires_grad
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1))
    sink = sink_of_shape((17,))
    out, lse = attention_forward(q, k, v, sink)
    torch.testing.assert_close(out, sink_attention_reference(q, k, v, sink))
    torch.testing.assert_close(lse, torch.logaddexp(torch.logsumexp(logits, dim=-1), sink))


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (lambda q, k, v, s: (q.numpy(), k, v, s), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v, s: (q, k.long(), v, s), TypeError, "k must have a floating dtype"),
        (lambda q, k, v, s: (q, k, v.double(), s), TypeError, "share a dtype"),
        (lambda q, k, v, s: (q[0], k, v, s), ValueError, "q must be"),
        (lambda q, k, v, s: (q, k, v[..., :8], s), ValueError, "k and v must have the same shape"),
        (lambda q, k, v, s: (q, k[:, :1], v[:, :1], s), ValueError, "must agree"),
        (lambda q, k, v, s: (q, k, v, torch.zeros(5)), ValueError, "does not broadcast"),
        (lambda q, k, v, s: (q, k, v, torch.zeros(2, 2, 2, 9)), ValueError, "does not broadcast"),
        (lambda q, k, v, s: (q, k, v, torch.zeros(9, dtype=torch.long)), TypeError, "sink must have a floating"),
        (lambda q, k, v, s: (q, k, v, s.to("meta")), ValueError, "sink is on meta"),
    ],
)
def test_bad_inputs(args, error, message):
    q, k, v = (t.detach() for t in make_qkv(2, 2, 9, 16))
    with pytest.raises(error, match=message):
        sink_attention(*args(q, k, v, torch.zeros(9)))


def test_bad_scale():
    q, k, v = make_qkv(1, 1, 4, 8)
    with pytest.raises(TypeError, match="scale must be a float"):
        sink_attention(q, k, v, torch.zeros(4), scale="0.5")


def test_cross_attention_lengths():
    q = make_qkv(2, 2, 9, 16, torch.float64)[0]
    _, k, v = make_qkv(2, 2, 23, 16, torch.float64, seed=5)
    assert_matches(sink_attention, q, k, v, sink_of_shape((9,)), torch.float64)


# Triton kernels: through the interpreter on CPU (small ragged shapes), on CUDA tensors on a GPU.


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "tokens", "dim", "sink_shape"),
    [(2, 1, 32, "n"), (2, 17, 64, "bhn"), (2, 65, 32, "1h1"), (1, 197, 64, "n")],
)
def test_triton_matches_reference(dtype, batch, tokens, dim, sink_shape):
    q, k, v = make_qkv(batch, 2, tokens, dim, device=TRITON_DEVICE)
    shape = {"n": (tokens,), "bhn": (batch, 2, tokens), "1h1": (1, 2, 1)}[sink_shape]
    assert_matches(sink_attention_triton, q, k, v, sink_of_shape(shape, device=TRITON_DEVICE), dtype)


@needs_triton
def test_triton_padded_head_dim_and_cross_lengths():
    q = make_qkv(1, 2, 20, 80, device=TRITON_DEVICE)[0]
    _, k, v = make_qkv(1, 2, 37, 80, seed=5, device=TRITON_DEVICE)
    assert_matches(sink_attention_triton, q, k, v, sink_of_shape((1, 1, 20), device=TRITON_DEVICE), torch.float32)


@needs_triton
def test_triton_return_scale_and_contiguous_inputs():
    q, k, v = (t.detach().contiguous() for t in make_qkv(1, 2, 17, 32, device=TRITON_DEVICE))
    sink = sink_of_shape((17,), device=TRITON_DEVICE).detach()
    out, scale = sink_attention_triton(q, k, v, sink, return_scale=True, scale=0.2)
    want_out, want_scale = sink_attention_reference(q, k, v, sink, return_scale=True, scale=0.2)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scale, want_scale, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("sink_value", [float("-inf"), 80.0])
def test_triton_extreme_sinks_fp16(sink_value):
    q, k, v = (t.detach().half().requires_grad_() for t in make_qkv(1, 2, 17, 32, device=TRITON_DEVICE))
    sink = torch.full((17,), sink_value, device=TRITON_DEVICE, requires_grad=True)
    out = sink_attention_triton(q, k, v, sink)
    out.float().sum().backward()
    for t in (out, q.grad, k.grad, v.grad, sink.grad):
        assert torch.isfinite(t).all()
    if sink_value < 0:
        plain = sink_attention_reference(*(t.detach().double() for t in (q, k, v)), sink.detach().double())
        torch.testing.assert_close(out.double(), plain, rtol=0, atol=2e-3)
        assert torch.equal(sink.grad, torch.zeros_like(sink))
    else:
        assert out.abs().max().item() == 0


@needs_triton
def test_triton_huge_logits_fp16():
    q, k, v = make_qkv(1, 2, 17, 32, device=TRITON_DEVICE)
    q = (q.detach() * 60).half().requires_grad_()  # logits of magnitude ~1e4
    k, v = k.detach().half().requires_grad_(), v.detach().half().requires_grad_()
    sink = sink_of_shape((17,), device=TRITON_DEVICE)
    out = sink_attention_triton(q, k, v, sink)
    out.float().sum().backward()
    for t in (out, q.grad, k.grad, v.grad, sink.grad):
        assert torch.isfinite(t).all()
    want = sink_attention_reference(*(t.detach().double() for t in (q, k, v)), sink.detach().double())
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-2)


@needs_triton
def test_triton_rejects_unsupported_inputs():
    q, k, v = make_qkv(1, 1, 4, 8, torch.float64, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        sink_attention_triton(q, k, v, torch.zeros(4, device=TRITON_DEVICE))


# GPU only: the shapes EPT meets at 224-1024 px, bf16, and the dispatch.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("tokens", "dim"), [(197, 64), (577, 80), (1025, 64), (1025, 32), (2305, 96), (4097, 128)])
def test_gpu_matches_reference(dtype, tokens, dim):
    q, k, v = make_qkv(2, 3, tokens, dim, device="cuda")
    tol = 1e-4 if dtype == torch.float32 else None  # 3×TF32 products: about fp32, summed over up to 4097 rows
    assert_matches(sink_attention, q, k, v, sink_of_shape((tokens,), device="cuda"), dtype, tol=tol)


@pytest.mark.gpu
def test_gpu_dispatches_to_triton_and_forward_agrees():
    q, k, v = (t.detach().bfloat16() for t in make_qkv(2, 4, 1025, 64, device="cuda"))
    sink = sink_of_shape((1025,), device="cuda").detach()
    assert sink_module._auto_backend(q, k, v) == "triton"
    out, lse = attention_forward(q, k, v, sink)
    torch.testing.assert_close(out, sink_attention(q, k, v, sink), rtol=0, atol=0)
    logits = q.float() @ k.float().transpose(-2, -1) * 64**-0.5
    torch.testing.assert_close(lse, torch.logaddexp(torch.logsumexp(logits, -1), sink), rtol=1e-3, atol=1e-3)
    plain_out, plain_lse = attention_forward(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(plain_out, sdpa, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(plain_lse, torch.logsumexp(logits, -1), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("sink_value", [float("-inf"), 80.0])
def test_gpu_extreme_sinks_bf16(sink_value):
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in make_qkv(2, 2, 577, 64, device="cuda"))
    sink = torch.full((577,), sink_value, device="cuda", requires_grad=True)
    out = sink_attention(q, k, v, sink)
    out.float().sum().backward()
    for t in (out, q.grad, k.grad, v.grad, sink.grad):
        assert torch.isfinite(t).all()


@pytest.mark.skipif(TRITON_DEVICE != "cpu" or not triton_importable(), reason="the interpreter's bf16 dot (CPU only)")
def test_interpreter_bf16_needs_the_conftest_dot_patch(monkeypatch):
    """Without tests/conftest.py's bf16_dot_as_fp32, the interpreter multiplies bf16 storage as integers."""
    from triton.runtime.interpreter import InterpreterBuilder

    q, k, v = make_qkv(1, 2, 17, 32)
    sink = sink_of_shape((17,))
    assert_matches(sink_attention_triton, q, k, v, sink, torch.bfloat16)  # patched: correct
    monkeypatch.setattr(InterpreterBuilder, "create_dot", InterpreterBuilder.create_dot.original)
    with pytest.raises(AssertionError):
        assert_matches(sink_attention_triton, q, k, v, sink, torch.bfloat16)


# Launch plumbing: device guard and the deterministic config (the sm_90 compile check covers the real kernels).


@needs_triton
def test_every_kernel_launches_under_its_tensors_device_guard(monkeypatch):
    """Each of the six kernels runs inside `_device_guard` of its first tensor (so cuda:1 tensors run on GPU 1)."""
    import contextlib

    from fastprompt.kernels import importance_triton
    from fastprompt.kernels import sink_attention_triton as kernels

    guarded, seen = [], []

    @contextlib.contextmanager
    def guard(tensor):
        guarded.append(tensor)
        yield
        guarded.pop()

    monkeypatch.setattr(kernels, "_device_guard", guard)
    runner = type(kernels._delta_kernel)  # JITFunction on a GPU, InterpretedFunction under the interpreter
    real_run = runner.run

    def run(self, *args, **kwargs):
        seen.append(len(guarded))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(runner, "run", run)
    q, k, v = make_qkv(1, 2, 17, 32, device=TRITON_DEVICE)
    sink_attention_triton(q, k, v, sink_of_shape((17,), device=TRITON_DEVICE)).sum().backward()
    importance_triton.attention_importance(q.detach(), k.detach(), None, 17, 0.2)
    assert seen == [1] * 5  # forward, delta, fused backward, row lse, column mass: each inside one guard
    monkeypatch.undo()
    assert isinstance(kernels._device_guard(torch.empty(0)), contextlib.nullcontext)  # CPU: nothing to switch


@needs_triton
def test_device_guard_targets_the_tensors_cuda_device():
    from types import SimpleNamespace

    from fastprompt.kernels import sink_attention_triton as kernels

    guard = kernels._device_guard(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@needs_triton
def test_deterministic_config_is_the_first_that_fits(monkeypatch):
    """Per dtype and head dim: the first of DETERMINISTIC_ORDER whose compiled shared memory fits the device; a clear
    error naming the device limit when none does."""
    from types import SimpleNamespace

    from fastprompt.kernels import sink_attention_triton as kernels

    class Kernel:
        def __init__(self):
            self.__name__ = "_fake_kernel"

        def warmup(self, *args, grid, BLOCK_M, BLOCK_N, **options):  # shared memory grows with the tile
            return SimpleNamespace(metadata=SimpleNamespace(shared=100 * (BLOCK_M + BLOCK_N)))

    q = torch.empty(1, 1, 4, 8)

    def choose(limit):
        monkeypatch.setattr(kernels, "shared_memory_limit", lambda device: limit)
        kernel = Kernel()  # a new kernel: not in the choice cache
        return kernels.deterministic_config(kernel, None, q, BLOCK_D=16), kernel

    assert kernels._shape(choose(100 * 96)[0]) == kernels.DETERMINISTIC_ORDER[1]
    config, kernel = choose(100 * 128)
    assert kernels._shape(config) == kernels.DETERMINISTIC_ORDER[0]
    monkeypatch.setattr(kernels, "shared_memory_limit", lambda device: 10)
    assert kernels.deterministic_config(kernel, None, q, BLOCK_D=16) is config  # chosen once per case
    with pytest.raises(
        RuntimeError, match=r"no block configuration of _fake_kernel fits the 10 bytes .*DISABLE_TRITON"
    ):
        choose(10)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_second_device_without_set_device():
    assert torch.cuda.current_device() == 0
    q, k, v = make_qkv(1, 2, 65, 64, device="cuda:1")
    assert_matches(sink_attention, q, k, v, sink_of_shape((65,), device="cuda:1"), torch.bfloat16)
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_gpu_more_than_65535_batch_heads():
    """B·H = 65,544 (over the 65,535 limit of grid axes 1 and 2): every kernel launches and the last head is right."""
    from fastprompt.kernels import attention_importance
    from fastprompt.kernels.reference import attention_importance_reference

    torch.manual_seed(0)
    qkv = torch.randn(5462, 17, 3, 12, 64, device="cuda", dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)
    q, k, v = (t.requires_grad_() for t in qkv.detach().unbind(0))
    sink = torch.randn(17, device="cuda", requires_grad=True)
    out = sink_attention(q, k, v, sink)
    out.float().square().sum().backward()
    last = [t.detach()[-1:].double().requires_grad_() for t in (q, k, v)]
    want = sink_attention_reference(*last, sink.detach().double())
    torch.testing.assert_close(out[-1:].double(), want, rtol=2e-2, atol=2e-2)
    (want_dq,) = torch.autograd.grad(want.square().sum(), last[0])
    torch.testing.assert_close(q.grad[-1:].double(), want_dq, rtol=5e-2, atol=5e-2)
    scores = attention_importance(q.detach(), k.detach())
    torch.testing.assert_close(
        scores[-1:], attention_importance_reference(q[-1:].detach(), k[-1:].detach()), rtol=2e-3, atol=1e-6
    )


# The backward's two paths: the fused single-pass kernel (default) and the two-kernel deterministic one.

PATHS = {"fused": "0", "deterministic": "1"}
SINK_BROADCASTS = [(), (1,), "n", (2, 1), (2, "n"), (2, 1, 1), (2, 1, "n"), (2, 2, 1), (2, 2, "n")]


def backward_path(monkeypatch, path: str) -> None:
    """Select the Triton backward: FASTPROMPT_DETERMINISTIC is read at each launch."""
    monkeypatch.setenv("FASTPROMPT_DETERMINISTIC", PATHS[path])


def broadcast_shape(shape, tokens):
    return tuple(tokens if s == "n" else s for s in shape)


@needs_triton
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("n_q", "n_k", "dim"),
    [(1, 1, 16), (17, 17, 32), (5, 70, 80), (70, 3, 32), (130, 129, 16), (197, 197, 64)],
)
def test_triton_backward_paths_match_float64(monkeypatch, path, dtype, n_q, n_k, dim):
    """Both backward paths against float64: N = 1, 17, 197, ragged N (last Q and K tiles partial), N_Q ≠ N_K either
    way, a padded head dim (80 → 128), fp32 and flash-attention's rule for fp16/bf16."""
    backward_path(monkeypatch, path)
    q = make_qkv(2, 2, n_q, dim, device=TRITON_DEVICE)[0]
    _, k, v = make_qkv(2, 2, n_k, dim, seed=5, device=TRITON_DEVICE)
    assert_matches(sink_attention_triton, q, k, v, sink_of_shape((2, 1, n_q), device=TRITON_DEVICE), dtype)


@needs_triton
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SINK_BROADCASTS, ids=str)
def test_triton_backward_every_sink_broadcast(monkeypatch, path, shape):
    backward_path(monkeypatch, path)
    q, k, v = make_qkv(2, 2, 19, 16, device=TRITON_DEVICE)
    sink = sink_of_shape(broadcast_shape(shape, 19), device=TRITON_DEVICE)
    assert_matches(sink_attention_triton, q, k, v, sink, torch.float32)


@needs_triton
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tokens", [577, pytest.param(1025, marks=pytest.mark.slow)])
def test_triton_backward_long_sequences_fp16(monkeypatch, path, tokens):
    backward_path(monkeypatch, path)
    q, k, v = make_qkv(1, 1, tokens, 16, device=TRITON_DEVICE)
    assert_matches(sink_attention_triton, q, k, v, sink_of_shape((tokens,), device=TRITON_DEVICE), torch.float16)


@needs_triton
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("offset", "sink"), [(-1e4, float("-inf")), (-1e4, -1e4), (1e4, 0.0), (0.0, 1e4)])
def test_triton_backward_extreme_logits_and_sinks(monkeypatch, path, dtype, offset, sink):
    """Logits shifted by ±1e4 (through one channel) and sinks of ±1e4 or −inf: finite, and equal to float64 run on
    the same (rounded) inputs.

    With every logit near −1e4, lse' is near −1e4 too, so a padded key (logit 0) would give exp2(+1.4e4) = inf:
    the ragged key tile (N_K = 70) must drop padded keys before anything multiplies them.
    """
    backward_path(monkeypatch, path)
    q, k, v = (t.detach() for t in make_qkv(1, 2, 70, 32, torch.float64, device=TRITON_DEVICE))
    q[..., 0], k[..., 0] = offset / 32**-0.5, 1.0  # s_ij = offset + a random part of order 1
    q, k, v = (t.to(dtype).double() for t in (q, k, v))  # the reference sees exactly what the kernel sees
    torch.manual_seed(3)
    dout = torch.randn(q.shape, dtype=torch.float64, device=TRITON_DEVICE).to(dtype).double()
    sink = torch.full((70,), sink, dtype=torch.float64, device=TRITON_DEVICE)
    want_out, want_grads = outputs_and_grads(sink_attention_reference, q, k, v, sink, dout)
    cast = [t.to(dtype) for t in (q, k, v)]
    got_out, got_grads = outputs_and_grads(sink_attention_triton, *cast, sink.float(), dout.to(dtype))
    tol = 4e-3 if dtype == torch.float32 else 2e-2  # fp32 logits of 1e4 carry absolute errors of ~1e-3
    for name, got, want in zip(("out", "dq", "dk", "dv", "dsink"), (got_out, *got_grads), (want_out, *want_grads)):
        assert torch.isfinite(got).all(), f"{name} has NaN or inf"
        err = (got.double() - want).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), f"{name}: max error {err}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_atomic_dq_equals_deterministic_dq(monkeypatch, dtype):
    """dq through the fused kernel's fp32 atomic adds equals the two-kernel path's to fp32 rounding (then one cast)."""
    q = make_qkv(2, 2, 150, 32, device=TRITON_DEVICE)[0]
    _, k, v = make_qkv(2, 2, 140, 32, seed=5, device=TRITON_DEVICE)
    sink = sink_of_shape((150,), device=TRITON_DEVICE)
    dout = torch.randn(q.shape, device=TRITON_DEVICE).to(dtype)
    cast = [t.detach().to(dtype) for t in (q, k, v)]
    grads = {}
    for path in PATHS:
        backward_path(monkeypatch, path)
        grads[path] = outputs_and_grads(sink_attention_triton, *cast, sink, dout)[1]
    for name, fused, fixed in zip(("dq", "dk", "dv", "dsink"), grads["fused"], grads["deterministic"]):
        size = fixed.abs().max().item()
        ulp = torch.finfo(torch.float32).eps if dtype == torch.float32 else torch.finfo(dtype).eps
        assert (fused - fixed).abs().max().item() <= 8 * ulp * size, name


@needs_triton
def test_deterministic_mode_runs_the_two_kernel_backward(monkeypatch):
    """Default: one fused `_backward_kernel`; FASTPROMPT_DETERMINISTIC=1 or torch's deterministic switch: dK/dV, dQ."""
    from fastprompt.kernels import sink_attention_triton as kernels

    launched = []
    real = kernels.launch
    monkeypatch.setattr(
        kernels, "launch", lambda tuned, *a, **kw: launched.append(tuned.fn.__name__) or real(tuned, *a, **kw)
    )
    q, k, v = make_qkv(1, 2, 17, 16, device=TRITON_DEVICE)
    sink = sink_of_shape((17,), device=TRITON_DEVICE)

    def kernels_of_backward():
        launched.clear()
        sink_attention_triton(q, k, v, sink).sum().backward()
        return launched[1:]

    backward_path(monkeypatch, "fused")
    assert kernels_of_backward() == ["_backward_kernel"]
    backward_path(monkeypatch, "deterministic")
    assert kernels_of_backward() == ["_dkdv_kernel", "_dq_kernel"]
    backward_path(monkeypatch, "fused")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert kernels_of_backward() == ["_dkdv_kernel", "_dq_kernel"]
    finally:
        torch.use_deterministic_algorithms(deterministic)


if triton_importable():
    import triton
    import triton.language as tl

    from fastprompt.kernels.sink_attention_triton import tile_ptrs

    @triton.jit
    def _offsets_kernel(OUT, first, stride_n, BLOCK: tl.constexpr):
        """The offsets `tile_ptrs` gives rows first…first+BLOCK at row stride stride_n (integer base 0)."""
        dims = tl.arange(0, BLOCK)
        tl.store(OUT + dims[:, None] * BLOCK + dims[None, :], tile_ptrs(first * 0, first + dims, dims, stride_n, 1))


@needs_triton
def test_tile_row_offsets_are_64_bit():
    """Row offsets past 2**31 elements (≈ 932k tokens at ViT-B's packed qkv row stride) do not wrap around: the
    shared tile helper computes them in int64, checked on the offsets themselves, without a large tensor."""
    out = torch.zeros(16, 16, dtype=torch.int64, device=TRITON_DEVICE)
    _offsets_kernel[(1,)](out, 3, 2**30 - 1, BLOCK=16)
    rows = torch.arange(3, 19, dtype=torch.int64)[:, None]
    assert torch.equal(out.cpu(), rows * (2**30 - 1) + torch.arange(16)[None, :])


@needs_triton
def test_every_kernel_addresses_tiles_through_the_64_bit_helper():
    """No kernel multiplies a row index by a row stride itself (an int32 product that wraps past 2**31): 2-D tiles
    go through `tile_ptrs`/`load_tile`, whose offsets the test above checks."""
    import inspect
    import re

    from fastprompt.kernels import importance_triton
    from fastprompt.kernels import sink_attention_triton as kernels

    checked = 0
    for module in (kernels, importance_triton):
        for name, value in vars(module).items():
            function = getattr(value, "fn", None)  # the Python source of a JITFunction / InterpretedFunction
            if inspect.isfunction(function) and name != "tile_ptrs":
                assert not re.search(r"\[:, None\] \* stride_", inspect.getsource(function)), (
                    f"{module.__name__}.{name}"
                )
                checked += 1
    assert checked >= 12  # every @triton.jit function of both modules
