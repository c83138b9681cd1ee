"""`fastprompt train --config FILE`: YAML/TOML flags, command-line overrides, RUN/config.yaml repeats a run, and
one-line errors for unknown keys and bad values (before torch is imported)."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import write_image_folder

from fastprompt.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("config") / "data", 5)


def tiny_settings(folder) -> dict:
    """TINY and FAST written as config-file keys."""
    return {
        "data": str(folder),
        "model": "vit_tiny_patch16_224",
        "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
        "img-size": 32,
        "method": "linear",
        "epochs": 2,
        "batch_size": 4,
        "lr": 0.01,
        "workers": 0,
        "backend": "torch",
        "quiet": True,
    }


def test_yaml_config_trains_flags_override_and_the_run_config_repeats_it(folder, tmp_path):
    config = tmp_path / "train.yaml"
    file_kwargs = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "mlp_ratio": 2.0}
    settings = {**tiny_settings(folder), "epochs": 5, "seed": 3, "hflip": True, "model_kwargs": file_kwargs}
    settings.update({"logger": ["csv"], "class-weights": [1.0, 2.0]})  # a list flag with choices, a typed list
    config.write_text(yaml.safe_dump(settings))
    first = tmp_path / "first"
    flags = ["--epochs=1", "--no-hflip", "--model-kwargs", "depth=2", "embed_dim=32", "num_heads=2", "patch_size=8"]
    assert main(["train", "--config", str(config), *flags, f"--output-dir={first}"]) == 0
    settings = yaml.safe_load((first / "config.yaml").read_text())
    assert settings["epochs"] == 1 and settings["seed"] == 3  # the command line wins; the file fills the rest
    assert settings["hflip"] is False  # a flag replaces the file's value entirely (no mlp_ratio from the file):
    assert settings["model-kwargs"] == {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
    assert settings["logger"] == ["csv"] and settings["class-weights"] == [1.0, 2.0]
    run = json.loads((first / "config.json").read_text())
    assert run["engine"]["epochs"] == 1 and run["augmentation"]["hflip"] == 0.0
    assert not any("Flip" in step for step in run["augmentation"]["pipeline"])

    second = tmp_path / "second"
    assert main(["train", "--config", str(first / "config.yaml"), f"--output-dir={second}"]) == 0
    again = yaml.safe_load((second / "config.yaml").read_text())
    assert {**again, "output-dir": None} == {**settings, "output-dir": None}
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (first, second)]
    assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-5)  # the same run, repeated


def test_toml_config_and_defaults(folder, tmp_path):
    config = tmp_path / "train.toml"
    lines = [f"{key} = {json.dumps(value)}" for key, value in tiny_settings(folder).items() if key != "model_kwargs"]
    lines.append('model-kwargs = ["depth=2", "embed_dim=32", "num_heads=2", "patch_size=8"]')
    config.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(["train", f"--config={config}", f"--output-dir={out}"]) == 0
    run = json.loads((out / "config.json").read_text())
    assert run["model_kwargs"]["depth"] == 2 and run["engine"]["lr"] == 0.01
    augmentation = run["augmentation"]  # the default preset, recorded with its resolved pipeline: no flips
    assert augmentation["augment"] == "standard" and augmentation["hflip"] == 0.0 and augmentation["scale"] == [0.7, 1]
    assert any(step.startswith("RandomResizedCrop(") for step in augmentation["pipeline"])
    assert not any("Flip" in step for step in augmentation["pipeline"])


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("batch_sise: 4\n", ".yaml", "unknown key 'batch_sise'; did you mean 'batch-size'?"),
        ("lr = -1\n", ".toml", "key 'lr' has value -1, which is not allowed: must be a number greater than 0"),
        ("augment: strong\n", ".yaml", "key 'augment' has value 'strong'; allowed: one of none, light, standard"),
        ("pretrained: 1\n", ".yaml", "key 'pretrained' has value 1; allowed: true or false"),
        ("crop-scale: [0.9, 0.2]\n", ".yaml", "'crop-scale' has value [0.9, 0.2], which is not allowed: crop scale"),
        ("logger: [csv, wandb]\n", ".yaml", "'logger' has value ['csv', 'wandb']; allowed: a list of one of csv,"),
        ("- lr\n", ".yaml", "must hold a mapping of flag: value, got a list"),
        ("lr: [1\n", ".yaml", "cannot be parsed"),
    ],
)
def test_config_errors_name_the_key_the_value_and_what_is_allowed(tmp_path, capsys, content, suffix, message):
    config = tmp_path / f"bad{suffix}"
    config.write_text(content)
    assert main(["train", "--config", str(config), "--data=x", "--model=m", "--output-dir=o"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("fastprompt train: error: --config") and message in errors[0]
