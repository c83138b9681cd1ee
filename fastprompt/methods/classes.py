"""Methods as classes: a method is installed by swapping a module's class to a named subclass of it.

`swap_class(module, EPTAttention)` turns a timm `Attention` into an `EPTAttention(EPTMixin, Attention)`: the mixin
overrides the smallest piece (usually `forward`) and calls `super()` for the rest. Unlike a forward bound on the
instance, a class

- pickles: `torch.save(model)` / `torch.load(..., weights_only=False)` and `copy.deepcopy` rebuild the subclass
  through `rebuild` (module-level, found by name), since the subclass itself is made at run time per base class;
- shows in `print(model)` (the class name, plus the mixin's `extra_repr`);
- can be taken off again with `restore_class`.

TorchScript cannot compile these classes (they are made at run time and use Python features it lacks), so
`torch.jit.script` on a patched model raises `TorchScriptUnsupportedError` naming the method and the alternatives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "InputRequiresGrad",
    "MethodMixin",
    "TorchScriptUnsupportedError",
    "patched_class",
    "rebuild",
    "restore_class",
    "set_input_requires_grad",
    "swap_class",
]


class TorchScriptUnsupportedError(TypeError):
    """Raised by `torch.jit.script` on a model patched by a fastprompt method."""


@torch.fx.wrap
def check_no_mask(method: str, mask: torch.Tensor | None, is_causal: bool = False) -> None:
    """Raise unless `mask` is None and `is_causal` is False (wrapped for torch.fx, so it runs on the real values)."""
    if mask is not None or is_causal:
        feature = "is_causal=True" if is_causal else "an attention mask"
        raise ValueError(
            f"{method} does not support {feature}: it changes the token sequence, so a token mask cannot apply; "
            "call the model without attn_mask / attention_mask and is_causal"
        )


class MethodMixin:
    """Base of the method mixins. A subclass sets `method` (the name users see) and `prefix` (class-name prefix)."""

    method: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    _fastprompt_mixins: ClassVar[tuple[type, ...]] = ()
    _fastprompt_root: ClassVar[type]

    def __reduce_ex__(self, protocol: Any) -> tuple:
        reduced = super().__reduce_ex__(protocol)  # (copyreg.__newobj__, (cls,), state, ...) for protocol >= 2
        cls = type(self)
        return (rebuild, (cls._fastprompt_mixins, cls._fastprompt_root), *reduced[2:])

    def __prepare_scriptable__(self) -> nn.Module:
        raise TorchScriptUnsupportedError(
            f"TorchScript is not supported for fastprompt method {self.method!r} ({type(self).__name__}); "
            "use torch.compile(model) or torch.export.export(model, args) instead of torch.jit.script"
        )


@functools.cache
def patched_class(mixins: tuple[type, ...], root: type) -> type:
    """The class `mixins[-1](... mixins[0](root))`, named by the mixins' prefixes (e.g. `EPTAttention`); cached."""
    cls = root
    for count, mixin in enumerate(mixins, start=1):
        namespace = {
            "__module__": root.__module__,  # library checks (timm / transformers) keep working; pickling uses rebuild
            "_fastprompt_mixins": mixins[:count],
            "_fastprompt_root": root,
        }
        cls = type(f"{mixin.prefix}{cls.__name__}", (mixin, cls), namespace)
    return cls


def rebuild(mixins: tuple[type, ...], root: type) -> nn.Module:
    """An empty instance of `patched_class(mixins, root)`; pickle fills in its state."""
    cls = patched_class(tuple(mixins), root)
    return cls.__new__(cls)


def swap_class(module: nn.Module, mixin: type) -> nn.Module:
    """Give `module` the class `mixin` + its current class, in place; returns `module`."""
    cls = type(module)
    mixins = getattr(cls, "_fastprompt_mixins", ())
    root = cls._fastprompt_root if mixins else cls
    if mixin in mixins:
        raise ValueError(f"{type(module).__name__} already has {mixin.__name__}")
    module.__class__ = patched_class((*mixins, mixin), root)
    return module


def restore_class(module: nn.Module, mixin: type) -> nn.Module:
    """Take `mixin` off `module`'s class (the other mixins stay), in place; returns `module`."""
    cls = type(module)
    mixins = tuple(m for m in getattr(cls, "_fastprompt_mixins", ()) if m is not mixin)
    root = getattr(cls, "_fastprompt_root", cls)
    module.__class__ = patched_class(mixins, root) if mixins else root
    return module


class InputRequiresGrad:
    """Forward hook on the patch embedding: its output requires grad (while `active(model)`, when given).

    Reentrant checkpointing gives no gradient to parameters inside a checkpointed block whose inputs do not require
    grad, and a frozen backbone's embedding output does not; peft's `enable_input_require_grads` does the same.
    """

    def __init__(self, active: Callable[[nn.Module], bool] | None = None, model: nn.Module | None = None) -> None:
        self.active, self.model = active, model

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor) and torch.is_grad_enabled() and not output.requires_grad:
            if self.active is None or self.active(self.model):
                output.requires_grad_(True)


def set_input_requires_grad(embedding: nn.Module, enable: bool, **options: Any) -> None:
    """Install (once) or remove the `InputRequiresGrad` hook on `embedding`."""
    hooks = embedding._forward_hooks
    present = [key for key, hook in hooks.items() if isinstance(hook, InputRequiresGrad)]
    if enable and not present:
        embedding.register_forward_hook(InputRequiresGrad(**options))
    elif not enable:
        for key in present:
            del hooks[key]
