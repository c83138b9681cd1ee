"""The benchmark harness on tiny configurations: result schema, report rendering, budget search, timing statistics."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from benchmarks import budget, harness, kernels, memory, report, results, throughput
from benchmarks.models import Variant


def test_summarize_known_values():
    stats = harness.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median, stats.q1, stats.q3, stats.iqr) == (3.0, 2.0, 4.0, 2.0)
    assert (stats.minimum, stats.maximum, stats.mean, stats.repeats) == (1.0, 5.0, 3.0, 5)
    assert harness.summarize([0.5]).iqr == 0.0
    with pytest.raises(ValueError, match="at least one"):
        harness.summarize([])


def test_time_cpu_uses_timer_after_warmup():
    calls = []
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # three timed calls lasting 1, 3 and 2 seconds
    stats = harness.time_cpu(lambda: calls.append(1), warmup=2, repeats=3, timer=lambda: next(clock))
    assert len(calls) == 5
    assert (stats.median, stats.minimum, stats.maximum, stats.repeats) == (2.0, 1.0, 3.0, 3)
    with pytest.raises(ValueError, match="repeats"):
        harness.time_cpu(lambda: None, warmup=0, repeats=0)


@pytest.mark.parametrize("threshold", [1, 2, 7, 64, 100, 1000])
def test_budget_search_finds_threshold(threshold):
    probed = []

    def fits(batch: int) -> bool:
        probed.append(batch)
        return 1_000 + 37 * batch <= 1_000 + 37 * threshold  # monotone: fits up to `threshold`

    batch, calls = budget.largest_fitting(fits, limit=4096)
    assert batch == threshold
    assert calls == len(probed) <= 2 * math.ceil(math.log2(threshold + 1)) + 2


def test_budget_search_edges():
    assert budget.largest_fitting(lambda b: False) == (0, 1)
    assert budget.largest_fitting(lambda b: True, limit=10)[0] == 10
    model = memory.cpu_budget_model(fixed=100, saved1=10, saved2=15)
    assert [model(b) for b in (1, 2, 3)] == [110, 115, 120]


def test_parse_bytes():
    assert budget.parse_bytes("24GB") == 24 * 10**9
    assert budget.parse_bytes("80 GiB") == 80 * 2**30
    assert budget.parse_bytes("1.5MB") == 1_500_000
    for bad in ("24 parsecs", "", "GB", "0GB"):
        with pytest.raises(ValueError):
            budget.parse_bytes(bad)


def test_bf16_peak_table():
    assert throughput.bf16_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert throughput.bf16_peak("NVIDIA H200")[0] == 989e12
    assert throughput.bf16_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert throughput.bf16_peak("Some CPU") is None


def check_schema(path):
    record = results.load_record(path)
    assert set(results.REQUIRED_KEYS) <= set(record)
    assert record["device_type"] == "cpu" and record["versions"]["torch"]
    assert record["command"].split()[1:3] == ["-m", record["command"].split()[2]]
    return record


def test_memory_run_schema(tmp_path):
    out = tmp_path / "memory.json"
    args = ["--model", "vit_tiny_patch16_224", "--resolutions", "32", "--methods", "linear", "full"]
    memory.main([*args, "--budget", "1GB", "--no-isolate", "--output", str(out)])
    record = check_schema(out)
    assert record["suite"] == "memory"
    linear, full = record["rows"]
    for row in (linear, full):
        for key in ("method", "resolution", "trainable_pct", "saved_bytes", "peak_rss_bytes", "max_batch"):
            assert key in row
    assert full["trainable_pct"] == 100.0 and 0 < linear["trainable_pct"] < 1
    assert full["saved_bytes"] > linear["saved_bytes"] > 0
    assert full["max_batch"] < linear["max_batch"]


def test_throughput_and_kernel_run_schema(tmp_path):
    out = tmp_path / "throughput.json"
    throughput.main(
        ["--model", "vit_tiny_patch16_224", "--resolutions", "32", "--methods", "lora"]
        + ["--warmup", "0", "--repeats", "2", "--output", str(out)]
    )
    row = check_schema(out)["rows"][0]
    assert row["step_seconds"]["repeats"] == 2 and row["images_per_second"] > 0
    assert row["flops_per_step"] > 0 and row["mfu"] is None  # no MFU without a GPU peak
    out = tmp_path / "kernels.json"
    kernels.main(
        ["--ns", "9", "--head-dims", "16", "--width", "32", "--warmup", "0", "--repeats", "1"] + ["--output", str(out)]
    )
    rows = check_schema(out)["rows"]
    by_impl = {(row["op"], row["impl"], row["pass"]): row for row in rows}
    assert "time_seconds" in by_impl[("attention", "ept_reference", "fwd+bwd")]
    assert "time_seconds" in by_impl[("importance", "importance_reference", "fwd")]
    assert "skipped" in by_impl[("attention", "xformers", "fwd")]  # no CPU kernels even where installed


def fixture_record(suite, rows, *, device="Test CPU", device_type="cpu", date="2026-01-01T00:00:00+00:00", config=None):
    return {
        "schema": results.SCHEMA,
        "suite": suite,
        "device": device,
        "device_type": device_type,
        "versions": {"torch": "x"},
        "git_commit": "abc",
        "date": date,
        "command": f"python -m benchmarks.{suite}",
        "config": config or {},
        "rows": rows,
    }


def memory_row(method, resolution, saved, pct, **extra):
    return {
        "model": "vit_b",
        "method": method,
        "resolution": resolution,
        "batch_size": 1,
        "precision": "fp32",
        "grad_checkpointing": False,
        "trainable_pct": pct,
        "saved_bytes": saved,
        "peak_rss_bytes": 2 * saved,
        **extra,
    }


def write(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_report_renders_tables_between_markers(tmp_path):
    root = tmp_path / "benchmarks" / "results"
    rows = [
        memory_row("full", 224, 118_200_000, 100.0),
        memory_row("full", 512, 612_000_000, 100.0),
        memory_row("lora", 224, 80_700_000, 0.347, score=80.0),
    ]
    write(root / "cpu" / "memory.json", fixture_record("memory", rows))
    stale = [memory_row("full", 224, 1, 100.0)]
    write(root / "cpu" / "old.json", fixture_record("memory", stale, date="2025-01-01T00:00:00+00:00"))
    kernel_rows = [
        {
            "op": "attention",
            "impl": "sdpa_flash",
            "n": 197,
            "d": 64,
            "batch": 1,
            "heads": 2,
            "dtype": "fp32",
            "pass": "fwd",
            "time_seconds": {"median": 0.002, "iqr": 0.0},
            "tflops": 0.1,
        },
        {
            "op": "attention",
            "impl": "sink_attention",
            "n": 197,
            "d": 64,
            "batch": 1,
            "heads": 2,
            "dtype": "fp32",
            "pass": "fwd",
            "time_seconds": {"median": 0.004, "iqr": 0.0},
            "tflops": 0.05,
        },
        {
            "op": "attention",
            "impl": "xformers",
            "n": 197,
            "d": 64,
            "batch": 1,
            "heads": 2,
            "dtype": "fp32",
            "pass": "fwd",
            "skipped": "not installed",
        },
    ]
    write(root / "cpu" / "kernels.json", fixture_record("kernels", kernel_rows))
    (root / "cpu" / "broken.json").write_text("{}")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{report.START}\nold table\n{report.END}\n\nfooter\n")

    skipped = report.render(root, readme, root / "plots", committed_only=False)

    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n") and text.endswith("\n\nfooter\n") and "old table" not in text
    block = text.split(report.START)[1].split(report.END)[0]
    saved = block.split("saved for backward, MB:")[1].split("peak RSS")[0]
    assert "| method | 224 | 512 |" in saved
    assert "| full | 118.2 | 612.0 |" in saved  # the newest file wins over old.json
    assert "| lora | 80.7 | — |" in saved
    assert "| full | 236.4 | 1,224.0 |" in block.split("peak RSS, MB:")[1]
    assert "| lora | 0.347 | — |" in block.split("trainable %:")[1]
    assert block.count(report.NOT_ON_GPU) == 3  # memory, throughput and kernels have no GPU results
    assert "0.50× (sdpa_flash)" in block and "xformers (not installed)" in block
    ppe = 80.0 * math.exp(-math.log10(0.347 / 100 + 1))
    pme = 80.0 * math.exp(-math.log10(80.7 / 118.2 + 1))
    assert f"| {ppe:.2f} | {pme:.2f} |" in block
    assert any("broken.json" in note for note in skipped)
    plots = sorted(p.name for p in (root / "plots").glob("*.png"))
    assert len(plots) == 2 and plots[0].startswith("kernels-test-cpu") and plots[1].startswith("memory-test-cpu")


def test_report_gpu_rows_and_marker_handling(tmp_path):
    root = tmp_path / "results"
    budget_fields = {"budget_bytes": 24e9, "budget_method": "measured"}
    gpu_rows = [
        memory_row("full", 512, 612_000_000, 100.0, peak_allocated_bytes=5_000_000_000, max_batch=9, **budget_fields),
        memory_row("linear", 512, 3_000_000, 0.1, peak_allocated_bytes=400_000_000, max_batch=64, **budget_fields),
    ]
    record = fixture_record("memory", gpu_rows, device="NVIDIA H100", device_type="cuda", config={"budget_limit": 64})
    write(root / "h100" / "memory.json", record)
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    report.render(root, readme, tmp_path / "plots", committed_only=False)
    text = readme.read_text()
    assert text.startswith("# no markers\n") and text.rstrip().endswith(report.END)
    memory_gpu = text.split("### Memory (GPU)")[1].split("###")[0]
    assert "| full | 5,000.0 |" in memory_gpu and "| linear | 400.0 |" in memory_gpu
    assert "| full | 9 |" in memory_gpu and "| linear | ≥ 64 |" in memory_gpu
    assert "within 24 GB (measured)" in memory_gpu and report.NOT_ON_GPU not in memory_gpu
    assert report.NOT_ON_GPU in text.split("### Throughput (GPU)")[1].split("###")[0]
    with pytest.raises(ValueError, match="unpaired"):
        report.replace_block(f"{report.END}\n{report.START}\n", "x")


def test_report_reads_only_committed_files(tmp_path):
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    write(tmp_path / "cpu" / "committed.json", fixture_record("memory", [memory_row("full", 224, 1, 100.0)]))
    write(tmp_path / "cpu" / "new.json", fixture_record("memory", [memory_row("linear", 224, 1, 0.1)]))
    git("add", "cpu/committed.json")
    records, skipped = report.load_results(tmp_path, committed_only=True)
    assert [path.name for path, _ in records] == ["committed.json"]
    assert any("new.json: not committed" in note for note in skipped)


def test_variant_labels_name_unknown_methods():
    from benchmarks import models

    assert Variant("lora", "lora") in models.select_variants(["lora"])
    with pytest.raises(ValueError, match="unknown method"):
        models.select_variants(["no-such-method"])
