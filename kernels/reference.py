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


def sink_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    *,
    scale: float | None = None,
    return_scale: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax([sink, q kᵀ·scale]) with the sink column dropped, times V; optionally also σ(lse − sink) [B, H, N]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-2, -1) * scale
    sink_col = sink.to(logits.dtype).expand(logits.shape[:-1]).unsqueeze(-1)
    probs = torch.softmax(torch.cat([sink_col, logits], dim=-1), dim=-1)[..., 1:]
    out = probs @ v
    if not return_scale:
        return out
    return out, torch.sigmoid(torch.logsumexp(logits, dim=-1) - sink_col.squeeze(-1))


def ept_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Official EPT attention: prompt [N, P] before the scaled logits, softmax over N+P, prompt columns sliced off."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = q @ k.transpose(-2, -1) * scale
    batch, heads, tokens, _ = attn.shape
    prompt = prompt.to(attn.dtype).expand(batch, heads, tokens, prompt.shape[-1])
    attn = torch.cat([prompt, attn], dim=-1).softmax(dim=-1)
    attn = attn[..., prompt.shape[-1] :].clone()
    return attn @ v
