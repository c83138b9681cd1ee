"""VPT: learnable prompt tokens inserted after the prefix (CLS) tokens, shallow or deep."""

from __future__ import annotations

import math
import types
from functools import reduce
from operator import mul

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastprompt.methods.linear import unfreeze_head
from fastprompt.methods.registry import check_float, check_int, register_method


class VisualPrompts(nn.Module):
    """Prompt tokens `[layers, num_tokens, dim]` (layers = depth for deep VPT, 1 for shallow)."""

    def __init__(self, layers: int, num_tokens: int, dim: int, patch_area: int, dropout: float) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.zeros(layers, num_tokens, dim))
        bound = math.sqrt(6.0 / float(3 * patch_area + dim))  # VPT's Xavier-uniform over the patch fan-in
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    @property
    def deep(self) -> bool:
        return self.prompts.shape[0] > 1

    @property
    def num_tokens(self) -> int:
        return self.prompts.shape[1]


def _vpt_forward_features(
    self: VisionTransformer, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    if attn_mask is not None or is_causal:
        raise ValueError("VPT inserts prompt tokens, so a token attention mask cannot apply; call without attn_mask")
    x = self.patch_embed(x)
    x = self._pos_embed(x)
    x = self.patch_drop(x)
    x = self.norm_pre(x)
    vpt: VisualPrompts = self.vpt
    prefix, count = self.num_prefix_tokens, vpt.num_tokens
    for i, block in enumerate(self.blocks):
        if i == 0 or vpt.deep:
            prompts = vpt.dropout(vpt.prompts[i if vpt.deep else 0]).to(x.dtype).expand(x.shape[0], -1, -1)
            rest = x[:, prefix:] if i == 0 else x[:, prefix + count :]
            x = torch.cat([x[:, :prefix], prompts, rest], dim=1)
        if self.grad_checkpointing and self.training:
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    x = torch.cat([x[:, :prefix], x[:, prefix + count :]], dim=1)
    return self.norm(x)


@register_method("vpt")
def vpt(
    model: VisionTransformer, *, num_tokens: int = 10, deep: bool = True, dropout: float = 0.0
) -> VisionTransformer:
    """VPT: `num_tokens` prompts per layer (deep) or at the input (shallow); removed before the head."""
    check_int("num_tokens", num_tokens, minimum=0)
    check_float("dropout", dropout, minimum=0.0, maximum=1.0)
    if not isinstance(deep, bool):
        raise TypeError(f"option 'deep' must be a bool, got {type(deep).__name__}")
    patch_area = reduce(mul, model.patch_embed.patch_size, 1)
    layers = len(model.blocks) if deep else 1
    ref = model.cls_token if model.cls_token is not None else next(model.parameters())
    model.vpt = VisualPrompts(layers, num_tokens, model.embed_dim, patch_area, dropout).to(
        device=ref.device, dtype=ref.dtype
    )
    model.forward_features = types.MethodType(_vpt_forward_features, model)
    unfreeze_head(model)
    return model
