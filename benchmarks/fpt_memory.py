"""Bytes saved for backward: one FPT+ training step from cached features against full fine-tuning.

ViT-B/16 (`vit_base_patch16_384` at 512×512, random weights, 5 classes), batch 1, fp32, CPU. Run
`python -m benchmarks.fpt_memory` to write benchmarks/results/cpu/fpt_saved_bytes.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import fastprompt
from benchmarks.results import default_output_dir, run_record, write_record
from fastprompt import FPT
from fastprompt.profiling import saved_tensor_bytes

MODEL = "vit_base_patch16_384"
LIMIT_RATIO = 0.05


def vit_b(image_size: int, **kwargs: Any) -> torch.nn.Module:
    """Randomly initialised ViT-B/16 (384 pretraining config) at `image_size`."""
    import timm  # imported after fastprompt, whose shim lets timm import torchvision on CPU torch

    return timm.create_model(MODEL, img_size=image_size, **kwargs)


def full_finetune_bytes(image_size: int = 512, batch: int = 1, num_classes: int = 5) -> int:
    """Bytes saved for backward by a full fine-tuning forward + loss (every parameter trainable)."""
    torch.manual_seed(0)
    model = vit_b(image_size, num_classes=num_classes).train()
    images = torch.randn(batch, 3, image_size, image_size)
    labels = torch.arange(batch) % num_classes
    return saved_tensor_bytes(lambda: F.cross_entropy(model(images), labels), exclude=model)


def fpt_cached_bytes(
    variant: str = "fpt+",
    image_size: int = 512,
    batch: int = 1,
    num_classes: int = 5,
    dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:
    """Bytes saved for backward by one FPT training step (fusion + side ViT) from cached features of `dtype`."""
    torch.manual_seed(0)
    backbone = vit_b(image_size)
    model = FPT(backbone, num_classes, variant=variant).train()
    heads = backbone.blocks[0].attn.num_heads
    shape = (batch, len(model.layers), heads, model.num_selected_tokens(), backbone.embed_dim // heads)
    features = {"keys": torch.randn(shape).to(dtype), "values": torch.randn(shape).to(dtype)}
    side_images = torch.randn(batch, 3, model.side_input_size, model.side_input_size)
    labels = torch.arange(batch) % num_classes

    def step() -> torch.Tensor:
        return F.cross_entropy(model.forward_features_cached(features, side_images), labels)

    return {
        "saved_bytes": saved_tensor_bytes(step, exclude=model),
        "feature_shape": list(shape),
        "feature_dtype": str(dtype).removeprefix("torch."),
        "side_input_size": model.side_input_size,
        "trainable_parameters": fastprompt.count_parameters(model)[0],
    }


def measure(image_size: int = 512, batch: int = 1) -> dict[str, Any]:
    """Both figures and their ratio."""
    fpt_plus = fpt_cached_bytes("fpt+", image_size=image_size, batch=batch)
    full = full_finetune_bytes(image_size=image_size, batch=batch)
    return {"fpt+_cached": fpt_plus, "full_finetune_saved_bytes": full, "ratio": fpt_plus["saved_bytes"] / full}


def main(argv: list[str] | None = None) -> Path:
    """Measure and write the result record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=default_output_dir() / "cpu" / "fpt_saved_bytes.json")
    args = parser.parse_args(argv)
    result = measure(args.image_size, args.batch)
    fpt_plus = result["fpt+_cached"]
    rows = [
        {"method": "fpt+ (cached features)", **fpt_plus},
        {"method": "full fine-tuning", "saved_bytes": result["full_finetune_saved_bytes"]},
        {"method": "ratio fpt+/full", "ratio": result["ratio"], "limit": LIMIT_RATIO},
    ]
    config = {"model": MODEL, "image_size": args.image_size, "batch": args.batch, "num_classes": 5, "dtype": "float32"}
    notes = ["saved_tensor_bytes: storages saved for backward, de-duplicated, parameters excluded"]
    path = write_record(run_record("fpt_memory", "cpu", config, rows, notes), args.out)
    print(
        f"FPT+ from cache: {fpt_plus['saved_bytes'] / 1e6:.2f} MB; full fine-tuning: "
        f"{result['full_finetune_saved_bytes'] / 1e6:.1f} MB; ratio {result['ratio']:.4f} (limit {LIMIT_RATIO})"
    )
    print(f"written to {path}")
    return path


if __name__ == "__main__":
    main()
