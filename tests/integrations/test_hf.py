"""fastprompt.apply on Hugging Face ViT / DINOv2: equivalence with the official EPT, every method, FPT's tap, counts."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from helpers import images, tiny_hf_model

import fastprompt
from fastprompt.kernels.reference import attention_importance_reference
from fastprompt.methods import hf, registry

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AttentionInterface,
    Dinov2ForImageClassification,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTModel,
)

HIDDEN, HEADS, DEPTH, IMG, PATCH, MLP = 32, 4, 2, 32, 8, 64
TOKENS = (IMG // PATCH) ** 2 + 1  # 17


def tiny_dinov2(cls=Dinov2ForImageClassification, **kwargs):
    """tiny_hf_model's DINOv2 (28×28 images, 7-pixel patches)."""
    return tiny_hf_model(cls, **kwargs)


def logits_of(model, x, **kwargs) -> torch.Tensor:
    out = model(x, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


# The official EPT formulation, as a Hugging Face attention function: concat the prompt in front of the scaled
# logits, softmax over N + P columns, drop the prompt columns, multiply by V. It reads `module.official_prompt`.
def official_ept_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    prompt = module.official_prompt.expand(logits.shape[0], logits.shape[1], -1, -1)
    probs = torch.cat([prompt, logits], dim=-1).softmax(dim=-1)[..., prompt.shape[-1] :]
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


AttentionInterface.register("official_ept_test", official_ept_attention)


def official_twin(model, prompts: dict[int, torch.Tensor]):
    """An unpatched copy of `model` running official EPT with `prompts` (leaf tensors, per layer)."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("official_ept_test")
    for i, attn in hf.attention_modules(twin).items():
        attn.official_prompt = prompts[i]
    return twin


def hf_resampled(prompt: torch.Tensor, size: int, patch: int) -> torch.Tensor:
    """`prompt` [N, P] resampled by Hugging Face's own ViTEmbeddings.interpolate_pos_encoding (hidden = P)."""
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    rows, width = prompt.shape
    grid = int((rows - 1) ** 0.5)
    embeddings = ViTEmbeddings(ViTConfig(hidden_size=width, image_size=grid * patch, patch_size=patch))
    del embeddings.position_embeddings  # a plain tensor instead, so that gradients flow back to `prompt`
    embeddings.position_embeddings = prompt[None]
    new_rows = (size // patch) ** 2 + 1
    return embeddings.interpolate_pos_encoding(torch.zeros(1, new_rows, width), size, size)[0]


@pytest.mark.parametrize("size", [IMG, 2 * IMG])
@pytest.mark.parametrize("attention", ["fused", "official"])
def test_ept_matches_official_concat_softmax_slice(size, attention):
    """Logits and prompt gradients of EPT on an HF ViT equal the official formulation to 1e-5 (fp32), also at an
    interpolated size (prompt rows resampled as Hugging Face resamples position embeddings)."""
    base = tiny_hf_model(initializer_range=0.2)  # weights large enough that prompt gradients are far above 1e-5
    model = fastprompt.apply(copy.deepcopy(base), "ept", prompt_length=7, attention=attention)
    with torch.no_grad():
        for attn in hf.attention_modules(model).values():
            attn.prompt.normal_(std=1.0)  # away from g ≈ ln P, so the sink really weighs
    kwargs = {"interpolate_pos_encoding": True} if size != IMG else {}
    x = images(size)
    leaves = {i: a.prompt.detach().clone().requires_grad_(True) for i, a in hf.attention_modules(model).items()}
    used = {i: hf_resampled(p, size, PATCH) if size != IMG else p for i, p in leaves.items()}
    twin = official_twin(base, used)
    twin.classifier = copy.deepcopy(model.classifier)
    ours, theirs = logits_of(model, x, **kwargs), logits_of(twin, x, **kwargs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3))
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    for i, attn in hf.attention_modules(model).items():
        torch.testing.assert_close(attn.prompt.grad, leaves[i].grad, atol=1e-5, rtol=1e-5)
        assert leaves[i].grad.abs().max() > 1e-3  # far above the tolerance (last layer: only the CLS row)


def test_ept_on_dinov2_matches_official():
    base = tiny_dinov2(initializer_range=0.2)
    model = fastprompt.apply(copy.deepcopy(base), "ept", prompt_length=5)
    with torch.no_grad():
        for attn in hf.attention_modules(model).values():
            attn.prompt.normal_(std=1.0)
    leaves = {i: a.prompt.detach().clone().requires_grad_(True) for i, a in hf.attention_modules(model).items()}
    twin = official_twin(base, leaves)
    twin.classifier = copy.deepcopy(model.classifier)
    x = images(28)
    ours, theirs = logits_of(model, x), logits_of(twin, x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.sum().backward()
    theirs.sum().backward()
    for i, attn in hf.attention_modules(model).items():
        torch.testing.assert_close(attn.prompt.grad, leaves[i].grad, atol=1e-5, rtol=1e-5)
        assert leaves[i].grad.abs().max() > 1e-3


def test_prompt_resampling_is_hugging_faces_position_interpolation():
    prompt = torch.randn(TOKENS, 6, generator=torch.Generator().manual_seed(0))
    ours = hf.resample_prompt(prompt, (8, 8), (4, 4), 1)
    torch.testing.assert_close(ours, hf_resampled(prompt, 64, PATCH), atol=1e-6, rtol=1e-6)
    assert hf.resample_prompt(prompt, (4, 4), (4, 4), 1) is prompt


def randomise_norms(model) -> None:
    """Give every LayerNorm a random weight and bias: fresh ones are the identity, so a wrong norm would not show."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))


@pytest.mark.parametrize("make", [tiny_hf_model, tiny_dinov2])
def test_ept_scales_on_hf_are_the_official_attentions_non_prompt_mass(make):
    """σ(lse − g) per token, head-averaged, equals 1 − the probability the official concat-softmax puts on the prompt
    columns, read from Hugging Face's own attention probabilities (norms randomised; interpolated size for ViT)."""
    base = make(initializer_range=0.2)
    randomise_norms(base)
    model = fastprompt.apply(copy.deepcopy(base), "ept", prompt_length=4, prompt_layers=[1])
    with torch.no_grad():
        model_prompt = hf.attention_modules(model)[1].prompt
        model_prompt.normal_(std=1.5)
    dinov2 = make is tiny_dinov2
    size = 28 if dinov2 else 2 * IMG
    kwargs = {} if dinov2 else {"interpolate_pos_encoding": True}
    x = images(size)
    scales = fastprompt.ept_scales(model, x, **kwargs)
    patch = 7 if dinov2 else PATCH
    assert list(scales) == [1] and scales[1].shape == (2, (size // patch) ** 2 + 1)
    prompt = model_prompt.detach() if dinov2 else hf_resampled(model_prompt.detach(), size, PATCH)
    far = torch.full((prompt.shape[0], 1), -1e4)  # layer 0 unprompted: a sink no token attends to
    twin = official_twin(base, {0: far, 1: prompt})
    with torch.no_grad():
        attentions = twin(x, output_attentions=True, **kwargs).attentions
    expected = attentions[1].sum(dim=-1).mean(dim=1)  # the kept (non-prompt) probability mass, head mean
    torch.testing.assert_close(scales[1], expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 0.01  # the map varies over tokens and images: a constant would not pass


def head(config_hidden: int, classes: int) -> int:
    return config_hidden * classes + classes


def expected_trainable(method: str, classes: int = 5) -> int:
    """Independent counts for the tiny ViT (D = 32, 2 layers, MLP 64, 17 tokens) with a `classes`-way head."""
    d, blocks = HIDDEN, DEPTH
    biases = d + blocks * (4 * d + 2 * d + MLP + d) + d  # patch conv; q,k,v,o, 2 LayerNorms, fc1, fc2; final LN
    table = {
        "linear": 0,
        "bitfit": biases,
        "ept": blocks * TOKENS * 7,  # prompt_length 7
        "lora": blocks * 3 * 4 * (d + d),  # rank 4 on q, k, v separately
        "vpt": blocks * 3 * d,  # 3 tokens, deep
        "adapter": blocks * (2 * d * (d // 8) + d // 8 + d),
    }
    return table[method] + head(d, classes)


OPTIONS = {"ept": dict(prompt_length=7), "lora": dict(rank=4), "vpt": dict(num_tokens=3), "adapter": {}}


@pytest.mark.parametrize("method", ["linear", "bitfit", "ept", "lora", "vpt", "adapter"])
def test_methods_train_exactly_their_parameters(method):
    model = fastprompt.apply(tiny_hf_model(), method, num_classes=5, **OPTIONS.get(method, {}))
    trainable, total = fastprompt.count_parameters(model)
    assert trainable == expected_trainable(method)
    assert model.config.num_labels == 5 and model.classifier.out_features == 5
    out = model(images(), labels=torch.tensor([0, 4]))
    assert out.logits.shape == (2, 5) and out.loss.ndim == 0
    out.loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


def test_dinov2_head_sees_cls_and_mean_patch_token():
    model = fastprompt.apply(tiny_dinov2(), "vpt", num_classes=4, num_tokens=2)
    assert model.classifier.in_features == 2 * HIDDEN and model.config.num_labels == 4
    out = model(images(28), labels=torch.tensor([0, 3]))
    assert out.logits.shape == (2, 4) and torch.isfinite(out.loss)
    expected = 2 * DEPTH * HIDDEN + 2 * HIDDEN * 4 + 4  # deep prompts + [CLS, mean] head
    assert fastprompt.count_parameters(model)[0] == expected


def test_dinov2_vpt_head_pools_the_image_tokens_without_the_prompts():
    """DINOv2's head sees [CLS, mean of the patch tokens]: the prompt tokens are gone before the final norm, so the
    mean is over the 16 patch tokens only (computed by hand; randomised norms)."""
    base = tiny_dinov2()
    randomise_norms(base)
    model = fastprompt.apply(copy.deepcopy(base), "vpt", num_tokens=2)
    prompts = model.dinov2.vpt.prompts
    x = images(28)
    with torch.no_grad():
        hidden = base.dinov2.embeddings(x)
        for i, layer in enumerate(hf.hf_layers(base)):
            rest = hidden[:, 1:] if i == 0 else hidden[:, 3:]
            hidden = layer(torch.cat([hidden[:, :1], prompts[i].expand(2, -1, -1), rest], dim=1))
        tokens = base.dinov2.layernorm(torch.cat([hidden[:, :1], hidden[:, 3:]], dim=1))
        assert tokens.shape[1] == 1 + (28 // 7) ** 2
        expected = base.classifier(torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1))
        got = logits_of(model, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_lora_and_adapter_start_as_the_pretrained_model(method):
    base = tiny_hf_model()
    model = fastprompt.apply(copy.deepcopy(base), method)
    torch.testing.assert_close(logits_of(model, images()), logits_of(base, images()), atol=0, rtol=0)


def test_lora_merges_into_the_hf_projections():
    model = fastprompt.apply(tiny_hf_model(), "lora", rank=2, targets=("qkv", "proj"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    before = logits_of(model, images())
    fastprompt.merge(model)
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(logits_of(model, images()), before, atol=1e-5, rtol=1e-5)


def test_shallow_vpt_inserts_its_prompts_at_the_first_layer_only():
    base = tiny_hf_model(num_hidden_layers=3)
    model = fastprompt.apply(copy.deepcopy(base), "vpt", num_tokens=3, deep=False)
    prompts = model.vit.vpt.prompts
    assert prompts.shape[0] == 1  # one set of prompt tokens, at the input
    x = images()
    with torch.no_grad():
        hidden = base.vit.embeddings(x)
        hidden = torch.cat([hidden[:, :1], prompts[0].expand(2, -1, -1), hidden[:, 1:]], dim=1)
        for layer in base.vit.layers:  # the prompt tokens flow through every later layer untouched by hand
            hidden = layer(hidden)
        expected = base.classifier(base.vit.layernorm(torch.cat([hidden[:, :1], hidden[:, 4:]], dim=1))[:, 0])
    torch.testing.assert_close(logits_of(model, x), expected, atol=1e-6, rtol=1e-6)


def test_vpt_matches_tokens_inserted_by_hand():
    base = tiny_hf_model()
    model = fastprompt.apply(copy.deepcopy(base), "vpt", num_tokens=3)
    prompts = model.vit.vpt.prompts
    x = images()
    with torch.no_grad():
        hidden = base.vit.embeddings(x)
        for i, layer in enumerate(base.vit.layers):
            rest = hidden[:, 1:] if i == 0 else hidden[:, 4:]
            hidden = layer(torch.cat([hidden[:, :1], prompts[i].expand(2, -1, -1), rest], dim=1))
        expected = base.classifier(base.vit.layernorm(hidden)[:, 0])
    torch.testing.assert_close(logits_of(model, x), expected, atol=1e-6, rtol=1e-6)


def test_options_mirror_the_timm_methods():
    specs = registry.available_methods()
    for name, fn in hf.HF_METHODS.items():
        params = inspect.signature(fn).parameters.values()
        assert tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY) == specs[name]
        timm_defaults = {p.name: p.default for p in inspect.signature(registry.get_method(name).fn).parameters.values()}
        assert {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY} == {
            k: timm_defaults[k] for k in specs[name]
        }


@pytest.mark.parametrize(
    ("method", "options", "error", "match"),
    [
        ("ept", dict(prompt_length=0), ValueError, "'prompt_length' must be >= 1"),
        ("ept", dict(prompt_layers=[5]), ValueError, "block index 5 out of range for a 2-block model"),
        ("ept", dict(attention="flash"), ValueError, "option 'attention' must be one of"),
        ("lora", dict(targets=("mlp",)), ValueError, "non-empty subset of"),
        ("vpt", dict(deep=1), TypeError, "'deep' must be a bool"),
        ("adapter", dict(reduction=0), ValueError, "'reduction' must be >= 1"),
        ("ept", dict(prompt_lenght=3), ValueError, r"unknown option\(s\) \['prompt_lenght'\]"),
        ("partial", {}, ValueError, "timm ViTs only"),
    ],
)
def test_errors_mirror_the_timm_path(method, options, error, match):
    with pytest.raises(error, match=match):
        fastprompt.apply(tiny_hf_model(), method, **options)


def test_errors_specific_to_hugging_face_models():
    with pytest.raises(TypeError, match="ViTForMaskedImageModeling"):
        fastprompt.apply(tiny_hf_model(ViTForMaskedImageModeling), "ept")
    with pytest.raises(ValueError, match="ViTModel has no classifier"):
        fastprompt.apply(tiny_hf_model(ViTModel), "linear", num_classes=4)
    with pytest.raises(ValueError, match="attention_probs_dropout_prob=0.0"):
        fastprompt.apply(tiny_hf_model(attention_probs_dropout_prob=0.1), "ept")
    model = fastprompt.apply(tiny_hf_model(), "ept", prompt_length=3)
    with pytest.raises(ValueError, match="already has method 'ept'"):
        fastprompt.apply(model, "lora")


def test_from_pretrained_local_dir_works_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_hf_model(seed=5).save_pretrained(tmp_path)
    loaded = ViTForImageClassification.from_pretrained(tmp_path, local_files_only=True).eval()
    original = tiny_hf_model(seed=5)
    torch.manual_seed(9)
    a = fastprompt.apply(loaded, "ept", prompt_length=4)
    torch.manual_seed(9)
    b = fastprompt.apply(original, "ept", prompt_length=4)
    torch.testing.assert_close(logits_of(a, images()), logits_of(b, images()), atol=0, rtol=0)


def test_fpt_hf_tap_selects_the_true_keys_and_values():
    """The tap's selected K/V are Hugging Face's own k_proj/v_proj outputs at the tokens that receive the most
    attention in Hugging Face's eager attention probabilities (interpolated to 2× the config size; every norm
    randomised, so taking the wrong one shows)."""
    backbone = tiny_hf_model(ViTModel, attn_implementation="eager")
    randomise_norms(backbone)
    model = fastprompt.apply(backbone, "fpt", num_classes=3, side_input_size=16, token_ratio=0.25)
    x = images(2 * IMG)
    features = model.extract_features(x, return_indices=True)
    out = backbone(x, interpolate_pos_encoding=True, output_hidden_states=True, output_attentions=True)
    count = int(((2 * IMG // PATCH) ** 2 + 1) * 0.25)
    assert features["keys"].shape == (2, DEPTH, HEADS, count, HIDDEN // HEADS)
    for j, layer_index in enumerate(model.layers):
        layer = backbone.layers[layer_index]
        normed = layer.layernorm_before(out.hidden_states[layer_index])
        heads = lambda t: t.view(2, -1, HEADS, HIDDEN // HEADS).transpose(1, 2)  # noqa: E731
        k, v = heads(layer.attention.k_proj(normed)), heads(layer.attention.v_proj(normed))
        received = out.attentions[layer_index].mean(dim=2)  # [B, H, N]: attention each token receives
        top = received.topk(count, dim=-1).indices
        chosen = features["indices"][:, j]
        assert torch.equal(chosen.sort(dim=-1).values, top.sort(dim=-1).values)
        index = chosen[..., None].expand(-1, -1, -1, HIDDEN // HEADS)
        torch.testing.assert_close(features["keys"][:, j], k.gather(2, index), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(features["values"][:, j], v.gather(2, index), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            attention_importance_reference(*heads_qk(layer, normed), scale=layer.attention.scaling),
            received, atol=1e-5, rtol=1e-5,
        )  # fmt: skip


def heads_qk(layer, normed):
    shape = (normed.shape[0], -1, HEADS, HIDDEN // HEADS)
    return (
        layer.attention.q_proj(normed).view(shape).transpose(1, 2),
        layer.attention.k_proj(normed).view(shape).transpose(1, 2),
    )


@pytest.mark.parametrize("make", [tiny_hf_model, tiny_dinov2])
def test_fpt_on_hf_backbones_trains_only_fusion_and_side(make):
    backbone = make()
    size = 28 if make is tiny_dinov2 else IMG
    model = fastprompt.apply(backbone, "fpt+", num_classes=3, side_input_size=2 * (size // 4))
    assert not any(p.requires_grad for p in backbone.parameters())
    logits = model(images(2 * size))
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.feature_signature()["image_size"] == [size, size]


def vit_b_backbone_parameters(image_size: int = 384, pooler: bool = False) -> int:
    """HF ViT-B/16 parameters, analytically: embeddings (patch conv, CLS, position table at the config size),
    12 layers (q, k, v, o, fc1, fc2, two LayerNorms), final LayerNorm, optional pooler."""
    d, mlp = 768, 3072
    embeddings = 3 * 16 * 16 * d + d + d + ((image_size // 16) ** 2 + 1) * d
    layer = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 2 * 2 * d
    return embeddings + 12 * layer + 2 * d + (d * d + d if pooler else 0)


@pytest.mark.parametrize(("variant", "published"), [("fpt+", 900_965), ("fpt", 1_602_341)])
def test_published_fpt_counts_on_the_hf_vit_b_backbone(variant, published):
    """google/vit-base-patch16-384's architecture (ViTConfig defaults at 384), run at 512, 5 classes."""
    with torch.device("meta"):
        backbone = ViTModel(ViTConfig(image_size=384), add_pooling_layer=False)
        model = fastprompt.apply(backbone, variant, num_classes=5)
    trainable, total = fastprompt.count_parameters(model)
    assert trainable == published
    assert total - trainable == vit_b_backbone_parameters() == 86_090_496
    assert model.num_selected_tokens((512, 512)) == 205 and model.num_selected_tokens() == 115


def test_hf_models_with_registers_or_other_heads_are_refused_clearly():
    with pytest.raises(TypeError, match="Dinov2Model"):
        fastprompt.apply(torch.nn.Linear(2, 2), "ept")
    assert hf.base_model(tiny_dinov2(Dinov2Model)) is not None


def test_memory_benchmark_builds_hugging_face_rows():
    from benchmarks import models

    variant = models.Variant("ept", "ept", {"prompt_length": 3})
    model = models.build_model(
        variant, "hf:vit-base-patch16-224", 32, num_classes=5, grad_checkpointing=False, device=torch.device("cpu")
    )
    assert isinstance(model, models.HFLogits) and model.training
    assert fastprompt.count_parameters(model)[0] == 12 * 197 * 3 + 768 * 5 + 5  # prompts at 224 + the new head
    assert model(images(32, count=1)).shape == (1, 5)  # 32×32 through interpolate_pos_encoding
    with pytest.raises(ValueError, match="unknown Hugging Face architecture 'vit-huge'"):
        models.build_model(variant, "hf:vit-huge", 32, num_classes=5, grad_checkpointing=False, device="cpu")


@pytest.mark.parametrize("method", ["ept", "vpt"])
def test_hugging_face_gradient_checkpointing_gives_the_same_gradients(method):
    models = []
    for checkpointing in (False, True):
        torch.manual_seed(4)
        model = fastprompt.apply(tiny_hf_model(initializer_range=0.2), method, num_classes=3).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(images(), labels=torch.tensor([0, 2])).loss.backward()
        models.append(model)
    plain, checkpointed = ({n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models)
    assert plain.keys() == checkpointed.keys() and len(plain) > 2
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    assert models[1].vit.layers[0].gradient_checkpointing and models[1].is_activation_checkpointing
