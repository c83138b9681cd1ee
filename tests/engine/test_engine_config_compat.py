"""Run folders written before EngineConfig/TrainState (tests/fixtures, by the code at cc56237) still resume and load.

engine_v0_run: a bare Engine's output_dir after 2 of a constant-lr schedule's epochs (checkpoint version 1: the
config and state as string-keyed dicts). cli_v0_run: a `fastprompt train` run folder whose config.json has the old
"engine" dict and the class names at its top level. See tests/fixtures/make_engine_v0_checkpoint.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fixtures.make_engine_v0_checkpoint import ENGINE_OPTIONS, engine_loaders, engine_model
from helpers import TESTS

from fastprompt import Engine, load_run, read_checkpoint
from fastprompt.cli import main
from fastprompt.engine import BestEpoch, EngineConfig, TrainState

FIXTURES = TESTS / "fixtures"

ENGINE_RUN, CLI_RUN, CLI_DATA = FIXTURES / "engine_v0_run", FIXTURES / "cli_v0_run", FIXTURES / "cli_v0_data"


def test_the_fixture_is_the_old_format():
    payload = read_checkpoint(ENGINE_RUN / "checkpoints" / "last.pt")
    assert payload["version"] == 1 and "resolved" in payload["config"] and "resolved" not in payload


def test_an_old_engine_checkpoint_loads_with_its_config_and_state(tmp_path):
    run = shutil.copytree(ENGINE_RUN, tmp_path / "run")
    saved = read_checkpoint(run / "checkpoints" / "last.pt")
    loaded = Engine.load(run / "checkpoints" / "last.pt", engine_model())
    assert loaded.config == EngineConfig(**ENGINE_OPTIONS)
    assert loaded.history == saved["history"]
    params = dict(loaded.model.named_parameters())
    assert all(torch.equal(params[name].detach(), value) for name, value in saved["trainable"].items())

    engine = Engine(engine_model(), output_dir=run, **ENGINE_OPTIONS)
    train, val = engine_loaders()
    assert engine.fit(train, val, resume=True) == saved["history"]  # nothing left to train: the state is restored
    best = saved["state"]["best"]
    assert engine.state == TrainState(
        epoch=2, step_in_epoch=0, global_step=8, best=BestEpoch(best["metric"], best["value"], best["epoch"]),
        stale_epochs=saved["state"]["stale_epochs"], last_good=str(run / "checkpoints" / "last.pt"),
        running=engine.state.running,
    )  # fmt: skip
    assert engine.state.running.to_dict() == saved["running"][0]
    optimizer = engine.backend.optimizer.state_dict()["state"]
    for key, value in saved["optimizer"][0]["optimizer"]["state"].items():
        assert all(torch.equal(optimizer[key][name], value[name]) for name in value)


def test_an_old_engine_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    """Extending the fixture's 2 epochs to 3 (constant lr) ends where one 3-epoch run ends, bit for bit."""
    run = shutil.copytree(ENGINE_RUN, tmp_path / "run")
    options = {**ENGINE_OPTIONS, "epochs": 3}
    train, val = engine_loaders()
    resumed = Engine(engine_model(), output_dir=run, **options)
    history = resumed.fit(train, val, resume=True)
    straight = Engine(engine_model(), output_dir=tmp_path / "straight", **options)
    straight_history = straight.fit(train, val)
    for key in ("train_loss", "lr", "val_loss", "val_auc"):
        assert [record[key] for record in history] == [record[key] for record in straight_history], key
    a, b = resumed.trainable_state_dict(), straight.trainable_state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert resumed.state.to_dict() == straight.state.to_dict()
    payload = read_checkpoint(run / "checkpoints" / "last.pt")  # rewritten in today's format
    assert payload["version"] == 2 and payload["config"] == resumed.config.to_dict()


def test_an_old_cli_run_folder_evaluates_predicts_and_loads(tmp_path, capsys):
    run = shutil.copytree(CLI_RUN, tmp_path / "run")
    data = shutil.copytree(CLI_DATA, tmp_path / "data")
    loaded = load_run(run)
    assert loaded.classes == ["benign", "malignant"] and loaded.epoch == 1
    recorded = json.loads((CLI_RUN / "metrics.json").read_text())
    argv = ["evaluate", f"--checkpoint={run}", f"--data={data}", "--workers=0", "--quiet"]
    assert main([*argv, f"--output={tmp_path / 'evaluation.json'}"]) == 0
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["positive_class"] == "malignant" == recorded["positive_class"]  # the run's recorded choice
    assert main(["predict", f"--run={run}", f"--data={data}", f"--output={tmp_path / 'p.csv'}", "--quiet"]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 and "positive_class" in rows[0] and rows[1].count("malignant") >= 1


def test_an_old_cli_run_folder_resumes(tmp_path, capsys):
    from helpers import CLI_TINY

    run = shutil.copytree(CLI_RUN, tmp_path / "run")
    data = shutil.copytree(CLI_DATA, tmp_path / "data")
    old = json.loads((run / "config.json").read_text())
    old["data"] = str(data)  # where the images are now (the fixture recorded where they were generated)
    (run / "config.json").write_text(json.dumps(old))
    argv = ["train", f"--data={data}", "--val-fraction=0.25", *CLI_TINY, f"--output-dir={run}", "--resume"]
    assert main([*argv, "--epochs=2"]) == 0, capsys.readouterr().err
    assert read_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 2
    assert json.loads((run / "config.json").read_text()) == old  # a resume keeps the run's config.json
    resumes = [json.loads(line) for line in (run / "resume_history.jsonl").read_text().splitlines()]
    assert resumes[-1]["changes"]["engine.epochs"] == [1, 2]


@pytest.mark.parametrize("path", ["checkpoints/last.pt", "checkpoints/best.pt"])
def test_old_cli_checkpoints_read_as_engine_configs(path):
    from fastprompt.engine.config import saved_config

    payload = read_checkpoint(CLI_RUN / path)
    config = saved_config(payload)
    assert config.class_names == ("benign", "malignant") and config.positive_class == "malignant"
