"""Benchmark runs write where the user is (./benchmark-results/), never into the committed benchmarks/results/."""

from __future__ import annotations

import argparse
import importlib

import pytest

results = pytest.importorskip("benchmarks.results")


def committed_files() -> set:
    return {path for path in results.RESULTS_DIR.rglob("*") if path.is_file()}


@pytest.mark.parametrize("output, expected", [(None, "benchmark-results/cpu/s.json"), ("mine", "mine/cpu/s.json"),
                                              ("one.json", "one.json")])  # fmt: skip
def test_suite_runs_default_to_the_current_directory(tmp_path, monkeypatch, capsys, output, expected):
    monkeypatch.chdir(tmp_path)
    before = committed_files()
    args = argparse.Namespace(output=output, batch=1)
    path = results.save_suite_run("memory", "cpu", args, [{"method": "ept", "bytes": 1}], [], "s")
    assert path.resolve() == (tmp_path / expected).resolve()
    assert results.load_record(path)["config"] == {"batch": 1}
    assert committed_files() == before


def test_explicit_output_benchmarks_results_commits(tmp_path, monkeypatch):
    record = {"device_type": "cpu", "device": "x"}
    assert results.default_path(record, "s", results.RESULTS_DIR) == results.RESULTS_DIR / "cpu" / "s.json"


@pytest.mark.parametrize("suite, measured", [
    ("ept_memory", {"fused": 1, "official": 2}),
    ("fpt_memory", {"fpt+_cached": {"saved_bytes": 1}, "full_finetune_saved_bytes": 4, "ratio": 0.25}),
])  # fmt: skip
def test_standalone_suites_default_to_the_current_directory(tmp_path, monkeypatch, capsys, suite, measured):
    module = importlib.import_module(f"benchmarks.{suite}")
    monkeypatch.setattr(module, "measure", lambda *args: measured)  # the measurement itself is tested elsewhere
    monkeypatch.chdir(tmp_path)
    before = committed_files()
    path = module.main([])
    assert path.resolve().is_relative_to((tmp_path / "benchmark-results" / "cpu").resolve())
    assert committed_files() == before


def test_cli_startup_suite_measures_every_help_screen(tmp_path):
    from benchmarks import cli_startup

    path = cli_startup.main(["--repeats=1", f"--output={tmp_path / 'startup.json'}"])
    rows = results.load_record(path)["rows"]
    assert [row["command"] for row in rows][:2] == ["fastprompt --help", "fastprompt train --help"]
    assert len(rows) == len(cli_startup.COMMANDS)
    assert all(row["heavy_modules_imported"] == [] for row in rows)  # not even the error row imports torch
    assert [row["exit_code"] for row in rows] == [0] * (len(rows) - 1) + [2]  # the missing --data: exit 2


@pytest.mark.parametrize("output", [None, "committed"])
def test_default_set_forwards_its_output_folder(tmp_path, monkeypatch, capsys, output):
    import benchmarks.__main__ as default_set

    seen = []
    for suite in ("memory", "throughput", "kernels"):
        monkeypatch.setattr(getattr(default_set, suite), "main", lambda argv, name=suite: seen.append(argv) or name)
    default_set.main([] if output is None else ["--output", output])
    assert len(seen) == 3
    for argv in seen:
        assert ("--output" in argv) == (output is not None)
        if output is not None:
            assert argv[argv.index("--output") + 1] == output
