"""Small models and tasks shared by the tests."""

from __future__ import annotations

import fastprompt  # noqa: F401  (first: installs the torchvision repair before timm imports torchvision)

# isort: split
import torch
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(img_size: int = 32, patch_size: int = 8, num_classes: int = 4, **kwargs) -> VisionTransformer:
    """A 2-block ViT small enough for CPU tests (embed 32, 4 heads)."""
    torch.manual_seed(0)
    options = dict(
        img_size=img_size, patch_size=patch_size, embed_dim=32, depth=2, num_heads=4, num_classes=num_classes
    )
    options.update(kwargs)
    return VisionTransformer(**options)


def learnable_task(num_classes: int = 4, count: int = 16, img_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose class is a per-class colour shift: learnable in a few steps by any method."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(count) % num_classes
    colours = 2.0 * torch.randn(num_classes, 3, 1, 1, generator=generator)
    images = 0.3 * torch.randn(count, 3, img_size, img_size, generator=generator) + colours[labels]
    return images, labels


def tiny_hf_vit(cls_name: str = "ViTModel", seed: int = 0, **config):
    """A 2-layer Hugging Face ViT (width 32, 4 heads, MLP 64, 32×32 images, patch 8, 3 labels), in eval mode.

    `cls_name` names the transformers class (ViTModel, ViTForImageClassification); `config` overrides ViTConfig.
    """
    import transformers

    torch.manual_seed(seed)
    options = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3, initializer_range=0.2,
    )  # fmt: skip
    model_cls = getattr(transformers, cls_name)
    extra = {"add_pooling_layer": False} if cls_name == "ViTModel" else {}
    return model_cls(transformers.ViTConfig(**{**options, **config}), **extra).eval()
