"""Plain-PyTorch references: the specification every kernel is tested against.

Everything here is materialised and obviously right; nothing here is fast.
"""

from __future__ import annotations

import torch


def attention_importance_reference(
    q: torch.Tensor, k: torch.Tensor, *, mode: str = "global", scale: float | None = None
) -> torch.Tensor:
    """Attention each key receives, [B, H, N] fp32: softmax(q kᵀ·scale) row mean ('global') or row 0 ('cls')."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax(q.float() @ k.float().transpose(-2, -1) * scale, dim=-1)
    if mode == "global":
        return probs.mean(dim=-2)
    if mode == "cls":
        return probs[..., 0, :]
    raise ValueError(f"mode must be 'global' or 'cls', got {mode!r}")


def select_tokens_reference(
    k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top int(N·ratio) keys/values per (b, h) by score, highest first, ties to the lower index; also the indices."""
    count = int(k.shape[-2] * ratio)
    indices = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]
    rows = indices.unsqueeze(-1)
    return (
        k.gather(-2, rows.expand(*indices.shape, k.shape[-1])),
        v.gather(-2, rows.expand(*indices.shape, v.shape[-1])),
        indices,
    )
