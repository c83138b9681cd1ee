"""`fastprompt train/evaluate/predict` on folders abnormal/ and normal/: the positive class, logs, training options."""

from __future__ import annotations

import csv
import importlib.util
import json
import re

import pytest
from helpers import FAST, TINY, train_argv, write_image_folder

from fastprompt.cli import main

CLASSES = ("abnormal", "normal")
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # the optional extra
LOGGERS = ["csv", "tensorboard"] if HAS_TENSORBOARD else ["csv"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clinical")
    return write_image_folder(root / "train", 6, classes=CLASSES), write_image_folder(
        root / "val", 3, classes=CLASSES, seed=1
    )


@pytest.fixture(scope="module")
def run(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    flags = ["--logger", *LOGGERS, "--class-weights=auto", "--positive-class=normal"]
    assert main(train_argv(folders, out, *flags)) == 0
    return out


def test_default_run_on_abnormal_and_normal_reports_abnormal_with_a_line_saying_so(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(folders, out)) == 0
    captured = capsys.readouterr()
    assert "positive class: abnormal ('normal' is a recognised negative class; change it with --positive-class" in (
        captured.err
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["positive_class"] == "abnormal"
    # the headline sensitivity is abnormal's: TP / (TP + FN) counted from the confusion matrix (row 0: abnormal)
    (tp, fn), (fp, tn) = metrics["confusion_matrix"]
    assert metrics["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert metrics["specificity"] == pytest.approx(tn / (tn + fp))
    assert re.search(r"^positive class +abnormal$", captured.out, re.MULTILINE)  # the metrics table names it
    assert json.loads((out / "config.json").read_text())["engine"]["positive_class"] == "abnormal"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["positive_class"] for row in rows] == ["abnormal", "abnormal"]
    with open(out / "metrics.csv", newline="") as handle:
        assert [row["positive_class"] for row in csv.DictReader(handle)] == ["abnormal", "abnormal"]


def test_evaluate_and_predict_reuse_the_recorded_positive_class_unless_overridden(run, folders, tmp_path, capsys):
    _, val = folders
    argv = ["evaluate", f"--checkpoint={run}", f"--data={val}", "--workers=0"]
    assert main([*argv, f"--output={tmp_path / 'a.json'}"]) == 0
    assert "positive class: normal (recorded by the run; change it with --positive-class NAME)" in (
        capsys.readouterr().err
    )
    recorded = json.loads((tmp_path / "a.json").read_text())
    assert recorded["positive_class"] == "normal"  # the run's choice, not the default (abnormal)
    assert main([*argv, f"--output={tmp_path / 'b.json'}", "--positive-class=abnormal"]) == 0
    other = json.loads((tmp_path / "b.json").read_text())
    assert other["positive_class"] == "abnormal"
    assert (other["sensitivity"], other["specificity"]) == pytest.approx(
        (recorded["specificity"], recorded["sensitivity"])
    )
    assert main([*argv, f"--output={tmp_path / 'c.json'}", "--positive-class=covid"]) == 2
    assert "'covid' is not one of the classes ['abnormal', 'normal']" in capsys.readouterr().err
    output = tmp_path / "preds.csv"
    assert main(["predict", f"--checkpoint={run}", "--data", str(val), f"--output={output}", "--workers=0"]) == 0
    with open(output, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(r["positive_class"] == "normal" and r["positive_probability"] == r["prob_normal"] for r in rows)


def test_the_run_records_loggers_and_class_weights_and_writes_tensorboard(run):
    config = json.loads((run / "config.json").read_text())
    assert config["engine"]["loggers"] == LOGGERS
    assert config["engine"]["class_weights"] == pytest.approx([1.0, 1.0])  # 6 and 6 images: N / (C * n_c) = 1
    assert config["engine"]["balanced_sampler"] is False
    recorded = json.loads((run / "metrics.json").read_text())["positive_class"]
    assert config["engine"]["positive_class"] == recorded == "normal"
    if HAS_TENSORBOARD:
        assert any(path.name.startswith("events.out.tfevents") for path in (run / "tensorboard").iterdir())


def test_auto_class_weights_come_from_the_training_images(tmp_path, capsys):
    train = write_image_folder(tmp_path / "train", {"abnormal": 2, "normal": 6}, classes=CLASSES)
    val = write_image_folder(tmp_path / "val", 2, classes=CLASSES, seed=1)
    out = tmp_path / "run"
    argv = ["train", f"--data={train}", f"--val={val}", *TINY, "--method=linear", *FAST, f"--output-dir={out}"]
    assert main([*argv, "--class-weights=auto", "--balanced-sampler", "--patience=1"]) == 0
    assert "class weights (auto: N / (classes x n)): abnormal 2, normal 0.667" in capsys.readouterr().err
    engine = json.loads((out / "config.json").read_text())["engine"]
    assert engine["class_weights"] == pytest.approx([8 / (2 * 2), 8 / (2 * 6)])
    assert engine["balanced_sampler"] is True and engine["patience"] == 1


def test_class_weights_of_the_wrong_length_name_the_class_count(folders, tmp_path, capsys):
    assert main(train_argv(folders, tmp_path / "run", "--class-weights=1,2,3")) == 2
    assert "--class-weights has 3 values but the data has 2 classes (abnormal, normal)" in capsys.readouterr().err
    assert main(train_argv(folders, tmp_path / "run", "--class-weights=heavy")) == 2
    assert "expected auto, none or numbers" in capsys.readouterr().err


def test_resume_with_more_epochs_continues_the_run(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(folders, out)) == 0  # FAST: 2 epochs
    assert main([*train_argv(folders, out), "--epochs=3", "--resume"]) == 0
    assert "extending the run from 2 to 3 epochs" in capsys.readouterr().err
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_predict_images_in_python_reuses_the_run_positive_class(run, folders):
    import fastprompt

    rows = fastprompt.predict_images(run, folders[1], progress=False)
    assert rows and all(row["positive_class"] == "normal" for row in rows)
    assert all(row["positive_probability"] == row["prob_normal"] for row in rows)
    with pytest.raises(ValueError, match=r"positive_class 'covid' must be one of the classes \['abnormal', 'normal'\]"):
        fastprompt.predict_images(run, folders[1], progress=False, positive_class="covid")


def test_resume_with_another_method_names_the_method(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(folders, out, "--epochs=1")) == 0
    argv = [arg if arg != "--method=linear" else "--method=bitfit" for arg in train_argv(folders, out, "--resume")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "method: the run has 'linear', now 'bitfit'" in err and len(err.strip().splitlines()) == 1, err


def test_logger_tensorboard_without_the_package_prints_the_install_hint(folders, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    assert main(train_argv(folders, tmp_path / "run", "--logger", "tensorboard")) == 2
    assert "pip install 'fastprompt[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written
