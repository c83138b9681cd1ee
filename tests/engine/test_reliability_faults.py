"""Reliability under faults: SIGKILL mid-step / mid-write / mid-preload, disk full, NaN, bad data, damaged caches.

The subprocess side is tests/workers/reliability_worker.py. Kill points are drawn from a seeded RNG (printed on
failure).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, WORKERS, feature_images, shuffled, tiny_data, tiny_fpt
from PIL import Image
from safetensors.torch import load_file
from workers.reliability_worker import make_engine

import fastprompt
import fastprompt.engine.checkpoint as engine_checkpoint
from fastprompt.data import FeatureCache, FeatureDataset, ImageFolderDataset, build_transforms, preload
from fastprompt.engine import NonFiniteLossError
from fastprompt.engine.checkpoint import CheckpointError, read_checkpoint

WORKER = WORKERS / "reliability_worker.py"
SEED = int(os.environ.get("FASTPROMPT_RELIABILITY_SEED", "20261124"))


def worker(mode: str, out_dir: Path, kill: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(WORKER), mode, str(out_dir)] + ([kill] if kill else [])
    return subprocess.run(command, env=env, capture_output=True, timeout=timeout)


def assert_killed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-3000:]


def verify_checkpoint_dir(directory: Path) -> list[str]:
    """Every final-named checkpoint verifies and holds only finite parameters; returns the leftover temp files."""
    finals = [p for p in directory.iterdir() if not p.name.startswith(".")]
    assert finals, f"no checkpoint in {directory}"
    for path in finals:
        payload = read_checkpoint(path)  # raises CheckpointError when half-written or corrupt
        assert all(torch.isfinite(v).all() for v in payload["trainable"].values()), path
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def assert_same_parameters(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run every crashed-and-resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the function-scoped one_thread fixture
    try:
        engine = make_engine(out)
        history = engine.fit(shuffled(tiny_data()))
    finally:
        torch.set_num_threads(threads)
    return engine.trainable_state_dict(), [h["train_loss"] for h in history]


def test_sigkill_in_a_step_in_a_checkpoint_write_and_at_a_random_time_resumes_bit_identical(tmp_path, reference_run):
    """Three SIGKILLs in a row on one output dir; each leaves only verified checkpoints; the resumed run is exact."""
    rng = random.Random(SEED)
    out = tmp_path / "run"
    points = [f"loss:{rng.randint(3, 8)}", f"write:{rng.randint(2, 4)}:{rng.uniform(0.05, 0.95):.3f}"]
    for kill in points:
        assert_killed(worker("train", out, kill))
        verify_checkpoint_dir(out / "checkpoints")
    (out / "started").unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "train", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    delay = rng.uniform(0.0, 0.4)
    try:
        deadline = time.monotonic() + 120
        while not (out / "started").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = verify_checkpoint_dir(out / "checkpoints")
    assert all(name.endswith(".tmp") for name in leftovers), leftovers  # only hidden temp files, never read

    resumed = make_engine(out)
    history = resumed.fit(shuffled(tiny_data()), resume=True)
    parameters, losses = reference_run
    assert_same_parameters(resumed.trainable_state_dict(), parameters)
    assert [h["train_loss"] for h in history] == losses, f"kill points {points}, then SIGKILL {delay:.3f}s in"
    verify_checkpoint_dir(out / "checkpoints")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_a_kill_between_the_last_checkpoint_and_its_reports_loses_no_report(tmp_path):
    """Killed after the final epoch's last.pt but before metrics.jsonl / metrics.csv were written: the resume has no
    epoch left to train, and still writes the reports from the checkpoint's history."""
    out = tmp_path / "run"
    make_engine(out).fit(shuffled(tiny_data()))
    for name in ("metrics.jsonl", "metrics.csv"):
        (out / name).unlink()
    history = make_engine(out).fit(shuffled(tiny_data()), resume=True)
    assert [h["epoch"] for h in history] == [1, 2]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert (out / "metrics.csv").read_text().count("\n") == 3  # a header and two epochs


def cache_state(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every entry's tensors by file name (the bytes differ run to run: safetensors orders metadata by hash)."""
    entries = sorted(directory.glob("*/*.safetensors"))
    return {p.name: {k: v.clone() for k, v in load_file(p).items()} for p in entries}  # copies, not file maps


def assert_same_cache(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert_same_parameters(left[name], right[name])


def test_sigkill_during_preload_resumes_and_every_entry_verifies(tmp_path):
    """Preload dies inside its 5th entry write; the 4 present entries verify; resume computes only the other 8."""
    rng = random.Random(SEED + 1)
    cut = tmp_path / "cut"
    assert_killed(worker("preload", cut, f"write:5:{rng.uniform(0.05, 0.95):.3f}"))
    cache = FeatureCache(cut / "cache")
    model = tiny_fpt()
    keys = [cache.key(model, image=image) for image in feature_images()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt entry would warn
        present = [key for key in keys if cache.load(key) is not None]
    assert len(present) == 4 and len(cache.entries()) == 4  # entries 1-4 whole, entry 5 never got its final name

    report = preload(model, feature_images(), cache, batch_size=2, progress=False)
    assert (report.skipped, report.computed) == (4, 8)
    fresh = FeatureCache(tmp_path / "fresh")
    preload(model, feature_images(), fresh, batch_size=2, progress=False)
    assert_same_cache(cache_state(cut / "cache"), cache_state(tmp_path / "fresh"))  # bit-identical entries


class DiskFullAfter:
    """A file handle proxy that writes `budget` bytes, then raises OSError(ENOSPC) like a full disk."""

    def __init__(self, handle, budget: int) -> None:
        self.handle, self.budget = handle, budget

    def write(self, data: bytes) -> int:
        if len(data) > self.budget:
            self.handle.write(data[: self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def disk_full_open(budget: int):
    real_open = fastprompt.io.atomic_open

    @contextlib.contextmanager
    def opener(path, mode="wb"):
        with real_open(path, mode) as handle:
            yield DiskFullAfter(handle, budget)

    return opener


@pytest.mark.parametrize("budget", [0, 100, 5000])
def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, budget):
    """ENOSPC part-way through a mid-epoch checkpoint: fit raises the OSError, last.pt is the previous step's."""
    engine = make_engine(tmp_path, epochs=1, checkpoint_every=2)
    loader = shuffled(tiny_data())
    real_write = engine_checkpoint.write_checkpoint
    writes = []

    def write_then_fill_disk(path, payload):
        writes.append(Path(path).name)
        if len(writes) == 2:
            monkeypatch.setattr(engine_checkpoint, "atomic_open", disk_full_open(budget))
        return real_write(path, payload)

    monkeypatch.setattr("fastprompt.engine.core.write_checkpoint", write_then_fill_disk)
    with pytest.raises((OSError, CheckpointError)) as raised:
        engine.fit(loader)
    error = raised.value
    cause = error if isinstance(error, OSError) else error.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC, repr(error)
    assert "No space left on device" in str(error)
    directory = tmp_path / "checkpoints"
    assert verify_checkpoint_dir(directory) == []  # no temp file left behind
    assert read_checkpoint(directory / "last.pt")["state"]["global_step"] == 2  # the step-2 checkpoint, intact
    resumed = make_engine(tmp_path, epochs=1, checkpoint_every=2)
    monkeypatch.undo()
    resumed.fit(shuffled(tiny_data()), resume=True)  # after space is freed, the run resumes from step 2
    reference = make_engine(tmp_path / "reference", epochs=1, checkpoint_every=2)
    reference.fit(shuffled(tiny_data()))
    assert_same_parameters(resumed.trainable_state_dict(), reference.trainable_state_dict())


def test_disk_full_during_preload_keeps_every_written_entry(tmp_path, monkeypatch):
    model, cache = tiny_fpt(), FeatureCache(tmp_path / "cache")
    real_save, saved = cache.save, []

    def save(key, features):
        if len(saved) == 3:
            monkeypatch.setattr(fastprompt.io, "atomic_open", disk_full_open(64))
        saved.append(key)
        return real_save(key, features)

    monkeypatch.setattr(cache, "save", save)
    with pytest.raises(OSError, match="No space left on device: could not write feature cache entry .*resumes"):
        preload(model, feature_images(), cache, batch_size=2, progress=False)
    monkeypatch.undo()
    assert len(cache.entries()) == 3 and not list((tmp_path / "cache").glob("*/.*"))
    report = preload(model, feature_images(), cache, batch_size=2, progress=False)
    assert (report.skipped, report.computed) == (3, 9)


class FaultyLoss:
    """Cross-entropy returning `value` (NaN or inf) on the `at`-th call."""

    def __init__(self, at: int, value: float) -> None:
        self.at, self.value, self.calls = at, value, 0

    def __call__(self, logits, targets):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return loss * self.value if self.calls == self.at else loss


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_loss_names_the_step_and_last_good_checkpoint(tmp_path, value):
    engine = make_engine(tmp_path, loss=FaultyLoss(9, value))
    with pytest.raises(NonFiniteLossError) as raised:
        engine.fit(shuffled(tiny_data()))
    message = str(raised.value)
    assert "epoch 2, step 3 of the epoch" in message and "global step 9" in message, message
    assert str(tmp_path / "checkpoints" / "last.pt") in message, message
    verify_checkpoint_dir(tmp_path / "checkpoints")
    assert read_checkpoint(tmp_path / "checkpoints" / "last.pt")["state"]["global_step"] == 8


def test_nonfinite_loss_is_skipped_with_skip_nonfinite(tmp_path):
    engine = make_engine(tmp_path, loss=FaultyLoss(4, float("nan")), skip_nonfinite=True)
    history = engine.fit(shuffled(tiny_data()))
    assert [h["skipped_batches"] for h in history] == [1, 0]
    verify_checkpoint_dir(tmp_path / "checkpoints")


def test_nan_parameter_is_never_saved(tmp_path):
    """A parameter turned NaN by a (finite-loss) step: the next checkpoint is refused; earlier ones stay clean."""
    engine = make_engine(tmp_path, epochs=1)

    class PoisonAfter(FaultyLoss):
        def __call__(self, logits, targets):
            self.calls += 1
            if self.calls == self.at:
                with torch.no_grad():
                    next(p for p in engine.model.parameters() if p.requires_grad).fill_(float("nan"))
            return torch.nn.functional.cross_entropy(logits, targets)

    engine.loss_fn = PoisonAfter(3, 0.0)
    with pytest.raises(NonFiniteLossError, match="refusing to write a checkpoint"):
        engine.fit(shuffled(tiny_data()))
    verify_checkpoint_dir(tmp_path / "checkpoints")


# ---------------------------------------------------------------------------------------------- data faults


def write_faulty_folder(root: Path) -> dict[str, Path]:
    """A class folder tree with every kind of awkward file; returns the interesting paths."""
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "empty"):
        (root / name).mkdir(parents=True)
    paths = {
        "rgb": root / "a" / "scan.png",
        "dup_name": root / "b" / "scan.png",  # same file name, different image
        "same_bytes": root / "b" / "copy_of_a.png",  # same image as a/scan.png under another name
        "one_pixel": root / "a" / "tiny.png",
        "sixteen_bit": root / "b" / "deep.png",
        "palette": root / "c" / "palette.png",
        "wrong_ext": root / "c" / "really_png.jpg",
        "truncated": root / "a" / "truncated.png",
        "corrupt": root / "c" / "corrupt.png",
    }
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(paths["rgb"])
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(paths["dup_name"])
    paths["same_bytes"].write_bytes(paths["rgb"].read_bytes())
    Image.fromarray(np.full((1, 1, 3), 200, dtype=np.uint8)).save(paths["one_pixel"])
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(paths["sixteen_bit"])
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("P").save(paths["palette"])
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(paths["wrong_ext"], format="PNG")
    paths["truncated"].write_bytes(paths["rgb"].read_bytes()[:200])
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 500, dtype=np.uint8)))
    return paths


def test_faulty_image_folder_is_skipped_with_a_count_and_cannot_poison_the_cache(tmp_path):
    paths = write_faulty_folder(tmp_path / "data")
    with pytest.warns(UserWarning, match=r"empty class folder.*'empty'"):
        dataset = ImageFolderDataset(tmp_path / "data", transform=build_transforms(32, train=False))
    assert dataset.classes == ["a", "b", "c"]
    with pytest.warns(UserWarning, match=r"2 unreadable image\(s\) in .* dropped"):
        skipped = dataset.verify(workers=1, progress=False)
    assert sorted(skipped) == sorted([str(paths["truncated"]), str(paths["corrupt"])])
    assert len(dataset) == 7
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, 32, 32) and torch.isfinite(image).all() and 0 <= label < 3

    model, cache = tiny_fpt(), FeatureCache(tmp_path / "cache")
    files = [path for path, _ in dataset.samples]
    report = preload(model, dataset, cache, paths=files, preprocess="eval32", batch_size=4, progress=False)
    by_path = dict(zip(files, report.keys))
    assert by_path[str(paths["rgb"])] != by_path[str(paths["dup_name"])]  # same name, other folder: other entry
    assert by_path[str(paths["rgb"])] == by_path[str(paths["same_bytes"])]  # same bytes, other name: one entry
    assert len(cache.entries()) == len(set(report.keys)) == 6


def test_csv_label_outside_the_class_list_is_a_clear_error(tmp_path):
    paths = write_faulty_folder(tmp_path / "data")
    csv = tmp_path / "list.csv"
    csv.write_text(f"path,label\n{paths['rgb']},a\n{paths['dup_name']},zebra\n")
    with pytest.raises(ValueError, match=r"line 3.*'zebra'.*not in the class list"):
        fastprompt.data.CsvDataset(csv, classes=["a", "b"])


@pytest.mark.parametrize(
    "change",
    [
        {"token_ratio": 0.5},
        {"layers": [1]},
        {"cache_dtype": torch.bfloat16},
        {"weights": "perturbed"},
    ],
    ids=["ratio", "layers", "dtype", "backbone_weights"],
)
def test_entries_from_another_configuration_are_never_used(tmp_path, change):
    """A cache filled under one configuration is fully recomputed (nothing reused) under another."""
    images = feature_images(4)
    first = preload(tiny_fpt(), images, FeatureCache(tmp_path), progress=False)
    options = {k: v for k, v in change.items() if k in ("token_ratio", "layers")}
    model = tiny_fpt_with(**options)
    if "weights" in change:
        with torch.no_grad():
            model.backbone.blocks[0].attn.qkv.weight.add_(1e-3)
    cache = FeatureCache(tmp_path, dtype=change.get("cache_dtype", torch.float16))
    second = preload(model, images, cache, progress=False)
    assert (second.skipped, second.computed) == (0, 4)
    assert not set(first.keys) & set(second.keys)


def tiny_fpt_with(**options) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)
    return fastprompt.FPT(backbone, 3, **{"layers": [0, 1], "side_input_size": 16, **options})


# ---------------------------------------------------------------------------------------- cache integrity


def damage(path: Path, how: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        for _ in range(3):
            data[rng.randrange(len(data))] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[: rng.randrange(len(data))]))
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_damaged_half_of_the_cache_is_detected_recomputed_and_reported(tmp_path, how):
    rng = random.Random(SEED + 2)
    model, cache = tiny_fpt(), FeatureCache(tmp_path)
    report = preload(model, feature_images(), cache, progress=False)
    clean = cache_state(tmp_path)
    entries = cache.entries()
    damaged = rng.sample(entries, len(entries) // 2)
    for path in damaged:
        damage(path, how, rng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = preload(model, feature_images(), cache, progress=False)
    corrupt_warnings = [w for w in caught if "corrupt" in str(w.message)]
    expected_warnings = 0 if how == "delete" else len(damaged)
    flipped_but_valid = expected_warnings - len(corrupt_warnings)  # a flip inside padding can leave data intact
    assert flipped_but_valid == 0 or how == "flip"
    assert again.computed == len(damaged) - flipped_but_valid and again.skipped == len(entries) - again.computed
    assert_same_cache(cache_state(tmp_path), clean)  # recomputed entries are bit-identical to the originals

    for path in damaged[:2]:
        damage(path, how, rng)
    dataset = FeatureDataset(cache, report.keys, list(range(12)), model=model, source=feature_images())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = [dataset[i] for i in range(len(dataset))]
    assert all(torch.isfinite(item[0]["keys"].float()).all() for item in items)
    assert_same_cache(cache_state(tmp_path), clean)


def test_damaged_cache_without_a_model_is_an_error_naming_preload(tmp_path):
    model, cache = tiny_fpt(), FeatureCache(tmp_path)
    report = preload(model, feature_images(2), cache, progress=False)
    cache.entries()[0].write_bytes(b"not safetensors")
    dataset = FeatureDataset(cache, report.keys, [0, 1])
    with pytest.warns(RuntimeWarning, match="corrupt"), pytest.raises(RuntimeError, match="preload"):
        [dataset[i] for i in range(2)]


# -------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("backend, stage", [("torch", 0), ("deepspeed", 2)])
def test_same_seed_same_backend_gives_bit_identical_parameters(backend, stage):
    """Two runs with one seed on one machine and backend are bit-identical; another seed is not."""
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")

    def run(seed: int) -> dict:
        engine = make_engine(None, backend=backend, zero_stage=stage, checkpoint_every=None, seed=seed)
        engine.fit(shuffled(tiny_data()))
        return engine.trainable_state_dict()

    first = run(0)
    assert_same_parameters(run(0), first)
    assert any(not torch.equal(a, b) for a, b in zip(run(1).values(), first.values()))
