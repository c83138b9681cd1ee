"""Device-independent memory figures: the bytes of activations saved for backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def saved_tensor_bytes(fn: Callable[..., Any], *args: Any, exclude: nn.Module | None = None, **kwargs: Any) -> int:
    """Run `fn(*args, **kwargs)` and return the bytes autograd saved for backward.

    Tensors are de-duplicated by storage (a storage saved twice counts once, at its full size) and the
    parameters of `exclude` (usually the model) are not counted, so the figure is the activation memory a
    training step keeps alive between forward and backward.
    """
    param_storages = set()
    if exclude is not None:
        param_storages = {p.untyped_storage().data_ptr() for p in exclude.parameters()}
        param_storages |= {b.untyped_storage().data_ptr() for b in exclude.buffers()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta" and tensor.numel() > 0:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in param_storages:
                seen[key] = max(seen.get(key, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*args, **kwargs)
    return sum(seen.values())
