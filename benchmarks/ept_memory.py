"""Bytes saved for backward in one EPT training step: fused sink attention vs the official materialised attention.

python -m benchmarks.ept_memory          # ViT-B/16 (random weights) at 512×512, batch 1, P = 100 on all 12 layers
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import fastprompt
from benchmarks import results
from fastprompt.profiling import saved_tensor_bytes

ATTENTIONS = ("fused", "official")
LIMIT = 0.25


def step_saved_bytes(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes autograd saves during one training step (forward, cross-entropy, backward) of `model`."""

    def step() -> None:
        F.cross_entropy(model(images), labels).backward()

    return saved_tensor_bytes(step, exclude=model)


def measure(img_size: int, batch: int, prompt_length: int) -> dict[str, int]:
    """Saved bytes of one EPT step per attention path, on one randomly initialised ViT-B/16 (frozen backbone)."""
    import timm  # after fastprompt, whose import repairs the torchvision that timm imports

    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", img_size=img_size, num_classes=2)
    images = torch.randn(batch, 3, img_size, img_size)
    labels = torch.zeros(batch, dtype=torch.long)
    saved = {}
    for attention in tqdm(ATTENTIONS, desc="EPT saved bytes", unit="path"):
        model = fastprompt.apply(copy.deepcopy(base), "ept", prompt_length=prompt_length, attention=attention)
        saved[attention] = step_saved_bytes(model, images, labels)
        del model
    return saved


def main(argv: list[str] | None = None) -> Path:
    """Measure both paths, write the result record, print the figures; return the record's path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=100)
    parser.add_argument("--output", type=Path, default=results.default_output_dir() / "cpu" / "ept_saved_bytes.json")
    args = parser.parse_args(argv)
    saved = measure(args.img_size, args.batch, args.prompt_length)
    ratio = saved["fused"] / saved["official"]
    config = {
        "model": "vit_base_patch16_224 (random weights)",
        "img_size": args.img_size,
        "batch": args.batch,
        "prompt_length": args.prompt_length,
        "prompt_layers": "all 12",
        "dtype": "float32",
        "trainable": "prompts + classifier (backbone frozen)",
        "step": "forward + cross-entropy + backward",
        "measure": "fastprompt.profiling.saved_tensor_bytes(step, exclude=model)",
    }
    rows = [{"attention": name, "saved_bytes": saved[name]} for name in ATTENTIONS]
    notes = [f"fused / official = {ratio:.4f} (target <= {LIMIT})"]
    record = results.run_record("ept_saved_bytes", "cpu", config, rows, notes)
    record["summary"] = {
        "fused_bytes": saved["fused"],
        "official_bytes": saved["official"],
        "ratio": ratio,
        "limit": LIMIT,
        "passes": ratio <= LIMIT,
    }
    path = results.write_record(record, args.output)
    print(f"fused {saved['fused']:,} B, official {saved['official']:,} B, ratio {ratio:.4f} -> {path}")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
