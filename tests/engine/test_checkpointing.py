"""checkpoint_activations: same gradients as without recomputation, and the recomputation each policy promises."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_vit
from torch.utils._python_dispatch import TorchDispatchMode

import fastprompt
from fastprompt.checkpointing import activation_plan, attention_ops, checkpoint_activations

sink_module = importlib.import_module("fastprompt.kernels.sink_attention")  # the module, not the function

METHODS = [
    ("ept", {}),
    ("ept", {"attention": "official"}),
    ("vpt", {}),
    ("lora", {"targets": ("qkv", "proj")}),
    ("adapter", {}),
    ("bitfit", {}),
    ("partial", {}),
    ("full", {}),
]
POLICIES = ("selective", "full")


def _model(method: str, options: dict, depth: int = 3) -> torch.nn.Module:
    model = fastprompt.apply(tiny_vit(depth=depth), method, **options)
    with torch.no_grad():  # non-zero LoRA B / adapter up-projections, so every gradient path carries signal
        for name, param in model.named_parameters():
            if param.requires_grad and not name.startswith("head"):
                param.add_(0.05 * torch.randn_like(param))
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 32, 32, generator=generator), torch.tensor([0, 3])


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    images, labels = _batch()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    ("method", "options"), METHODS, ids=[m + ("-official" if o.get("attention") else "") for m, o in METHODS]
)
def test_gradients_equal_unrecomputed(method: str, options: dict, policy: str) -> None:
    reference = _model(method, options)
    expected = _grads(reference)
    model = checkpoint_activations(copy.deepcopy(reference), policy)
    got = _grads(model)
    assert sorted(got) == sorted(expected)
    method_params = [n for n in expected if any(k in n for k in ("prompt", "lora_", "vpt", "adapter", "bias"))]
    if method not in ("partial", "full"):
        assert method_params, "the method's own parameters must be among those compared"
    for name in expected:
        assert expected[name].abs().sum() > 0, name  # a zero gradient would compare equal whatever happens
        torch.testing.assert_close(got[name], expected[name], rtol=1.3e-6, atol=1e-7, msg=name)


class _Counter(TorchDispatchMode):
    """Counts op executions by overload packet (ops served from the selective-checkpoint cache never get here)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[object, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket] = self.calls.get(func.overloadpacket, 0) + 1
        return func(*args, **(kwargs or {}))


def _recompute_counts(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, int]:
    """(MLP fc1 runs, EPT sink-attention kernel runs, timm SDPA kernel runs) over one forward + backward."""
    mlp_calls = [0]
    for block in model.blocks:
        # fc1's output is the GELU input: the last thing a block's recomputation needs (it stops right after)
        block.mlp.fc1.register_forward_hook(lambda *_: mlp_calls.__setitem__(0, mlp_calls[0] + 1))
    sink_runs = [0]
    original = sink_module._forward

    def counted(*args, **kwargs):
        sink_runs[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(sink_module, "_forward", counted)
    images, labels = _batch()
    with _Counter() as counter:
        F.cross_entropy(model(images), labels).backward()
    sdpa = counter.calls.get(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, 0)
    return mlp_calls[0], sink_runs[0], sdpa


@pytest.mark.parametrize(
    ("policy", "mlp", "attention"), [("none", 1, 1), ("selective", 2, 1), ("full", 2, 2)]
)  # per block: forward runs, including recomputation in backward
def test_ept_fused_recomputes_mlp_not_attention(policy: str, mlp: int, attention: int, monkeypatch) -> None:
    depth = 3
    model = checkpoint_activations(_model("ept", {}, depth), policy)
    mlp_calls, sink_runs, _ = _recompute_counts(model, monkeypatch)
    assert mlp_calls == mlp * depth
    assert sink_runs == attention * depth  # fails if the sink-attention op is renamed and the policy misses it


@pytest.mark.parametrize(("policy", "mlp", "attention"), [("none", 1, 1), ("selective", 2, 1), ("full", 2, 2)])
def test_timm_attention_recomputed_only_by_full(policy: str, mlp: int, attention: int, monkeypatch) -> None:
    depth = 3
    model = checkpoint_activations(_model("lora", {}, depth), policy)
    mlp_calls, _, sdpa = _recompute_counts(model, monkeypatch)
    assert mlp_calls == mlp * depth
    assert sdpa == attention * depth


class _WideMatmuls(TorchDispatchMode):
    """Counts matrix products whose output is `width` wide (the q/k/v projection's 3 x embed)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width, self.count = width, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.addmm, torch.ops.aten.mm) and out.shape[-1] == self.width:
            self.count += 1
        return out


@pytest.mark.parametrize("method", ["ept", "lora"])
def test_selective_keeps_qkv_full_recomputes_it(method: str) -> None:
    """Selective recomputation serves the q/k/v projection from what it kept: as many q/k/v products as without
    recomputation; full recomputation runs them twice. Gradients stay exact (test_gradients_equal_unrecomputed)."""
    depth = 3
    counts = {}
    for policy in ("none", "selective", "full"):
        model = checkpoint_activations(_model(method, {}, depth), policy)
        images, labels = _batch()
        with _WideMatmuls(3 * model.embed_dim) as counter:
            F.cross_entropy(model(images), labels).backward()
        counts[policy] = counter.count
    assert counts["none"] >= depth  # at least one q/k/v product per block (LoRA's B adds one)
    assert counts["selective"] == counts["none"]
    assert counts["full"] == 2 * counts["none"]


def test_attention_ops_name_the_kernels_in_use() -> None:
    names = {str(op) for op in attention_ops()}
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in names
    assert any(name.startswith("fastprompt.") for name in names), "fastprompt's sink-attention op is not recognised"


def test_blocks_count_subset_mixing_and_removal() -> None:
    model = _model("vpt", {}, depth=4)
    checkpoint_activations(model, "selective", blocks=2)
    assert activation_plan(model) == ["selective", "selective", "none", "none"]
    checkpoint_activations(model, "full", blocks=[3, -4])
    assert activation_plan(model) == ["full", "selective", "none", "full"]
    checkpoint_activations(model, "none")
    assert activation_plan(model) == ["none"] * 4
    assert "forward" not in model.blocks[0].__dict__  # the original forward is back
    state = model.state_dict()
    assert set(state) == set(_model("vpt", {}, depth=4).state_dict())  # parameter names unchanged


def test_eval_and_no_grad_run_without_checkpoint() -> None:
    model = checkpoint_activations(_model("ept", {}), "full").eval()
    images, _ = _batch()
    with torch.no_grad():
        out = model(images)
    reference = checkpoint_activations(copy.deepcopy(model), "none")
    with torch.no_grad():
        torch.testing.assert_close(out, reference(images), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"policy": "some"}, ValueError, "policy must be one of"),
        ({"blocks": 9}, ValueError, "between 0 and the depth"),
        ({"blocks": [7]}, ValueError, "out of range"),
        ({"blocks": True}, TypeError, "blocks must be"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        checkpoint_activations(_model("lora", {}), **kwargs)


def test_refuses_timm_checkpointing_and_non_vits() -> None:
    model = _model("lora", {})
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="set_grad_checkpointing"):
        checkpoint_activations(model)
    with pytest.raises(TypeError, match="timm ViTs"):
        checkpoint_activations(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("depth", [2, 3])
def test_a_count_of_every_block_is_accepted_and_one_more_is_refused(depth: int) -> None:
    """blocks=<depth> checkpoints every block (the planner's "full on all L blocks" step); depth + 1 is refused."""
    model = checkpoint_activations(_model("lora", {}, depth), "full", blocks=depth)
    assert activation_plan(model) == ["full"] * depth
    checkpoint_activations(model, "selective", blocks=depth - 1)
    assert activation_plan(model) == ["selective"] * (depth - 1) + ["full"]
    checkpoint_activations(model, "none", blocks=0)  # a count of zero names no block
    assert activation_plan(model) == ["selective"] * (depth - 1) + ["full"]
    with pytest.raises(ValueError, match="between 0 and the depth"):
        checkpoint_activations(model, "full", blocks=depth + 1)
