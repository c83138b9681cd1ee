"""The command line answers at once: help without torch, defaults and descriptions, arguments checked first."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import pytest

from fastprompt.cli import build_parser, main
from fastprompt.cli.common import METHOD_NAMES

COMMANDS = ("train", "evaluate", "predict", "preload", "bench", "explain", "demo")
HEAVY = ("torch", "timm", "torchvision", "numpy", "PIL")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_imports_neither_torch_nor_timm_and_is_fast():
    code = (
        "import sys, time\n"
        "start = time.perf_counter()\n"
        "from fastprompt.cli import main\n"
        f"codes = [main([*command, '--help']) for command in ([], *[[c] for c in {COMMANDS!r}])]\n"
        "elapsed = time.perf_counter() - start\n"
        f"print(codes, [m for m in {HEAVY!r} if m in sys.modules], elapsed)\n"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{[0] * (len(COMMANDS) + 1)} [] "), last  # every --help exits 0, nothing heavy imported
    in_process = float(last.rsplit(" ", 1)[1])
    print(f"{len(COMMANDS) + 1} --help screens: {in_process:.3f} s in-process, {wall:.2f} s with interpreter start")
    assert in_process < 2.0  # today ~0.1 s; importing torch + timm alone takes 10-27 s on this machine


def test_import_fastprompt_is_light_and_exports_load_on_use():
    code = (
        "import sys, fastprompt\n"
        "light = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]\n"
        "names = sorted(fastprompt.__all__)\n"
        "missing = [n for n in names if getattr(fastprompt, n, None) is None]\n"
        "print(light, missing, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[] [] True"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_shows_its_default_and_a_description(command):
    parser = subcommands()[command]
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1]
        described = parser._get_formatter()._expand_help(action) if action.help else ""
        assert described and len(described.split()) >= 3, f"{command} {flag}: no description"
        assert "(default" in described or "(required)" in described, f"{command} {flag}: {described!r}"
    if command in ("train", "evaluate", "preload"):  # commands that read a labelled dataset explain the CSV format
        words = " ".join(text.split())
        assert "`path,label`" in words and "0/1 column per class" in words


def test_bench_help_lists_the_suites(capsys):
    pytest.importorskip("benchmarks")
    assert main(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    for suite in ("memory", "throughput", "kernels", "report"):
        assert f"\n  {suite} " in text
    words = " ".join(text.split())
    assert "./benchmark-results/" in words and "--output benchmarks/results" in words


def test_preload_offers_only_the_options_preload_uses():
    flags = {flag for action in subcommands()["preload"]._actions for flag in action.option_strings}
    expected = {"-h", "--help", "--data", "--model", "--pretrained", "--weights", "--checkpoint", "--model-kwargs"}
    expected |= {"--img-size", "--method", "--token-ratio", "--option", "--seed", "--cache", "--batch-size", "--dtype"}
    assert flags == expected | {"--debug", "--quiet"}


def test_method_names_for_help_match_the_registry():
    import fastprompt

    assert tuple(fastprompt.available_methods()) == METHOD_NAMES


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--batch-size", "0", "argument --batch-size: must be a positive integer (1 or more), got 0"),
        ("--lr", "-1", "argument --lr: must be a number greater than 0, got -1"),
        ("--epochs", "0", "argument --epochs: must be a positive integer (1 or more), got 0"),
        ("--val-fraction", "1.5", "argument --val-fraction: must be between 0 and 1 (exclusive), got 1.5"),
        ("--grad-accum", "x", "argument --grad-accum: expected an integer, got 'x'"),
    ],
)
def test_bad_numbers_are_rejected_before_anything_is_built(tmp_path, capsys, monkeypatch, flag, value, message):
    import fastprompt.cli.runs as runs

    def must_not_build(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(runs, "make_backbone", must_not_build)
    out = tmp_path / "run"
    argv = ["train", f"--data={tmp_path}", "--model=vit_tiny_patch16_224", f"--output-dir={out}", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastprompt train: error: {message} (see `fastprompt train --help`)"]
    assert not out.exists()
