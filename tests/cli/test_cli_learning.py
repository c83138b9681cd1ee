"""The command line must learn: `python -m fastprompt train` on a separable synthetic task reaches a clearly better
than chance validation accuracy and a validation loss well below chance, with the seed fixed; `evaluate` reproduces
it; `explain` writes its figures, and the EPT map it draws has the token grid's shape and depends on the image.

Commands run as ``python -m fastprompt ...`` (in this process, through runpy), so the tests do not depend on how the
CLI is laid out inside the package.
"""

from __future__ import annotations

import json
import math
import runpy
import sys
import types

import numpy as np
import pytest
import torch
from helpers import TINY  # the tiny ViT's command-line arguments
from PIL import Image

CLASSES = ("blue", "red")
GRID = (4, 4)  # 32-pixel images in 8-pixel patches


def fastprompt_cli(*argv: str) -> int:
    """Run ``python -m fastprompt *argv`` in this process; its exit code."""
    saved = sys.argv
    sys.argv = ["fastprompt", *argv]
    try:
        runpy.run_module("fastprompt", run_name="__main__", alter_sys=False)
    except SystemExit as done:
        return 0 if done.code is None else int(done.code) if isinstance(done.code, int) else 1
    finally:
        sys.argv = saved
    return 0


def write_task(root, per_class: int, seed: int):
    """Noisy 32×32 PNGs whose class is a colour cast (red up and blue down, or the reverse) of ±50 on a noise of
    std 40: separable, but not from any single pixel."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.normal(128.0, 40.0, (32, 32, 3))
            sign = 1.0 if label == 1 else -1.0
            pixels[..., 0] += 50.0 * sign
            pixels[..., 2] -= 50.0 * sign
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An EPT run of 4 epochs on 2 × 16 training images, validated on 2 × 8 others (seed 0)."""
    root = tmp_path_factory.mktemp("learn")
    train, val = write_task(root / "train", 16, seed=0), write_task(root / "val", 8, seed=1)
    run = root / "run"
    argv = ["train", f"--data={train}", f"--val={val}", *TINY, "--method=ept", "--prompt-length=4"]
    argv += ["--epochs=4", "--batch-size=8", "--lr=1e-2", "--seed=0", "--workers=0", "--backend=torch", "--quiet"]
    assert fastprompt_cli(*argv, f"--output-dir={run}") == 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return types.SimpleNamespace(root=root, train=train, val=val, run=run, history=history)


def test_train_learns_the_task(trained):
    history = trained.history
    assert [record["epoch"] for record in history] == [1, 2, 3, 4]
    final = history[-1]
    chance_loss = math.log(len(CLASSES))
    assert final["val_acc"] >= 0.9, history
    assert final["val_auc"] >= 0.95, history
    assert final["val_loss"] < 0.5 * chance_loss, history  # confident and right, not a lucky threshold
    assert final["train_loss"] < 0.5 * history[0]["train_loss"], history


def test_evaluate_reproduces_the_learned_metrics(trained, tmp_path):
    """`evaluate` on the last checkpoint gives the last epoch's validation metrics (same images, same model)."""
    output = tmp_path / "eval.json"
    last = trained.run / "checkpoints" / "last.pt"
    argv = ["evaluate", f"--checkpoint={last}", f"--data={trained.val}", f"--output={output}", "--workers=0"]
    assert fastprompt_cli(*argv, "--quiet") == 0
    evaluated, final = json.loads(output.read_text()), trained.history[-1]
    assert evaluated["acc"] == final["val_acc"] >= 0.9
    assert evaluated["loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    assert evaluated["loss"] < 0.5 * math.log(len(CLASSES))


def test_explain_writes_a_figure_per_image_and_its_map_depends_on_the_image(trained, tmp_path):
    from fastprompt.data import transforms_for_model
    from fastprompt.data.images import load_image
    from fastprompt.explain import explain_maps
    from fastprompt.serialization import load_run

    images = [
        trained.val / CLASSES[0] / "0.png",
        trained.val / CLASSES[1] / "0.png",
        trained.val / CLASSES[1] / "1.png",
    ]
    out = tmp_path / "explain"
    assert (
        fastprompt_cli("explain", f"--checkpoint={trained.run}", *map(str, images), f"--output-dir={out}", "--quiet")
        == 0
    )
    figures = sorted(out.glob("*.png"))
    assert len(figures) == len(images)
    for figure in figures:
        with Image.open(figure) as png:
            assert png.format == "PNG"

    run = load_run(trained.run)
    transform = transforms_for_model(run.model, 32, train=False)  # what explain feeds the model
    pixels = torch.stack([transform(load_image(path)) for path in images])
    kind, maps, _ = explain_maps(run.model, pixels)
    assert kind.startswith("EPT")
    assert sorted(maps) == [0, 1]  # every block is prompted by default
    for layer, grid in maps.items():
        assert grid.shape == (len(images), *GRID), layer
        assert torch.isfinite(grid).all() and ((grid > 0) & (grid < 1)).all(), layer  # σ(lse − g) is a share
        for a in range(len(images)):
            for b in range(a + 1, len(images)):
                assert not torch.allclose(grid[a], grid[b], rtol=0, atol=1e-6), f"layer {layer}: images {a}, {b}"
    again = explain_maps(run.model, pixels)[1]
    assert all(torch.equal(again[layer], maps[layer]) for layer in maps)  # a function of the image, not of chance
