"""explain for every model: Hugging Face backbones (EPT, LoRA, FPT+) and methods without a map of their own (LoRA,
VPT, ...), whose map is the attention each patch receives at the last layer; transforms_for_model on HF models."""

from __future__ import annotations

import pytest
import torch
from helpers import images, tiny_hf_model, tiny_vit
from PIL import Image

import fastprompt
from fastprompt.data import build_transforms, transforms_for_model
from fastprompt.explain import ATTENTION_KIND, EPT_KIND, FPT_KIND, attention_received, explain_images, explain_maps

transformers = pytest.importorskip("transformers")
from transformers import ViTForImageClassification, ViTImageProcessor  # noqa: E402

IMG, PATCH = 32, 8


def hf_vit(**kwargs) -> ViTForImageClassification:
    return tiny_hf_model(initializer_range=0.2, **kwargs)


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Move every trainable tensor away from its init (LoRA starts as the pretrained model)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("size", [IMG, 2 * IMG])
def test_attention_received_on_hf_lora_is_hugging_faces_own_attention(size):
    """Against the eager attention probabilities Hugging Face returns (output_attentions), LoRA's q/k included."""
    model = perturb(fastprompt.apply(hf_vit(attn_implementation="eager"), "lora", rank=2))
    x = images(size)
    received = attention_received(model, x)
    with torch.no_grad():
        probs = model(x, output_attentions=True, interpolate_pos_encoding=True).attentions[-1]  # [B, H, N, N]
    assert list(received) == [1]
    torch.testing.assert_close(received[1], probs.mean(dim=2).mean(dim=1), atol=1e-5, rtol=1e-5)


def test_attention_received_on_timm_lora_matches_a_float64_softmax():
    """q and k taken from the fused qkv projection's own output (hooked during the real forward), then a
    materialised float64 softmax, row mean, head mean."""
    model = perturb(fastprompt.apply(tiny_vit(), "lora", rank=2)).eval()
    attn = model.blocks[-1].attn
    outputs = []
    handle = attn.qkv.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    x = images()
    received = attention_received(model, x)
    with torch.no_grad():
        model(x)
    handle.remove()
    qkv = outputs[-1].double().reshape(2, -1, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    probs = (qkv[0] @ qkv[1].transpose(-1, -2) * attn.head_dim**-0.5).softmax(dim=-1)
    torch.testing.assert_close(received[1].double(), probs.mean(dim=2).mean(dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("build", "kind", "layers"),
    [
        (lambda: fastprompt.apply(hf_vit(), "ept", prompt_length=4), EPT_KIND, [0, 1]),
        (lambda: fastprompt.apply(hf_vit(), "lora", rank=2), ATTENTION_KIND, [1]),
        (lambda: fastprompt.apply(hf_vit(), "vpt", num_tokens=3), ATTENTION_KIND, [1]),
        (lambda: fastprompt.apply(hf_vit(), "fpt+", num_classes=3, side_input_size=16), FPT_KIND, [1]),
        (lambda: fastprompt.apply(tiny_vit(num_classes=3), "lora", rank=2), ATTENTION_KIND, [1]),
        (lambda: fastprompt.apply(tiny_vit(num_classes=3), "adapter"), ATTENTION_KIND, [1]),
    ],
    ids=["hf-ept", "hf-lora", "hf-vpt", "hf-fpt+", "timm-lora", "timm-adapter"],
)
def test_explain_images_draws_every_method_on_timm_and_hf(build, kind, layers, tmp_path):
    model = build()
    hf_non_fpt = fastprompt.methods.hf.is_hf_model(model)
    size = 2 * IMG if hf_non_fpt else IMG  # an HF ViT at twice its config size: interpolate_pos_encoding
    got_kind, maps, _ = explain_maps(model, images(size))
    assert got_kind == kind and sorted(maps) == layers
    grid = size // PATCH
    assert all(tuple(m.shape) == (2, grid, grid) for m in maps.values())
    if kind == ATTENTION_KIND:  # the patches' share of attention: positive, and < 1 per patch (CLS takes some)
        assert all(bool(((m > 0) & (m < 1)).all()) for m in maps.values())
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"scan{i}.png")
        Image.fromarray((torch.rand(40, 40, 3).numpy() * 255).astype("uint8")).save(paths[-1])
    hf_model = hf_non_fpt or kind == FPT_KIND  # the FPT case wraps an HF backbone; tiny_vit has no pretrained_cfg
    transform = transforms_for_model(model, size, train=False) if hf_model else build_transforms(size, train=False)
    written = explain_images(model, paths, tmp_path / "out", transform, classes=["a", "b", "c"])
    assert [path.name for path in written] == ["scan0_explain.png", "scan1_explain.png"]
    with Image.open(written[0]) as png:
        assert png.format == "PNG" and png.width > 200


def test_transforms_for_hf_models_read_the_saved_image_processor(tmp_path):
    model = hf_vit()
    plain = transforms_for_model(model, IMG, train=False)  # no processor file: google/vit-*'s ViTImageProcessor
    normalize = plain.transforms[-2]
    assert list(normalize.mean) == [0.5] * 3 and list(normalize.std) == [0.5] * 3
    assert "BILINEAR" in repr(plain)
    model.save_pretrained(tmp_path)
    ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], resample=3).save_pretrained(tmp_path)
    loaded = ViTForImageClassification.from_pretrained(tmp_path)
    fpt = fastprompt.apply(loaded.vit, "fpt+", num_classes=3, side_input_size=16)  # through the FPT wrapper
    saved = transforms_for_model(fpt, IMG, train=False)
    normalize = saved.transforms[-2]
    assert list(normalize.mean) == pytest.approx([0.1, 0.2, 0.3]) and list(normalize.std) == pytest.approx(
        [0.4, 0.5, 0.6]
    )
    assert "BICUBIC" in repr(saved)
    pixels = saved(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert tuple(pixels.shape) == (3, IMG, IMG)
    torch.testing.assert_close(
        pixels[:, 0, 0], (torch.tensor([1.0, 0, 0]) - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([0.4, 0.5, 0.6])
    )
