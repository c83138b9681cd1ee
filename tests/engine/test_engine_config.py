"""EngineConfig (validation, unknown fields, JSON round trip), Engine(model, config=...), TrainState, Backend."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
from fixtures.make_engine_v0_checkpoint import engine_model as model
from helpers import TESTS, learnable_task
from torch.utils.data import DataLoader, TensorDataset

import fastprompt
from fastprompt.engine import Backend, BestEpoch, Engine, EngineConfig, TrainState
from fastprompt.engine.backends import DeepSpeedBackend, TorchBackend
from fastprompt.engine.config import saved_config


def loader():
    images, labels = learnable_task()
    return DataLoader(TensorDataset(images, labels), batch_size=4, shuffle=True)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"lr": -1}, ValueError, r"option 'lr' must be >= 0.0, got -1.0"),
        ({"optimizer": "adam"}, ValueError, r"option 'optimizer' must be one of \['adamw', 'sgd'\], got 'adam'"),
        ({"zero_stage": 4}, ValueError, r"option 'zero_stage' must be one of \[0, 1, 2, 3\], got 4"),
        ({"epochs": 0}, ValueError, r"option 'epochs' must be >= 1, got 0"),
        ({"momentum": 1.5}, ValueError, r"option 'momentum' must be <= 1.0, got 1.5"),
        ({"progress": 1}, TypeError, r"option 'progress' must be True or False, got 1"),
        ({"balanced_sampler": "yes"}, TypeError, r"option 'balanced_sampler' must be True or False, got 'yes'"),
        ({"patience": 0}, ValueError, r"option 'patience' must be >= 1, got 0"),
        ({"class_weights": "balanced"}, ValueError, r"'class_weights' must be 'auto', 'none' or one weight per"),
        ({"loss": 3}, ValueError, r"option 'loss' must be 'auto' or a callable"),
        ({"loggers": ["wandb"]}, ValueError, r"unknown logger\(s\) \['wandb'\]; choose from"),
        ({"backend": "torch", "zero_stage": 2}, ValueError, r"'zero_stage' > 0 needs backend='deepspeed'"),
        ({"activation_memory": "4GB", "grad_checkpointing": True}, ValueError, r"pass only one"),
    ],
)
def test_a_bad_value_names_the_field_the_value_and_what_is_allowed(options, error, match):
    with pytest.raises(error, match=match):
        EngineConfig(**options)
    with pytest.raises(error, match=match):  # the Engine's keywords go through the same checks
        Engine(model(), **options)


def test_tensorboard_needs_an_output_dir():
    pytest.importorskip("tensorboard")
    with pytest.raises(ValueError, match=r"writes into output_dir/tensorboard; pass output_dir"):
        EngineConfig(loggers="tensorboard")


def test_an_unknown_field_names_the_closest_and_lists_the_valid_ones():
    valid = ", ".join(field.name for field in dataclasses.fields(EngineConfig))
    with pytest.raises(TypeError, match=r"unknown Engine config field 'lrr'; did you mean 'lr'\?") as raised:
        EngineConfig.from_dict({"lrr": 1})
    assert valid in str(raised.value)
    with pytest.raises(TypeError, match=r"unknown Engine config field 'optimiser'; did you mean 'optimizer'\?"):
        EngineConfig(optimiser="sgd")
    with pytest.raises(TypeError, match=r"unknown Engine option 'lrr'; did you mean 'lr'\?") as raised:
        Engine(model(), lrr=1)
    assert valid in str(raised.value)
    with pytest.raises(TypeError, match=r"unknown Engine option 'zzz'; valid options: optimizer, lr"):
        Engine(model(), zzz=1)


def test_values_are_normalised_once():
    config = EngineConfig(lr=1, loggers="csv", class_weights=[1, 2], class_names=["a", "b"], output_dir="out")
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.loggers == ("csv",) and config.class_weights == (1.0, 2.0) and config.class_names == ("a", "b")
    assert config.output_dir is not None and config.output_dir.name == "out"
    assert EngineConfig(class_weights="none").class_weights is None
    assert dataclasses.replace(config, epochs=3) == EngineConfig(**{**config.to_dict(), "epochs": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 2.0  # type: ignore[misc]


def test_the_defaults_are_the_documented_ones():
    """EngineConfig's defaults are those Engine documented as keyword defaults before EngineConfig (cc56237)."""
    documented = dict(
        optimizer="adamw", lr=1e-3, weight_decay=0.0, epochs=10, warmup_steps=0, schedule="cosine",
        precision="auto", zero_stage=0, grad_accum=1, clip_grad=None, grad_checkpointing=False,
        activation_memory=None, backend="auto", deepspeed_config=None, loss="auto", output_dir=None, seed=0,
        skip_nonfinite=False, momentum=0.9, checkpoint_every=None, monitor="auto", progress=True,
        deterministic=False, class_names=None, positive_class=None, loggers=["csv"], patience=None,
        class_weights=None, balanced_sampler=False,
    )  # fmt: skip
    assert EngineConfig().to_dict() == documented


def test_to_dict_from_dict_round_trips_through_json(tmp_path):
    config = EngineConfig(
        optimizer="sgd", lr=0.05, momentum=0.5, epochs=3, warmup_steps=2, schedule="constant", clip_grad=1.0,
        activation_memory="2GB", deepspeed_config={"zero_optimization": {"reduce_bucket_size": 1000}},
        output_dir=tmp_path, seed=7, skip_nonfinite=True, checkpoint_every=5, monitor="loss", progress=False,
        class_names=["a", "b"], positive_class="b", loggers=["csv"], patience=2, class_weights=[1.0, 3.0],
        balanced_sampler=True,
    )  # fmt: skip
    data = json.loads(json.dumps(config.to_dict()))
    assert set(data) == {field.name for field in dataclasses.fields(EngineConfig)}
    assert EngineConfig.from_dict(data) == config


def test_a_loss_callable_is_recorded_by_name_and_must_be_given_again():
    def my_loss(logits, targets):
        return torch.nn.functional.cross_entropy(logits, targets)

    data = json.loads(json.dumps(EngineConfig(loss=my_loss).to_dict()))
    assert data["loss"] == "callable"
    with pytest.raises(ValueError, match=r"custom loss callable, which is not saved; pass it again: loss=fn"):
        EngineConfig.from_dict(data)
    assert EngineConfig.from_dict(data, loss=my_loss).loss is my_loss


def test_engine_takes_a_config_and_keywords_override_it():
    config = EngineConfig(lr=0.05, epochs=4, progress=False)
    assert Engine(model(), config=config).config is config
    engine = Engine(model(), config=config, epochs=2, lr=0.01)
    assert engine.config == dataclasses.replace(config, epochs=2, lr=0.01)
    assert config.epochs == 4  # the given config is not changed
    assert Engine(model(), lr=0.05, epochs=4, progress=False).config == config
    with pytest.raises(TypeError, match="config must be an EngineConfig, got dict"):
        Engine(model(), config={"lr": 0.1})
    with pytest.raises(ValueError, match="option 'epochs' must be >= 1, got 0"):
        Engine(model(), config=config, epochs=0)  # an override is validated too


def test_keyword_and_config_engines_train_identically(tmp_path):
    options = dict(lr=1e-2, epochs=2, seed=1, progress=False)
    first = Engine(model(), **options)
    second = Engine(model(), config=EngineConfig(**options))
    assert first.fit(loader())[-1]["train_loss"] == second.fit(loader())[-1]["train_loss"]
    a, b = first.trainable_state_dict(), second.trainable_state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resolved_decisions_live_outside_the_config(tmp_path):
    engine = Engine(model(), epochs=1, progress=False, backend="auto", precision="auto")
    assert engine.resolved is None
    engine.fit(loader())
    assert (engine.resolved.backend, engine.resolved.precision) == ("torch", "fp32")  # CPU
    assert (engine.config.backend, engine.config.precision) == ("auto", "auto")


def test_checkpoints_hold_the_config_and_state_as_plain_data(tmp_path):
    engine = Engine(model(), epochs=2, lr=1e-2, progress=False, output_dir=tmp_path, class_weights=[1, 1, 2, 1])
    engine.fit(loader())
    payload = fastprompt.read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert payload["version"] == 2
    assert payload["config"] == engine.config.to_dict()
    assert payload["resolved"] == {"backend": "torch", "precision": "fp32", "world_size": 1}
    assert payload["state"] == engine.state.to_dict()
    assert TrainState.from_dict(payload["state"]) == dataclasses.replace(engine.state, last_good=None, running=None)
    assert saved_config(payload, output_dir=tmp_path) == engine.config
    loaded = Engine.load(tmp_path / "checkpoints" / "last.pt", model())
    assert loaded.config == dataclasses.replace(engine.config, output_dir=None)


def test_class_names_found_in_the_training_dataset_are_checkpointed_and_loaded(tmp_path):
    class Named(TensorDataset):
        classes = ["normal", "effusion", "nodule", "mass"]

    images, labels = learnable_task()
    engine = Engine(model(), epochs=1, progress=False, output_dir=tmp_path)
    engine.fit(DataLoader(Named(images, labels), batch_size=8))
    assert engine.class_names == Named.classes and engine.config.class_names is None  # found, not configured
    assert fastprompt.read_checkpoint(tmp_path / "checkpoints" / "last.pt")["config"]["class_names"] == Named.classes
    loaded = Engine.load(tmp_path / "checkpoints" / "last.pt", model())
    assert loaded.class_names == Named.classes  # evaluate names the classes without the training dataset


def test_train_state_reads_the_dict_it_replaced():
    old = {"epoch": 1, "step_in_epoch": 2, "global_step": 6, "best": {"metric": "val_auc", "value": 0.5, "epoch": 1}}
    state = TrainState.from_dict(old)  # a checkpoint written before the first epoch ended had no stale_epochs
    assert state == TrainState(epoch=1, step_in_epoch=2, global_step=6, best=BestEpoch("val_auc", 0.5, 1))
    assert state.to_dict() == {**old, "stale_epochs": 0}


@pytest.mark.parametrize("backend", [TorchBackend, DeepSpeedBackend])
def test_both_backends_implement_the_backend_protocol(backend):
    members = [name for name in vars(Backend) if not name.startswith("_")]
    methods = [name for name in members if inspect.isfunction(vars(Backend)[name])]
    assert {"forward", "backward", "step", "load_optimizer_state"} <= set(methods)
    for name in methods:  # each method, with the protocol's parameters
        assert callable(getattr(backend, name, None)), f"{backend.__name__} lacks {name}"
        wanted = list(inspect.signature(vars(Backend)[name]).parameters)
        assert list(inspect.signature(getattr(backend, name)).parameters) == wanted, name
    assert isinstance(backend.name, str)


def test_a_torch_backend_instance_is_a_backend():
    engine = Engine(model(), epochs=1, progress=False, backend="torch")
    engine.fit(loader())
    assert isinstance(engine.backend, Backend)


def test_a_cli_resume_may_change_quiet_and_how_the_run_folder_is_named(tmp_path, monkeypatch, capsys):
    import shutil

    from helpers import CLI_TINY

    from fastprompt.cli import main

    data = shutil.copytree(TESTS / "fixtures" / "cli_v0_data", tmp_path / "data")
    argv = ["train", f"--data={data}", "--val-fraction=0.25", *CLI_TINY]
    assert main([*argv, "--epochs=1", f"--output-dir={tmp_path / 'run'}"]) == 0
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["engine"] == EngineConfig.from_dict(recorded["engine"]).to_dict()
    assert not {"seed", "classes", "positive_class"} & set(recorded)  # recorded once, under "engine"
    monkeypatch.chdir(tmp_path)
    louder = [arg for arg in argv if arg != "--quiet"]
    assert main([*louder, "--epochs=2", "--output-dir=run", "--resume"]) == 0, capsys.readouterr().err
    assert fastprompt.read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["epoch"] == 2
