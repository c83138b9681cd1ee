"""Every method's training step runs on PyTorch's meta device (shapes only): the benchmarks' memory model
(`benchmarks.budget.meta_step_bytes`, `--budget`) traces it there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_vit

import fastprompt
from fastprompt import FPT


@pytest.mark.parametrize("method", sorted(fastprompt.available_methods()))
def test_a_training_step_runs_on_the_meta_device(method):
    options = {"side_input_size": 16} if method in ("fpt", "fpt+") else {}
    model = fastprompt.apply(tiny_vit(), method, num_classes=3, **options).to("meta")
    images = torch.empty(2, 3, 32, 32, device="meta")
    loss = F.cross_entropy(model(images), torch.zeros(2, dtype=torch.long, device="meta"))
    loss.backward()
    assert loss.device.type == "meta"
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant", ["fpt", "fpt+"])
def test_fpt_from_cached_features_runs_on_the_meta_device(variant):
    """The cached-feature path (fusion on stored K/V) as the memory benchmark's fpt-cached rows run it."""
    model = FPT(tiny_vit(), 3, variant=variant, side_input_size=16).to("meta")
    features = model.extract_features(torch.empty(2, 3, 32, 32, device="meta"))
    side = torch.empty(2, 3, 16, 16, device="meta")
    logits = model.forward_features_cached(features, side)
    assert logits.shape == (2, 3) and logits.device.type == "meta"
    logits.sum().backward()
