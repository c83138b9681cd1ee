"""Mistakes the command line can see without torch fail before torch is imported, in well under a second; `bench`
works from any working directory and never overwrites a result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastprompt.cli import main

# Runs main(argv) in a fresh interpreter and reports its exit code and whether torch was imported by then.
PROBE = """
import sys
from fastprompt.cli import main
code = main({argv!r})
print(code, "torch" in sys.modules, "timm" in sys.modules)
"""


def probe(argv: list[str], cwd: Path) -> tuple[float, str, str]:
    """(wall seconds of the whole subprocess, its stdout, its stderr)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    return time.perf_counter() - start, result.stdout, result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--data=absent", "--model=vit_base_patch16_384", "--output-dir=run"],
            "--data absent does not exist",
        ),
        (["train", "--data=.", "--val=nope", "--model=m", "--output-dir=run"], "--val nope does not exist"),
        (["train", "--data=.", "--model=m", "--method=eptt", "--output-dir=run"], "unknown method 'eptt'"),
        (
            ["train", "--data=.", "--model=m", "--checkpoint=w.pt", "--output-dir=run"],
            "--checkpoint w.pt is not a file",
        ),
        (["train", "--data=.", "--model=m", "--method=ept", "--cache=c", "--output-dir=run"], "--cache holds FPT"),
        (["evaluate", "--checkpoint=nope", "--data=."], "--checkpoint nope does not exist"),
        (["predict", "--checkpoint=.", "--data", ".", "gone.png", "--output=p.csv"], "--data gone.png does not exist"),
        (["preload", "--data=.", "--model=m", "--method=ept", "--cache=c"], "method 'ept' is not one this command"),
        (["explain", "--checkpoint=.", "x.png", "--output-dir=o"], "image x.png does not exist"),
    ],
)
def test_bad_arguments_fail_before_torch_is_imported(tmp_path, argv, message):
    seconds, out, err = probe(argv, tmp_path)
    assert out.split() == ["2", "False", "False"], err  # exit code 2, torch and timm never imported
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastprompt {argv[0]}: error: ") and message in lines[0]


def test_a_bad_path_fails_in_under_a_second(tmp_path):
    argv = ["train", "--data=absent", "--model=vit_base_patch16_384", "--output-dir=run"]
    # the whole interpreter (start-up, imports, parsing, the check) counts; best of 3 on a shared, loaded machine
    seconds = min(probe(argv, tmp_path)[0] for _ in range(3))
    assert seconds < 1.0, f"a mistyped --data took {seconds:.2f} s"


def test_bench_runs_outside_the_repository_and_never_overwrites(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # as a user's shell: the repository is not on the path
    flags = ["--model", "vit_tiny_patch16_224", "--resolutions", "32", "--methods", "linear", "--output", "out"]
    command = [sys.executable, "-m", "fastprompt", "bench", "memory", *flags]
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    written = sorted(path.name for path in (tmp_path / "out" / "cpu").iterdir())
    stem = "memory_vit_tiny_patch16_224_r32_fp32_b1_m-linear"
    assert written == [f"{stem}-2.json", f"{stem}.json"]
    first, second = (json.loads((tmp_path / "out" / "cpu" / name).read_text()) for name in written[::-1])
    assert first["date"] <= second["date"] and first["rows"][0]["method"] == "linear"


def test_in_process_preflight_names_the_flag(tmp_path, capsys):
    assert main(["train", f"--data={tmp_path / 'x'}", "--model=m", f"--output-dir={tmp_path}/run"]) == 2
    assert textwrap.shorten(capsys.readouterr().err, 200).startswith(f"fastprompt train: error: --data {tmp_path}")


def test_a_mistyped_method_option_is_hinted_as_the_command_line_flag(tmp_path, capsys):
    argv = ["train", f"--data={tmp_path}", "--model=m", "--method=ept", f"--output-dir={tmp_path}/run"]
    assert main([*argv, "--option", "promt_length=5"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown option(s) ['promt_length'] for method 'ept' (did you mean --prompt-length?)" in error
    assert "--option prompt_init=VALUE" in error and "prompt_length=" not in error.split("valid options:")[1]


@pytest.mark.parametrize("command", ["evaluate", "predict", "explain"])
def test_checkpoint_flags_one_meaning_each(command):
    from fastprompt.cli import build_parser

    extra = {
        "evaluate": ["--data=d"],
        "predict": ["--data", "d", "--output=p.csv"],
        "explain": ["x.png", "--output-dir=o"],
    }
    for flag in ("--run", "--checkpoint"):  # the trained run (folder or .pt); --checkpoint is the older name
        assert build_parser().parse_args([command, flag, "runs/a", *extra[command]]).checkpoint == "runs/a"
    for flag in ("--weights", "--checkpoint"):  # train: the backbone's weight file
        args = build_parser().parse_args(["train", "--data=d", "--model=m", "--output-dir=o", flag, "w.safetensors"])
        assert args.checkpoint == "w.safetensors"


def test_bench_memory_help_is_fast_and_imports_no_torch(tmp_path):
    code = (
        "import sys, time\nstart = time.perf_counter()\nfrom fastprompt.cli import main\n"
        "code = main(['bench', 'memory', '--help'])\n"
        "print('RESULT', code, 'torch' in sys.modules, round(time.perf_counter() - start, 3))\n"
    )
    best = None
    for _ in range(3):  # best of 3: the whole interpreter counts, on a shared machine
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    assert "--resolutions" in result.stdout and "--hf-model" in result.stdout, result.stderr
    assert result.stdout.split("RESULT")[1].split()[:2] == ["0", "False"]  # exit 0, torch never imported
    assert best < 2.0, f"bench memory --help took {best:.2f} s"


def test_bench_options_agree_with_the_modules_they_stand_in_for():
    from benchmarks import memory, models, options
    from fastprompt.checkpointing import POLICIES

    assert options.POLICIES == POLICIES and sorted(options.PRECISION_NAMES) == sorted(models.PRECISIONS)
    args = memory.parse_args(["--resolutions", "32", "--budget", "1GB"])
    assert (args.resolutions, args.budget, args.isolate, args.checkpointing) == ([32], "1GB", True, ["none"])
