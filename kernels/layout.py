"""Memory layouts of the attention tensors that every kernel backend allocates and returns.

timm reshapes attention outputs from [B, N, H, D] memory, so O, dq, dk and dv leave the custom ops as [B, H, N, D]
views of that layout ("heads-last": the head index varies faster than the token index) on every backend, and the
custom ops' fake implementations promise exactly these strides.
"""

from __future__ import annotations

import torch


def empty_heads_last(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of `like`'s shape [B, H, N, D], dtype and device, laid out as [B, N, H, D] memory."""
    batch, heads, tokens, dim = like.shape
    return torch.empty(batch, tokens, heads, dim, dtype=like.dtype, device=like.device).transpose(1, 2)


def is_heads_last(x: torch.Tensor) -> bool:
    """Whether [B, H, N, D] `x` has exactly the strides `empty_heads_last` gives."""
    batch, heads, tokens, dim = x.shape
    return x.stride() == (tokens * heads * dim, dim, heads * dim, 1)


def as_heads_last(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when it is already heads-last (`is_heads_last`), else a heads-last copy of it."""
    return x if is_heads_last(x) else empty_heads_last(x).copy_(x)
