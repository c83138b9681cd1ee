"""Run folders you can trust: no code from a checkpoint, one writer per run, resumes that refuse before writing,
a best checkpoint that is never silently replaced by last (issue 21)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import CLI_TINY, TESTS, WORKERS, learnable_task, tiny_vit, write_image_folder
from torch.utils.data import DataLoader, TensorDataset

import fastprompt
from fastprompt import serialization
from fastprompt.cli import main
from fastprompt.engine.checkpoint import (
    DIGEST_LEN,
    MAGIC,
    CheckpointError,
    read_checkpoint,
    restore_best,
    write_checkpoint,
)
from fastprompt.engine.state import BestEpoch
from fastprompt.runlock import LOCK_FILE, RunLockedError, run_lock

LEGACY = TESTS / "fixtures" / "legacy_pickle_checkpoint.pt"  # written by the code at 8a8e2e7
WORKER = WORKERS / "reliability_worker.py"


def raw_payload_bytes(path: Path) -> bytes:
    return path.read_bytes()[len(MAGIC) + DIGEST_LEN + 1 :]


def write_raw(path: Path, payload: object) -> None:
    """A checkpoint file with a valid header and checksum around any pickle (what an attacker can write)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path.write_bytes(MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)


class Planted:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def folder_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` except the lock file (which holds the last writer's PID)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != LOCK_FILE
    }


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch CLI run (linear head on a random-init tiny ViT) with its data folders."""
    root = tmp_path_factory.mktemp("runs")
    data = write_image_folder(root / "train", per_class=4)
    val = write_image_folder(root / "val", per_class=2, seed=1)
    out = root / "run"
    argv = ["train", f"--data={data}", f"--val={val}", *CLI_TINY, "--method=linear", "--epochs=1"]
    assert main([*argv, f"--output-dir={out}"]) == 0
    return {"root": root, "data": data, "val": val, "run": out, "argv": argv}


def copy_run(trained, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    return run


# ------------------------------------------------------------------------------------------------ 1. no code


def test_new_checkpoints_are_plain_data_that_torch_reads_with_weights_only(tmp_path):
    x, y = learnable_task(num_classes=4, count=8)
    engine = fastprompt.Engine(fastprompt.apply(tiny_vit(), "lora", num_classes=4), epochs=1, backend="torch",
                               progress=False, output_dir=tmp_path)  # fmt: skip
    engine.fit(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True))
    # torch's own safe loader, without fastprompt's reader or any allow-list
    payload = torch.load(io.BytesIO(raw_payload_bytes(tmp_path / "checkpoints" / "last.pt")), weights_only=True)
    assert isinstance(payload["rng"][0]["python"]["state"], torch.Tensor)
    assert isinstance(payload["rng"][0]["numpy"]["keys"], torch.Tensor)
    assert set(payload["trainable"]) == set(engine.trainable_state_dict())


def test_the_legacy_pickled_checkpoint_loads_only_with_trust(tmp_path):
    with pytest.raises(CheckpointError, match=r"numpy.*trust=True \(CLI: --trust-checkpoint\)"):
        read_checkpoint(LEGACY)
    model = fastprompt.apply(tiny_vit(depth=1, embed_dim=16, num_heads=2, num_classes=2), "linear", num_classes=2)
    with pytest.raises(CheckpointError, match="trust"):
        fastprompt.Engine.load(LEGACY, model)
    with pytest.warns(RuntimeWarning, match="full pickle"):
        engine = fastprompt.Engine.load(LEGACY, model, trust=True)
    expected = torch.load(io.BytesIO(raw_payload_bytes(LEGACY)), weights_only=False)["trainable"]
    for name, value in expected.items():
        assert torch.equal(dict(engine.model.named_parameters())[name].detach(), value)


def test_a_planted_checkpoint_runs_no_code_on_any_reading_path(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "code_ran"
    payload = read_checkpoint(run / "checkpoints" / "last.pt")
    payload["config"]["lr"] = Planted(marker)
    for name in ("best.pt", "last.pt", "prev.pt"):
        write_raw(run / "checkpoints" / name, payload)
    last = run / "checkpoints" / "last.pt"
    config = json.loads((run / "config.json").read_text())

    attempts = {
        "engine read_checkpoint": lambda: read_checkpoint(last),
        "fastprompt.read_checkpoint": lambda: fastprompt.read_checkpoint(run),
        "load_run": lambda: fastprompt.load_run(run),
        "Engine.load": lambda: fastprompt.Engine.load(last, serialization.build_run_model(config, run)),
        "Engine.fit(resume=True)": lambda: fastprompt.Engine(
            serialization.build_run_model(config, run), output_dir=run, epochs=1, progress=False
        ).fit(DataLoader(TensorDataset(*learnable_task(2, 4)), batch_size=4), resume=True),
    }
    for where, attempt in attempts.items():
        with pytest.raises(CheckpointError, match="trust"):
            attempt()
        assert not marker.exists(), where
    image = next(trained["val"].rglob("*.png"))
    commands = {
        "evaluate": ["evaluate", f"--checkpoint={run}", f"--data={trained['val']}", "--workers=0", "--quiet"],
        "predict": ["predict", f"--checkpoint={run}", f"--data={image}", f"--output={tmp_path / 'p.csv'}", "--quiet"],
        "explain": ["explain", f"--checkpoint={run}", str(image), f"--output-dir={tmp_path / 'ex'}"],
        "train --resume": [*trained["argv"], f"--output-dir={run}", "--resume"],
    }
    for where, argv in commands.items():
        code, err = run_cli(capsys, argv)
        assert code == 2 and "--trust-checkpoint" in err and "Traceback" not in err, (where, err)
        assert not marker.exists(), where
    # the file is really hostile: trusting it runs the code
    with pytest.warns(RuntimeWarning, match="full pickle"):
        read_checkpoint(last, trust=True)
    assert marker.exists()


# ------------------------------------------------------------------------------------------------ 2. one writer


def test_a_second_writer_is_refused_naming_the_pid_until_the_holder_dies(trained, tmp_path, capsys):
    folder = tmp_path / "locked_run"
    holder = subprocess.Popen([sys.executable, str(WORKER), "lock", str(folder)])
    try:
        deadline = time.monotonic() + 120
        while not (folder / "locked").exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
            time.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"), run_lock(folder):
            pass
        assert time.monotonic() - started < 1.0  # refused at once, not after waiting
        code, err = run_cli(capsys, [*trained["argv"], f"--output-dir={folder}"])
        assert code == 2 and f"PID {holder.pid}" in err and "Traceback" not in err
        assert not (folder / "config.json").exists()
        engine = fastprompt.Engine(fastprompt.apply(tiny_vit(), "linear", num_classes=4), output_dir=folder,
                                   epochs=1, progress=False)  # fmt: skip
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            engine.fit(DataLoader(TensorDataset(*learnable_task(4, 4)), batch_size=4))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(folder) as path:  # the OS released it: no stale lock
        assert path.read_text().strip() == str(os.getpid())


# ------------------------------------------------------------------------------------------------ 3. resume


@pytest.mark.parametrize(
    "change, named",
    [
        (["--method=bitfit"], "method"),
        (["--img-size=48"], "img_size"),
        (["--seed=1"], "seed"),
        (["--lr=0.5"], "engine.lr"),
        ("renamed classes", "engine.class_names"),
    ],
)
def test_a_refused_resume_changes_no_file(trained, tmp_path, capsys, change, named):
    run = copy_run(trained, tmp_path)
    before = folder_digest(run)
    argv = [*trained["argv"], f"--output-dir={run}", "--resume"]
    if change == "renamed classes":  # benign, malignant -> a_malignant, b_benign: the label indices swap
        data = tmp_path / "renamed"
        shutil.copytree(trained["data"] / "malignant", data / "a_malignant")
        shutil.copytree(trained["data"] / "benign", data / "b_benign")
        val = tmp_path / "renamed_val"
        shutil.copytree(trained["val"] / "malignant", val / "a_malignant")
        shutil.copytree(trained["val"] / "benign", val / "b_benign")
        argv = [arg.replace(str(trained["data"]), str(data)).replace(str(trained["val"]), str(val)) for arg in argv]
    else:
        argv += change
    code, err = run_cli(capsys, argv)
    assert code == 2 and "Traceback" not in err, err
    assert named in err and "nothing was written" in err, err
    assert folder_digest(run) == before


def test_a_resume_with_the_same_settings_keeps_config_and_records_itself(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    config = (run / "config.json").read_bytes()
    code, err = run_cli(capsys, [*trained["argv"], f"--output-dir={run}", "--resume"])
    assert code == 0, err
    assert (run / "config.json").read_bytes() == config
    (entry,) = [json.loads(line) for line in (run / "resume_history.jsonl").read_text().splitlines()]
    assert entry["from_epoch"] == 1 and entry["changes"] == {}


def test_safe_resume_changes_are_returned_for_the_history_and_others_refused():
    from fastprompt.cli.common import UsageError
    from fastprompt.cli.train import check_resume

    recorded = {"method": "lora", "engine": {"epochs": 2, "lr": 0.1}, "classes": ["a", "b"], "trainable_parameters": 5}
    assert check_resume(recorded, {**recorded, "engine": {"epochs": 4, "lr": 0.1}}) == {"engine.epochs": [2, 4]}
    newer = {**recorded, "engine": {"epochs": 2, "lr": 0.1, "patience": 3}}  # an option this run predates
    assert check_resume(recorded, newer) == {"engine.patience": [None, 3]}
    with pytest.raises(UsageError, match=r"classes: the run has \['a', 'b'\], now \['b', 'a'\]"):
        check_resume(recorded, {**recorded, "classes": ["b", "a"]})


def test_a_changed_random_init_backbone_is_refused_on_load_and_resume(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    assert len(json.loads((run / "config.json").read_text())["weights"]["sha256"]) == 64
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / "backbone.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, run / "backbone.safetensors")
    with pytest.raises(serialization.WeightsError, match="changed since training"):
        fastprompt.load_run(run)
    before = folder_digest(run)
    code, err = run_cli(capsys, [*trained["argv"], f"--output-dir={run}", "--resume"])
    assert code == 2 and "backbone.safetensors changed" in err, err
    assert folder_digest(run) == before


def test_a_lora_rank_mismatch_is_one_line(tmp_path):
    x, y = learnable_task(num_classes=4, count=4)
    engine = fastprompt.Engine(fastprompt.apply(tiny_vit(), "lora", num_classes=4, rank=4), epochs=1,
                               backend="torch", progress=False)  # fmt: skip
    engine.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    engine.save(tmp_path / "r4.pt")
    with pytest.raises(CheckpointError, match=r"\[4, 32\] in the checkpoint but \[8, 32\] in the model"):
        fastprompt.Engine.load(tmp_path / "r4.pt", fastprompt.apply(tiny_vit(), "lora", num_classes=4, rank=8))


# ------------------------------------------------------------------------------------------------ 4. best


def engine_run(out: Path, epochs: int = 1) -> tuple[fastprompt.Engine, DataLoader, DataLoader]:
    x, y = learnable_task(num_classes=4, count=8)
    model = fastprompt.apply(tiny_vit(), "linear", num_classes=4)
    engine = fastprompt.Engine(model, output_dir=out, epochs=epochs, backend="torch", progress=False, lr=1e-2)
    return engine, DataLoader(TensorDataset(x, y), batch_size=4), DataLoader(TensorDataset(x, y), batch_size=4)


def test_a_best_checkpoint_lost_in_its_write_is_rewritten_on_resume(tmp_path, monkeypatch):
    import fastprompt.engine.core as core

    engine, train, val = engine_run(tmp_path)

    def failing(path, payload):
        if Path(path).name == "best.pt":
            raise CheckpointError("disk full")
        write_checkpoint(path, payload)

    monkeypatch.setattr(core, "write_checkpoint", failing)
    with pytest.raises(CheckpointError, match="disk full"):
        engine.fit(train, val)
    monkeypatch.undo()
    best = tmp_path / "checkpoints" / "best.pt"
    assert not best.exists()
    with pytest.raises(CheckpointError, match=r"best\.pt is missing.*epoch 1.*checkpoint='last'"):
        fastprompt.read_checkpoint(tmp_path)  # never last in its place without saying so

    engine, train, val = engine_run(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"best\.pt is missing.*rewrote it from last\.pt"):
        engine.fit(train, val, resume=True)
    last = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    restored = read_checkpoint(best)
    assert restored["state"]["epoch"] == last["state"]["best"]["epoch"] == 1
    for name, value in last["trainable"].items():
        assert torch.equal(restored["trainable"][name], value)


def test_a_best_that_cannot_be_rebuilt_is_said_plainly_and_tracked_again(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    write_checkpoint(directory / "last.pt", {"state": {"epoch": 3, "step_in_epoch": 0}})
    write_checkpoint(directory / "prev.pt", {"state": {"epoch": 2, "step_in_epoch": 5}})
    best = BestEpoch(metric="val_auc", value=0.9, epoch=2)
    with pytest.warns(RuntimeWarning, match=r"best epoch 2 \(val_auc 0.9\) is left: that model is lost"):
        assert restore_best(directory, best, [directory / "last.pt", directory / "prev.pt"], write=True) is None
    assert not (directory / "best.pt").exists()
    (directory / "best.pt").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="does not verify"):
        restore_best(directory, best, [directory / "last.pt"], write=True)


def test_a_run_without_any_best_uses_last_with_a_warning(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    write_checkpoint(directory / "last.pt", {"state": {"epoch": 2, "best": None}, "trainable": {}})
    with pytest.warns(RuntimeWarning, match=r"no best checkpoint .*using .*last\.pt \(epoch 2\)"):
        fastprompt.read_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------ 5. Engine messages


@pytest.mark.parametrize("label", [4, 7, -1])
def test_a_label_outside_the_classes_is_named_with_the_class_count(label):
    x, y = learnable_task(num_classes=4, count=8)
    y[5] = label
    engine = fastprompt.Engine(fastprompt.apply(tiny_vit(), "linear", num_classes=4), epochs=1, progress=False)
    with pytest.raises(ValueError, match=rf"label {label} is outside the model's 4 classes"):
        engine.fit(DataLoader(TensorDataset(x, y), batch_size=4))


def test_an_all_ignored_batch_is_named_not_blamed_on_the_learning_rate():
    x, _ = learnable_task(num_classes=4, count=4)
    engine = fastprompt.Engine(fastprompt.apply(tiny_vit(), "linear", num_classes=4), epochs=1, progress=False)
    with pytest.raises(fastprompt.engine.NonFiniteLossError, match="every label in this batch is -100") as error:
        engine.fit(DataLoader(TensorDataset(x, torch.full((4,), -100)), batch_size=4))
    assert "learning rate" not in str(error.value)


def test_an_empty_loader_says_it_yielded_no_batches():
    x, y = learnable_task(num_classes=4, count=3)
    engine = fastprompt.Engine(fastprompt.apply(tiny_vit(), "linear", num_classes=4), epochs=1, progress=False)
    with pytest.raises(ValueError, match="yielded no batches") as error:
        engine.fit(DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True))
    assert "grad_accum" not in str(error.value)


# ------------------------------------------------------------------------------------------------ weights files


def rewrite_record(path: Path, edit) -> None:
    """Rewrite a save_trainable file's record (the tensors, and so their digest, unchanged)."""
    from safetensors.torch import load_file, save_file

    from fastprompt.io import safetensors_metadata

    record = json.loads(safetensors_metadata(path.read_bytes())["fastprompt"])
    text = edit(record)
    save_file(load_file(path), path, metadata={"fastprompt": text if isinstance(text, str) else json.dumps(record)})
    path.with_suffix(".json").unlink(missing_ok=True)


@pytest.fixture
def weights_file(tmp_path):
    from fastprompt.models import create_backbone

    model = fastprompt.apply(
        create_backbone("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2, patch_size=8),
        "linear",
        num_classes=2,
    )
    return fastprompt.save_trainable(model, tmp_path / "w.safetensors")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda record: record.pop("weights") and None, "no 'weights' entry"),
        (lambda record: record.pop("method") and None, "no 'method' entry"),
        (lambda record: record.update(method=["lora"]), "'method' is a list"),
        (lambda record: '{"format": "fastprompt-trainable", "x": ' + "[" * 200_000 + "]" * 200_000 + "}", "deeply"),
    ],
)
def test_a_damaged_weights_record_is_a_weights_error_naming_the_file(weights_file, edit, message):
    rewrite_record(weights_file, edit)
    with pytest.raises(serialization.WeightsError, match=rf"w\.safetensors.*{message}"):
        fastprompt.load(weights_file)


@pytest.mark.parametrize(
    "backbone, fetched",
    [
        ({"library": "transformers", "class": "transformers.ViTModel", "name": "someone/planted-vit"},
         "the Hugging Face repo 'someone/planted-vit'"),
        ({"library": "timm", "name": "vit_small_patch16_224", "img_size": [32, 32]},
         "timm's pretrained weights for 'vit_small_patch16_224' (Hugging Face repo 'timm/"),
    ],
)  # fmt: skip
def test_load_fetches_the_recorded_backbone_only_when_allowed(weights_file, tmp_path, monkeypatch, backbone, fetched):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a download attempt would fail, not hang
    import socket

    connections = []
    real_connect = socket.socket.connect
    monkeypatch.setattr(
        socket.socket, "connect", lambda sock, address: connections.append(address) or real_connect(sock, address)
    )
    rewrite_record(weights_file, lambda record: record.update(backbone=backbone))
    started = time.monotonic()
    with pytest.raises(serialization.WeightsError, match=rf"{re.escape(fetched)}.*allow_download=True"):
        fastprompt.load(weights_file)
    assert time.monotonic() - started < 3.0
    assert connections == []  # not one connection attempt to the hub
    assert constants.HF_HUB_OFFLINE is False  # the caller's setting is back


# ------------------------------------------------------------------------------------------------ OSError in the CLI


def test_os_errors_in_the_cli_are_one_line_naming_the_path_and_the_fix(trained, tmp_path, capsys, monkeypatch):
    import errno

    image = next(trained["val"].rglob("*.png"))
    predict = ["predict", f"--checkpoint={trained['run']}", f"--data={image}", "--quiet", "--workers=0"]
    folder = tmp_path / "a_folder"
    folder.mkdir()
    code, err = run_cli(capsys, [*predict, f"--output={folder}", "--overwrite"])
    assert code == 2 and "Traceback" not in err, err
    assert f"cannot use {folder}" in err and "pass a file name inside it" in err, err

    def full(fd):  # delayed allocation: a full disk is reported when the data is flushed
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    output = tmp_path / "preds.csv"
    code, err = run_cli(capsys, [*predict, f"--output={output}"])
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in err, err
    assert f"cannot use {output}: No space left on device; free disk space" in err, err
    assert not output.exists()


# ------------------------------------------------------------------------------------------------ CSV labels


@pytest.mark.parametrize(
    "rows, message",
    [
        (["a.png,normal", "b.png,", "c.png,pneumonia"], r"line 3: 'b.png' has an empty label"),
        (["a.png,normal", "b.png,0", "c.png,pneumonia"], r"mixes class indices and class names .*line 3: '0'"),
        (["a.png,Pneumonia", "b.png,normal", "c.png,pneumonia"], r"'Pneumonia' \(line 2\) and 'pneumonia' \(line 4\)"),
        (["a.png,normal", "b.png,pneumonia", "./a.png,pneumonia"], r"'./a.png' is listed on lines 2 and 4"),
    ],
)
def test_csv_labels_that_would_split_or_merge_classes_are_refused_naming_the_row(tmp_path, rows, message):
    from fastprompt.data import CsvDataset

    write_image_folder(tmp_path / "img", per_class=1)
    for name in ("a.png", "b.png", "c.png"):
        shutil.copy(tmp_path / "img" / "benign" / "0.png", tmp_path / name)
    (tmp_path / "list.csv").write_text("\n".join(["path,label", *rows]) + "\n")
    with pytest.raises(ValueError, match=message):
        CsvDataset(tmp_path / "list.csv")
    (tmp_path / "ok.csv").write_text("path,label\na.png,normal\nb.png,pneumonia\na.png,normal\n")
    assert CsvDataset(tmp_path / "ok.csv").classes == ["normal", "pneumonia"]  # a repeated identical row is fine


# ------------------------------------------------------------------------------------------------ feature cache


def test_cache_entries_of_a_wrong_shape_or_non_finite_are_named_dropped_and_recomputed(tmp_path):
    from helpers import feature_images, tiny_fpt

    from fastprompt.data import FeatureCache, FeatureDataset, preload

    model, images, cache = tiny_fpt(), feature_images(4), FeatureCache(tmp_path / "cache")
    keys = preload(model, images, cache, batch_size=2, progress=False).keys
    good = cache.load(keys[0])
    # the same layers and heads, an independent count of the kept tokens: int(N * ratio) with N = 16 patches + CLS
    assert tuple(good["keys"].shape) == (2, 4, int(17 * model.token_ratio), 8)
    cache.save(keys[1], {name: value[:, :, :-1] for name, value in good.items()})  # valid checksum, wrong shape
    cache.save(keys[2], {name: torch.full_like(value, float("nan")) for name, value in good.items()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = preload(model, images, cache, batch_size=2, progress=False)
    messages = " | ".join(str(w.message) for w in caught)
    assert str(cache.path(keys[1])) in messages and "the model's features are" in messages
    assert str(cache.path(keys[2])) in messages and "NaN" in messages
    assert report.computed == 2 and report.skipped == 2
    for key in keys:
        assert tuple(cache.load(key)["keys"].shape) == tuple(good["keys"].shape)
    cache.save(keys[3], {name: torch.full_like(value, float("inf")) for name, value in good.items()})
    with pytest.warns(RuntimeWarning, match="inf"), pytest.raises(RuntimeError, match=str(cache.path(keys[3]))):
        FeatureDataset(cache, keys, list(range(4)))[3]  # no model to recompute with: named, not a collate error


# ------------------------------------------------------------------------------------------------ predict admission


def test_predict_gives_a_tiny_image_a_row_with_the_reason_and_no_score(trained, tmp_path):
    from PIL import Image

    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tiny)
    normal = next(trained["val"].rglob("*.png"))
    with pytest.warns(UserWarning, match="1 image"):
        rows = fastprompt.predict_images(trained["run"], [normal, tiny], progress=False)
    assert [Path(row["path"]).name for row in rows] == [normal.name, "tiny.png"]
    assert rows[0]["error"] == "" and isinstance(rows[0]["probability"], float)
    assert rows[1]["predicted"] == "" and rows[1]["probability"] is None
    assert rows[1]["prob_benign"] is None and rows[1]["prob_malignant"] is None
    assert rows[1]["error"] == "1x1 pixels, smaller than one 8-pixel patch"


def test_the_training_summary_says_a_best_checkpoint_is_missing_not_that_no_metric_was_finite(tmp_path):
    from types import SimpleNamespace

    from fastprompt.cli.train import best_summary
    from fastprompt.engine import BestEpoch, TrainState

    engine = SimpleNamespace(state=TrainState(best=BestEpoch(metric="val_auc", value=0.8, epoch=2)), history=[])
    assert "best checkpoint (epoch 2) is missing" in best_summary(engine, tmp_path)


def test_a_resume_with_another_lora_rank_is_one_line_and_changes_nothing(trained, tmp_path, capsys):
    argv = [arg for arg in trained["argv"] if arg != "--method=linear"] + ["--method=lora", "--rank=2"]
    run = tmp_path / "lora_run"
    assert main([*argv, f"--output-dir={run}"]) == 0
    before = folder_digest(run)
    code, err = run_cli(capsys, [*argv, "--rank=4", f"--output-dir={run}", "--resume"])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "method_options: the run has {'rank': 2}, now {'rank': 4}" in err, err
    assert folder_digest(run) == before
