"""fastprompt.Engine: training on both backends, equivalences, checkpoints, crash safety, NaN handling, errors."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, WORKERS, flip_byte, shuffled, tiny_data, tiny_tuned_vit
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from workers.engine_worker import STALL_AFTER, resume_engine

from fastprompt.engine import CheckpointError, Engine, NonFiniteLossError
from fastprompt.engine import checkpoint as engine_checkpoint
from fastprompt.engine.backends import deep_merge
from fastprompt.engine.checkpoint import read_checkpoint

WORKER = WORKERS / "engine_worker.py"


def train(method: str = "lora", *, data=None, batch_size: int = 4, **kwargs) -> tuple[Engine, list[dict]]:
    """Fit a tiny ViT; returns the engine and its history."""
    kwargs.setdefault("lr", 1e-2)
    kwargs.setdefault("epochs", 2)
    kwargs.setdefault("progress", False)
    engine = Engine(tiny_tuned_vit(method), **kwargs)
    history = engine.fit(shuffled(data if data is not None else tiny_data(), batch_size=batch_size))
    return engine, history


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), atol=atol, rtol=1e-4, msg=name)


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


DS_SETTINGS = {"clip_grad": 1.0, "grad_accum": 2, "warmup_steps": 2, "weight_decay": 0.05}


@pytest.fixture(scope="module")
def torch_reference():
    """Trainable parameters after the DeepSpeed-comparison run on the torch backend."""
    engine, history = train(backend="torch", **DS_SETTINGS)
    return engine.trainable_state_dict(), history


def test_torch_backend_trains_only_the_trainable_parameters(tmp_path):
    model = tiny_tuned_vit("lora")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine = Engine(model, lr=1e-2, epochs=3, backend="torch", output_dir=tmp_path)
    val = DataLoader(tiny_data(12, seed=5), batch_size=6)
    history = engine.fit(shuffled(tiny_data()), val_loader=val)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "lora_A" in name or "lora_B" in name or name.startswith("head.")
            assert not torch.equal(param, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    state = engine.backend.optimizer.state_dict()["state"]
    assert len(state) == len(engine.trainable_names)  # optimizer state for trainable parameters only
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"last.pt", "prev.pt", "best.pt"}
    assert read_checkpoint(tmp_path / "checkpoints" / "last.pt")["state"]["epoch"] == 3
    scores = engine.predict(val)
    assert scores.shape == (12, 3) and scores.dtype == torch.float32
    metrics = engine.evaluate(val)
    assert {"loss", "acc", "auc"} <= set(metrics) and metrics["loss"] == pytest.approx(history[-1]["val_loss"])


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_zero_stages_agree_with_torch(stage, torch_reference):
    reference, reference_history = torch_reference
    linear = torch.nn.functional.linear
    model = tiny_tuned_vit("lora")
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    engine = Engine(model, lr=1e-2, epochs=2, backend="deepspeed", zero_stage=stage, progress=False, **DS_SETTINGS)
    history = engine.fit(shuffled(tiny_data()))
    assert engine.backend.name == "deepspeed" and engine.backend.zero_stage == stage
    assert torch.nn.functional.linear is linear  # ZeRO-3 must not leave F.linear patched for the whole process
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in reference_history], rel=1e-4)
    assert_close(engine.trainable_state_dict(), reference)
    import deepspeed

    params = dict(engine.backend.module.named_parameters())
    gather = deepspeed.zero.GatheredParameters(list(params.values())) if stage == 3 else contextlib.nullcontext()
    with gather:
        for name, value in frozen.items():
            assert torch.equal(params[name].detach(), value), f"frozen {name} changed"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_and_user_config(tmp_path, stage):
    """A DeepSpeed ZeRO run interrupted mid-epoch resumes to the uninterrupted result; user config is merged."""
    settings = dict(backend="deepspeed", zero_stage=stage, epochs=2, checkpoint_every=2, lr=1e-2, progress=False)
    full, _ = train(output_dir=tmp_path / "full", **settings)
    calls = {"n": 0}

    class Crash(Exception):
        pass

    def crashing_loss(logits, targets):
        calls["n"] += 1
        if calls["n"] == 9:
            raise Crash  # an interruption in the middle of epoch 2 (after the step-8 checkpoint)
        return torch.nn.functional.cross_entropy(logits.float(), targets)

    with pytest.raises(Crash):
        train(output_dir=tmp_path / "cut", loss=crashing_loss, **settings)
    ckpt = read_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert ckpt["state"]["epoch"] == 1 and ckpt["state"]["step_in_epoch"] == 2
    user = {"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.0}
    resumed = Engine(tiny_tuned_vit("lora"), output_dir=tmp_path / "cut", deepspeed_config=user, **settings)
    resumed.fit(shuffled(tiny_data()), resume=True)
    assert resumed.backend.engine.config["zero_optimization"]["reduce_bucket_size"] == 1000
    assert resumed.backend.engine.config["zero_optimization"]["stage"] == stage
    assert_close(resumed.trainable_state_dict(), full.trainable_state_dict())


@pytest.mark.parametrize(
    ("backend", "stage", "precision"), [("torch", 0, "bf16"), ("torch", 0, "fp16"), ("deepspeed", 2, "bf16")]
)
def test_half_precision_trains(backend, stage, precision):
    engine, history = train(backend=backend, zero_stage=stage, precision=precision, epochs=3)
    assert engine.resolved.precision == precision
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(torch.isfinite(v).all() for v in engine.trainable_state_dict().values())


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_cuda_deepspeed_half_precision(precision):
    engine, history = train(epochs=3, precision=precision)
    expected = "bf16" if precision == "auto" and torch.cuda.is_bf16_supported() else precision
    assert engine.resolved.backend == "deepspeed"  # auto on CUDA
    assert engine.resolved.precision == ("fp32" if expected == "auto" else expected)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_auto_backend_choice():
    assert train("linear", epochs=1)[0].backend.name == "torch"  # CPU, one process, no ZeRO
    assert train("linear", epochs=1, zero_stage=1)[0].backend.name == "deepspeed"


def test_grad_accumulation_matches_a_larger_batch():
    big, _ = train(backend="torch", batch_size=8, optimizer="sgd", lr=0.1)
    accumulated, _ = train(backend="torch", batch_size=4, grad_accum=2, optimizer="sgd", lr=0.1)
    assert_close(accumulated.trainable_state_dict(), big.trainable_state_dict())


def test_grad_checkpointing_gives_the_same_training():
    plain, _ = train(backend="torch", epochs=1)
    engine, _ = train(backend="torch", epochs=1, grad_checkpointing=True)
    assert engine.model.grad_checkpointing
    assert_close(engine.trainable_state_dict(), plain.trainable_state_dict())


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """A subprocess is SIGKILLed mid-epoch after a mid-epoch checkpoint; resuming ends bit-identical."""
    cut = tmp_path / "cut"
    cut.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = tmp_path / "worker.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(WORKER), "stall", str(cut)], env=env, stderr=stderr)
    try:
        deadline = time.monotonic() + 100
        while not (cut / "stalled").exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "worker never reached the stall point"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = read_checkpoint(cut / "checkpoints" / "last.pt")["state"]
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < 6  # killed mid-epoch, resumes mid-epoch
    assert STALL_AFTER > 24 + 4 * state["step_in_epoch"]

    stale = cut / "checkpoints" / ".last.pt.killed.tmp"  # what a kill during a checkpoint write leaves behind
    stale.write_bytes(b"half a checkpoint")
    resumed = resume_engine(cut)
    resumed.fit(shuffled(tiny_data()), resume=True)
    assert not stale.exists()
    reference = resume_engine(tmp_path / "full")
    reference_history = reference.fit(shuffled(tiny_data()))
    assert_equal(resumed.trainable_state_dict(), reference.trainable_state_dict())
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in reference_history]


class Noisy(Dataset):
    """Random augmentation drawn from the global torch RNG, as torchvision transforms do."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, target = self.base[index]
        return image + 0.1 * torch.randn(image.shape), target


def test_resume_with_a_user_distributed_sampler_is_bit_identical(tmp_path):
    """A sampler the Engine keeps (DistributedSampler) is fast-forwarded without disturbing the RNG."""

    def loader() -> DataLoader:
        data = Noisy(tiny_data())
        return DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=1, rank=0, seed=3))

    class Crash(Exception):
        pass

    def crash_at_9(logits, targets, calls=[0]):  # noqa: B006  (call counter)
        calls[0] += 1
        if calls[0] == 9:
            raise Crash
        return torch.nn.functional.cross_entropy(logits, targets)

    settings = dict(backend="torch", epochs=2, checkpoint_every=2, progress=False)
    with pytest.raises(Crash):
        Engine(tiny_tuned_vit("lora", dropout=0.1), output_dir=tmp_path / "cut", loss=crash_at_9, **settings).fit(
            loader()
        )
    resumed = Engine(tiny_tuned_vit("lora", dropout=0.1), output_dir=tmp_path / "cut", **settings)
    resumed.fit(loader(), resume=True)
    full = Engine(tiny_tuned_vit("lora", dropout=0.1), output_dir=tmp_path / "full", **settings)
    full.fit(loader())
    assert_equal(resumed.trainable_state_dict(), full.trainable_state_dict())


class NanAt:
    """Cross-entropy that returns NaN on its `at`-th call."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        return loss * float("nan") if self.calls == self.at else loss


def test_nonfinite_loss_stops_with_step_and_last_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 4 .*global step 4.*last\.pt"):
        train(backend="torch", loss=NanAt(4), output_dir=tmp_path, checkpoint_every=2)
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["state"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["trainable"].values())


def test_nonfinite_loss_skipped_when_asked():
    engine, history = train(backend="torch", loss=NanAt(3), skip_nonfinite=True)
    assert [h["skipped_batches"] for h in history] == [1, 0]
    assert all(torch.isfinite(v).all() for v in engine.trainable_state_dict().values())
    assert math.isfinite(history[0]["train_loss"])


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    engine, _ = train("linear", backend="torch", epochs=1, output_dir=tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    before = last.read_bytes()
    real_open = engine_checkpoint.atomic_open

    @contextlib.contextmanager
    def disk_full(path, mode="wb"):
        with real_open(path, mode) as handle:

            class Half:
                def write(self, data):
                    handle.write(data[: len(data) // 2])
                    raise OSError(28, "No space left on device")

            yield Half()

    monkeypatch.setattr(engine_checkpoint, "atomic_open", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint under that name is intact"):
        engine.save(last)
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]  # no temp file left behind


def test_corrupt_last_checkpoint_falls_back_to_previous(tmp_path):
    train("linear", backend="torch", epochs=2, output_dir=tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    flip_byte(last)
    corrupted = last.read_bytes()
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(last)
    engine = Engine(tiny_tuned_vit("linear"), epochs=2, backend="torch", output_dir=tmp_path, progress=False)
    with pytest.warns(RuntimeWarning, match="falling back"):
        history = engine.fit(shuffled(tiny_data()), resume=True)
    assert [h["epoch"] for h in history] == [1, 2]  # resumed after epoch 1 from prev.pt, trained epoch 2 again
    other = Engine(tiny_tuned_vit("linear"), epochs=2, backend="deepspeed", output_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="written by the torch backend"):
        other.fit(shuffled(tiny_data()), resume=True)
    (tmp_path / "checkpoints" / "prev.pt").write_bytes(b"garbage")
    last.write_bytes(corrupted)
    with pytest.raises(CheckpointError, match="no intact checkpoint"), pytest.warns(RuntimeWarning):
        engine = Engine(tiny_tuned_vit("linear"), epochs=2, backend="torch", output_dir=tmp_path, progress=False)
        engine.fit(shuffled(tiny_data()), resume=True)


def test_save_load_round_trip(tmp_path):
    engine, _ = train("lora", backend="torch", epochs=1)
    engine.save(tmp_path / "model.pt")
    loader = DataLoader(tiny_data(6, seed=3), batch_size=3)
    loaded = Engine.load(tmp_path / "model.pt", tiny_tuned_vit("lora"))
    assert loaded.config.lr == engine.config.lr
    assert_equal(loaded.trainable_state_dict(), engine.trainable_state_dict())
    torch.testing.assert_close(loaded.predict(loader), engine.predict(loader), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="trainable parameters"):
        Engine.load(tmp_path / "model.pt", tiny_tuned_vit("linear"))


class TwoInputs(torch.nn.Module):
    """A model taking (images, scale) to check the tuple-inputs batch convention."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = tiny_tuned_vit("linear")

    def forward(self, images: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.vit(images * scale[:, None, None, None])


class DictData(Dataset):
    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        image, target = self.base[index]
        return {"image": (image, torch.tensor(1.0)), "target": target}


def test_dict_batches_tuple_inputs_and_multilabel():
    engine = Engine(TwoInputs(), lr=1e-2, epochs=2, backend="torch", progress=False)
    history = engine.fit(shuffled(DictData(tiny_data())))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    engine, history = train("linear", data=tiny_data(multilabel=True), backend="torch", lr=5e-2)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    metrics = engine.evaluate(DataLoader(tiny_data(12, seed=4, multilabel=True), batch_size=4))
    assert {"loss", "acc", "auc", "map"} <= set(metrics)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"optimizer": "adam"}, ValueError, r"'optimizer' must be one of \['adamw', 'sgd'\]"),
        ({"lr": -1.0}, ValueError, "'lr' must be >= 0"),
        ({"epochs": 0}, ValueError, "'epochs' must be >= 1"),
        ({"schedule": "linear"}, ValueError, r"'schedule' must be one of \['cosine', 'constant'\]"),
        ({"precision": "fp8"}, ValueError, "'precision' must be one of"),
        ({"zero_stage": 4}, ValueError, r"'zero_stage' must be one of \[0, 1, 2, 3\]"),
        ({"grad_accum": 1.5}, TypeError, "'grad_accum' must be an int"),
        ({"backend": "jax"}, ValueError, r"'backend' must be one of \['auto', 'deepspeed', 'torch'\]"),
        ({"backend": "torch", "zero_stage": 2}, ValueError, "needs backend='deepspeed'"),
        ({"loss": "mse"}, ValueError, "'loss' must be 'auto' or a callable"),
        ({"skip_nonfinite": 1}, TypeError, "'skip_nonfinite' must be True or False"),
        ({"checkpoint_every": 0}, ValueError, "'checkpoint_every' must be >= 1"),
        ({"deepspeed_config": {"optimizer": {}}}, ValueError, r"key 'optimizer' is set by the Engine.*optimizer="),
        ({"deepspeed_config": "/nonexistent.json"}, ValueError, "does not exist"),
    ],
)
def test_bad_arguments_name_the_option(kwargs, error, match):
    with pytest.raises(error, match=match):
        Engine(tiny_tuned_vit("linear"), **kwargs)


def test_model_errors():
    model = tiny_tuned_vit("linear")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Engine(model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Engine("vit")
    engine = Engine(tiny_tuned_vit("linear"), backend="torch", progress=False)
    with pytest.raises(ValueError, match="needs Engine\\(output_dir"):
        engine.fit(shuffled(tiny_data()), resume=True)
    with pytest.raises(ValueError, match="grad_accum=9 exceeds"):
        Engine(tiny_tuned_vit("linear"), backend="torch", grad_accum=9).fit(shuffled(tiny_data()))
    with pytest.raises(ValueError, match="a batch must be"):
        engine.fit(DataLoader(tiny_data().tensors[0], batch_size=4))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'fp16' with DeepSpeed needs a CUDA device"):
            Engine(tiny_tuned_vit("linear"), backend="deepspeed", precision="fp16").fit(shuffled(tiny_data()))


def test_deep_merge_recurses():
    merged = deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"c": 5}, "e": 6})
    assert merged == {"a": {"b": 1, "c": 5}, "d": 3, "e": 6}


@pytest.fixture
def restore_determinism(monkeypatch):
    """Engine(deterministic=True) changes process-wide switches: put them back after the test."""
    monkeypatch.delenv("FASTPROMPT_DETERMINISTIC", raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


def test_deterministic_mode_switches_torch_and_pins_kernel_configs(restore_determinism, monkeypatch):
    from fastprompt.kernels import dispatch

    assert not dispatch.deterministic()
    engine = Engine(tiny_tuned_vit("linear"), epochs=1, backend="torch", progress=False, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and dispatch.deterministic()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    engine.fit(shuffled(tiny_data(8)))  # the CPU path runs under torch's deterministic mode
    # every Triton launch (both kernel modules share `launch`) then bypasses the autotuner for one fixed config
    from fastprompt.kernels import sink_attention_triton as kernels

    chosen = kernels.triton.Config({"BLOCK_M": 16})
    calls = []

    class Tuned:
        fn = {None: lambda *args, **kwargs: calls.append(("fixed", kwargs))}

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("autotuned", kwargs))

    monkeypatch.setattr(kernels, "interpreting", lambda: False)  # pretend to be on a GPU
    monkeypatch.setattr(kernels, "deterministic_config", lambda *args, **kwargs: chosen)
    q = torch.zeros(1)
    kernels.launch(Tuned(), None, q, BLOCK_D=16)
    monkeypatch.setenv("FASTPROMPT_DETERMINISTIC", "0")
    torch.use_deterministic_algorithms(False)
    kernels.launch(Tuned(), None, q, BLOCK_D=16)
    assert calls == [("fixed", {"BLOCK_D": 16, **chosen.all_kwargs()}), ("autotuned", {"BLOCK_D": 16})]


def test_deterministic_must_be_a_bool():
    with pytest.raises(TypeError, match="deterministic"):
        Engine(tiny_tuned_vit("linear"), deterministic="yes")
