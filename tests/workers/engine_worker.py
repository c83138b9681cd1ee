"""Tiny deterministic Engine runs shared by the Engine tests and run as a subprocess (SIGKILL, 2 ranks).

Usage: ``python tests/engine_worker.py MODE OUT_DIR`` with MODE ``stall`` (train, then hang inside the data loader
after STALL_AFTER samples of the second epoch so the test can SIGKILL it) or ``dist`` (run under torchrun: train on
the torch and DeepSpeed ZeRO-2 backends and save rank 0's trained parameters).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fastprompt

NUM_CLASSES = 3
STALL_AFTER = 24 + 20  # samples read before hanging: epoch 1 (24) + 5 batches of epoch 2 (checkpoint at step 8)


def tiny_vit(method: str = "lora", seed: int = 0, **options) -> torch.nn.Module:
    """A 2-block ViT on 32x32 inputs with `method` applied; the same weights for the same seed."""
    from timm.models.vision_transformer import VisionTransformer  # after fastprompt's torchvision shim

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=NUM_CLASSES)
    return fastprompt.apply(model, method, num_classes=NUM_CLASSES, **options)


def tiny_data(n: int = 24, seed: int = 1, multilabel: bool = False) -> TensorDataset:
    """Learnable random images: the class shifts the mean of one colour channel."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = torch.randn(n, 3, 32, 32, generator=generator) * 0.5
    images[torch.arange(n), labels] += 1.0
    if multilabel:
        targets = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()
        targets[::2, (labels[::2] + 1) % NUM_CLASSES] = 1.0
        return TensorDataset(images, targets)
    return TensorDataset(images, labels)


class StallingDataset(Dataset):
    """Wraps a dataset; after `after` reads, touches `marker` and sleeps (to be SIGKILLed)."""

    def __init__(self, base: Dataset, after: int, marker: Path) -> None:
        self.base, self.after, self.marker, self.reads = base, after, marker, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        self.reads += 1
        if self.reads > self.after:
            self.marker.touch()
            time.sleep(600)
        return self.base[index]


def resume_engine(out_dir: Path) -> fastprompt.Engine:
    """The Engine configuration of the SIGKILL test (torch backend, dropout on, checkpoint every 2 steps)."""
    model = tiny_vit("lora", dropout=0.1)
    return fastprompt.Engine(
        model,
        lr=1e-2,
        epochs=3,
        warmup_steps=2,
        backend="torch",
        output_dir=out_dir,
        checkpoint_every=2,
        progress=False,
    )


def shuffled(dataset: Dataset, batch_size: int = 4) -> DataLoader:
    """A shuffling loader (the Engine makes its order a function of seed and epoch)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True)


def run_dist(out_dir: Path) -> None:
    """Under torchrun: train with global batch 8 (4 per rank) on both backends; rank 0 saves the parameters."""
    results = {}
    for backend, stage in (("torch", 0), ("deepspeed", 2)):
        engine = fastprompt.Engine(
            tiny_vit("lora"), lr=1e-2, epochs=2, backend=backend, zero_stage=stage, clip_grad=1.0, progress=False
        )
        engine.fit(shuffled(tiny_data(), batch_size=4))
        results[backend] = engine.trainable_state_dict()
    if torch.distributed.get_rank() == 0:
        torch.save(results, out_dir / "dist.pt")


def main() -> None:
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    if mode == "stall":
        engine = resume_engine(out_dir)
        engine.fit(shuffled(StallingDataset(tiny_data(), STALL_AFTER, out_dir / "stalled")))
    elif mode == "dist":
        run_dist(out_dir)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
