"""Subprocess side of the crash-safety tests: a tiny training run or FPT preload that gets SIGKILLed.

Usage: ``python tests/workers/reliability_worker.py MODE OUT_DIR [KILL]``.

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

import fastprompt
import fastprompt.engine.checkpoint
import fastprompt.io

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers, when run as a script
from helpers import feature_images, shuffled, tiny_data, tiny_fpt, tiny_tuned_vit  # noqa: E402


def make_engine(out_dir: Path | None, **overrides) -> fastprompt.Engine:
    """The crash-test configuration: LoRA with dropout (uses the RNG), warm-up + cosine, checkpoint every step."""
    model = tiny_tuned_vit("lora", dropout=0.1)
    options = dict(lr=1e-2, epochs=2, warmup_steps=2, backend="torch", checkpoint_every=1, progress=False)
    return fastprompt.Engine(model, output_dir=out_dir, **{**options, **overrides})


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
    engine.fit(shuffled(tiny_data()), resume=True)
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
