"""What evaluate, predict and explain tell a user: which checkpoint, class names, confusion matrix, predictions CSV,
explanation figures with the prediction and a class-discriminative map."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from helpers import CLASSES, FAST, TINY, write_image_folder
from PIL import Image

import fastprompt
from fastprompt.cli import main
from fastprompt.data import load_image, transforms_for_model
from fastprompt.engine.checkpoint import read_checkpoint
from fastprompt.explain import class_evidence


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-epoch EPT run on two classes, and a validation folder."""
    root = tmp_path_factory.mktemp("outputs")
    train, val = write_image_folder(root / "train", 6), write_image_folder(root / "val", 3, seed=1)
    out = root / "run"
    argv = ["train", f"--data={train}", f"--val={val}", *TINY, "--method=ept", "--prompt-length=4", *FAST]
    assert main([*argv, "--epochs=3", f"--output-dir={out}"]) == 0
    return root, out, val


def test_evaluate_names_the_checkpoint_and_never_overwrites(trained, capsys):
    root, out, val = trained
    argv = ["evaluate", f"--checkpoint={out}", f"--data={val}", "--workers=0", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr()
    first = json.loads((out / "evaluate_val.json").read_text())
    best = out / "checkpoints" / "best.pt"
    assert first["checkpoint"] == str(best.resolve())
    assert first["epoch"] == read_checkpoint(best)["state"]["epoch"] and first["step_in_epoch"] == 0
    assert f"checkpoint: {best} (epoch {first['epoch']})" in printed.err
    assert set(first["per_class_auc"]) == {"malignant"}  # binary: the positive class, by name
    assert set(first["per_class_sensitivity"]) == set(CLASSES)
    matrix = np.asarray(first["confusion_matrix"])
    assert matrix.sum() == 6 and matrix.sum(axis=1).tolist() == [3, 3]  # rows are the true classes
    assert first["acc"] == pytest.approx(np.trace(matrix) / 6)
    text = printed.out.split("confusion matrix (rows: true class, columns: predicted class)")[1].splitlines()
    assert text[1].split() == list(CLASSES)
    for line, name, row in zip(text[2:4], CLASSES, matrix):
        assert line.split() == [name, *map(str, row)]
    with Image.open(out / "evaluate_val_confusion.png") as png:
        assert png.format == "PNG"

    assert main([*argv, f"--checkpoint={out / 'checkpoints' / 'last.pt'}"]) == 0  # a second evaluation: new file
    second = json.loads((out / "evaluate_val-2.json").read_text())
    assert second["epoch"] == 3 and json.loads((out / "evaluate_val.json").read_text()) == first
    assert main([*argv, f"--output={out / 'evaluate_val.json'}"]) == 2  # an explicit existing file is refused
    assert "exists (an earlier evaluation)" in capsys.readouterr().err
    assert main([*argv, f"--output={out / 'evaluate_val.json'}", "--overwrite"]) == 0


def test_predict_writes_a_row_per_image_and_matches_the_python_function(trained, tmp_path, capsys):
    root, out, val = trained
    images = sorted(val.rglob("*.png"))
    (val.parent / "extra").mkdir(exist_ok=True)
    broken = val.parent / "extra" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    output = tmp_path / "preds.csv"
    argv = ["predict", f"--checkpoint={out}", "--data", str(val), str(broken), f"--output={output}", "--workers=0"]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "predict" in err and "img" in err  # the progress bar
    assert "1 image(s) could not be read" in err and "broken.png" in err
    with open(output, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "path", "predicted", "probability", "prob_benign", "prob_malignant", "positive_class", "positive_probability",
        "error",
    ]  # fmt: skip
    assert [row["path"] for row in rows] == [str(path.resolve()) for path in [*images, broken]]
    failed = rows.pop()  # the unreadable image has a row: no prediction, and why
    assert failed["predicted"] == failed["probability"] == failed["prob_benign"] == failed["positive_probability"] == ""
    assert "cannot identify image file" in failed["error"], failed  # why it has no prediction
    assert all(row["error"] == "" for row in rows)
    assert all(row["positive_class"] == "malignant" and row["positive_probability"] == row["prob_malignant"]
               for row in rows)  # fmt: skip

    run = fastprompt.load_run(out)  # an independent forward pass of one image
    transform = transforms_for_model(run.model, run.config["img_size"], train=False)
    with torch.no_grad():
        expected = torch.softmax(run.model(transform(load_image(images[4]))[None]), dim=1)[0].tolist()
    assert [float(rows[4][f"prob_{name}"]) for name in CLASSES] == pytest.approx(expected, abs=1e-6)
    assert rows[4]["predicted"] == CLASSES[int(np.argmax(expected))]
    for row in rows:
        probs = [float(row[f"prob_{name}"]) for name in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-6) and float(row["probability"]) == max(probs)

    with pytest.warns(UserWarning, match="broken.png"):
        python_rows = fastprompt.predict_images(out, [*images, broken], progress=False)
    assert python_rows[-1]["probability"] is None and python_rows[-1]["error"] == failed["error"]
    python_rows = python_rows[:-1]
    assert [{k: str(v) for k, v in row.items()} for row in python_rows] == rows  # the same rows from Python
    assert main(argv) == 2 and "exists; pass --overwrite" in capsys.readouterr().err


def test_images_too_large_to_decode_get_a_row_with_the_error(trained, monkeypatch):
    from PIL import Image

    _, out, val = trained
    images = sorted(val.rglob("*.png"))[:3]
    with Image.open(images[0]) as first:
        pixels = first.width * first.height
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels // 3)  # PIL refuses images over twice this
    with pytest.warns(UserWarning, match="3 image"):
        rows = fastprompt.predict_images(out, images, progress=False)
    assert [row["path"] for row in rows] == [str(path.resolve()) for path in images]
    for row in rows:
        assert row["predicted"] == "" and row["probability"] is None
        assert "decompression bomb" in row["error"].lower() and "MAX_IMAGE_PIXELS" in row["error"]


def test_class_evidence_is_per_patch_and_depends_on_image_and_class(trained):
    _, out, val = trained
    run = fastprompt.load_run(out)
    transform = transforms_for_model(run.model, run.config["img_size"], train=False)
    images = torch.stack([transform(load_image(val / name / "0.png")) for name in CLASSES])
    for_first = class_evidence(run.model, images, torch.tensor([0, 0]))
    assert for_first.shape == (2, 4, 4)  # 32-pixel input, 8-pixel patches
    assert (for_first >= 0).all() and for_first.sum() > 0
    assert not torch.allclose(for_first[0], for_first[1])  # another image, another map
    for_second = class_evidence(run.model, images, torch.tensor([1, 1]))
    assert not torch.allclose(for_first, for_second)  # another class, another map

    # gradient × input by hand for one patch: logit of class 0, inputs in the top-left 8×8 patch
    inputs = images[:1].clone().requires_grad_(True)
    run.model(inputs)[0, 0].backward()
    by_hand = (inputs.grad * images[:1]).sum(dim=1)[0, :8, :8].mean().clamp_min(0)
    assert for_first[0, 0, 0] == pytest.approx(float(by_hand), rel=1e-4, abs=1e-9)


def test_explain_shows_the_prediction_and_records_the_checkpoint(trained, tmp_path, capsys, monkeypatch):
    _, out, val = trained
    import fastprompt.explain as explain

    drawn = []
    figure = explain._figure
    monkeypatch.setattr(explain, "_figure", lambda *args: drawn.append(args) or figure(*args))
    image = val / CLASSES[1] / "1.png"
    assert main(["explain", f"--checkpoint={out}", str(image), f"--output-dir={tmp_path}", "--quiet"]) == 0
    picture, kind, maps, vmax, title, prediction, evidence = drawn[0]
    run = fastprompt.load_run(out)
    transform = transforms_for_model(run.model, run.config["img_size"], train=False)
    with torch.no_grad():
        probs = torch.softmax(run.model(transform(load_image(image))[None]), dim=1)[0]
    assert prediction == f"{CLASSES[int(probs.argmax())]} (p = {float(probs.max()):.2f})"
    assert evidence.shape == (4, 4) and set(maps) == {0, 1} and vmax is None
    record = json.loads((tmp_path / "explain.json").read_text())
    assert record["checkpoint"] == str((out / "checkpoints" / "best.pt").resolve())
    assert record["epoch"] == read_checkpoint(out / "checkpoints" / "best.pt")["state"]["epoch"]
    with Image.open(tmp_path / "1_explain.png") as png:
        assert png.format == "PNG"


def test_ept_layers_share_one_colour_scale(monkeypatch):
    import matplotlib.axes

    import fastprompt.explain as explain

    limits = []
    imshow = matplotlib.axes.Axes.imshow

    def record(self, data, *args, **kwargs):
        if kwargs.get("cmap") == "inferno":
            limits.append((kwargs["vmin"], kwargs["vmax"]))
        return imshow(self, data, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", record)
    maps = {0: np.full((2, 2), 0.2), 3: np.array([[0.5, 0.9], [0.7, 0.6]])}
    png = explain._figure(np.zeros((16, 16, 3)), "EPT patch-wise scale", maps, None, "x.png", "a (p = 0.90)",
                          np.ones((2, 2)))  # fmt: skip
    assert limits == [(0.2, 0.9), (0.2, 0.9)]
    assert png[:4] == b"\x89PNG"
    assert "share of each patch's attention output kept" in explain.EPT_MEANING
