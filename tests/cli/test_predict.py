"""predict_images maps every probability row to its own file across batches, and a multi-label run gets independent
per-class sigmoids; both are compared with the model run by hand on one image at a time."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

import fastprompt
from fastprompt.data import transforms_for_model
from fastprompt.data.images import load_image
from fastprompt.models import create_backbone

CLASSES = ("a", "b", "c")


def loaded_run(multilabel: bool) -> types.SimpleNamespace:
    """What load_run returns, for a tiny EPT model with a large random head (probabilities far from uniform)."""
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2, patch_size=8)
    model = fastprompt.apply(backbone, "ept", num_classes=len(CLASSES), prompt_length=4)
    with torch.no_grad():
        model.head.weight.normal_(std=1.0)
        model.head.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
    config = {"img_size": 32, "multilabel": multilabel}
    return types.SimpleNamespace(model=model.eval(), classes=list(CLASSES), config=config)


@pytest.fixture
def files(tmp_path):
    """Seven PNGs, each a different colour, so every file has its own probabilities."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        pixels = (rng.uniform(0, 255, (1, 1, 3)) + rng.normal(0, 20, (32, 32, 3))).clip(0, 255).astype(np.uint8)
        path = tmp_path / f"{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def by_hand(run, path) -> torch.Tensor:
    """Logits of one image alone, in float64."""
    transform = transforms_for_model(run.model, 32, train=False)
    with torch.no_grad():
        return run.model(transform(load_image(path))[None])[0].double()


@pytest.mark.parametrize("batch_size", [2, 3])
def test_each_row_belongs_to_its_own_file_across_batches(files, batch_size):
    run = loaded_run(multilabel=False)
    order = [files[i] for i in (3, 0, 6, 1, 5, 2, 4)]  # not the sorted order: rows follow the input order
    rows = fastprompt.predict_images(run, order, batch_size=batch_size, progress=False, device="cpu")
    assert [row["path"] for row in rows] == [str(path.resolve()) for path in order]
    got_rows = []
    for row, path in zip(rows, order):
        expected = torch.softmax(by_hand(run, path), dim=0)
        got = torch.tensor([row[f"prob_{name}"] for name in CLASSES], dtype=torch.float64)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert row["predicted"] == CLASSES[int(expected.argmax())]
        got_rows.append(got)
    gaps = torch.cdist(torch.stack(got_rows), torch.stack(got_rows)) + torch.eye(len(files))
    assert gaps.min() > 1e-3  # the files' rows really differ, so a row given to the wrong file shows


def test_multilabel_rows_are_independent_sigmoids(files):
    run = loaded_run(multilabel=True)
    rows = fastprompt.predict_images(run, files, batch_size=4, progress=False, device="cpu")
    assert len(rows) == len(files)
    sums = []
    for row, path in zip(rows, files):
        logits = by_hand(run, path)
        expected = 1.0 / (1.0 + torch.exp(-logits))  # each class on its own
        got = torch.tensor([row[f"prob_{name}"] for name in CLASSES], dtype=torch.float64)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert row["predicted"] == ";".join(name for name, p in zip(CLASSES, expected.tolist()) if p >= 0.5)
        assert row["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
        sums.append(float(got.sum()))
    assert max(abs(total - 1.0) for total in sums) > 0.1  # not a softmax over classes
