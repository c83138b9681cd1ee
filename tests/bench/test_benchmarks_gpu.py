"""`python -m benchmarks.gpu` on a CPU: the dry run, every part at tiny size, time boxes, goals and the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO
from timm.models.vision_transformer import VisionTransformer

from benchmarks import gpu, report, results
from fastprompt import FPT

TINY_FILES = {
    "kernels.json": "kernels",
    "memory_ept.json": "memory",
    "throughput_ept.json": "throughput",
    "memory_fpt.json": "memory",
    "frozen_forward.json": "frozen_forward",
    "determinism.json": "determinism",
    "gpu_tests.json": "gpu_tests",
    "gpu_check.json": "gpu_check",
}


def run_check(out: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m benchmarks.gpu --out out --profile tiny ...` from the repository root, as a user would run it."""
    command = [sys.executable, "-m", "benchmarks.gpu", "--out", str(out), "--profile", "tiny", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_every_part_and_goal_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert gpu.main(["--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    for part in gpu.PARTS:
        assert f"{part.name:<15} ≤ {part.box_seconds:4.0f} s" in text
    for goal, target in gpu.GOALS.items():
        assert f"{goal}: {target:g}" in text
    # the sizes: kernels at B 32, H 12 (768 / 64), N 1025, D 64 in bf16; EPT at 512, batch 32; FPT+ batch 16
    assert '"batch": 32, "width": 768, "n": 1025, "d": 64, "dtype": "bf16"' in text
    assert '"model": "vit_base_patch16_224", "resolution": 512, "batch": 32' in text
    assert '"model": "vit_base_patch16_384", "resolution": 512, "batch": 16}' in text
    assert "pytest -m gpu tests/kernels/test_sink_attention.py tests/kernels/test_importance.py" in text
    assert sum(part.box_seconds for part in gpu.PARTS[:-1]) < gpu.TOTAL_SECONDS <= 8 * 60 - 30
    assert not out.exists()


def test_gpu_tests_run_the_kernels_first():
    files = gpu.gpu_test_files(["tests"])
    assert files[:3] == [
        "tests/kernels/test_sink_attention.py",
        "tests/kernels/test_importance.py",
        "tests/methods/test_fpt.py",
    ]
    assert "tests/kernels/test_compile.py" in files and len(files) == len(set(files))
    assert all("pytest.mark.gpu" in (REPO / file).read_text() for file in files)
    assert "tests/metrics/test_metrics.py" not in files  # no GPU test there: not collected at all


def test_an_uninstalled_checkout_imports_the_kernels_through_the_module(tmp_path):
    """On the GPU machine nothing is installed: with PYTHONPATH=. alone, importing benchmarks.gpu maps kernels/ to
    fastprompt.kernels (without it the import fails, so the check is real)."""
    script = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"  # undo a dev install
        "sys.path_importer_cache.clear()\n"
        "if sys.argv[1] == 'hook':\n"
        "    import benchmarks.gpu\n"
        "import fastprompt.kernels\n"
        "print(fastprompt.kernels.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": "."}
    for mode, ok in (("plain", False), ("hook", True)):
        done = subprocess.run(
            [sys.executable, "-c", script, mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert (done.returncode == 0) == ok, (mode, done.stderr[-2000:])
    assert done.stdout.strip().endswith(str(Path("kernels") / "__init__.py"))


def kernel_row(impl: str, kind: str, seconds: float) -> dict:
    return {"op": "attention", "impl": impl, "pass": kind, "time_seconds": {"median": seconds}}


def test_goal_rows_compare_the_parts_files_with_the_targets(tmp_path):
    """Known figures in, the issue's ratios out: each goal's arithmetic and direction."""

    def write(name: str, suite: str, rows: list[dict]) -> None:
        results.write_record(results.run_record(suite, "cpu", {}, rows), tmp_path / name)

    write(
        "kernels.json",
        "kernels",
        [
            kernel_row("sink_attention", "fwd", 0.003),  # the fwd rows must not be taken for the fwd+bwd ones
            kernel_row("sdpa_flash", "fwd", 0.004),
            kernel_row("sink_attention", "fwd+bwd", 0.012),
            kernel_row("sdpa_flash", "fwd+bwd", 0.010),
            kernel_row("ept_reference", "fwd+bwd", 0.060),
        ],
    )
    ept = {"apply_method": "ept"}
    write(
        "memory_ept.json",
        "memory",
        [
            {**ept, "method": "ept", "peak_allocated_bytes": 30},
            {**ept, "method": "ept-official", "peak_allocated_bytes": 100},
        ],
    )
    write(
        "throughput_ept.json",
        "throughput",
        [
            {**ept, "method": "ept", "images_per_second": 240.0},
            {**ept, "method": "ept-official", "images_per_second": 100.0},
        ],
    )
    fpt = {"method": "fpt+-cached", "apply_method": "fpt+", "peak_allocated_bytes": 700 * gpu.MIB}
    write("memory_fpt.json", "memory", [{**fpt, "optimizer_bytes": 40 * gpu.MIB}])
    write("frozen_forward.json", "frozen_forward", [{"impl": "summary", "speedup": 2.5}])
    write(
        "determinism.json",
        "determinism",
        [{"check": "kernels", "bit_identical": True}, {"check": "ept_training", "bit_identical": False}],
    )
    goals = {row["goal"]: row for row in gpu.goal_rows(tmp_path)}
    expected = {
        "sink_vs_sdpa_flash": (1.2, False),  # 12 ms against 10 ms: above 1.1
        "sink_vs_sdpa_flash_fwd": (0.75, True),  # the forward alone meets it: the backward is the gap
        "reference_vs_sink": (5.0, True),
        "ept_memory_ratio": (0.3, True),  # exactly at the target counts as met
        "ept_throughput_ratio": (2.4, False),
        "fpt_plus_peak_mib": (740.0, False),  # the step's peak plus the AdamW state a later step holds
        "frozen_speedup": (2.5, True),
        "deterministic": (0.0, False),
    }
    assert goals.keys() == expected.keys() == gpu.GOALS.keys()
    for name, (measured, passes) in expected.items():
        assert goals[name]["measured"] == pytest.approx(measured), name
        assert goals[name]["passes"] is passes, name
    (tmp_path / "throughput_ept.json").unlink()  # a part that wrote nothing: its goals are owed, not failed
    goals = {row["goal"]: row for row in gpu.goal_rows(tmp_path)}
    assert goals["ept_throughput_ratio"]["measured"] is None and goals["ept_throughput_ratio"]["passes"] is None


def test_parse_pytest_lines_keeps_each_tests_last_outcome():
    text = (
        "tests/test_a.py::test_one PASSED [ 10%]\n"
        "tests/test_a.py::test_two[bf16-1025] FAILED [ 20%]\n"
        "tests/test_a.py::test_one ERROR [ 30%]\n"  # teardown error after the pass
        "FAILED tests/test_a.py::test_two[bf16-1025] - AssertionError\n"
        "collected 3 items\n"
    )
    assert gpu.parse_pytest_lines(text) == [
        {"test": "tests/test_a.py::test_one", "outcome": "ERROR"},
        {"test": "tests/test_a.py::test_two[bf16-1025]", "outcome": "FAILED"},
    ]


def test_materialised_frozen_branch_selects_what_fpt_selects():
    """The frozen forward's reference computes the same features as FPT.extract_features (fp32, tiny backbone)."""
    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=0)
    for mode in ("global", "cls"):
        model = FPT(backbone, 3, variant="fpt+", layers=[0, 2], token_importance=mode, side_input_size=16).eval()
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        want = model.extract_features(images, return_indices=True)
        with torch.no_grad():
            got = gpu.materialised_features(model, images)
        assert torch.equal(got["indices"], want["indices"]), mode
        torch.testing.assert_close(got["keys"], want["keys"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["values"], want["values"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_every_part_runs_at_tiny_size_and_the_report_renders_them_as_a_gpu_run(tmp_path):
    out = tmp_path / "out"
    done = run_check(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {path.name for path in out.glob("*.json")} == set(TINY_FILES)
    records = {name: results.load_record(out / name) for name in TINY_FILES}
    assert {name: record["suite"] for name, record in records.items()} == TINY_FILES
    check = records["gpu_check.json"]["rows"]
    assert [row["status"] for row in check if "part" in row] == ["ok"] * len(gpu.PARTS)
    goals = {row["goal"]: row for row in check if "goal" in row}
    for name in ("sink_vs_sdpa_flash", "reference_vs_sink", "ept_throughput_ratio", "frozen_speedup"):
        assert goals[name]["measured"] > 0, name  # measured from the parts' files (timings on this CPU)
    for name in ("ept_memory_ratio", "fpt_plus_peak_mib"):  # GPU peak memory: no figure on a CPU
        assert goals[name]["measured"] is None and goals[name]["passes"] is None
    assert goals["deterministic"]["measured"] == 1.0
    kernels = records["kernels.json"]["rows"]
    assert {row["impl"] for row in kernels if "time_seconds" in row} >= {
        "sink_attention",
        "sdpa_flash",
        "ept_reference",
    }
    assert {(row["op"], row["pass"]) for row in kernels} >= {("attention", "fwd"), ("attention", "fwd+bwd")}
    assert {row["method"] for row in records["memory_ept.json"]["rows"]} == {"ept", "ept-official"}
    assert records["gpu_tests.json"]["summary"]["SKIPPED"] >= 1  # the GPU tests ran and skipped without CUDA
    assert "goals (issue 3" in done.stdout and "a plumbing check" in done.stdout

    # benchmarks.report reads the files once copied under benchmarks/results/cuda/ (here relabelled as a GPU run)
    root = tmp_path / "results"
    (root / "cuda").mkdir(parents=True)
    for name in TINY_FILES:
        record = json.loads((out / name).read_text())
        record.update(device="NVIDIA H200", device_type="cuda")
        (root / "cuda" / name).write_text(json.dumps(record))
    readme = tmp_path / "README.md"
    report.render(root, readme, tmp_path / "plots", committed_only=False)
    text = readme.read_text()
    for section in ("### Memory (GPU)", "### Throughput (GPU)", "### Kernels (GPU)"):
        body = text.split(section)[1].split("###")[0]
        assert report.NOT_ON_GPU not in body and "NVIDIA H200" in body, section
    assert "| sink_attention |" in text.split("### Kernels (GPU)")[1].split("###")[0]
    check_section = text.split("### GPU check")[1].split("###")[0]
    assert "EPT step peak memory / official-style" in check_section and "| not measured |" in check_section
    assert "| determinism | ok |" in check_section


@pytest.mark.slow
def test_a_part_past_its_time_box_is_stopped_and_the_others_still_write(tmp_path):
    out = tmp_path / "out"
    done = run_check(out, "--parts", "frozen_forward", "kernels", "--box-override", "frozen_forward=1")
    assert done.returncode == 1  # not every part finished
    statuses = {
        row["part"]: row["status"] for row in results.load_record(out / "gpu_check.json")["rows"] if "part" in row
    }
    assert statuses == {"frozen_forward": "timed out", "kernels": "ok"}
    assert (out / "kernels.json").exists() and not (out / "frozen_forward.json").exists()
    assert "stopped at its 1 s box" in done.stdout


def test_commit_is_stamped_only_where_git_was_missing(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    missing = results.run_record("kernels", "cpu", {}, [])
    missing.update(git_commit=None, git_dirty=None)
    known = results.run_record("kernels", "cpu", {}, [])
    known.update(git_commit="f" * 40, git_dirty=True)
    results.write_record(missing, tmp_path / "a.json")
    results.write_record(known, tmp_path / "b.json")
    assert gpu.stamp_commit(tmp_path, sha) == [tmp_path / "a.json"]
    a, b = results.load_record(tmp_path / "a.json"), results.load_record(tmp_path / "b.json")
    assert (a["git_commit"], a["git_dirty"]) == (sha, False)
    assert (b["git_commit"], b["git_dirty"]) == ("f" * 40, True)


def test_bad_box_override_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu.main(["--out", "x", "--dry-run", "--box-override", "kernel=5"])
    assert "expected PART=SECONDS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.main(["--out", "x", "--dry-run", "--commit", "HEAD"])
    assert "40-digit hex SHA" in capsys.readouterr().err
    shutil.rmtree("x", ignore_errors=True)


def test_kernels_file_is_written_row_by_row_with_ratios_to_sdpa_flash(tmp_path, monkeypatch):
    """A kernels run stopped after two rows (here by an exception in the third) leaves a valid file with both rows,
    each timed row with its ratio to SDPA flash at the same shape and pass."""
    from benchmarks import kernels as kernel_suite

    times = {"sdpa_flash": 0.010, "sink_attention": 0.012, "sink_attention_deterministic": 0.015}
    todo = [("attention", impl, None, "fwd+bwd", 33, 32) for impl in times]
    monkeypatch.setattr(kernel_suite, "cases", lambda args, device: todo)

    def run_case(op, impl, fn, kind, n, d, args, device):
        if impl == "sink_attention_deterministic":
            raise KeyboardInterrupt  # the run is stopped here
        row = {"op": op, "impl": impl, "n": n, "d": d, "batch": 1, "heads": 2, "dtype": "fp32", "pass": kind}
        return {**row, "time_seconds": {"median": times[impl]}, "tflops": 1.0}

    monkeypatch.setattr(kernel_suite, "run_case", run_case)
    path = tmp_path / "kernels.json"
    with pytest.raises(KeyboardInterrupt):
        kernel_suite.main(["--output", str(path), "--ns", "33", "--head-dims", "32"])
    rows = results.load_record(path)["rows"]
    assert [row["impl"] for row in rows] == ["sdpa_flash", "sink_attention"]
    assert rows[0]["vs_sdpa_flash"] == pytest.approx(1.0) and rows[1]["vs_sdpa_flash"] == pytest.approx(1.2)


def test_kernels_suite_times_both_backward_variants_and_flash_attn_beside_sdpa():
    from benchmarks import kernels as kernel_suite

    impls = kernel_suite.attention_impls(torch.device("cpu"))
    assert list(impls)[:2] == ["sdpa_flash", "sdpa_efficient"]  # the ratios' reference is measured first
    assert {"sink_attention", "sink_attention_deterministic", "flash_attn"} <= impls.keys()
    assert impls["sink_attention_deterministic"].deterministic and not impls["sink_attention"].deterministic
    assert isinstance(impls["flash_attn"], str)  # no flash-attn on a CPU: the reason, as a skipped row


def test_deterministic_impl_runs_forward_and_backward_in_deterministic_mode(monkeypatch):
    """The deterministic variant sets FASTPROMPT_DETERMINISTIC=1 around its forward and backward, then restores it."""
    from benchmarks import kernels as kernel_suite
    from fastprompt.kernels.dispatch import deterministic

    monkeypatch.delenv("FASTPROMPT_DETERMINISTIC", raising=False)
    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", deterministic()))
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", deterministic()))
            return grad

    fake = type("K", (), {"sink_attention": staticmethod(lambda q, k, v, sink: Spy.apply(q) * 1.0)})
    inputs = kernel_suite.make_inputs(1, 1, 4, 8, torch.float32, torch.device("cpu"), grad=True)
    for flag in (True, False):
        seen.clear()
        kernel_suite.forward_backward(kernel_suite.sink_attention_impl(fake, flag), inputs)()
        assert seen == [("forward", flag), ("backward", flag)]
        assert "FASTPROMPT_DETERMINISTIC" not in os.environ


def test_commit_comes_from_the_argument_or_the_environment(monkeypatch):
    sha, other = "0123456789abcdef0123456789abcdef01234567", "f" * 40
    monkeypatch.delenv(results.COMMIT_ENV, raising=False)
    assert gpu.resolve_commit(None) is None  # a git checkout needs neither
    monkeypatch.setenv(results.COMMIT_ENV, other)
    assert gpu.resolve_commit(None) == other
    assert gpu.resolve_commit(sha) == sha
    monkeypatch.setenv(results.COMMIT_ENV, "HEAD")
    with pytest.raises(SystemExit, match="FASTPROMPT_COMMIT.*40-digit hex SHA"):
        gpu.resolve_commit(None)


def test_a_tree_without_git_records_the_commit_from_the_environment(tmp_path, monkeypatch):
    """Every record a child writes, from its first row, carries the commit its parent was told (no stamping needed)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(results, "REPO_ROOT", tmp_path)  # a copied tree: git has no answer here
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "benchmarks" / "results")
    monkeypatch.delenv(results.COMMIT_ENV, raising=False)
    assert results.git_commit() == {"commit": None, "dirty": None}
    monkeypatch.setenv(results.COMMIT_ENV, sha)
    record = results.run_record("kernels", "cpu", {}, [])
    assert (record["git_commit"], record["git_dirty"]) == (sha, False)


def test_gpu_tests_file_keeps_each_finished_test_when_the_box_stops_pytest(tmp_path, monkeypatch):
    """gpu_tests.json is rewritten while pytest still runs (the fake pytest sees its own two results in it before it
    prints a third), and pytest stopped at its box leaves the outcomes so far, marked as timed out."""
    script = (
        "import json, pathlib, sys, time\n"
        "print('tests/test_a.py::test_one PASSED [ 50%]', flush=True)\n"
        "print('tests/test_a.py::test_two SKIPPED (needs CUDA) [100%]', flush=True)\n"
        "path = pathlib.Path(sys.argv[1])\n"
        "for _ in range(100):\n"
        "    if path.exists() and len(json.loads(path.read_text())['rows']) == 2:\n"
        "        print('tests/test_a.py::test_file_written_already PASSED', flush=True)\n"
        "        break\n"
        "    time.sleep(0.1)\n"
        "time.sleep(120)\n"
    )
    real = subprocess.Popen
    out = str(tmp_path / "gpu_tests.json")
    monkeypatch.setattr(gpu.subprocess, "Popen", lambda command, **kw: real([sys.executable, "-c", script, out], **kw))
    profile = {"device": "cpu", "gpu_tests": {"paths": ["tests/kernels/test_compile.py"]}}
    started = time.perf_counter()
    gpu.gpu_tests_part(profile, tmp_path, box_seconds=15)
    assert time.perf_counter() - started < 60
    record = results.load_record(tmp_path / "gpu_tests.json")
    assert record["rows"] == [
        {"test": "tests/test_a.py::test_one", "outcome": "PASSED"},
        {"test": "tests/test_a.py::test_two", "outcome": "SKIPPED"},
        {"test": "tests/test_a.py::test_file_written_already", "outcome": "PASSED"},
    ]
    assert record["summary"]["timed_out"] is True and record["summary"]["returncode"] is None


@pytest.mark.parametrize(("differ", "expected"), [(True, False), (False, True)])
def test_determinism_compares_two_separate_runs(tmp_path, monkeypatch, differ, expected):
    """Each check runs twice and compares the runs: runs that differ (a counter in the output) are reported as not
    bit-identical, equal runs as identical; a comparison of one run with itself would call both identical."""
    calls = {"kernels": 0, "ept_training": 0}

    def fake(name):
        def run(*args, **kwargs):
            calls[name] += 1
            return [torch.ones(3), torch.full((2,), float(calls[name] if differ else 0))]

        return run

    monkeypatch.setattr(gpu, "_kernel_run", fake("kernels"))
    monkeypatch.setattr(gpu, "_training_run", fake("ept_training"))
    monkeypatch.setattr("fastprompt.engine.core.enable_determinism", lambda: None)  # no global switches in-process
    gpu.determinism_part(gpu.PROFILES["tiny"], tmp_path)
    rows = {row["check"]: row for row in results.load_record(tmp_path / "determinism.json")["rows"]}
    assert calls == {"kernels": 2, "ept_training": 2}
    for check in calls:
        assert rows[check]["bit_identical"] is expected, rows
        assert rows[check]["max_abs_difference"] == (1.0 if differ else 0.0)


@pytest.mark.parametrize("shift", [0, 1])
def test_frozen_forward_compares_the_selections_and_times_of_both_paths(tmp_path, monkeypatch, shift):
    """The index agreement compares the two paths' selections (a reference that picks other tokens lowers it), and
    the speed-up is the reference's time over the fused path's (fixed timings in, their ratio out)."""
    real = gpu.materialised_features

    def reference(model, images):
        features = real(model, images)
        n = (images.shape[-1] // 16) ** 2 + 1  # tokens of the tiny profile's ViT
        return {**features, "indices": (features["indices"] + shift) % n}

    class Timing:
        def __init__(self, median):
            self.median = median

        def as_dict(self):
            return {"median": self.median}

    medians = iter([0.5, 2.0])  # fused first, then the reference
    monkeypatch.setattr(gpu, "materialised_features", reference)
    monkeypatch.setattr(gpu.harness, "time_fn", lambda *args, **kwargs: Timing(next(medians)))
    gpu.frozen_forward_part(gpu.PROFILES["tiny"], tmp_path)
    summary = results.load_record(tmp_path / "frozen_forward.json")["rows"][-1]
    assert summary["speedup"] == pytest.approx(4.0)
    if shift == 0:
        assert summary["selected_index_agreement"] == 1.0  # fp32: both paths select the same tokens
    else:
        assert summary["selected_index_agreement"] < 0.9
