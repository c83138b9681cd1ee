"""FPT / FPT+: exact parameter counts, frozen backbone, token selection, side branch, training, memory."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import fpt_reference_features, images, small_backbone, small_fpt

import fastprompt
from fastprompt import FPT
from fastprompt.explain import fpt_token_counts

EMBED, HEADS, DEPTH, IMG, PATCH = 64, 4, 4, 32, 8


def expected_trainable(variant, *, embed, side, layers, prompts, channels, patch, side_size, classes) -> int:
    """The parameter formula of fastprompt/methods/fpt.py's docstring."""
    tokens = (side_size // patch) ** 2 + 1
    side_vit = (channels * patch**2 * side + side) + side + tokens * side + layers * (12 * side**2 + 13 * side)
    side_vit += 2 * side + side * classes + classes
    if variant == "fpt+":
        fusion = layers * prompts * embed + 2 * embed + embed * side + side
    else:
        fusion = layers * prompts * side + side * embed + embed + embed * side + side
    return side_vit + fusion


@pytest.mark.parametrize(("variant", "published"), [("fpt+", 900_965), ("fpt", 1_602_341)])
def test_vit_b_parameter_counts_match_the_papers(variant, published):
    with torch.device("meta"):  # the architecture only: no weights, no forward
        backbone = timm.create_model("vit_base_patch16_384", img_size=512)
        model = fastprompt.apply(backbone, variant, num_classes=5)
    layers = 6 if variant == "fpt+" else 12
    side_size = 128 if variant == "fpt+" else 224
    formula = expected_trainable(
        variant, embed=768, side=96, layers=layers, prompts=16, channels=3, patch=16, side_size=side_size, classes=5
    )
    trainable, total = fastprompt.count_parameters(model)
    assert trainable == formula == published
    assert total == trainable + sum(p.numel() for p in backbone.parameters())
    assert model.layers == list(range(12 - layers, 12)) and model.num_selected_tokens() == 205


@pytest.mark.parametrize("variant", ["fpt+", "fpt"])
def test_tiny_parameter_count_follows_the_formula(variant):
    model = small_fpt(variant, num_prompts=5)
    layers = 2 if variant == "fpt+" else 4
    assert model.layers == list(range(DEPTH - layers, DEPTH))
    formula = expected_trainable(
        variant, embed=EMBED, side=8, layers=layers, prompts=5, channels=3, patch=PATCH, side_size=16, classes=3
    )
    assert fastprompt.count_parameters(model)[0] == formula


def test_backbone_stays_frozen_and_in_eval():
    model = small_fpt().train()
    assert model.training and model.fusion.dropout.training and model.side.training
    assert not any(module.training for module in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.train(True)
    assert not model.backbone.training


def test_only_fusion_and_side_receive_gradients():
    model = small_fpt().train()
    F.cross_entropy(model(images(seed=2)), torch.tensor([0, 2])).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert {name.split(".")[0] for name, _ in trainable} == {"fusion", "side"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)


@pytest.mark.parametrize("mode", ["global", "cls"])
def test_token_selection_matches_the_materialised_reference(mode):
    model = small_fpt(layers=[0, 2], token_importance=mode, token_ratio=0.3)
    x = images(seed=2)
    features = model.extract_features(x, return_indices=True)
    keys, values, indices = fpt_reference_features(model.backbone, x, [0, 2], 0.3, mode)
    assert features["keys"].shape == (2, 2, HEADS, int(17 * 0.3), EMBED // HEADS)
    torch.testing.assert_close(features["keys"], keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features["values"], values, rtol=1e-5, atol=1e-5)
    assert torch.equal(features["indices"], indices)
    counts = fpt_token_counts(model, x)  # what `fastprompt explain` draws: heads keeping each token
    for position, layer in enumerate([0, 2]):
        expected = torch.zeros(2, 17).scatter_add_(1, indices[:, position].reshape(2, -1), torch.ones(2, HEADS * 5))
        assert torch.equal(counts[layer], expected)


def test_cls_and_global_importance_select_different_tokens():
    x = images(seed=2)
    by_mode = {mode: small_fpt(token_importance=mode).extract_features(x)["keys"] for mode in ("global", "cls")}
    assert not torch.equal(by_mode["global"], by_mode["cls"])


def test_frozen_forward_stops_after_the_last_extracted_layer():
    model = small_fpt(layers=[1])
    calls = []
    for i, block in enumerate(model.backbone.blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: calls.append(i))
        block.mlp.register_forward_pre_hook(lambda module, args, i=i: calls.append(f"mlp{i}"))
    model.extract_features(images(seed=2))
    assert calls == [0, "mlp0"]  # block 0 runs whole; block 1 only up to its keys and scores; blocks 2-3 never


def test_cached_features_give_the_online_logits():
    model = small_fpt().eval()
    x = images(seed=2)
    online = model(x)
    features = {name: tensor.clone() for name, tensor in model.extract_features(x).items()}
    cached = model.forward_features_cached(features, model.resize_for_side(x))
    torch.testing.assert_close(cached, online, rtol=0, atol=0)


def test_side_images_given_or_resized_from_the_input():
    model = small_fpt().eval()
    x = images(seed=2)
    resized = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(model(x, side_images=resized), model(x), rtol=0, atol=0)
    assert not torch.allclose(model(x, side_images=torch.randn_like(resized)), model(x))
    larger = F.interpolate(x, size=(24, 24), mode="bilinear", antialias=True)  # other sizes: pos-embed resampled
    assert model(x, side_images=larger).shape == (2, 3)


def test_dropout_is_active_in_training_only():
    model = small_fpt().train()
    features = model.extract_features(images(seed=2))
    prompts = [model.fusion(features["keys"], features["values"]) for _ in range(2)]
    assert not torch.equal(prompts[0], prompts[1])
    model.eval()
    torch.testing.assert_close(model.fusion(features["keys"], features["values"]), model.fusion(**features))


@pytest.mark.parametrize("variant", ["fpt+", "fpt"])
def test_learns_a_tiny_task_through_the_frozen_features(variant):
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(12) % 3
    colours = 2.0 * torch.randn(3, 3, 1, 1, generator=generator)
    x = 0.3 * torch.randn(12, 3, IMG, IMG, generator=generator) + colours[labels]
    model = small_fpt(variant).train()
    features = model.extract_features(x)
    noise = torch.randn(12, 3, 16, 16, generator=generator)  # side images carry no label: fusion must learn
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model.forward_features_cached(features, noise), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    fresh_noise = torch.randn(12, 3, 16, 16, generator=generator)
    accuracy = (model.eval().forward_features_cached(features, fresh_noise).argmax(-1) == labels).float().mean()
    assert accuracy >= 0.9


def test_apply_returns_the_same_wrapper():
    model = fastprompt.apply(small_backbone(), "fpt+", num_classes=3, side_input_size=16, num_prompts=4)
    assert isinstance(model, FPT) and model.fastprompt_method == "fpt+" and model.variant == "fpt+"
    assert model.fusion.prompts.shape == (2, 4, EMBED) and model.fusion.norm is not None
    fpt = fastprompt.apply(small_backbone(), "fpt", num_classes=3, side_input_size=16)
    assert fpt.fusion.prompts.shape == (4, 16, 8) and fpt.fusion.query_proj is not None and fpt.fusion.norm is None
    assert float(fpt.fusion.prompts.detach().std()) < 1e-5


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"variant": "vpt"}, ValueError, "variant"),
        ({"side_width": 10}, ValueError, "divisible"),
        ({"token_ratio": 0.0}, ValueError, "token_ratio"),
        ({"token_importance": "mean"}, ValueError, "token_importance"),
        ({"layers": [9]}, ValueError, "out of range"),
        ({"num_prompts": 0}, ValueError, "num_prompts"),
    ],
)
def test_invalid_options_are_named(options, error, message):
    with pytest.raises(error, match=message):
        FPT(small_backbone(), 3, **options)


def test_too_small_token_ratio_is_explained():
    with pytest.raises(ValueError, match="ratio"):
        small_fpt(token_ratio=0.01).extract_features(images(seed=2))


@pytest.mark.slow
def test_cached_training_step_saves_under_5_percent_of_full_finetuning():
    from benchmarks.fpt_memory import LIMIT_RATIO, measure

    result = measure(image_size=512, batch=1)
    assert result["fpt+_cached"]["feature_shape"] == [1, 6, 12, 205, 64]
    assert 500e6 < result["full_finetune_saved_bytes"] < 700e6
    assert result["ratio"] <= LIMIT_RATIO


@pytest.mark.gpu
def test_fpt_plus_cached_training_peak_memory_at_or_below_the_published_736_mb():
    torch.manual_seed(0)
    model = FPT(timm.create_model("vit_base_patch16_384", img_size=512), 5).cuda().train()
    shape = (16, 6, 12, 205, 64)
    features = {name: torch.randn(shape, device="cuda", dtype=torch.bfloat16) for name in ("keys", "values")}
    side_images = torch.randn(16, 3, 128, 128, device="cuda")
    labels = torch.arange(16, device="cuda") % 5
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second step holds optimizer state too
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model.forward_features_cached(features, side_images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() <= 736 * 2**20
