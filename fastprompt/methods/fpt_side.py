"""FPT's trainable parts: the fusion module (prompts cross-attending to important tokens) and the side ViT."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

PROMPT_INIT_STD = 1e-6
SIDE_INIT_STD = 0.02


class FusionModule(nn.Module):
    """Per extracted layer, `num_prompts` learnable prompts that attend to that layer's important keys and values.

    The cross-attention is per head, with the frozen branch's post-projection K and V used as they are (no K/V
    projection, no output projection). The LayerNorm (FPT+) or query projection (FPT) and the output Linear are
    shared by all layers; only the prompts are per layer.

    - FPT+ (`query_projection=False`): prompts `[L, P, D]`, `F = Dropout(Linear_D→S(CrossAttn(LN(p), K, V) + p))`.
    - FPT (`query_projection=True`): prompts `[L, P, S]`, `F = Dropout(Linear_D→S(CrossAttn(Linear_S→D(p), K, V)) + p)`.
    """

    def __init__(
        self,
        num_layers: int,
        num_prompts: int,
        embed_dim: int,
        num_heads: int,
        side_width: int,
        *,
        query_projection: bool,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        prompt_dim = side_width if query_projection else embed_dim
        self.prompts = nn.Parameter(torch.empty(num_layers, num_prompts, prompt_dim))
        nn.init.normal_(self.prompts, std=PROMPT_INIT_STD)
        self.query_proj = nn.Linear(side_width, embed_dim) if query_projection else None
        self.norm = None if query_projection else nn.LayerNorm(embed_dim)
        self.out_proj = nn.Linear(embed_dim, side_width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Fused prompts `[B, L, P, S]` from selected keys and values `[B, L, H, k, Dh]`."""
        batch, layers, heads, count, head_dim = keys.shape
        prompts = self.prompts
        if layers != prompts.shape[0] or heads != self.num_heads or heads * head_dim != self.embed_dim:
            raise ValueError(
                f"features of shape {tuple(keys.shape)} do not fit this fusion module: expected [B, "
                f"{prompts.shape[0]}, {self.num_heads}, k, {self.embed_dim // self.num_heads}]; were they extracted "
                "with the same backbone and layers?"
            )
        queries = self.query_proj(prompts) if self.query_proj is not None else self.norm(prompts)
        num_prompts = prompts.shape[1]
        queries = queries.view(1, layers, num_prompts, heads, head_dim).transpose(2, 3)
        queries = queries.expand(batch, -1, -1, -1, -1).reshape(batch * layers, heads, num_prompts, head_dim)
        dtype = compute_dtype(keys.device.type, queries.dtype)
        context = cross_attention(
            queries.to(dtype),
            keys.reshape(batch * layers, heads, count, head_dim),
            values.reshape(batch * layers, heads, count, head_dim),
            dtype,
        )
        context = context.transpose(1, 2).reshape(batch, layers, num_prompts, self.embed_dim).to(prompts.dtype)
        if self.query_proj is not None:
            return self.dropout(self.out_proj(context) + prompts)
        return self.dropout(self.out_proj(context + prompts))


def compute_dtype(device: str, default: torch.dtype) -> torch.dtype:
    """The autocast dtype of `device` when autocast is on there, else `default`."""
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # not on meta
    return torch.get_autocast_dtype(device) if autocast else default


def cross_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """softmax(q kᵀ / √Dh) v per head, `[..., P, Dh]`, computed in `dtype` with the softmax in float32.

    Written as two matrix products rather than `scaled_dot_product_attention`: the keys and values come from the
    frozen branch or the feature cache and need no gradient, and autograd then computes none (the fused CPU kernel
    fills zero dK/dV buffers every step, and its backward is slower at these shapes: few queries, ~200 keys).
    Features already stored in `dtype` are read as they are; others are cast once.
    """
    keys, values = keys.to(dtype), values.to(dtype)
    scores = torch.matmul(queries * queries.shape[-1] ** -0.5, keys.transpose(-1, -2))
    weights = scores.float().softmax(dim=-1).to(dtype)
    return torch.matmul(weights, values)


def build_side_vit(
    *,
    img_size: int,
    patch_size: int,
    in_chans: int,
    width: int,
    depth: int,
    num_heads: int,
    num_classes: int,
) -> VisionTransformer:
    """A randomly initialised ViT (MLP ratio 4, qkv bias, CLS head) that accepts any input size."""
    side = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=width,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=num_classes,
        global_pool="token",
        class_token=True,
        dynamic_img_size=True,
    )
    for module in side.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=SIDE_INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.trunc_normal_(side.pos_embed, std=SIDE_INIT_STD)
    nn.init.trunc_normal_(side.cls_token, std=SIDE_INIT_STD)
    return side


def side_forward(side: VisionTransformer, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Logits of the side ViT; block i sees `prompts[:, i]` appended to its sequence (removed after the block)."""
    if prompts.shape[1] != len(side.blocks):
        raise ValueError(f"got fused prompts for {prompts.shape[1]} layers, the side network has {len(side.blocks)}")
    x = side.patch_embed(images)
    x = side._pos_embed(x)
    x = side.norm_pre(x)
    num_prompts = prompts.shape[2]
    for i, block in enumerate(side.blocks):
        x = block(torch.cat([x, prompts[:, i].to(x.dtype)], dim=1))[:, :-num_prompts]
    return side.forward_head(side.norm(x))
