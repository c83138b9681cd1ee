"""The baseline methods: what they train, their parameter formulas, their behaviour and their errors."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import learnable_task, tiny_vit

import fastprompt
from fastprompt.methods.adapter import Adapter
from fastprompt.methods.lora import LoRALinear

D, DEPTH, CLASSES = 32, 2, 4
HEAD = D * CLASSES + CLASSES
BASELINES = {
    "linear": ({}, HEAD),
    "partial": ({"blocks": 1}, None),  # filled in below from the block itself
    "bitfit": ({}, None),
    "lora": ({"rank": 4, "targets": ("qkv", "proj")}, DEPTH * 4 * ((D + 3 * D) + (D + D)) + HEAD),
    "adapter": ({"reduction": 4}, DEPTH * (2 * D * (D // 4) + D // 4 + D) + HEAD),
    "vpt": ({"num_tokens": 3}, DEPTH * 3 * D + HEAD),
    "full": ({}, None),
}


def expected_trainable(method: str, model) -> int:
    """Each method's trainable-parameter formula, from the model's own shapes."""
    options, formula = BASELINES[method]
    if formula is not None:
        return formula
    if method == "partial":
        last = sum(p.numel() for p in model.blocks[-1].parameters())
        return last + 2 * D + HEAD  # last block, final norm (weight + bias), head
    if method == "bitfit":
        biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") and not n.startswith("head"))
        return biases + HEAD
    return sum(p.numel() for p in model.parameters())


def make(method: str, **kwargs):
    model = tiny_vit(num_classes=10, **kwargs)
    options, _ = BASELINES[method]
    return fastprompt.apply(model, method, num_classes=CLASSES, **options)


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_parameter_count_follows_formula(method):
    model = make(method)
    trainable, total = fastprompt.count_parameters(model)
    assert trainable == expected_trainable(method, model)
    assert total == sum(p.numel() for p in model.parameters())
    assert model.get_classifier().out_features == CLASSES
    assert model.fastprompt_method == method


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_step_changes_only_trainable_and_loss_falls(method):
    model = make(method)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    images, labels = learnable_task(CLASSES)
    lr = 3e-3 if method == "bitfit" else 2e-2  # Adam moves every bias at once: BitFit wants a smaller step
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), f"frozen {name} changed"
    changed = [n for n, before in trainable.items() if not torch.equal(dict(model.named_parameters())[n], before)]
    assert "head.weight" in changed
    assert losses[-1] < 0.6 * losses[0], losses


def test_returns_same_object_and_works_with_other_geometry():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2, num_classes=3)
    assert fastprompt.apply(model, "lora", rank=2) is model
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize("method", ["vpt", "adapter", "lora"])
def test_dynamic_img_size(method):
    model = make(method, dynamic_img_size=True)
    assert model(torch.randn(2, 3, 48, 40)).shape == (2, CLASSES)


def test_lora_merge_gives_same_logits():
    model = make("lora")
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.5)  # a non-trivial update
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    before = model(images)
    fastprompt.merge(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(images), before, rtol=1e-5, atol=1e-5)


def test_lora_starts_as_pretrained_model():
    reference = tiny_vit().eval()
    model = fastprompt.apply(tiny_vit().eval(), "lora", rank=4)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)


def test_adapter_starts_as_pretrained_model_and_sits_after_mlp():
    reference = tiny_vit().eval()
    model = fastprompt.apply(tiny_vit().eval(), "adapter", reduction=2)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)
    mlp = model.blocks[0].mlp
    assert isinstance(mlp.adapter, Adapter)
    torch.nn.init.normal_(mlp.adapter.up.weight)
    x = torch.randn(2, 5, D)
    expected = mlp.adapter(reference.blocks[0].mlp(x))  # the unpatched timm Mlp, same weights
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_without_tokens_reproduces_backbone(deep):
    reference = tiny_vit().eval()
    model = fastprompt.apply(tiny_vit().eval(), "vpt", num_tokens=0, deep=deep)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), reference(images), rtol=1e-6, atol=1e-6)


def test_vpt_prompts_are_inserted_after_cls_and_removed_before_head():
    model = fastprompt.apply(tiny_vit().eval(), "vpt", num_tokens=3)
    lengths = []
    handle = model.blocks[1].register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    features = model.forward_features(torch.randn(1, 3, 32, 32))
    handle.remove()
    assert lengths == [1 + 16 + 3]
    # the prompts count as prefix tokens (as timm's register tokens): in the features, not in the pooled head input
    assert features.shape[1] == 1 + 3 + 16 and model.num_prefix_tokens == 1 + 3
    pooled = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, features[:, 0])


def test_num_classes_resets_trainable_classifier():
    model = fastprompt.apply(tiny_vit(num_classes=10), "bitfit", num_classes=7)
    assert model.head.out_features == 7 and model.head.weight.requires_grad


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="valid methods: .*lora.*vpt"):
        fastprompt.apply(tiny_vit(), "prefix-tuning")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match="valid options: num_classes, rank, alpha, dropout, targets"):
        fastprompt.apply(tiny_vit(), "lora", rnak=4)


def test_non_vit_model_is_rejected():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        fastprompt.apply(torch.nn.Linear(3, 3), "linear")


@pytest.mark.parametrize("num_classes", [0, -2])
def test_num_classes_must_be_positive(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        fastprompt.apply(tiny_vit(), "linear", num_classes=num_classes)


@pytest.mark.parametrize(
    ("method", "options", "error"),
    [
        ("lora", {"rank": "8"}, TypeError),
        ("lora", {"rank": 2.5}, TypeError),
        ("lora", {"targets": ("mlp",)}, ValueError),
        ("lora", {"dropout": 1.5}, ValueError),
        ("vpt", {"deep": "yes"}, TypeError),
        ("vpt", {"num_tokens": -1}, ValueError),
        ("adapter", {"reduction": 0}, ValueError),
        ("partial", {"blocks": 5}, ValueError),
        ("linear", {"num_classes": "3"}, TypeError),
    ],
)
def test_bad_option_values(method, options, error):
    with pytest.raises(error):
        fastprompt.apply(tiny_vit(), method, **options)


def test_method_cannot_be_applied_twice():
    model = fastprompt.apply(tiny_vit(), "linear")
    with pytest.raises(ValueError, match="already has method 'linear'"):
        fastprompt.apply(model, "lora")


def test_vpt_gradient_checkpointing_saves_less_and_gives_the_same_gradients():
    from fastprompt.profiling import saved_tensor_bytes

    images, labels = learnable_task(CLASSES, count=4)
    results = []
    for checkpointing in (False, True):
        model = make("vpt").train()
        model.set_grad_checkpointing(checkpointing)
        saved = saved_tensor_bytes(lambda m: F.cross_entropy(m(images), labels).backward(), model, exclude=model)
        results.append((saved, model.vpt.prompts.grad.clone()))
    (plain, grad), (checkpointed, grad_ckpt) = results
    assert checkpointed < plain / 2
    torch.testing.assert_close(grad_ckpt, grad)
