"""Frozen weights stored in the compute dtype (fastprompt.engine.precision) and bf16 on CPUs without native bf16."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import learnable_task, tiny_vit
from torch.utils.data import DataLoader, TensorDataset

import fastprompt
from fastprompt import Engine
from fastprompt.engine import precision
from fastprompt.engine.precision import cpu_bf16_support, store_frozen_in
from fastprompt.serialization import BackboneWeightsWarning, WeightsError

NATIVE_BF16 = cpu_bf16_support()[0]


def _model(method: str) -> torch.nn.Module:
    torch.manual_seed(3)
    model = fastprompt.apply(tiny_vit(), method, num_classes=4)
    with torch.no_grad():  # trained-looking trainable tensors, so that they matter to the logits
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _loader() -> DataLoader:
    images, labels = learnable_task(count=8)
    return DataLoader(TensorDataset(images, labels), batch_size=4, shuffle=True, generator=torch.Generator())


@pytest.mark.parametrize("method", ["ept", "lora", "bitfit"])
def test_logits_match_autocast_with_fp32_weights(method: str) -> None:
    """Error against an fp64 reference: no worse than 2x plain autocast's (fp32 weights) + a small atol."""
    model = _model(method)
    images = learnable_task(count=4)[0]
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(images.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(images).float()
            assert store_frozen_in(model, torch.bfloat16) > 0
            stored = model(images).float()
    autocast_error = (autocast.double() - reference).abs().max()
    stored_error = (stored.double() - reference).abs().max()
    assert stored_error <= 2 * autocast_error + 1e-3, (stored_error, autocast_error)
    torch.testing.assert_close(stored, autocast, atol=0.05, rtol=0.05)


def _step_dtypes(engine: Engine, loader: DataLoader) -> set[torch.dtype]:
    """The dtypes of the trainable gradients that backward produces, from hooks on the parameters."""
    seen: set[torch.dtype] = set()
    handles = [p.register_hook(lambda grad: seen.add(grad.dtype)) for p in engine.model.parameters() if p.requires_grad]
    try:
        engine.fit(loader)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16: precision='bf16' trains in fp32 here")
@pytest.mark.parametrize("method", ["ept", "lora"])
def test_engine_bf16_stores_frozen_weights_once_in_bf16(method: str, tmp_path) -> None:
    model = _model(method)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    engine = Engine(model, epochs=1, lr=1e-2, precision="bf16", backend="torch", progress=False)
    grad_dtypes = _step_dtypes(engine, _loader())
    assert engine.resolved.precision == "bf16"
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16}  # no frozen fp32 weight remains
    assert sum(p.numel() * p.element_size() for p in frozen) == fp32_bytes // 2
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert grad_dtypes == {torch.float32}
    state = engine.backend.optimizer.state.values()
    assert {v.dtype for s in state for v in s.values() if v.dim() > 0} == {torch.float32}

    # save_trainable / load_trainable: a fresh fp32 model takes the weights, its backbone is recognised (no warning)
    fastprompt.save_trainable(model, tmp_path / "w.safetensors")
    fresh = _model(method)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackboneWeightsWarning)
        fastprompt.load_trainable(fresh, tmp_path / "w.safetensors")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in fresh.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, trained[name]), name
    other = _model(method)  # another backbone is still refused
    with torch.no_grad():
        next(p for p in other.parameters() if not p.requires_grad).add_(1.0)
    with pytest.raises(WeightsError, match="frozen weights of this model differ"):
        fastprompt.load_trainable(other, tmp_path / "w.safetensors")


def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32(monkeypatch, tmp_path, caplog) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    model = _model("lora")
    engine = Engine(model, epochs=1, lr=1e-2, precision="bf16", backend="torch", progress=False)
    with pytest.warns(RuntimeWarning, match="no native bf16 instructions.*training in fp32"):
        engine.fit(_loader())
    assert engine.resolved.precision == "fp32"
    assert engine.backend.autocast_dtype is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_cpu_bf16_support_reads_the_flags(monkeypatch, tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert cpu_bf16_support()[0] is False  # unreadable
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert cpu_bf16_support() == (True, "this CPU has avx512_bf16")
    cpuinfo.write_text("flags\t\t: fpu avx512f amx_bf16\n")
    assert cpu_bf16_support()[0] is True


def test_store_frozen_in_leaves_mixed_norms_and_reports_the_saving() -> None:
    model = _model("bitfit")  # trainable biases beside frozen weights
    mixed_norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) and m.bias.requires_grad]
    assert mixed_norms
    saved = store_frozen_in(model, torch.bfloat16)
    assert all(m.weight.dtype == torch.float32 for m in mixed_norms)  # layer_norm needs one dtype
    frozen = [p for p in model.parameters() if not p.requires_grad]
    stored = [p for p in frozen if p.dtype == torch.bfloat16]
    assert len(stored) == len(frozen) - len(mixed_norms)  # every other frozen tensor, Linear weights included
    assert saved == 2 * sum(p.numel() for p in stored)
    assert store_frozen_in(model, torch.bfloat16) == 0  # nothing left to store
