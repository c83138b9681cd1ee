"""Tiny deterministic Engine runs of the Engine tests, run as a subprocess (SIGKILL, 2 ranks).

Usage: ``python tests/workers/engine_worker.py MODE OUT_DIR`` with MODE ``stall`` (train, then hang inside the data
loader after STALL_AFTER samples of the second epoch so the test can SIGKILL it) or ``dist`` (run under torchrun: train
on the torch and DeepSpeed ZeRO-2 backends and save rank 0's trained parameters).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

import fastprompt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers, when run as a script
from helpers import shuffled, tiny_data, tiny_tuned_vit  # noqa: E402

STALL_AFTER = 24 + 20  # samples read before hanging: epoch 1 (24) + 5 batches of epoch 2 (checkpoint at step 8)


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
    model = tiny_tuned_vit("lora", dropout=0.1)
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


def run_dist(out_dir: Path) -> None:
    """Under torchrun: train with global batch 8 (4 per rank) on both backends; rank 0 saves the parameters."""
    results = {}
    for backend, stage in (("torch", 0), ("deepspeed", 2)):
        engine = fastprompt.Engine(
            tiny_tuned_vit("lora"), lr=1e-2, epochs=2, backend=backend, zero_stage=stage, clip_grad=1.0, progress=False
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
