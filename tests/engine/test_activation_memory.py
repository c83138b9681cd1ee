"""Activation memory on a budget: the live-bytes meter, plan prediction, the planner and Engine(activation_memory=)."""

from __future__ import annotations

import gc
import json
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import FAST, TINY, tiny_vit, write_image_folder
from torch.utils.data import DataLoader, TensorDataset

import fastprompt
from fastprompt import Engine
from fastprompt.checkpointing import activation_plan, checkpoint_activations
from fastprompt.engine.activation import (
    ActivationMemoryError,
    LiveBytes,
    Plan,
    StepProfile,
    choose_plan,
    parse_bytes,
    plan_chain,
    profile_step,
    resident_bytes,
    step_peak,
)

DEPTH = 5


def test_live_bytes_counts_allocations_views_and_frees() -> None:
    outside = torch.zeros(250)  # allocated before the meter: neither it nor its views count
    with LiveBytes() as meter:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(500, dtype=torch.float64)  # 4000 B
        view = a.view(10, 100)
        alias = outside[:10]
        outside.add_(1)
        assert meter.current == 8000
        del a
        assert meter.current == 8000  # the view keeps a's storage alive
        del view
        assert meter.current == 4000
        c = torch.empty(3000)  # 12000 B
        assert (meter.current, meter.peak) == (16000, 16000)
        del b, c, alias
    gc.collect()
    assert meter.current == 0 and meter.peak == 16000


def test_live_bytes_step_peak_closed_form() -> None:
    n = 100_000
    x = torch.randn(n, requires_grad=True)

    def step() -> None:
        (x * 2).exp().sum().backward()  # y = 2x, z = exp(y) kept; backward: ones, grad·z, ·2, x.grad

    peak = step_peak(step)
    # y = 2x is freed once exp has run; z = exp(y) is kept for backward. Backward: the scalar loss's gradient (4 B,
    # expanded as a view), grad_y = grad·z while z is alive (2 vectors), then z is released and 2·grad_y becomes
    # x.grad (2 vectors). Peak: two n-vectors of fp32 plus the two scalars (the sum and its gradient).
    assert peak == 2 * 4 * n + 2 * 4


def _model(depth: int = DEPTH) -> torch.nn.Module:
    return fastprompt.apply(tiny_vit(depth=depth, img_size=48, embed_dim=32), "ept")


def _step(model: torch.nn.Module):
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(2, 3, 48, 48, generator=generator), torch.tensor([0, 1])

    def run() -> None:
        for param in model.parameters():
            param.grad = None
        F.cross_entropy(model(images), labels).backward()

    return run


@pytest.fixture(scope="module")
def enumerated() -> dict:
    """Every plan's measured step peak, from applying the policies by hand (not through the planner)."""
    model = _model()
    run = _step(model)
    peaks = []
    for plan in plan_chain(DEPTH):
        checkpoint_activations(model, "none")
        if plan.full:
            checkpoint_activations(model, "full", list(range(plan.full)))
        if plan.selective:
            checkpoint_activations(model, "selective", list(range(plan.full, plan.full + plan.selective)))
        peaks.append(step_peak(run))
    checkpoint_activations(model, "none")
    return {"peaks": peaks, "profile": profile_step(model, run)}


def test_chain_order_and_memory_falls(enumerated: dict) -> None:
    chain = plan_chain(DEPTH)
    assert chain[0] == Plan() and chain[-1] == Plan(full=DEPTH)
    assert len(chain) == 2 * DEPTH + 1
    peaks = enumerated["peaks"]
    assert all(later <= earlier for earlier, later in zip(peaks, peaks[1:]))
    assert peaks[DEPTH] < 0.75 * peaks[0] and peaks[-1] < peaks[DEPTH]  # selective and full each save memory


def test_profile_predicts_every_plan(enumerated: dict) -> None:
    profile, peaks = enumerated["profile"], enumerated["peaks"]
    assert profile.peak == peaks[0]
    block_output = max(profile.full)
    for plan, measured in zip(plan_chain(DEPTH), peaks):  # an estimate: within two block outputs of the truth
        assert abs(profile.predict(plan) - measured) < 2 * block_output, plan
    assert all(f < s < k for f, s, k in zip(profile.full, profile.selective, profile.kept))


def test_profiling_leaves_the_users_plan_in_place() -> None:
    """profile_step measures with nothing recomputed, then gives every block back the policy it had."""
    model = _model(depth=3)
    checkpoint_activations(model, "full", [0])
    checkpoint_activations(model, "selective", [2])
    profile = profile_step(model, _step(model))
    assert len(profile.kept) == 3
    assert activation_plan(model) == ["full", "none", "selective"]


@pytest.mark.parametrize("fraction", [0.8, 0.6, 0.45])
def test_planner_picks_least_recompute_that_fits(enumerated: dict, fraction: float) -> None:
    peaks = enumerated["peaks"]
    fixed = 1000
    budget = fixed + int(fraction * peaks[0])
    expected = next(i for i, peak in enumerate(peaks) if fixed + peak <= budget)  # independent enumeration
    assert expected > 0
    model = _model()
    run = _step(model)
    choice = choose_plan(model, run, budget, fixed=fixed)
    assert choice.plan == plan_chain(DEPTH)[expected]
    assert activation_plan(model) == choice.plan.policies(DEPTH)  # applied to the model
    assert fixed + step_peak(run) <= budget  # the chosen plan's step really fits


@pytest.mark.parametrize("skew", [3.0, 0.2])
def test_planner_corrects_a_wrong_prediction_by_measuring(enumerated: dict, skew: float) -> None:
    """Predictions far too high (start at full recomputation) or too low (start at none): measuring walks the chain
    to the same least-recompute plan that fits."""
    peaks, profile = enumerated["peaks"], enumerated["profile"]
    budget = int(0.6 * peaks[0])
    expected = next(i for i, peak in enumerate(peaks) if peak <= budget)
    scale = lambda values: tuple(int(skew * v) for v in values)  # noqa: E731
    wrong = StepProfile(int(skew * profile.peak), scale(profile.kept), scale(profile.selective), scale(profile.full))
    model = _model()
    choice = choose_plan(model, _step(model), budget, fixed=0, profile=wrong)
    assert choice.plan == plan_chain(DEPTH)[expected]
    assert choice.measured_peak == peaks[expected]


def test_planner_error_names_the_smallest_budget(enumerated: dict) -> None:
    smallest = 1000 + enumerated["peaks"][-1]
    model = _model()
    with pytest.raises(ActivationMemoryError, match=f"needs .*\\({smallest} bytes") as info:
        choose_plan(model, _step(model), smallest - 1, fixed=1000)
    assert "lower the batch size" in str(info.value)
    assert activation_plan(model) == ["none"] * DEPTH  # the model is left as it was
    choice = choose_plan(model, _step(model), smallest, fixed=1000)  # fits; plans as lean as full-on-all come first
    peaks = enumerated["peaks"]
    assert choice.plan == plan_chain(DEPTH)[peaks.index(peaks[-1])]


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(8, 3, 48, 48, generator=generator)
    labels = torch.arange(8) % 4
    return DataLoader(TensorDataset(images, labels), batch_size=2, shuffle=True, generator=generator)


def test_engine_applies_plan_reports_it_and_trains_identically(enumerated: dict, tmp_path, capsys) -> None:
    reference = _model()
    reference_history = Engine(reference, epochs=1, backend="torch", progress=False, lr=1e-2).fit(_loader())
    model = _model()
    fixed = resident_bytes(model) + 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # + AdamW
    budget = fixed + int(0.6 * enumerated["peaks"][0])
    engine = Engine(model, epochs=1, backend="torch", lr=1e-2, activation_memory=budget, output_dir=tmp_path)
    history = engine.fit(_loader())
    fresh = _model()
    expected = choose_plan(fresh, _step(fresh), budget, fixed=fixed).plan  # same budget, by hand
    assert engine.activation_choice.plan == expected != Plan()
    assert activation_plan(model) == expected.policies(DEPTH)
    assert f"activation memory: plan {expected.describe(DEPTH)}" in capsys.readouterr().err
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["activation_plan"] == expected.describe(DEPTH)
    assert record["activation_budget_bytes"] == budget
    assert record["activation_step_bytes"] <= budget
    # the measurement steps leave training untouched: same losses and parameters as without a budget
    assert history[0]["train_loss"] == pytest.approx(reference_history[0]["train_loss"], rel=1e-6)
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


def test_engine_budget_too_small_raises_clearly() -> None:
    model = _model()
    with pytest.raises(ActivationMemoryError, match="give at least"):
        Engine(model, epochs=1, backend="torch", progress=False, activation_memory="300KB").fit(_loader())


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("lots", ValueError, "cannot read memory size"),
        (0, ValueError, "must be positive"),
        (True, TypeError, "activation_memory"),
        (2.5, TypeError, "activation_memory"),
    ],
)
def test_engine_option_validation(value, error, match) -> None:
    with pytest.raises(error, match=match):
        Engine(_model(), activation_memory=value)


def test_engine_option_conflicts_with_grad_checkpointing() -> None:
    with pytest.raises(ValueError, match="pass only one"):
        Engine(_model(), activation_memory="auto", grad_checkpointing=True)


def test_auto_budget_is_free_memory_plus_resident(monkeypatch, tmp_path) -> None:
    from fastprompt.engine import activation

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:    2048 kB\n")
    monkeypatch.setattr(activation, "MEMINFO", meminfo)
    assert activation.resolve_budget("auto", "cpu", 100) == 2048 * 1024 + 100
    assert activation.resolve_budget("4GB", "cpu", 100) == 4 * 10**9
    assert parse_bytes("1.5GiB") == 3 * 2**29


@pytest.mark.parametrize("method", ["ept", "lora", "vpt"])
def test_meta_memory_model_matches_a_cpu_step(method: str) -> None:
    """benchmarks.budget's memory model traces the step on the meta device: it must allocate what a CPU step does."""
    from benchmarks.budget import meta_step_bytes

    for policy in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = checkpoint_activations(fastprompt.apply(tiny_vit(depth=3, img_size=48, embed_dim=32), method), policy)
        images, labels = torch.randn(2, 3, 48, 48), torch.tensor([0, 1])

        def step(model=model, images=images, labels=labels) -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()

        cpu = step_peak(step)
        assert meta_step_bytes(model.to("meta"), 2, 48) == cpu, policy


def test_report_keeps_policies_apart_and_joins_the_tradeoff(tmp_path) -> None:
    from benchmarks import report

    base = {"model": "m", "resolution": 512, "batch_size": 1, "precision": "fp32", "grad_checkpointing": False}
    old = {**base, "method": "vpt", "saved_bytes": 9}  # a row from before the policies existed
    memory_rows = [old] + [
        {**base, "method": "ept", "checkpointing": p, "saved_bytes": 1, "step_peak_bytes": b}
        for p, b in (("none", 400), ("selective", 150), ("full", 60))
    ]
    throughput_rows = [
        {**base, "method": "ept", "checkpointing": p, "step_seconds": {"median": t}}
        for p, t in (("none", 1.0), ("selective", 1.2), ("full", 1.4))
    ]
    records = [
        (tmp_path / "a.json", {"suite": "memory", "date": "1", "device": "cpu0", "device_type": "cpu", "config": {},
                               "rows": memory_rows}),
        (tmp_path / "b.json", {"suite": "throughput", "date": "2", "device": "cpu0", "device_type": "cpu",
                               "config": {}, "rows": throughput_rows}),
    ]  # fmt: skip
    memory = report.latest_rows(records, "memory", report.MEMORY_KEY)
    assert sorted((row["method"], row["checkpointing"]) for row in memory) == [
        ("ept", "full"),
        ("ept", "none"),
        ("ept", "selective"),
        ("vpt", "none"),  # the old row is kept, as policy "none"
    ]
    labels = sorted(row["method"] for row in report.policy_labels(memory))
    assert labels == ["ept", "ept (full)", "ept (selective)", "vpt"]
    points = report.tradeoff_points(memory, report.latest_rows(records, "throughput", report.THROUGHPUT_KEY))
    assert {(p["checkpointing"], p["step_seconds"], p["step_peak_bytes"]) for p in points} == {
        ("none", 1.0, 400),
        ("selective", 1.2, 150),
        ("full", 1.4, 60),
    }


@pytest.mark.parametrize("backend", [["--backend=torch"], ["--backend=deepspeed", "--zero-stage=2"]])
def test_cli_train_activation_memory(tmp_path, capsys, backend: list[str]) -> None:
    from fastprompt.cli import main

    data = write_image_folder(tmp_path / "data", 4)
    out = tmp_path / "run"
    argv = ["train", f"--data={data}", *TINY, "--method=ept", "--prompt-length=4", *FAST, "--epochs=1", *backend]
    assert main([*argv, f"--output-dir={out}", "--activation-memory=64GB"]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["activation_plan"] == "none"  # everything fits: nothing is recomputed
    assert record["activation_budget_bytes"] == 64 * 10**9
    capsys.readouterr()
    assert main([*argv, f"--output-dir={tmp_path / 'run2'}", "--activation-memory=lots"]) == 2
    assert "cannot read memory size 'lots'" in capsys.readouterr().err


def _recording_loss(record: list[float]):
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = F.cross_entropy(logits, targets)
        record.append(value.item())
        return value

    return loss


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_engine_plans_within_budget_and_trains_like_torch(enumerated: dict, stage: int) -> None:
    """DeepSpeed ZeRO on CPU: a budget below the unrecomputed step picks a recomputing plan, and training then
    follows the torch backend running that plan, loss by loss."""
    peaks = enumerated["peaks"]
    settings = dict(epochs=2, lr=1e-2, backend="deepspeed", zero_stage=stage, progress=False)
    # a budget nothing fits: the error names the smallest that works (DeepSpeed's fixed bytes + full-recompute peak)
    with pytest.raises(ActivationMemoryError, match=r"give at least that") as info:
        Engine(_model(), activation_memory="1KB", **settings).fit(_loader())
    smallest = int(re.search(r"\((\d+) bytes", str(info.value)).group(1))
    assert smallest > resident_bytes(_model()) + peaks[-1]  # DeepSpeed's master copies and optimizer state count
    budget = smallest + (peaks[0] - peaks[-1]) // 2  # below the unrecomputed step, above full recomputation
    expected = next(i for i, peak in enumerate(peaks) if smallest - peaks[-1] + peak <= budget)
    assert expected > 0

    losses: list[float] = []
    engine = Engine(_model(), activation_memory=budget, loss=_recording_loss(losses), **settings)
    engine.fit(_loader())
    if stage < 3:  # the bare module's step is the torch backend's (ZeRO-3 adds its parameter gathering)
        assert engine.activation_choice.plan == plan_chain(DEPTH)[expected]
    assert engine.activation_choice.plan != Plan()
    assert engine.activation_choice.fixed + engine.activation_choice.measured_peak <= budget
    steps = 2 * len(_loader())

    reference_losses: list[float] = []
    reference = engine.activation_choice.plan.apply(_model())
    Engine(reference, epochs=2, lr=1e-2, backend="torch", progress=False, loss=_recording_loss(reference_losses)).fit(
        _loader()
    )
    assert len(reference_losses) == steps
    assert losses[-steps:] == pytest.approx(reference_losses, abs=1e-5)


def test_deepspeed_bf16_plans_in_the_precision_it_trains_in(enumerated: dict) -> None:
    """Under DeepSpeed bf16 the measured step is the bf16 module's (inputs cast as in training): its activations
    take about half the fp32 step's bytes, and the fixed bytes count the bf16 weights plus fp32 master copies."""
    model = _model()
    fp32_weights = resident_bytes(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = Engine(
        model, epochs=1, lr=1e-2, backend="deepspeed", zero_stage=2, precision="bf16", activation_memory="64GB"
    )
    engine.fit(_loader())
    choice = engine.activation_choice
    assert choice.plan == Plan()
    assert choice.unrecomputed_peak < 0.7 * enumerated["peaks"][0]  # bf16 activations, not fp32 ones
    assert {p.dtype for p in engine.backend.module.parameters()} == {torch.bfloat16}  # DeepSpeed's own cast
    assert choice.fixed >= fp32_weights // 2 + 3 * 4 * trainable  # bf16 module + fp32 master and AdamW moments
