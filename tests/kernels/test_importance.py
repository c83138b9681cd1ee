"""FPT important-token kernels: attention-received scores (Triton in the interpreter, chunked PyTorch) and top-k."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastprompt  # noqa: F401  (import before timm/triton users: torchvision shim)
from fastprompt.kernels import attention_importance, attention_with_importance, select_tokens
from fastprompt.kernels import importance as importance_module
from fastprompt.kernels.importance import attention_importance_triton
from fastprompt.kernels.reference import attention_importance_reference, select_tokens_reference

MODES = ("global", "cls")


def strided_qk(batch: int, heads: int, tokens: int, dim: int, dtype: torch.dtype, device: str = "cpu", spread=1.0):
    """q and k as timm makes them: views into one packed qkv tensor, so neither is contiguous."""
    qkv = (torch.randn(batch, tokens, 3, heads, dim, device=device) * spread).to(dtype)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def reference_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Every query row's log-sum-exp, materialised (small shapes only)."""
    return torch.logsumexp(q.float() @ k.float().transpose(-2, -1) * scale, dim=-1)


class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 64])
@pytest.mark.parametrize("tokens", [1, 17, 65, 197])
@pytest.mark.parametrize("mode", MODES)
def test_triton_interpreter_matches_reference(mode, tokens, dim, dtype):
    torch.manual_seed(tokens * dim)
    q, k, _ = strided_qk(1, 2, tokens, dim, dtype)
    got = attention_importance_triton(q, k, mode=mode)
    want = attention_importance_reference(q, k, mode=mode)
    assert got.dtype == torch.float32 and got.shape == (1, 2, tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_chunked_torch_path_matches_reference(mode, dtype):
    torch.manual_seed(1)
    q, k, _ = strided_qk(1, 2, 1025, 32, dtype)
    got = attention_importance(q, k, mode=mode, scale=0.3)
    torch.testing.assert_close(got, attention_importance_reference(q, k, mode=mode, scale=0.3), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_given_lse_agrees_with_computed_lse(mode, path):
    torch.manual_seed(2)
    q, k, _ = strided_qk(2, 2, 40, 24, torch.float32)  # D = 24: padded to 32 and masked in the kernel
    run = attention_importance if path == "torch" else attention_importance_triton
    lse = reference_lse(q, k, 0.25)
    given = run(q, k, mode=mode, scale=0.25, lse=lse)
    torch.testing.assert_close(given, run(q, k, mode=mode, scale=0.25))
    torch.testing.assert_close(given, attention_importance_reference(q, k, mode=mode, scale=0.25))
    shifted = run(q, k, mode=mode, scale=0.25, lse=lse + torch.log(torch.tensor(2.0)))  # the given lse is what is used
    torch.testing.assert_close(shifted, given / 2)


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_extreme_logits_stay_finite_and_exact(mode, path):
    torch.manual_seed(3)
    q, k, _ = strided_qk(1, 2, 33, 16, torch.float32, spread=30.0)
    run = attention_importance if path == "torch" else attention_importance_triton
    got = run(q, k, mode=mode)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, attention_importance_reference(q, k, mode=mode), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 2))  # each softmax row sums to 1


@pytest.mark.parametrize("mode", MODES)
def test_attention_with_importance_reuses_the_forward_lse(mode):
    torch.manual_seed(8)
    q, k, v = (t.requires_grad_() for t in strided_qk(2, 3, 70, 32, torch.float32))
    out, scores = attention_with_importance(q, k, v, mode=mode, scale=0.2)
    probs = torch.softmax(q @ k.transpose(-2, -1) * 0.2, dim=-1)
    torch.testing.assert_close(out, probs @ v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, attention_importance_reference(q, k, mode=mode, scale=0.2), rtol=1e-4, atol=1e-7)
    assert not out.requires_grad and not scores.requires_grad


def test_chunked_path_never_holds_an_n_by_n_tensor(monkeypatch):
    torch.manual_seed(4)
    heads, tokens = 2, 1025
    q, k, _ = (t.requires_grad_() for t in strided_qk(1, heads, tokens, 16, torch.float32))
    with LargestOutput() as probe:
        default = attention_importance(q, k)
    assert probe.largest <= heads * importance_module.CHUNK_ROWS * tokens < heads * tokens * tokens
    monkeypatch.setattr(importance_module, "CHUNK_ROWS", 100)  # does not divide N: ragged last chunk
    with LargestOutput() as probe:
        ragged = attention_importance(q, k)
    assert probe.largest <= heads * 100 * tokens
    torch.testing.assert_close(ragged, default)
    assert not default.requires_grad  # nothing saved for a backward that would keep every chunk alive


def test_bad_arguments_name_the_problem():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="mode must be one of"):
        attention_importance(q, q, mode="class_token")
    with pytest.raises(ValueError, match=r"q and k must both be \[B, H, N, D\]"):
        attention_importance(q, q[:, :, :4])
    with pytest.raises(ValueError, match="lse must be a"):
        attention_importance(q, q, lse=torch.zeros(1, 2, 7))
    with pytest.raises(TypeError, match="share one dtype"):
        attention_importance(q, q.half())
    with pytest.raises(ValueError, match="head dim D <= 128"):
        attention_importance_triton(torch.randn(1, 1, 4, 160), torch.randn(1, 1, 4, 160))


def test_select_tokens_breaks_ties_towards_lower_indices():
    k = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 2, 6, 3)
    scores = torch.tensor([[[0.1, 0.3, 0.2, 0.3, 0.3, 0.0], [0.5] * 6]])
    k_sel, v_sel, indices = select_tokens(k, k + 10, scores, 0.5, return_indices=True)
    assert indices.tolist() == [[[1, 3, 4], [0, 1, 2]]]
    assert indices.dtype == torch.int64
    assert k_sel[0, :, :, 0].tolist() == [[1.0, 3.0, 4.0], [0.0, 1.0, 2.0]]
    assert v_sel[0, :, :, 0].tolist() == [[11.0, 13.0, 14.0], [10.0, 11.0, 12.0]]


@pytest.mark.parametrize("ratio", [0.2, 0.37, 1.0])
def test_select_tokens_matches_reference(ratio):
    torch.manual_seed(5)
    k, v = torch.randn(2, 3, 50, 8), torch.randn(2, 3, 50, 8)
    scores = torch.rand(2, 3, 50).round(decimals=1)  # many ties
    k_sel, v_sel, indices = select_tokens(k, v, scores, ratio, return_indices=True)
    k_ref, v_ref, indices_ref = select_tokens_reference(k, v, scores, ratio)
    assert k_sel.shape == (2, 3, int(50 * ratio), 8)
    assert torch.equal(indices, indices_ref) and torch.equal(k_sel, k_ref) and torch.equal(v_sel, v_ref)
    kept = scores.gather(-1, indices)
    assert (kept[..., :-1] >= kept[..., 1:]).all()  # best first
    assert (kept.min(-1).values >= scores.topk(int(50 * ratio), dim=-1).values.min(-1).values).all()
    assert len(select_tokens(k, v, scores, ratio)) == 2


def test_select_tokens_ratio_edge_cases():
    k = torch.randn(1, 1, 7, 4)
    scores = torch.rand(1, 1, 7)
    assert select_tokens(k, k, scores, 1 / 7 + 1e-9)[0].shape[2] == 1
    with pytest.raises(ValueError, match=r"ratio=0\.1 keeps int\(N·ratio\) = 0 of N=7"):
        select_tokens(k, k, scores, 0.1)
    for ratio in (0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            select_tokens(k, k, scores, ratio)
    with pytest.raises(TypeError, match="ratio must be a number"):
        select_tokens(k, k, scores, True)
    with pytest.raises(ValueError, match="scores must be"):
        select_tokens(k, k, scores[..., :6], 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 80, 128])
@pytest.mark.parametrize("tokens", [197, 1025, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_kernel_matches_reference(mode, dtype, tokens, dim):
    torch.manual_seed(6)
    q, k, _ = strided_qk(2, 3, tokens, dim, dtype, device="cuda")
    got = attention_importance(q, k, mode=mode)
    torch.testing.assert_close(got, attention_importance_reference(q, k, mode=mode), rtol=2e-3, atol=1e-6)
    assert torch.equal(got, attention_importance(q, k, mode=mode))  # deterministic: no atomics


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_given_lse_and_selection(mode):
    torch.manual_seed(7)
    q, k, v = strided_qk(2, 3, 1025, 64, torch.bfloat16, device="cuda")
    lse = reference_lse(q, k, 64**-0.5)
    scores = attention_importance(q, k, mode=mode, lse=lse)
    torch.testing.assert_close(scores, attention_importance(q, k, mode=mode), rtol=2e-3, atol=1e-6)
    for got, want in zip(select_tokens(k, v, scores, 0.2), select_tokens_reference(k, v, scores, 0.2)):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_attention_with_importance(mode):
    torch.manual_seed(9)
    q, k, v = strided_qk(2, 12, 1025, 64, torch.bfloat16, device="cuda")
    out, scores = attention_with_importance(q, k, v, mode=mode)
    probs = torch.softmax(q.float() @ k.float().transpose(-2, -1) * 64**-0.5, dim=-1)
    torch.testing.assert_close(out.float(), probs @ v.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(scores, attention_importance_reference(q, k, mode=mode), rtol=2e-3, atol=1e-6)
