"""The method registry: one entry per parameter-efficient method that `fastprompt.apply` knows."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, the function that applies it, and the options it takes."""

    name: str
    fn: Callable[..., nn.Module]
    options: tuple[str, ...]
    doc: str
    wrapper: bool


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str, *, wrapper: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register `fn(model, **options) -> model` under `name`.

    The keyword-only parameters of `fn` are the method's options. For a patch method (the default)
    `num_classes` is handled by `fastprompt.apply` (it resets the backbone's classifier) and must not be
    one of them. A `wrapper` method returns a new module around the frozen backbone and receives
    `num_classes` itself, as its first positional argument after the model.
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        params = inspect.signature(fn).parameters.values()
        options = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
        doc = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _REGISTRY[key] = MethodSpec(name=key, fn=fn, options=options, doc=doc, wrapper=wrapper)
        return fn

    return decorator


def available_methods() -> dict[str, tuple[str, ...]]:
    """Registered method names mapped to the options each accepts (besides `num_classes`)."""
    return {name: spec.options for name, spec in sorted(_REGISTRY.items())}


def get_method(name: str) -> MethodSpec:
    """The spec registered under `name`; a ValueError listing the valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string naming one of {sorted(_REGISTRY)}, got {type(name).__name__}")
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}") from None


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """Validate an integer option (bools rejected) and return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"option {name!r} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"option {name!r} must be >= {minimum}, got {value}")
    return value


def check_float(name: str, value: object, *, minimum: float | None = None, maximum: float | None = None) -> float:
    """Validate a real-valued option and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"option {name!r} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"option {name!r} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"option {name!r} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"option {name!r} must be <= {maximum}, got {value}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Validate a string option against its allowed values."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"option {name!r} must be one of {list(choices)}, got {value!r}")
    return value


def check_layers(name: str, value: object, depth: int) -> list[int]:
    """Validate a subset of block indices (negative indices count from the end); sorted, unique."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"option {name!r} must be an iterable of block indices, got {type(value).__name__}")
    layers = []
    for index in value:
        check_int(name, index)
        if not -depth <= index < depth:
            raise ValueError(f"option {name!r}: block index {index} out of range for a {depth}-block model")
        layers.append(index % depth)
    if not layers:
        raise ValueError(f"option {name!r} must name at least one block")
    return sorted(set(layers))
