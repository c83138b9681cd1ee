"""`EngineConfig`: the Engine's options as one frozen, self-validating dataclass; `Resolved`: what "auto" became.

``Engine(model, lr=1e-2, epochs=5)`` builds ``EngineConfig(lr=1e-2, epochs=5)``; ``Engine(model, config=cfg)``
takes one directly, and ``Engine(model, config=cfg, epochs=5)`` is ``dataclasses.replace(cfg, epochs=5)``.

Every value is checked and normalised once, in `EngineConfig.__post_init__`: a bad value raises naming the option,
the value and what is allowed; an unknown option names the closest valid one and lists them all. Normalised forms:
floats for lr/weight_decay/momentum/clip_grad, tuples for loggers (always with "csv"), class_names (strings) and
class_weights, None for ``class_weights="none"``, a dict for ``deepspeed_config`` (a JSON path is read), a Path
for ``output_dir``.

`to_dict` / `from_dict` round-trip through JSON. A `loss` callable is not serialisable: it is recorded as the
string ``"callable"``, and `from_dict` refuses that record unless the callable is passed again (``loss=fn``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastprompt.engine.activation import check_budget_option
from fastprompt.engine.backends import deepspeed_installed, load_user_config
from fastprompt.engine.data import LossFn
from fastprompt.engine.report import check_loggers
from fastprompt.methods.registry import check_choice, check_float, check_int

__all__ = ["CHECKPOINT_VERSION", "CUSTOM_LOSS", "EngineConfig", "Resolved", "check_version", "saved_config"]

CUSTOM_LOSS = "callable"  # how to_dict records a loss callable


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """The Engine's options (see `fastprompt.Engine` for what each does); validated on construction."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 10
    warmup_steps: int = 0
    schedule: str = "cosine"
    precision: str = "auto"
    backend: str = "auto"
    zero_stage: int = 0
    grad_accum: int = 1
    clip_grad: float | None = None
    grad_checkpointing: bool = False
    activation_memory: str | int | None = None
    deepspeed_config: dict[str, Any] | str | Path | None = None
    loss: str | LossFn = "auto"
    output_dir: str | Path | None = None
    seed: int = 0
    skip_nonfinite: bool = False
    checkpoint_every: int | None = None
    monitor: str = "auto"
    progress: bool = True
    deterministic: bool = False
    class_names: Sequence[str] | None = None
    positive_class: str | int | None = None
    loggers: str | Sequence[str] = ("csv",)
    patience: int | None = None
    class_weights: str | Sequence[float] | None = None
    balanced_sampler: bool = False

    def __new__(cls, *args: Any, **fields: Any) -> EngineConfig:
        cls.check_names(list(fields), what="config field")  # before dataclass __init__'s bare TypeError
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for name, value in self._checked().items():
            object.__setattr__(self, name, value)
        self._check_combinations()

    def _checked(self) -> dict[str, Any]:
        """Each option validated on its own, in its normalised form."""
        check_choice("optimizer", self.optimizer, ("adamw", "sgd"))
        check_int("epochs", self.epochs, minimum=1)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_choice("schedule", self.schedule, ("cosine", "constant"))
        check_choice("precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        check_choice("backend", self.backend, ("auto", "deepspeed", "torch"))
        check_int("zero_stage", self.zero_stage, minimum=0)
        if self.zero_stage > 3:
            raise ValueError(f"option 'zero_stage' must be one of [0, 1, 2, 3], got {self.zero_stage}")
        check_int("grad_accum", self.grad_accum, minimum=1)
        check_int("seed", self.seed, minimum=0)
        if self.checkpoint_every is not None:
            check_int("checkpoint_every", self.checkpoint_every, minimum=1)
        if self.patience is not None:
            check_int("patience", self.patience, minimum=1)
        if not isinstance(self.monitor, str):
            raise TypeError(f"option 'monitor' must be a metric name ('auc', 'acc', 'loss'), got {self.monitor!r}")
        for flag in ("grad_checkpointing", "skip_nonfinite", "progress", "deterministic", "balanced_sampler"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"option {flag!r} must be True or False, got {getattr(self, flag)!r}")
        if not (isinstance(self.loss, str) and self.loss == "auto") and not callable(self.loss):
            raise ValueError(f"option 'loss' must be 'auto' or a callable(logits, targets) -> loss, got {self.loss!r}")
        return {
            "lr": check_float("lr", self.lr, minimum=0.0),
            "weight_decay": check_float("weight_decay", self.weight_decay, minimum=0.0),
            "momentum": check_float("momentum", self.momentum, minimum=0.0, maximum=1.0),
            "clip_grad": None if self.clip_grad is None else check_float("clip_grad", self.clip_grad, minimum=0.0),
            "activation_memory": check_budget_option(self.activation_memory, self.grad_checkpointing),
            "deepspeed_config": load_user_config(self.deepspeed_config) or None,
            "output_dir": None if self.output_dir is None else Path(self.output_dir),
            "class_names": None if self.class_names is None else tuple(str(name) for name in self.class_names),
            "loggers": check_loggers(self.loggers),
            "class_weights": self._checked_class_weights(),
        }

    def _checked_class_weights(self) -> str | tuple[float, ...] | None:
        weights = self.class_weights
        if weights is None or (isinstance(weights, str) and weights == "none"):
            return None
        if not (isinstance(self.loss, str) and self.loss == "auto"):
            raise ValueError("class_weights weight the built-in loss (loss='auto'); put the weights in your own loss")
        if isinstance(weights, str):
            if weights != "auto":
                raise ValueError(
                    f"option 'class_weights' must be 'auto', 'none' or one weight per class, got {weights!r}"
                )
            return "auto"
        values = tuple(check_float("class_weights", value, minimum=0.0) for value in weights)
        if self.class_names is not None and len(values) != len(self.class_names):
            raise ValueError(
                f"class_weights has {len(values)} values but there are {len(self.class_names)} classes "
                f"({', '.join(map(str, self.class_names))}); give one weight per class, in class order"
            )
        return values

    def _check_combinations(self) -> None:
        if self.backend == "torch" and self.zero_stage > 0:
            raise ValueError("option 'zero_stage' > 0 needs backend='deepspeed' (or 'auto' with DeepSpeed installed)")
        if self.backend == "deepspeed" and not deepspeed_installed():
            raise ValueError("backend='deepspeed' but DeepSpeed is not installed: pip install deepspeed or use 'torch'")
        if "tensorboard" in self.loggers and self.output_dir is None:
            raise ValueError("loggers=['tensorboard'] writes into output_dir/tensorboard; pass output_dir=...")
        if self.positive_class is not None and self.class_names is not None:
            from fastprompt.metrics import resolve_positive_class  # scikit-learn: imported when used

            resolve_positive_class(list(self.class_names), self.positive_class)  # an unknown name fails, naming them

    # ------------------------------------------------------------------ construction and serialisation

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(item.name for item in dataclasses.fields(cls))

    @classmethod
    def check_names(cls, names: Sequence[str], what: str = "option") -> None:
        """TypeError naming the first unknown option, the closest valid one, and all valid ones."""
        valid = cls.field_names()
        for name in names:
            if name not in valid:
                close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise TypeError(f"unknown Engine {what} {name!r}; {hint}valid {what}s: {', '.join(valid)}")

    @classmethod
    def from_options(cls, base: EngineConfig | None = None, /, **options: Any) -> EngineConfig:
        """`base` (or the defaults) with `options` replaced; unknown options are named with the valid ones."""
        cls.check_names(list(options))
        if base is None:
            return cls(**options)
        if not isinstance(base, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(base).__name__}")
        return dataclasses.replace(base, **options) if options else base

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: every field, tuples as lists, output_dir as a string, a loss callable as "callable"."""
        data = {}
        for name in self.field_names():
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Path):
                value = str(value)
            elif name == "loss" and callable(value):
                value = CUSTOM_LOSS
            data[name] = value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> EngineConfig:
        """The config `to_dict` wrote (or a subset of its keys), with `overrides` replacing recorded values.

        A recorded custom loss needs the callable again: ``from_dict(data, loss=fn)``.
        """
        values = {**data, **overrides}  # an unknown name is refused by __new__
        if values.get("loss") == CUSTOM_LOSS:
            raise ValueError(
                "this configuration was trained with a custom loss callable, which is not saved; pass it again: "
                "loss=fn (Engine.load(path, model, loss=fn))"
            )
        return cls(**values)


@dataclass(frozen=True)
class Resolved:
    """What the Engine decided at set-up from its config and the machine ("auto" backend and precision)."""

    backend: str  # "torch" or "deepspeed"
    precision: str  # "bf16", "fp16" or "fp32"
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHECKPOINT_VERSION = 2  # 2: "config" is EngineConfig.to_dict() and "resolved" sits beside it
READABLE_VERSIONS = (1, 2)  # 1: fastprompt <= cc56237, "config" a dict holding "resolved"


def check_version(payload: Mapping[str, Any], path: str | Path) -> None:
    """CheckpointError unless the checkpoint's format version is one this fastprompt reads."""
    from fastprompt.engine.checkpoint import CheckpointError

    if payload.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')}, expected one of {list(READABLE_VERSIONS)}"
        )


def saved_config(payload: Mapping[str, Any], **overrides: Any) -> EngineConfig:
    """The EngineConfig a checkpoint was written with, `overrides` replacing recorded values.

    The checkpoint's output_dir is not taken over unless `overrides` names one (then a TensorBoard logger is kept;
    without one it is dropped: there is nowhere to write it). Reads both checkpoint versions.
    """
    data = dict(payload["config"])
    if payload.get("version") == 1:
        data.pop("resolved", None)  # version 1 kept the resolved backend and precision inside the config
    if "output_dir" not in overrides:
        data["output_dir"] = None
        data["loggers"] = [name for name in data.get("loggers", ()) if name != "tensorboard"]
    return EngineConfig.from_dict(data, **overrides)
