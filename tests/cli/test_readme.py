"""The README's first screen is install, then own-data training, then predict; every `fastprompt` command and the
config-file example it shows parse with today's command line."""

from __future__ import annotations

import re
import shlex

import yaml
from helpers import REPO

from fastprompt.cli import build_parser
from fastprompt.cli.config import expand_config

README = REPO / "README.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def fastprompt_commands() -> list[list[str]]:
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("fastprompt "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_first_screen_is_install_then_own_data_then_predict():
    titles = re.findall(r"^## (.+)$", README.read_text(encoding="utf-8"), flags=re.M)
    assert titles[:3] == ["Install", "Train on your own folder of images", "Predict and evaluate"]
    for topic in ("Multi-GPU and multi-node", "DICOM", "Offline use and local weights", "Benchmarks"):
        assert topic in titles
    assert "docs/benchmarks.md" in README.read_text(encoding="utf-8")


def test_every_fastprompt_command_in_the_readme_parses(tmp_path):
    parser = build_parser()
    commands = fastprompt_commands()
    assert len(commands) >= 10
    config = tmp_path / "train.yaml"
    config.write_text(code_blocks("yaml")[0])
    for argv in commands:
        if argv[0] == "bench" or argv == ["demo"]:
            continue  # bench forwards its arguments to the suite
        if "--config" in argv:  # the README's train.yaml, or a run's config.yaml (same keys)
            at = argv.index("--config")
            argv = [argv[0], *expand_config(parser._subparsers._group_actions[0].choices["train"],
                                            [*argv[1:at], "--config", str(config), *argv[at + 2:]])]  # fmt: skip
        args = parser.parse_args(argv)  # SystemExit (a failed test) on any unknown flag or bad value
        assert args.command == argv[0]


def test_the_config_example_uses_only_train_flags():
    settings = yaml.safe_load(code_blocks("yaml")[0])
    train = build_parser().parse_args(["train", "--data=d", "--model=m", "--output-dir=o"])
    for key in settings:
        assert hasattr(train, key.replace("-", "_")), key
