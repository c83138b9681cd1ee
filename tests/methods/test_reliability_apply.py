"""Reliability of `fastprompt.apply`: options drawn from each method's documented valid space must work; a value
drawn from an option's invalid space must fail with ValueError/TypeError naming that option (hypothesis).

The model is a 2-block ViT on 32×32 images (8-pixel patches, 17 tokens, width 32, 4 heads), so the valid spaces
below are the documented ones instantiated for it. Every example asserts: nothing returns early.
"""

from __future__ import annotations

import math
import re
import string

import pytest
import torch
from helpers import tiny_vit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastprompt
from fastprompt.methods.adapter import Adapter
from fastprompt.methods.lora import LoRALinear

METHODS = fastprompt.available_methods()
NUM_CLASSES = 3
DEPTH, WIDTH, HEADS, PATCH, TOKENS = 2, 32, 4, 8, 17
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None, derandomize=True
)


# ------------------------------------------------------------------------------------------------ valid spaces

block_indices = st.integers(-DEPTH, DEPTH - 1)
layer_subsets = st.lists(block_indices, min_size=1, max_size=3).flatmap(lambda xs: st.sampled_from([xs, tuple(xs)]))
probability = st.floats(0.0, 1.0)
FPT_VALID = {
    "layers": st.none() | layer_subsets,
    "num_prompts": st.integers(1, 4),
    "token_ratio": st.floats(0.06, 1.0),  # at least one of the 17 tokens kept per head (1/17 < 0.06)
    "token_importance": st.sampled_from(["global", "cls"]),
    "side_width": st.integers(1, 4).map(lambda m: HEADS * m),  # a multiple of the backbone's heads
    "side_input_size": st.sampled_from([8, 16, 24]),  # multiples of the side ViT's 8-pixel patch
}
VALID = {
    "adapter": {"reduction": st.integers(1, 2 * WIDTH)},
    "lora": {
        "rank": st.integers(1, 16),
        "alpha": st.floats(0.0, 64.0) | st.integers(0, 64),
        "dropout": probability,
        "targets": st.sampled_from(
            ["qkv", "proj", ("qkv",), ("proj",), ("qkv", "proj"), ["proj", "qkv"], ("qkv", "qkv")]
        ),
    },
    "partial": {"blocks": st.integers(1, DEPTH)},
    "vpt": {"num_tokens": st.integers(0, 8), "deep": st.booleans(), "dropout": probability},
    "ept": {
        "prompt_length": st.integers(1, 12),
        "prompt_layers": st.none() | layer_subsets,
        "prompt_init": st.sampled_from(["normal", "uniform", "zero", "kaiming"]),
        "attention": st.sampled_from(["fused", "official"]),
    },
    "fpt": FPT_VALID,
    "fpt+": FPT_VALID,
}

# ------------------------------------------------------------------------------------------------ invalid spaces

junk = st.sampled_from([None, "1", [1], {"a": 1}, object()])  # never valid for any option
not_int = junk | st.floats(allow_nan=True) | st.booleans()  # floats (even 2.0) and bools are not ints


def bad_int(minimum: int, maximum: int | None = None, multiple: int | None = None) -> st.SearchStrategy:
    bad = not_int | st.integers(max_value=minimum - 1)
    if maximum is not None:
        bad |= st.integers(min_value=maximum + 1)
    if multiple is not None:
        bad |= st.integers(minimum, 64).filter(lambda x: x % multiple != 0)
    return bad


def bad_float(minimum: float, maximum: float | None = None) -> st.SearchStrategy:
    """Anything but a finite number in [minimum, maximum] (the bounds themselves are valid)."""
    bad = junk | st.booleans() | st.sampled_from([math.nan, math.inf, -math.inf]) | st.floats(max_value=minimum)
    bad = bad.filter(lambda x: not (isinstance(x, float) and x == minimum))
    if maximum is not None:
        bad |= st.floats(min_value=maximum, exclude_min=True)
    return bad


def bad_choice(choices: tuple[str, ...]) -> st.SearchStrategy:
    return st.text(max_size=8).filter(lambda x: x not in choices) | st.sampled_from([None, 1, ["global"], b"cls"])


bad_layers = (
    st.just([])
    | st.lists(st.integers().filter(lambda i: not -DEPTH <= i < DEPTH), min_size=1, max_size=3)
    | st.lists(st.sampled_from([0.0, "1", None, True]), min_size=1, max_size=2)
    | st.sampled_from([0, 1.0, "01", object()])
)
FPT_INVALID = {
    "layers": bad_layers,
    "num_prompts": bad_int(1),
    "token_ratio": bad_float(0.0, 1.0) | st.just(0.0) | st.just(0),
    "token_importance": bad_choice(("global", "cls")),
    "side_width": bad_int(1, multiple=HEADS).filter(lambda x: x is not None),  # None: the default width
    "side_input_size": bad_int(1, multiple=PATCH).filter(lambda x: x is not None),
}
INVALID = {
    "adapter": {"reduction": bad_int(1)},
    "lora": {
        "rank": bad_int(1),
        "alpha": bad_float(0.0),
        "dropout": bad_float(0.0, 1.0),
        "targets": bad_choice(("qkv", "proj"))
        | st.lists(st.sampled_from(["qkv", "proj", "bogus", "fc1"]), max_size=3).filter(
            lambda xs: not xs or any(x not in ("qkv", "proj") for x in xs)
        )
        | st.sampled_from([("bogus",), (), {"qkv"}, 5]),
    },
    "partial": {"blocks": bad_int(1, maximum=DEPTH)},
    "vpt": {
        "num_tokens": bad_int(0),
        "deep": st.sampled_from([0, 1, "yes", None, 1.0, [True]]),
        "dropout": bad_float(0.0, 1.0),
    },
    "ept": {
        "prompt_length": bad_int(1),
        "prompt_layers": bad_layers,
        "prompt_init": bad_choice(("normal", "uniform", "zero", "kaiming")),
        "attention": bad_choice(("fused", "official")),
    },
    "fpt": FPT_INVALID,
    "fpt+": FPT_INVALID,
}


def test_the_spaces_cover_every_option_of_every_method():
    """A new method or option must get a valid and an invalid space here."""
    with_options = {method: set(options) for method, options in METHODS.items() if options}
    assert {method: set(space) for method, space in VALID.items()} == with_options
    assert {method: set(space) for method, space in INVALID.items()} == with_options


def small_side(method: str, options: dict) -> dict:
    """FPT's side branch defaults to 128-pixel inputs: keep it small unless the test draws it."""
    return {"side_input_size": 16, **options} if method in ("fpt", "fpt+") else options


def check_model(model: torch.nn.Module) -> None:
    """The applied model trains something and gives finite logits of the right shape."""
    trainable, _ = fastprompt.count_parameters(model)
    assert trainable > 0
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()


def expected_layers(value, default: list[int]) -> list[int]:
    return default if value is None else sorted({index % DEPTH for index in value})


def check_options_took_effect(model: torch.nn.Module, method: str, options: dict) -> None:
    """The applied model has the structure the options asked for."""
    if method == "ept":
        layers = expected_layers(options.get("prompt_layers"), list(range(DEPTH)))
        prompted = [i for i, block in enumerate(model.blocks) if hasattr(block.attn, "prompt")]
        assert prompted == layers
        for i in layers:
            assert model.blocks[i].attn.prompt.shape == (TOKENS, options.get("prompt_length", 100))
    elif method == "lora":
        targets = options.get("targets", ("qkv",))
        targets = {targets} if isinstance(targets, str) else set(targets)
        wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
        assert len(wrapped) == DEPTH * len(targets)
        rank = options.get("rank", 8)
        assert all(m.rank == rank and math.isclose(m.scaling, options.get("alpha", 8) / rank) for m in wrapped)
    elif method == "partial":
        trainable_blocks = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and "blocks" in n}
        assert trainable_blocks == {str(i) for i in range(DEPTH - options.get("blocks", 1), DEPTH)}
    elif method == "adapter":
        adapters = [m for m in model.modules() if isinstance(m, Adapter)]
        assert len(adapters) == DEPTH
        assert all(a.down.out_features == max(1, WIDTH // options.get("reduction", 8)) for a in adapters)
    elif method == "vpt":
        assert model.vpt.prompts.shape[:2] == (DEPTH if options.get("deep", True) else 1, options.get("num_tokens", 10))
    elif method in ("fpt", "fpt+"):
        default = list(range(DEPTH // 2, DEPTH)) if method == "fpt+" else list(range(DEPTH))
        assert model.layers == expected_layers(options.get("layers"), default)
        assert model.token_ratio == options.get("token_ratio", 0.2)
        assert model.side_input_size == options["side_input_size"]


PAIRS = [(method, option) for method in sorted(VALID) for option in sorted(VALID[method])]
PER_OPTION = settings(SETTINGS, max_examples=15)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if not METHODS[m]))
def test_methods_without_options_work(method):
    check_model(fastprompt.apply(tiny_vit(num_classes=5), method, num_classes=NUM_CLASSES))


@pytest.mark.parametrize("method, option", PAIRS)
@PER_OPTION
@given(data=st.data())
def test_valid_options_always_work(method, option, data):
    """`option` drawn from its valid space, up to two other options too: apply works and the options take effect."""
    space = VALID[method]
    rest = sorted(set(space) - {option})
    drawn = [option] + (data.draw(st.lists(st.sampled_from(rest), unique=True, max_size=2)) if rest else [])
    options = small_side(method, {name: data.draw(space[name], label=name) for name in drawn})
    model = fastprompt.apply(tiny_vit(num_classes=5), method, num_classes=NUM_CLASSES, **options)
    check_model(model)
    check_options_took_effect(model, method, options)


@pytest.mark.parametrize("method, option", PAIRS)
@PER_OPTION
@given(data=st.data())
def test_an_invalid_value_fails_naming_its_option(method, option, data):
    """`option` drawn from its invalid space (up to two others valid): ValueError/TypeError naming `option`."""
    rest = sorted(set(VALID[method]) - {option})
    others = data.draw(st.lists(st.sampled_from(rest), unique=True, max_size=2)) if rest else []
    options = {name: data.draw(VALID[method][name], label=name) for name in others}
    options[option] = data.draw(INVALID[method][option], label="bad value")
    with pytest.raises((ValueError, TypeError)) as error:
        fastprompt.apply(tiny_vit(num_classes=5), method, num_classes=NUM_CLASSES, **small_side(method, options))
    assert f"'{option}'" in str(error.value), f"the error does not name option {option!r}: {error.value}"


DEFINITELY_INVALID = [  # (method, option, value): regression examples, rejected whatever else is drawn
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
    ("fpt", "side_input_size", 4), ("fpt+", "side_input_size", 12),
]  # fmt: skip


@pytest.mark.parametrize("method, option, value", DEFINITELY_INVALID)
def test_invalid_values_raise_naming_the_option(method, option, value):
    with pytest.raises((ValueError, TypeError), match=f"'{option}'"):
        fastprompt.apply(
            tiny_vit(num_classes=5), method, num_classes=NUM_CLASSES, **small_side(method, {option: value})
        )


@pytest.mark.parametrize("method", ["fpt", "fpt+"])
def test_a_token_ratio_that_keeps_no_token_is_refused_at_the_first_forward(method):
    """The token count depends on the input size, so a ratio keeping int(N·ratio) = 0 tokens fails when N is
    known, with the smallest usable ratio."""
    model = fastprompt.apply(
        tiny_vit(num_classes=5), method, num_classes=NUM_CLASSES, token_ratio=0.05, side_input_size=16
    )
    with pytest.raises(ValueError, match=r"ratio=0\.05 keeps int\(N·ratio\) = 0 of N=17 tokens; use ratio >= 0\.0588"):
        model(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------------ names

identifiers = st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=12)


@SETTINGS
@given(st.data())
def test_unknown_option_names_are_rejected_by_name(data):
    method = data.draw(st.sampled_from(sorted(METHODS)))
    reserved = {*METHODS[method], "num_classes", "model", "method"}
    name = data.draw(identifiers.filter(lambda n: n not in reserved), label="name")
    value = data.draw(st.integers() | st.text(max_size=3) | st.none(), label="value")
    with pytest.raises(ValueError, match=re.escape(f"unknown option(s) ['{name}'] for method '{method}'")):
        fastprompt.apply(tiny_vit(num_classes=5), method, num_classes=NUM_CLASSES, **{name: value})


@SETTINGS
@given(st.text(max_size=12).filter(lambda m: m.lower() not in METHODS))
def test_unknown_method_names_are_rejected_listing_the_valid_ones(method):
    with pytest.raises(ValueError, match="unknown method") as error:
        fastprompt.apply(tiny_vit(num_classes=5), method, num_classes=NUM_CLASSES)
    assert all(name in str(error.value) for name in METHODS)


@pytest.mark.parametrize("method", [None, 3, ["lora"], b"lora"])
def test_a_method_that_is_not_a_string_is_a_type_error(method):
    with pytest.raises(TypeError, match="method must be a string"):
        fastprompt.apply(tiny_vit(num_classes=5), method, num_classes=NUM_CLASSES)


@SETTINGS
@given(st.sampled_from(sorted(METHODS)), st.sampled_from([0, -2, 2.0, "3", True, math.nan, None]))
def test_bad_num_classes_names_num_classes(method, num_classes):
    if num_classes is None and method not in ("fpt", "fpt+"):
        num_classes = 0  # None keeps a patch method's classifier: valid there
    with pytest.raises((ValueError, TypeError), match="num_classes"):
        fastprompt.apply(tiny_vit(num_classes=5), method, num_classes=num_classes, **small_side(method, {}))


def test_non_vit_and_twice_applied_models_are_rejected():
    with pytest.raises(TypeError, match="VisionTransformer"):
        fastprompt.apply(torch.nn.Linear(3, 3), "lora")
    model = fastprompt.apply(tiny_vit(num_classes=5), "lora", num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="already has method 'lora'"):
        fastprompt.apply(model, "bitfit")
