"""Bottleneck adapters placed sequentially after each block's MLP."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fastprompt.methods.classes import MethodMixin, swap_class
from fastprompt.methods.linear import unfreeze_head
from fastprompt.methods.registry import check_int, register_method


class Adapter(nn.Module):
    """`x + up(act(down(x)))` with a `dim // reduction` bottleneck; `up` starts at zero (identity)."""

    def __init__(self, dim: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class AdapterMLP(MethodMixin):
    """An MLP (timm or Hugging Face) followed by its `adapter`: `adapter(mlp(x))`."""

    method = "adapter"
    prefix = "Adapter"
    adapter: Adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(super().forward(x))


@register_method("adapter")
def adapter(model: VisionTransformer, *, reduction: int = 8) -> VisionTransformer:
    """Sequential bottleneck adapter after every MLP: 2·D·(D/r) + D/r + D parameters per block."""
    check_int("reduction", reduction, minimum=1)
    for block in model.blocks:
        attach_adapter(block.mlp, model.embed_dim, reduction)
    unfreeze_head(model)
    return model


def attach_adapter(mlp: nn.Module, dim: int, reduction: int) -> None:
    """Run an Adapter on `mlp`'s output (on the MLP's device and dtype)."""
    ref = next(mlp.parameters())
    mlp.adapter = Adapter(dim, reduction).to(device=ref.device, dtype=ref.dtype)
    swap_class(mlp, AdapterMLP)
