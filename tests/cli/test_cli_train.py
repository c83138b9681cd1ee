"""`fastprompt train` says what it did: per-epoch metrics, the best checkpoint, and Ctrl-C that can be resumed."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import CLASSES, FAST, TINY, train_argv, write_image_folder
from PIL import Image

from fastprompt.cli import main
from fastprompt.engine.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return write_image_folder(root / "train", 6), write_image_folder(root / "val", 2, seed=1)


def test_train_prints_each_epoch_and_names_the_best_checkpoint(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(folders, out, "--epochs=3")) == 0
    printed = capsys.readouterr().out
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in printed.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    for line, record in zip(lines, history):  # the numbers on screen are the recorded ones
        assert f"val_loss {record['val_loss']:.4f}" in line and f"val_acc {record['val_acc']:.4f}" in line
    best = max(history, key=lambda r: (r["val_auc"], -r["epoch"]))  # first epoch with the highest val AUC
    assert sum("* best" in line for line in lines) >= 1
    summary = next(line for line in printed.splitlines() if line.startswith("best checkpoint:"))
    assert str(out / "checkpoints" / "best.pt") in summary
    assert f"(epoch {best['epoch']}, best val_auc; " in summary and f"val_auc {best['val_auc']:.4f}" in summary
    payload = read_checkpoint(out / "checkpoints" / "best.pt")
    assert payload["state"]["epoch"] == best["epoch"]


@pytest.mark.parametrize(
    "workers, batch, accum, at, steps",  # Ctrl-C during the first micro-batch of optimizer step `at`
    [(0, 2, 2, 2, 3), (2, 1, 6, 1, 2)],  # with workers: more micro-batches to load after Ctrl-C than are prefetched
)
def test_ctrl_c_saves_mid_epoch_and_prints_the_resume_command(folders, tmp_path, workers, batch, accum, at, steps):
    out = tmp_path / "run"
    flags = ["--epochs=2", f"--batch-size={batch}", f"--grad-accum={accum}", f"--workers={workers}"]
    argv = train_argv(folders, out, *flags)
    code = f"""
    import os, signal, sys
    from fastprompt.engine import core
    split_batch, seen = core.split_batch, []
    def split_then_interrupt(batch, **kwargs):  # Ctrl-C in a terminal: SIGINT to the whole process group
        seen.append(1)
        if len(seen) == {(at - 1) * accum + 1}:
            os.killpg(os.getpgid(0), signal.SIGINT)
        return split_batch(batch, **kwargs)
    core.split_batch = split_then_interrupt
    from fastprompt.cli import main
    sys.exit(main({argv!r}))
    """
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        start_new_session=True,  # its own process group (with its data-loading workers), not pytest's
    )
    assert result.returncode == 130, result.stderr
    assert f"interrupted in epoch 1, after step {at} of {steps}" in result.stderr
    command = next(line for line in result.stderr.splitlines() if line.startswith("resume with: "))
    resume = shlex.split(command.removeprefix("resume with: "))
    assert resume == ["fastprompt", *argv, "--resume"]
    payload = read_checkpoint(out / "checkpoints" / "last.pt")
    assert (payload["state"]["epoch"], payload["state"]["step_in_epoch"]) == (0, at)

    assert main(resume[1:]) == 0  # the printed command continues the run to the end ...
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    if workers:  # augmentation in worker processes draws other random numbers than in-process loading
        return
    reference = tmp_path / "reference"
    assert main(train_argv(folders, reference, *flags)) == 0
    resumed, uninterrupted = (read_checkpoint(p / "checkpoints" / "last.pt")["trainable"] for p in (out, reference))
    for name, value in uninterrupted.items():  # ... to the same parameters as a run never interrupted
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)
    assert CLASSES == tuple(json.loads((out / "config.json").read_text())["engine"]["class_names"])


def test_warnings_name_the_class_and_are_printed_once(folders, tmp_path, capsys):
    train, _ = folders
    val = write_image_folder(tmp_path / "val", 2, seed=3)
    for path in (val / CLASSES[1]).iterdir():  # validation without a single 'malignant' image
        path.unlink()
    (val / CLASSES[1]).rmdir()
    argv = ["train", f"--data={train}", f"--val={val}", *TINY, "--method=linear", *FAST, "--epochs=3"]
    capsys.readouterr()
    assert main([*argv, f"--output-dir={tmp_path / 'run'}"]) == 0
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "single target value" in line]
    assert len(skipped) == 1, err  # three validations, one warning
    assert f"['{CLASSES[1]}']" in skipped[0]


def test_a_dataset_root_with_split_folders_is_refused_before_anything_is_built(tmp_path, capsys, monkeypatch):
    import fastprompt.cli.runs as runs

    monkeypatch.setattr(runs, "make_backbone", lambda *a, **k: pytest.fail("a model was built"))
    root = tmp_path / "chest_xray"
    write_image_folder(root / "train", 3)
    write_image_folder(root / "val", 2, seed=1)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", f"--data={root}", *TINY, "--method=linear", *FAST, f"--output-dir={out}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and f"--data {root / 'train'} --val {root / 'val'}" in errors[0]
    assert not out.exists()


def test_unreadable_images_are_all_listed_in_the_run(tmp_path, capsys):
    """Unreadable files of --data and --val are all in unreadable.csv; images narrower or shorter than one patch
    (either side) are left out of training."""
    data, val = write_image_folder(tmp_path / "data", 4), write_image_folder(tmp_path / "val", 2, seed=1)
    broken = [data / CLASSES[0] / "broken.png", data / CLASSES[1] / "empty.png", val / CLASSES[1] / "cut.png"]
    broken[0].write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    broken[1].write_bytes(b"")
    broken[2].write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    small = [(data / CLASSES[0] / "wide.png", 40, 4), (data / CLASSES[1] / "tall.png", 4, 40)]
    small.append((val / CLASSES[0] / "tall.png", 4, 40))
    for path, width, height in small:  # one side below the 8-pixel patch
        Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(path)
    out = tmp_path / "run"
    assert main(["train", f"--data={data}", f"--val={val}", *TINY, "--method=linear", *FAST, "--epochs=1",
                 f"--output-dir={out}"]) == 0  # fmt: skip
    with open(out / "unreadable.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["path"] for row in rows) == sorted(map(str, broken))
    err = capsys.readouterr().err
    assert f"listed in {out / 'unreadable.csv'}" in err
    assert "skipped 2 image(s) smaller than one 8-pixel patch" in err  # in --data
    assert "skipped 1 image(s) smaller than one 8-pixel patch" in err  # in --val
    config = json.loads((out / "config.json").read_text())
    assert (config["train_size"], config["val_size"]) == (8, 4)  # 4 + 4 readable, full-size; 2 + 2 in --val


def test_evaluate_refuses_other_classes_unless_asked_to_skip(folders, tmp_path, capsys):
    train, val = folders
    out = tmp_path / "run"
    assert main(train_argv(folders, out, "--epochs=1")) == 0
    other = write_image_folder(tmp_path / "other", 2, seed=5)
    (other / "pneumonia").mkdir()
    for index in range(2):
        (other / CLASSES[0] / f"{index}.png").rename(other / "pneumonia" / f"{index}.png")
    argv = ["evaluate", f"--checkpoint={out}", f"--data={other}", "--workers=0", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pneumonia" in err and "benign" in err  # the extra class and the trained class without images
    assert main([*argv, "--skip-unknown-classes"]) == 0
    record = json.loads((out / "evaluate_other.json").read_text())
    assert record["images"] == 2 and record["skipped_unknown_classes"] == {"pneumonia": 2}
