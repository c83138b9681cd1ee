"""Reliability of `fastprompt.apply`: random method names, options and values (hypothesis).

Every call either returns a working model (finite logits of the right shape, something trainable) or raises
ValueError/TypeError whose message names the offending option (or the method).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer

import fastprompt

METHODS = fastprompt.available_methods()
NUM_CLASSES = 3
VALUES = [  # valid for some options, invalid for others
    -1, 0, 1, 2, 3, 4, 16, 2.5, 0.5, 1.0, 1.5, -0.5, float("nan"), float("inf"), True, None, "3", "normal", "zeros",
    "fused", "official", "global", "cls", "bogus", "qkv", "proj", [0], [1], [0, 1], [5], [-1], [], (0, 1), ("qkv",),
    ("bogus",), {"a": 1}, object(),
]  # fmt: skip
DEFINITELY_INVALID = [  # (method, option, value): rejected whatever the implementation's other choices
    ("adapter", "reduction", -1), ("adapter", "reduction", "8"), ("adapter", "reduction", 2.5),
    ("lora", "rank", 0), ("lora", "rank", -3), ("lora", "rank", "8"), ("lora", "alpha", float("nan")),
    ("lora", "alpha", "8"), ("lora", "dropout", -0.5), ("lora", "dropout", 1.5), ("lora", "targets", ("bogus",)),
    ("lora", "targets", 5), ("partial", "blocks", -1), ("partial", "blocks", 3), ("partial", "blocks", "1"),
    ("vpt", "num_tokens", -1), ("vpt", "num_tokens", 2.5), ("lora", "alpha", float("inf")), ("vpt", "deep", "yes"),
    ("vpt", "dropout", float("nan")),
    ("ept", "prompt_length", 0), ("ept", "prompt_length", "10"), ("ept", "prompt_layers", [5]),
    ("ept", "prompt_layers", []), ("ept", "prompt_layers", 1), ("ept", "prompt_init", "bogus"),
    ("ept", "attention", "bogus"), ("fpt+", "token_ratio", 0.0), ("fpt+", "token_ratio", 1.5),
    ("fpt+", "token_ratio", float("nan")), ("fpt+", "token_ratio", "0.2"), ("fpt+", "layers", [7]),
    ("fpt+", "layers", []), ("fpt+", "num_prompts", 0), ("fpt+", "token_importance", "bogus"),
    ("fpt", "side_width", -4), ("fpt", "side_input_size", 0), ("fpt", "side_input_size", "16"),
]  # fmt: skip


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)


def base_options(method: str) -> dict:
    """FPT's side branch defaults to 128-pixel inputs; keep it small unless the option is under test."""
    return {"side_input_size": 16} if method in ("fpt", "fpt+") else {}


def apply_and_check(method: str, options: dict, drawn: list[str], num_classes: int | None = NUM_CLASSES) -> None:
    """Apply; on success the model must work; on failure only ValueError/TypeError naming a `drawn` option may come."""
    names = drawn or ["num_classes"]
    try:
        model = fastprompt.apply(tiny_vit(), method, num_classes=num_classes, **options)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(repr(name) in message or name in message for name in names), message
        return
    trainable, _ = fastprompt.count_parameters(model)
    assert trainable > 0
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, num_classes or 5) and torch.isfinite(logits).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None, derandomize=True)
@given(st.data())
def test_random_options_work_or_name_the_option(data):
    method = data.draw(st.sampled_from(sorted(METHODS)))
    options, drawn = dict(base_options(method)), []
    if METHODS[method]:
        drawn = data.draw(st.lists(st.sampled_from(METHODS[method]), min_size=1, max_size=2, unique=True))
        options.update({name: data.draw(st.sampled_from(VALUES)) for name in drawn})
    apply_and_check(method, options, drawn)


@pytest.mark.parametrize("method", ["fpt", "fpt+"])
@pytest.mark.parametrize("side_input_size", [4, 12])
def test_fpt_side_input_size_the_side_patch_cannot_tile_is_rejected_at_apply(method, side_input_size):
    """A side input the side ViT's 8-pixel patches cannot tile must fail in apply, naming the option."""
    apply_and_check(method, {"side_input_size": side_input_size}, ["side_input_size"])


@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(st.sampled_from(sorted(METHODS)), st.text(min_size=1, max_size=12), st.sampled_from(VALUES))
def test_unknown_option_names_are_rejected_by_name(method, name, value):
    if name in METHODS[method] or name == "num_classes" or not name.isidentifier():
        return
    with pytest.raises(ValueError, match="unknown option"):
        fastprompt.apply(tiny_vit(), method, num_classes=NUM_CLASSES, **{name: value})


@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(st.one_of(st.text(max_size=12), st.integers(), st.none(), st.just(["lora"])))
def test_unknown_methods_are_rejected(method):
    if isinstance(method, str) and method.lower() in METHODS:
        return
    error = ValueError if isinstance(method, str) else TypeError
    with pytest.raises(error, match="method"):
        fastprompt.apply(tiny_vit(), method, num_classes=NUM_CLASSES)


@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(st.sampled_from(sorted(METHODS)), st.sampled_from([0, -2, 2.0, "3", True, math.nan]))
def test_bad_num_classes_names_num_classes(method, num_classes):
    with pytest.raises((ValueError, TypeError), match="num_classes"):
        fastprompt.apply(tiny_vit(), method, num_classes=num_classes, **base_options(method))


@pytest.mark.parametrize("method, option, value", DEFINITELY_INVALID)
def test_invalid_values_raise_naming_the_option(method, option, value):
    with pytest.raises((ValueError, TypeError), match=option):
        fastprompt.apply(tiny_vit(), method, num_classes=NUM_CLASSES, **{**base_options(method), option: value})


def test_non_vit_and_twice_applied_models_are_rejected():
    with pytest.raises(TypeError, match="VisionTransformer"):
        fastprompt.apply(torch.nn.Linear(3, 3), "lora")
    model = fastprompt.apply(tiny_vit(), "lora", num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="already has method 'lora'"):
        fastprompt.apply(model, "bitfit")
