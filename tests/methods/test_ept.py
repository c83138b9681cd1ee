"""EPT as a patch of timm ViTs: official semantics, training, resolutions, scaling maps, saved-tensor memory."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import ept_vit, images, prompt_params, prompted

import fastprompt
from fastprompt.methods.ept import ept_scales, resample_prompt
from fastprompt.profiling import saved_tensor_bytes

CLASSES = 5


def test_prompts_per_token_and_only_prompts_and_head_train():
    model = fastprompt.apply(ept_vit(reg_tokens=2), "ept", num_classes=3, prompt_length=7, prompt_layers=[2, 0])
    prompts = prompt_params(model)
    assert sorted(prompts) == [0, 2]
    assert all(p.shape == (1 + 2 + 16, 7) for p in prompts.values())  # CLS + 2 registers + 4x4 patches
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.0.attn.prompt", "blocks.2.attn.prompt", "head.weight", "head.bias"}
    assert fastprompt.count_parameters(model)[0] == 2 * 19 * 7 + 32 * 3 + 3
    assert model.fastprompt_method == "ept"
    assert "blocks.0.attn.prompt" in model.state_dict()


@pytest.mark.parametrize("layers", [None, [0, 2]])
def test_fused_matches_official_logits_and_gradients(layers):
    base = ept_vit(reg_tokens=1)
    fused = prompted(copy.deepcopy(base), "fused", prompt_length=9, prompt_layers=layers)
    official = prompted(copy.deepcopy(base), "official", prompt_length=9, prompt_layers=layers)
    x, weights = images(), torch.randn(2, CLASSES, generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (fused, official):
        logits = model(x)
        (logits * weights).sum().backward()
        grads.append((logits, {i: p.grad for i, p in prompt_params(model).items()}, model.head.weight.grad))
    (logits_f, prompt_f, head_f), (logits_o, prompt_o, head_o) = grads
    torch.testing.assert_close(logits_f, logits_o, atol=1e-5, rtol=1e-5)
    assert prompt_f.keys() == prompt_o.keys() == set(layers or range(3))
    for i in prompt_f:
        assert prompt_f[i].abs().max() > 1e-5  # the prompts really receive a gradient
        # within 1e-5 absolutely and relative to the gradient's own size
        torch.testing.assert_close(prompt_f[i], prompt_o[i], atol=1e-5 * min(1.0, prompt_o[i].abs().max()), rtol=1e-5)
    torch.testing.assert_close(head_f, head_o, atol=1e-5, rtol=1e-5)


def test_official_path_is_concat_softmax_slice_and_unprompted_blocks_untouched():
    base = ept_vit()
    model = prompted(copy.deepcopy(base), "official", prompt_length=5, prompt_layers=[0, 2])
    attn, plain = model.blocks[0].attn, base.blocks[0].attn
    tokens = torch.randn(2, 17, 32)
    batch, n, _ = tokens.shape
    q, k, v = plain.qkv(tokens).reshape(batch, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * 8**-0.5
    prompt = attn.prompt.expand(batch, 4, -1, -1)
    probs = torch.cat([prompt, logits], dim=-1).softmax(-1)[..., 5:]
    expected = plain.proj((probs @ v).transpose(1, 2).reshape(batch, n, 32))
    torch.testing.assert_close(attn(tokens), expected, atol=1e-6, rtol=1e-6)
    assert "forward" not in vars(model.blocks[1].attn) and not hasattr(model.blocks[1].attn, "prompt")
    torch.testing.assert_close(model.blocks[1](tokens), base.blocks[1](tokens), atol=0, rtol=0)


def test_deepcopy_state_dict_and_grad_checkpointing_keep_the_prompts():
    model = prompted(ept_vit(), prompt_length=3, prompt_layers=[0, 2])
    x = images()
    model(x).sum().backward()
    expected = {i: p.grad.clone() for i, p in prompt_params(model).items()}
    twin = copy.deepcopy(model)
    assert twin.blocks[0].attn.ept.tracker is twin.blocks[2].attn.ept.tracker is not model.blocks[0].attn.ept.tracker
    twin.zero_grad()
    twin.set_grad_checkpointing(True)
    twin(x).sum().backward()
    for i, param in prompt_params(twin).items():
        torch.testing.assert_close(param.grad, expected[i], atol=1e-6, rtol=1e-6)
    fresh = fastprompt.apply(ept_vit(), "ept", prompt_length=3, prompt_layers=[0, 2])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_one_step_changes_only_prompts_and_head():
    model = prompted(ept_vit(), prompt_layers=[1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    F.cross_entropy(model(images()), torch.tensor([0, 4])).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in ("blocks.1.attn.prompt", "head.weight", "head.bias"):
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name


def test_loss_falls_on_a_tiny_task():
    generator = torch.Generator().manual_seed(5)
    labels = torch.arange(10) % CLASSES
    colours = 2.0 * torch.randn(CLASSES, 3, 1, 1, generator=generator)
    x = 0.3 * torch.randn(10, 3, 32, 32, generator=generator) + colours[labels]
    model = fastprompt.apply(ept_vit(), "ept", prompt_length=4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("init", ["normal", "uniform", "zero", "kaiming"])
def test_prompt_inits(init):
    model = ept_vit(img_size=64)
    torch.manual_seed(0)
    prompt = fastprompt.apply(model, "ept", prompt_init=init, prompt_layers=[0]).blocks[0].attn.prompt
    assert prompt.shape == (65, 100)
    if init == "zero":
        assert torch.count_nonzero(prompt) == 0
    elif init == "uniform":
        assert prompt.abs().max() <= 0.08 and prompt.abs().max() > 0.079
    else:  # kaiming_normal_ on the official [layers, N, P] tensor: fan_in = N·P
        std = 0.02 if init == "normal" else (2.0 / (65 * 100)) ** 0.5
        assert abs(prompt.std().item() / std - 1) < 0.03 and abs(prompt.mean().item()) < 0.05 * std


def test_option_errors():
    with pytest.raises(ValueError, match="normal.*uniform.*zero.*kaiming"):
        fastprompt.apply(ept_vit(), "ept", prompt_init="token")
    with pytest.raises(ValueError, match="fused.*official"):
        fastprompt.apply(ept_vit(), "ept", attention="flash")
    with pytest.raises(ValueError, match="prompt_length"):
        fastprompt.apply(ept_vit(), "ept", prompt_length=0)
    with pytest.raises(ValueError, match="out of range"):
        fastprompt.apply(ept_vit(), "ept", prompt_layers=[3])
    with pytest.raises(ValueError, match="attn_drop_rate=0"):
        fastprompt.apply(ept_vit(attn_drop_rate=0.1), "ept")
    with pytest.raises(ValueError, match="patch_drop_rate=0"):
        fastprompt.apply(ept_vit(patch_drop_rate=0.5), "ept")
    with pytest.raises(TypeError, match="standard Attention"):
        fastprompt.apply(ept_vit(attn_layer="diff"), "ept")


def test_runtime_errors_name_the_problem():
    model = fastprompt.apply(ept_vit(), "ept", prompt_layers=[0])
    with pytest.raises(ValueError, match="EPT does not support is_causal=True"):
        model.blocks[0](torch.randn(1, 17, 32), is_causal=True)
    with pytest.raises(ValueError, match="17 rows .* got 20 tokens"):
        model.blocks[0].attn(torch.randn(1, 20, 32))
    with pytest.raises(ValueError, match="no EPT prompts"):
        ept_scales(ept_vit(), images())


def test_resample_prompt_is_timm_bicubic_on_the_grid_prefix_kept():
    prompt = torch.randn(2 + 16, 6)
    assert resample_prompt(prompt, (4, 4), (4, 4), 2) is prompt
    out = resample_prompt(prompt, (6, 3), (4, 4), 2)
    grid = prompt[2:].reshape(1, 4, 4, 6).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 3), mode="bicubic", antialias=True, align_corners=False)
    assert out.shape == (2 + 18, 6)
    torch.testing.assert_close(out[:2], prompt[:2], atol=0, rtol=0)
    torch.testing.assert_close(out[2:], expected.permute(0, 2, 3, 1).reshape(18, 6))


def test_other_resolutions_resample_the_prompt():
    base = ept_vit()
    static = prompted(copy.deepcopy(base), prompt_length=6, prompt_layers=[0, 2])
    dynamic = prompted(ept_vit(dynamic_img_size=True), prompt_length=6, prompt_layers=[0, 2])
    x = images()
    at_training_size = dynamic(x)
    torch.testing.assert_close(at_training_size, static(x), atol=0, rtol=0)  # the prompt is used as it is

    # the expected model: created for 48×32, pos_embed resampled by timm, prompts resampled by hand
    expected = copy.deepcopy(base)
    expected.set_input_size(img_size=(48, 32))
    fastprompt.apply(expected, "ept", prompt_length=6, prompt_layers=[0, 2])
    with torch.no_grad():
        for i, prompt in prompt_params(static).items():
            patches = prompt[1:].reshape(1, 4, 4, 6).permute(0, 3, 1, 2)
            patches = F.interpolate(patches, size=(6, 4), mode="bicubic", antialias=True, align_corners=False)
            prompt_params(expected)[i].copy_(torch.cat([prompt[:1], patches.permute(0, 2, 3, 1).reshape(24, 6)]))
    tall = images((48, 32))
    want = expected(tall)
    torch.testing.assert_close(dynamic(tall), want, atol=1e-5, rtol=1e-5)
    static.set_input_size(img_size=(48, 32))  # a static model moved to another input size after EPT
    torch.testing.assert_close(static(tall), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dynamic(x), at_training_size, atol=0, rtol=0)  # back at the training size


def test_ept_scales_is_the_sink_scaling_map():
    model = prompted(ept_vit(reg_tokens=1), prompt_length=5, prompt_layers=[1, 2]).train()
    captured = {}
    model.blocks[1].attn.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    x = images(count=3)
    scales = ept_scales(model, x)
    assert model.training and sorted(scales) == [1, 2]
    assert all(s.shape == (3, 18) and not s.requires_grad for s in scales.values())
    attn = model.blocks[1].attn
    q, k, _ = attn.qkv(captured["x"]).reshape(3, 18, 3, 4, 8).permute(2, 0, 3, 1, 4)
    lse = torch.logsumexp((q @ k.transpose(-2, -1)) * 8**-0.5, dim=-1)
    expected = torch.sigmoid(lse - torch.logsumexp(attn.prompt, dim=-1)).mean(dim=1)
    torch.testing.assert_close(scales[1], expected, atol=1e-5, rtol=1e-5)
    assert all(0 < s.min() and s.max() < 1 for s in scales.values())


@pytest.mark.slow
def test_fused_saves_at_most_a_quarter_of_official_bytes_vit_b16_512():
    torch.manual_seed(0)  # weight values do not change what is saved: skip timm's slow trunc-normal init
    base = timm.create_model("vit_base_patch16_224", img_size=512, num_classes=2, weight_init="skip")
    x, target = torch.randn(1, 3, 512, 512), torch.tensor([1])
    saved = {}
    for attention in ("fused", "official"):
        model = fastprompt.apply(copy.deepcopy(base), "ept", attention=attention)
        saved[attention] = saved_tensor_bytes(lambda m: F.cross_entropy(m(x), target), model, exclude=model)
        del model
    assert saved["official"] > 12 * 12 * 1025 * 1125 * 4  # at least the materialised softmax of every layer
    assert saved["fused"] <= 0.25 * saved["official"]
