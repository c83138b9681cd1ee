"""Models and dispatch through the Triton kernels: on CPU through the interpreter, on CUDA tensors on a GPU.

On CPU, `triton_on_cpu` makes the dispatcher treat CPU tensors as a Triton device (kernels/dispatch.py's
TRITON_DEVICE_TYPES), so `sink_attention`, `attention_forward` and `attention_importance` take the Triton path with
every one of their own rules (dtype, head dim, FASTPROMPT_DISABLE_TRITON) intact. Spies on the launch functions
prove which path ran. Sizes are tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    assert_matches,
    ept_vit,
    fpt_reference_features,
    images,
    make_qkv,
    prompt_params,
    prompted,
    sink_of_shape,
    small_fpt,
)

from fastprompt.kernels import (
    attention_forward,
    attention_importance,
    attention_with_importance,
    dispatch,
    sink_attention,
)
from fastprompt.kernels.dispatch import triton_importable
from fastprompt.kernels.reference import attention_importance_reference, sink_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_importable(), reason="needs triton")


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Dispatch CPU tensors to the Triton kernels (run by the interpreter that tests/conftest.py turns on)."""
    monkeypatch.delenv("FASTPROMPT_DISABLE_TRITON", raising=False)
    if DEVICE == "cpu":
        monkeypatch.setattr(dispatch, "TRITON_DEVICE_TYPES", ("cuda", "cpu"))


class Calls(dict):
    """Calls per launch function name, and `results`: (name, return value) of each call in order."""

    def __init__(self) -> None:
        super().__init__()
        self.results: list[tuple[str, object]] = []


@pytest.fixture
def launches(monkeypatch):
    """Counts of calls to each Triton launch function (the real ones still run), with their results."""
    from fastprompt.kernels import importance_triton, sink_attention_triton

    counts = Calls()
    for module, name in [
        (sink_attention_triton, "forward"),
        (sink_attention_triton, "backward"),
        (importance_triton, "attention_importance"),
    ]:
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            result = _real(*args, **kwargs)
            counts.results.append((_name, result))
            return result

        monkeypatch.setattr(module, name, spy)
    return counts


def with_grads(model, x, weights):
    logits = model(x)
    (logits * weights).sum().backward()
    prompts = {i: p.grad.clone() for i, p in prompt_params(model).items()}
    return logits.detach(), prompts, model.head.weight.grad.clone()


@pytest.mark.parametrize(("embed", "heads"), [(32, 4), (160, 2)])  # head dims 8 and 80
def test_ept_vit_through_triton_matches_official(embed, heads, triton_on_cpu, launches):
    """A 2-block EPT ViT whose attention runs the Triton forward and backward (dq, dk, dv: the second block's
    inputs depend on the first block's prompt) agrees with official EPT (concat, softmax, slice) in logits and in
    every gradient."""
    base = ept_vit(embed_dim=embed, num_heads=heads, depth=2).to(DEVICE)
    fused = prompted(copy.deepcopy(base), "fused", prompt_length=6)
    official = prompted(copy.deepcopy(base), "official", prompt_length=6)
    x = images().to(DEVICE)
    weights = torch.randn(2, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    logits_f, prompts_f, head_f = with_grads(fused, x, weights)
    assert launches == {"forward": 2, "backward": 1}  # block 0's q, k, v need no gradient: the sink's only
    logits_o, prompts_o, head_o = with_grads(official, x, weights)
    assert launches == {"forward": 2, "backward": 1}  # the official path never calls a kernel
    torch.testing.assert_close(logits_f, logits_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_f, head_o, atol=1e-5, rtol=1e-5)
    assert prompts_f.keys() == prompts_o.keys() == {0, 1}
    for i in prompts_f:
        assert prompts_o[i].abs().max() > 1e-5
        torch.testing.assert_close(prompts_f[i], prompts_o[i], atol=1e-5 * prompts_o[i].abs().max(), rtol=1e-4)


@pytest.mark.parametrize("mode", ["global", "cls"])
def test_fpt_extraction_through_triton_matches_the_materialised_reference(mode, triton_on_cpu, launches):
    """FPT's frozen branch with the Triton forward and importance kernels selects the same tokens as timm's blocks
    with full softmax probabilities and a stable top-k (the official semantics)."""
    model = small_fpt(layers=[0, 2], token_importance=mode, token_ratio=0.3).to(DEVICE)
    x = images(seed=2).to(DEVICE)
    features = model.extract_features(x, return_indices=True)
    assert launches == {"forward": 1, "attention_importance": 2}  # layer 0: forward + scores; layer 2: scores only
    keys, values, indices = fpt_reference_features(model.backbone, x, [0, 2], 0.3, mode)
    assert torch.equal(features["indices"], indices)
    backbone = model.backbone
    hidden = backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(x)))
    scores = [result for name, result in launches.results if name == "attention_importance"]
    for layer, block in enumerate(backbone.blocks[:3]):  # the scores themselves, against full softmax
        if layer in (0, 2):
            attn = block.attn
            qkv = attn.qkv(block.norm1(hidden)).reshape(*hidden.shape[:2], 3, attn.num_heads, attn.head_dim)
            q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            want = attention_importance_reference(q, k, mode=mode, scale=attn.scale)
            torch.testing.assert_close(scores.pop(0), want, rtol=1e-4, atol=1e-6)
        hidden = block(hidden)
    torch.testing.assert_close(features["keys"], keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features["values"], values, rtol=1e-5, atol=1e-5)


def test_disable_triton_takes_the_pytorch_path(triton_on_cpu, launches, monkeypatch):
    q, k, v = make_qkv(1, 2, 17, 32, device=DEVICE)
    sink = sink_of_shape((17,), device=DEVICE)
    triton_out = sink_attention(q, k, v, sink)
    assert launches == {"forward": 1}
    monkeypatch.setenv("FASTPROMPT_DISABLE_TRITON", "1")
    torch_out = sink_attention(q, k, v, sink)
    attention_forward(q, k, v, sink)
    attention_importance(q, k)
    assert launches == {"forward": 1}  # nothing more reached Triton
    torch.testing.assert_close(torch_out, triton_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("dim", "triton"), [(128, True), (160, False)])
def test_head_dims_above_128_and_fp64_fall_back(dim, triton, triton_on_cpu, launches):
    q, k, v = make_qkv(1, 2, 9, dim, device=DEVICE)
    sink = sink_of_shape((9,), device=DEVICE)
    out = sink_attention(q, k, v, sink)
    scores = attention_importance(q, k)
    expected = {"forward": 1, "attention_importance": 1} if triton else {}
    assert launches == expected
    torch.testing.assert_close(out, sink_attention_reference(q, k, v, sink), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, attention_importance_reference(q, k), rtol=1e-4, atol=1e-6)
    sink_attention(q.double(), k.double(), v.double(), sink.double())
    assert launches == expected  # fp64 always takes the PyTorch path


def test_attention_forward_and_importance_through_triton(triton_on_cpu, launches):
    q, k, v = (t.detach() for t in make_qkv(2, 2, 33, 32, device=DEVICE))
    sink = sink_of_shape((33,), device=DEVICE).detach()
    out, lse = attention_forward(q, k, v, sink)
    logits = (q @ k.transpose(-2, -1)).double() * 32**-0.5
    want = sink_attention_reference(*(t.double() for t in (q, k, v)), sink.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        lse.double(), torch.logaddexp(torch.logsumexp(logits, -1), sink.double()), rtol=1e-6, atol=1e-6
    )
    attended, scores = attention_with_importance(q, k, v, mode="global")
    assert launches == {"forward": 2, "attention_importance": 1}  # the score pass reuses the forward's lse
    torch.testing.assert_close(attended, torch.softmax(logits, -1).float() @ v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, attention_importance_reference(q, k), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dim", [80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_head_dims_80_96_128_through_dispatch(dim, dtype, triton_on_cpu, launches):
    """Padded head dims (80, 96 → 128) and the largest Triton one, every gradient, via `sink_attention` itself."""
    q, k, v = make_qkv(1, 2, 20, dim, device=DEVICE)
    assert_matches(sink_attention, q, k, v, sink_of_shape((1, 2, 20), device=DEVICE), dtype)
    assert launches == {"forward": 1, "backward": 1}
    qi, ki, _ = (t.detach().to(dtype) for t in make_qkv(1, 2, 20, dim, seed=4, device=DEVICE))
    for mode in ("global", "cls"):
        scores = attention_importance(qi, ki, mode=mode)
        torch.testing.assert_close(scores, attention_importance_reference(qi, ki, mode=mode), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_extreme_logits_through_triton_stay_finite(dtype, triton_on_cpu, launches):
    """Logits of ~1e4 and sinks of ±inf, 0 and 80 in 16-bit through the Triton paths: no NaN, no inf but lse' = +inf
    under an infinite sink."""
    q, k, v = make_qkv(1, 2, 17, 64, device=DEVICE)
    q = (q.detach() * 60).to(dtype).requires_grad_()
    k, v = (t.detach().to(dtype).requires_grad_() for t in (k, v))
    for sink_value in (float("-inf"), 0.0, 80.0, float("inf")):
        sink = torch.full((17,), sink_value, device=DEVICE, requires_grad=True)
        out = sink_attention(q, k, v, sink)
        out.float().sum().backward()
        for t in (out, q.grad, k.grad, v.grad, sink.grad):
            assert torch.isfinite(t).all(), sink_value
        out, lse = attention_forward(q.detach(), k.detach(), v.detach(), sink.detach())
        assert torch.isfinite(out).all() and not torch.isnan(lse).any()
        if sink_value == float("inf"):  # all mass on the sink: a zero output, an infinite normaliser
            assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
            continue
        want = sink_attention_reference(*(t.detach().double() for t in (q, k, v)), sink.detach().double())
        torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-2)
    scores = attention_importance(q.detach(), k.detach())
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, attention_importance_reference(q.detach(), k.detach()), rtol=1e-3, atol=1e-5)
    assert launches["backward"] == 4 and launches["attention_importance"] == 1
