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


TINY = [  # `fastprompt train` model arguments: a 2-block ViT on 32x32 images
    "--model=vit_tiny_patch16_224",
    "--model-kwargs",
    "depth=2",
    "embed_dim=32",
    "num_heads=2",
    "patch_size=8",
    "--img-size=32",
]
CLI_TRAINING = ["--batch-size=4", "--lr=1e-2", "--workers=0", "--backend=torch", "--quiet"]
FAST = ["--epochs=2", *CLI_TRAINING]
CLI_TINY = [*TINY, *CLI_TRAINING]  # trained in seconds; add --epochs


def stop_trainer_at(step: int):
    """A transformers TrainerCallback that ends training after `step` optimizer steps (the checkpoint at `step`
    exists), as a killed job would."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= step
            return control

    return StopAt()


def write_image_folder(root, classes=("benign", "malignant"), per_class: int = 4, *, seed: int = 0, size: int = 40):
    """Class-coloured noisy PNGs: root/<class>/<i>.png; returns root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.normal(90 + 80 * label, 30, (size, size, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def tiny_hf_model(kind: str = "vit", seed: int = 0, **config):
    """A 2-layer Hugging Face ViT or DINOv2 classifier (hidden 32, 4 heads, 3 labels, 4x4 patch grid), in eval."""
    from transformers import Dinov2Config, Dinov2ForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    options = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_labels=3)
    if kind == "vit":
        model = ViTForImageClassification(
            ViTConfig(**options, intermediate_size=64, image_size=32, patch_size=8, **config)
        )
    else:
        model = Dinov2ForImageClassification(
            Dinov2Config(**options, mlp_ratio=2, image_size=28, patch_size=7, **config)
        )
    return model.eval()


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
