"""Subprocess side of the crash-safety tests: a tiny training run or FPT preload that gets SIGKILLed.

Usage: ``python tests/reliability_worker.py MODE OUT_DIR [KILL]``.

- ``train``: `Engine.fit(resume=True)` of a 2-block LoRA ViT (torch backend, a checkpoint after every step) in
  OUT_DIR. Touches OUT_DIR/started after the first optimizer step, and OUT_DIR/done when fit returns.
- ``preload``: fills the FPT feature cache OUT_DIR/cache with 12 images, two at a time.
- ``lock``: takes the run-folder lock of OUT_DIR, touches OUT_DIR/locked, and sleeps until killed.

KILL makes the process SIGKILL itself at a chosen point: ``write:N:FRACTION`` inside the N-th atomic file write
(checkpoint or cache entry), after FRACTION of its bytes reached the temporary file; ``loss:N`` during the N-th
training forward (between the forward and the backward of that step).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import fastprompt
import fastprompt.engine.checkpoint
import fastprompt.io

NUM_CLASSES = 3
IMG = 32


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """A 2-block ViT (embed 32, 4 heads) on 32x32 inputs; the same weights for the same seed."""
    from timm.models.vision_transformer import VisionTransformer  # after fastprompt's torchvision shim

    torch.manual_seed(seed)
    return VisionTransformer(img_size=IMG, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=NUM_CLASSES)


def train_data(count: int = 24) -> DataLoader:
    """A shuffling loader over learnable random images (class = colour-channel shift)."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(count) % NUM_CLASSES
    images = torch.randn(count, 3, IMG, IMG, generator=generator) * 0.5
    images[torch.arange(count), labels] += 1.0
    return DataLoader(TensorDataset(images, labels), batch_size=4, shuffle=True)


def make_engine(out_dir: Path | None, **overrides) -> fastprompt.Engine:
    """The crash-test configuration: LoRA with dropout (uses the RNG), warm-up + cosine, checkpoint every step."""
    model = fastprompt.apply(tiny_vit(), "lora", num_classes=NUM_CLASSES, dropout=0.1)
    options = dict(lr=1e-2, epochs=2, warmup_steps=2, backend="torch", checkpoint_every=1, progress=False)
    return fastprompt.Engine(model, output_dir=out_dir, **{**options, **overrides})


def feature_images(count: int = 12) -> torch.Tensor:
    return torch.randn(count, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))


def tiny_fpt() -> torch.nn.Module:
    """An FPT+ wrapper around a headless tiny ViT (layers 0 and 1, 16-pixel side input)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=IMG, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)
    return fastprompt.FPT(backbone, NUM_CLASSES, layers=[0, 1], side_input_size=16)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_inside_write(number: int, fraction: float) -> None:
    """Patch every atomic write so that the `number`-th one dies after `fraction` of its bytes."""
    real_open = fastprompt.io.atomic_open
    writes = {"count": 0}

    @contextlib.contextmanager
    def dying_open(path, mode="wb"):
        writes["count"] += 1
        with real_open(path, mode) as handle:
            if writes["count"] != number:
                yield handle
                return

            class Dying:
                def write(self, data: bytes) -> int:
                    cut = int(len(data) * fraction)
                    handle.write(data[:cut])
                    handle.flush()
                    os.fsync(handle.fileno())
                    die()

            yield Dying()

    fastprompt.io.atomic_open = dying_open
    fastprompt.engine.checkpoint.atomic_open = dying_open


class LossThatDies:
    """Cross-entropy that SIGKILLs the process on its `number`-th call."""

    def __init__(self, number: int) -> None:
        self.number, self.calls = number, 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.number:
            die()
        return torch.nn.functional.cross_entropy(logits, targets)


def run_train(out_dir: Path, kill: list[str]) -> None:
    overrides = {"loss": LossThatDies(int(kill[1]))} if kill and kill[0] == "loss" else {}
    engine = make_engine(out_dir, **overrides)
    started = out_dir / "started"
    real_step = torch.optim.AdamW.step

    def step_and_mark(optimizer, *args, **kwargs):
        result = real_step(optimizer, *args, **kwargs)
        started.touch()
        return result

    torch.optim.AdamW.step = step_and_mark
    engine.fit(train_data(), resume=True)
    (out_dir / "done").touch()


def run_preload(out_dir: Path) -> None:
    from fastprompt.data import FeatureCache, preload

    preload(tiny_fpt(), feature_images(), FeatureCache(out_dir / "cache"), batch_size=2, progress=False)
    (out_dir / "done").touch()


def hold_lock(out_dir: Path) -> None:
    import time

    from fastprompt.runlock import run_lock

    with run_lock(out_dir):
        (out_dir / "locked").touch()
        time.sleep(600)


def main() -> None:
    torch.set_num_threads(1)
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    kill = sys.argv[3].split(":") if len(sys.argv) > 3 else []
    if kill and kill[0] == "write":
        kill_inside_write(int(kill[1]), float(kill[2]))
    if mode == "train":
        run_train(out_dir, kill)
    elif mode == "preload":
        run_preload(out_dir)
    elif mode == "lock":
        hold_lock(out_dir)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
