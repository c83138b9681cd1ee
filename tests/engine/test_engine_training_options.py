"""Engine training options of issue 20: positive class, CSV/TensorBoard logs, patience, run extension, imbalance."""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch
from helpers import tiny_vit
from torch.utils.data import DataLoader, Dataset

import fastprompt
from fastprompt.engine import CheckpointError, Engine
from fastprompt.engine.checkpoint import read_checkpoint
from fastprompt.engine.data import EpochSampler
from fastprompt.engine.report import write_curves


class Labelled(Dataset):
    """Tiny images whose class shifts one colour channel, with `targets` and `classes` like a folder dataset."""

    def __init__(self, labels, classes=("abnormal", "normal"), seed=1):
        generator = torch.Generator().manual_seed(seed)
        self.targets, self.classes = list(labels), list(classes)
        self.images = torch.randn(len(self.targets), 3, 32, 32, generator=generator) * 0.5
        self.images[torch.arange(len(self.targets)), torch.tensor(self.targets)] += 1.0
        self.seen: list[int] = []

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        self.seen.append(int(index))
        return self.images[index], self.targets[index]


def model2(seed=0):
    torch.manual_seed(seed)
    return fastprompt.apply(tiny_vit(num_classes=2), "linear", num_classes=2)


def engine(**options):
    options.setdefault("progress", False)
    options.setdefault("backend", "torch")
    options.setdefault("lr", 1e-2)
    return Engine(model2(), **options)


def loader(dataset, shuffle=True, batch_size=4):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


BALANCED = [0, 1] * 6


def test_evaluate_names_the_classes_of_the_dataset_and_the_default_positive_class(capsys):
    metrics = engine().evaluate(loader(Labelled(BALANCED), shuffle=False))
    assert metrics["positive_class"] == "abnormal" and list(metrics["per_class_auc"]) == ["abnormal"]
    assert set(metrics["per_class_sensitivity"]) == {"abnormal", "normal"}
    assert "positive class: abnormal ('normal' is a recognised negative class" in capsys.readouterr().err


def test_an_unknown_positive_class_names_the_classes():
    with pytest.raises(ValueError, match=r"'covid' is not one of the classes \['abnormal', 'normal'\]"):
        engine(class_names=["abnormal", "normal"], positive_class="covid")


def test_every_metrics_row_carries_the_positive_class_and_the_csv_matches_the_jsonl(tmp_path):
    data = Labelled(BALANCED)
    eng = engine(epochs=3, output_dir=tmp_path, positive_class="normal")
    eng.fit(loader(data), loader(Labelled(BALANCED, seed=2), shuffle=False))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    with open(tmp_path / "metrics.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(rows) == len(table) == 3
    for row, line in zip(rows, table):
        assert row["positive_class"] == line["positive_class"] == "normal"
        for key in (
            "epoch",
            "train_loss",
            "val_loss",
            "val_auc",
            "val_sensitivity",
            "val_sensitivity_at_90_specificity",
        ):
            assert float(line[key]) == pytest.approx(row[key], rel=1e-12)


def test_tensorboard_log_holds_the_epoch_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    eng = engine(epochs=2, output_dir=tmp_path, loggers=["csv", "tensorboard"])
    history = eng.fit(loader(Labelled(BALANCED)), loader(Labelled(BALANCED, seed=2), shuffle=False))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("train_loss", "val_auc", "val_specificity"):
        logged = events.Scalars(key)
        assert [event.step for event in logged] == [1, 2]
        assert [event.value for event in logged] == pytest.approx([record[key] for record in history], rel=1e-6)


def test_missing_tensorboard_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'fastprompt\[tensorboard\]'"):
        engine(output_dir=tmp_path, loggers="tensorboard")
    with pytest.raises(ValueError, match="unknown logger"):
        engine(loggers=["wandb"])


def test_patience_stops_when_the_metric_stops_improving_and_keeps_the_best(tmp_path, capsys):
    # lr 0: the validation loss never changes, so epoch 1 stays the best and 2 more epochs exhaust patience 2
    eng = engine(epochs=10, lr=0.0, output_dir=tmp_path, patience=2, monitor="loss")
    history = eng.fit(loader(Labelled(BALANCED)), loader(Labelled(BALANCED, seed=2), shuffle=False))
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert eng.state.best.epoch == 1
    assert read_checkpoint(tmp_path / "checkpoints" / "best.pt")["state"]["epoch"] == 1
    assert "early stopping after epoch 3: val_loss has not improved for 2 epoch(s)" in capsys.readouterr().err


def test_patience_keeps_training_while_the_metric_improves():
    eng = engine(epochs=4, lr=1e-2, patience=1, monitor="loss")
    history = eng.fit(loader(Labelled(BALANCED)), loader(Labelled(BALANCED), shuffle=False))
    losses = [record["val_loss"] for record in history]
    stop = next((i + 1 for i in range(1, len(losses)) if losses[i] >= min(losses[:i])), 4)
    assert len(history) == stop  # stops at the first epoch that fails to improve on the best so far, else runs all


def test_patience_without_validation_says_validation_is_needed():
    with pytest.raises(ValueError, match="patience=3 stops on a validation metric: pass val_loader"):
        engine(patience=3).fit(loader(Labelled(BALANCED)))


def _lr_after_epoch(epoch, steps_per_epoch, epochs, base=1e-2):
    step = epoch * steps_per_epoch - 1  # the last optimizer step of the epoch (0-based)
    return base * 0.5 * (1 + math.cos(math.pi * step / (epochs * steps_per_epoch)))


def test_resume_with_more_epochs_extends_the_run_and_recomputes_the_schedule(tmp_path, capsys):
    data = Labelled(BALANCED)  # 12 samples, batch 4: 3 steps per epoch
    first = engine(epochs=2, output_dir=tmp_path).fit(loader(data))
    assert [r["lr"] for r in first] == pytest.approx([_lr_after_epoch(e, 3, 2) for e in (1, 2)])
    longer = engine(epochs=4, output_dir=tmp_path)
    history = longer.fit(loader(data), resume=True)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert [r["lr"] for r in history[2:]] == pytest.approx([_lr_after_epoch(e, 3, 4) for e in (3, 4)])
    err = capsys.readouterr().err
    assert "extending the run from 2 to 4 epochs: the learning-rate schedule is recomputed for 4 epochs" in err
    with pytest.raises(CheckpointError, match=r"\(4 epochs\), this run has 3 \(1 epochs\)"):
        engine(epochs=1, output_dir=tmp_path).fit(loader(data), resume=True)


def test_class_weights_of_the_wrong_length_name_the_class_count():
    with pytest.raises(ValueError, match=r"class_weights has 3 values but there are 2 classes \(abnormal, normal\)"):
        engine(class_names=["abnormal", "normal"], class_weights=[1, 2, 3])
    eng = engine(class_weights=[1.0, 2.0, 3.0])  # no class names: found at the first loss
    with pytest.raises(ValueError, match="class_weights has 3 values but the model has 2 classes"):
        eng.fit(loader(Labelled(BALANCED)))


def test_class_weights_weight_the_cross_entropy():
    data = Labelled(BALANCED)
    eng = engine(class_weights=[0.25, 3.0])
    logits = eng.predict(loader(data, shuffle=False)).double().numpy()
    targets = np.asarray(data.targets)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    weight = np.array([0.25, 3.0])[targets]
    expected = -(weight * log_p[np.arange(len(targets)), targets]).sum() / weight.sum()
    assert eng.evaluate(loader(data, shuffle=False))["loss"] == pytest.approx(expected, rel=1e-5)


def test_auto_class_weights_are_inverse_frequency():
    data = Labelled([0] * 9 + [1] * 3)  # N 12, C 2: 12 / (2 * 9), 12 / (2 * 3)
    eng = engine(epochs=1, class_weights="auto")
    eng.fit(loader(data))
    assert eng.config.class_weights == pytest.approx([12 / 18, 2.0])


def test_balanced_sampler_draws_the_classes_equally_often():
    data = Labelled([0] * 12 + [1] * 4)
    engine(epochs=6, balanced_sampler=True).fit(loader(data))
    minority = sum(data.targets[i] for i in data.seen) / len(data.seen)
    assert len(data.seen) == 6 * 16 and 0.4 < minority < 0.6  # without the sampler: exactly 0.25
    sampler = EpochSampler(16, shuffle=True, seed=3, weights=[1 / 12] * 12 + [1 / 4] * 4)
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(2, start=5)
    assert list(sampler) == first[5:]  # a function of (seed, epoch) that can start mid-epoch: resumable


def test_learning_curves_tick_whole_epochs_only(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    write_curves(tmp_path / "curves.png", [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}])
    for ax in figures[0].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_resume_with_another_method_or_classes_names_the_difference(tmp_path):
    data = Labelled(BALANCED)
    engine(epochs=1, output_dir=tmp_path).fit(loader(data))
    other = Engine(fastprompt.apply(tiny_vit(num_classes=2), "bitfit", num_classes=2), output_dir=tmp_path, epochs=2,
                   backend="torch", progress=False)  # fmt: skip
    with pytest.raises(CheckpointError, match="method 'linear' in the checkpoint, 'bitfit' now"):
        other.fit(loader(data), resume=True)
    renamed = engine(epochs=2, output_dir=tmp_path, class_names=["covid", "normal"])
    with pytest.raises(
        CheckpointError, match=r"classes \['abnormal', 'normal'\] in the checkpoint, \['covid', 'normal'\] now"
    ):
        renamed.fit(loader(data), resume=True)


def test_a_loaded_engine_keeps_the_class_names_and_the_positive_class(tmp_path):
    eng = engine(class_names=["covid", "normal"], positive_class="normal")
    eng.save(tmp_path / "engine.pt")
    loaded = Engine.load(tmp_path / "engine.pt", model2())
    metrics = loaded.evaluate(loader(torch.utils.data.TensorDataset(Labelled(BALANCED).images, torch.tensor(BALANCED))))
    assert metrics["positive_class"] == "normal" and list(metrics["per_class_auc"]) == ["normal"]
