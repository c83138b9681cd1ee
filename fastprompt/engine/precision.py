"""Frozen weights in the compute dtype, and whether this CPU computes in bf16 well.

With a frozen backbone nothing needs an fp32 master copy of the frozen weights: under bf16/fp16 autocast every step
would cast each frozen Linear/Conv weight again, and the fp32 copy holds twice the memory. `store_frozen_in` stores
every frozen floating-point parameter once in the compute dtype; trainable parameters (and so their gradients and
the optimizer state) stay fp32. Autocast then finds the frozen weights already in its dtype and casts only the
activations and the small trainable tensors.

On CPU, bf16 is fast only with native bf16 instructions (AVX512-BF16 or AMX); elsewhere it is emulated and slower
than fp32, so `cpu_bf16_support` says whether to use it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

__all__ = ["cpu_bf16_support", "store_frozen_in"]

CPUINFO = Path("/proc/cpuinfo")
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_AUTOCAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def cpu_bf16_support() -> tuple[bool, str]:
    """(whether this CPU has native bf16 arithmetic, the reason): AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return False, f"cannot read {CPUINFO} to find AVX512-BF16/AMX-BF16 instructions"
    match = re.search(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    found = [flag for flag in _BF16_FLAGS if flag in flags]
    if found:
        return True, f"this CPU has {' and '.join(found)}"
    return False, "this CPU has no native bf16 instructions (no avx512_bf16 or amx_bf16 in /proc/cpuinfo)"


def _castable(model: nn.Module, dtype: torch.dtype) -> list[nn.Parameter]:
    """Frozen floating-point parameters not yet in `dtype`, of modules whose parameters are all frozen or whose
    operands autocast casts together (Linear, Conv: BitFit's trainable bias beside a frozen weight); a LayerNorm with
    a trainable bias keeps its frozen weight in fp32 (layer_norm needs one dtype and is tiny)."""
    found = []
    for module in model.modules():
        direct = list(module.parameters(recurse=False))
        mixed = any(p.requires_grad for p in direct)
        if mixed and not isinstance(module, _AUTOCAST_MODULES):
            continue
        found += [p for p in direct if not p.requires_grad and p.is_floating_point() and p.dtype != dtype]
    return found


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen floating-point parameters of `model` in `dtype`, in place; returns the bytes saved.

    Trainable parameters stay as they are, and so do the frozen weights of norms that have trainable ones beside
    them (see `_castable`). `fastprompt.save_trainable` and the backbone check of `load_trainable` keep identifying
    the original frozen weights (their record is taken before the cast).
    """
    from fastprompt.io import tensor_digest
    from fastprompt.serialization import FROZEN_CAST_ATTR, _frozen_record, _frozen_state

    frozen = {id(p): p for p in _castable(model, dtype)}.values()
    if not frozen:
        return 0
    before = _frozen_record(model)
    saved = 0
    with torch.no_grad():
        for param in frozen:
            saved += param.numel() * (param.element_size() - torch.empty((), dtype=dtype).element_size())
            param.data = param.data.to(dtype)
    if before is not None:
        setattr(model, FROZEN_CAST_ATTR, (tensor_digest(_frozen_state(model)), before))
    return saved
