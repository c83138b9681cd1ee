"""VPT: learnable prompt tokens inserted after the prefix (CLS) tokens, shallow or deep.

On a timm ViT the prompts count as prefix tokens, as timm's register tokens do: `model.num_prefix_tokens` includes
them, `forward_features` returns `[prefix, prompts, patches]`, `forward_head` pools the CLS token (or the mean of the
patch tokens) as before, and `forward_intermediates` / `get_intermediate_layers` run the prompted blocks and return
patch maps without the prompts. See docs/drop-in.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import reduce
from operator import mul
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fastprompt.methods import classes
from fastprompt.methods.classes import MethodMixin, swap_class
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
        self.layers, self.count = layers, num_tokens  # plain ints: torch.fx traces the parameter's shape

    @property
    def deep(self) -> bool:
        return self.layers > 1

    @property
    def num_tokens(self) -> int:
        return self.count

    def insert(self, x: torch.Tensor, index: int, *, prefix: int) -> torch.Tensor:
        """Tokens `x` entering layer `index` with its prompts after the `prefix` tokens: inserted at layer 0,
        replacing the previous layer's prompt outputs at a deeper layer."""
        prompts = self.dropout(self.prompts[index if self.deep else 0]).to(x.dtype).expand(x.shape[0], -1, -1)
        rest = x[:, prefix:] if index == 0 else x[:, prefix + self.num_tokens :]
        return torch.cat([x[:, :prefix], prompts, rest], dim=1)

    def remove(self, x: torch.Tensor, *, prefix: int) -> torch.Tensor:
        """Tokens `x` without the prompt tokens that follow the `prefix` tokens."""
        return torch.cat([x[:, :prefix], x[:, prefix + self.num_tokens :]], dim=1)


class VPTBlock(MethodMixin):
    """A timm block that puts its layer's prompt tokens after the prefix tokens before running (see `vpt`)."""

    method = "vpt"
    prefix = "VPT"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        index, prefix, prompts = self.__dict__["_vpt_layer"]
        return super().forward(prompts.insert(x, index, prefix=prefix), *args, **kwargs)

    def extra_repr(self) -> str:
        index, _, prompts = self.__dict__["_vpt_layer"]
        own = f"vpt={'insert' if index == 0 else 'replace'} {prompts.num_tokens} prompt tokens"
        rest = super().extra_repr()
        return f"{rest}, {own}" if rest else own


class VPTVisionTransformer(MethodMixin):
    """A timm VisionTransformer whose prompt tokens count as prefix tokens (see the module docstring).

    With `return_prefix_tokens=True`, `forward_intermediates` gives as prefix part the CLS / register tokens
    followed by the prompts.
    """

    method = "vpt"
    prefix = "VPT"

    @contextlib.contextmanager
    def _embedding_prefix(self) -> Iterator[None]:
        """`num_prefix_tokens` without the prompts while timm resamples the position embedding (no prompt rows)."""
        count = self.num_prefix_tokens
        self.num_prefix_tokens = count - self.vpt.num_tokens
        try:
            yield
        finally:
            self.num_prefix_tokens = count

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_img_size:  # only timm's resampling branch reads num_prefix_tokens
            return super()._pos_embed(x)
        with self._embedding_prefix():
            return super()._pos_embed(x)

    def set_input_size(self, *args: Any, **kwargs: Any) -> None:
        with self._embedding_prefix():
            super().set_input_size(*args, **kwargs)

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        classes.check_no_mask("VPT", attn_mask, is_causal)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        classes.check_no_mask("VPT", kwargs.pop("attn_mask", None))
        return super().forward_intermediates(x, *args, **kwargs)


@register_method("vpt")
def vpt(
    model: VisionTransformer, *, num_tokens: int = 10, deep: bool = True, dropout: float = 0.0
) -> VisionTransformer:
    """VPT: `num_tokens` prompts per layer (deep) or at the input (shallow), after the prefix tokens.

    On timm the prompts become prefix tokens (`model.num_prefix_tokens` grows by `num_tokens`); the head pools the
    CLS token or the patch tokens as before.
    """
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
    prefix = model.num_prefix_tokens
    for i, block in enumerate(model.blocks if deep else model.blocks[:1]):
        swap_class(block, VPTBlock)
        block.__dict__["_vpt_layer"] = (i, prefix, model.vpt)  # not a submodule: the prompts live in model.vpt
    model.num_prefix_tokens = prefix + num_tokens
    swap_class(model, VPTVisionTransformer)
    unfreeze_head(model)
    return model
