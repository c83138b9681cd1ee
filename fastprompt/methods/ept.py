"""EPT (Embedded Prompt Tuning): a learnable prompt row per token that acts as an attention sink.

The official method concatenates `prompt[n, :]` (P logits) in front of token n's scaled attention logits,
takes the softmax over N + P columns and drops the prompt columns. The output depends on the prompt only
through `g[n] = logsumexp(prompt[n, :])`, so the fused path runs `fastprompt.kernels.sink_attention` with that
sink and never materialises the B·H·N·(N+P) probabilities (see DESIGN.md, "EPT is an attention sink").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import Attention, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fastprompt.kernels import sink_attention
from fastprompt.kernels.reference import ept_attention_reference
from fastprompt.methods.classes import MethodMixin, swap_class
from fastprompt.methods.layout import attention_modules
from fastprompt.methods.linear import unfreeze_head
from fastprompt.methods.registry import check_choice, check_int, check_layers, register_method

PROMPT_INITS = ("normal", "uniform", "zero", "kaiming")
ATTENTION_PATHS = ("fused", "official")


class TokenGrid:
    """Forward pre-hook on `patch_embed` recording the patch grid of the images it embeds."""

    def __init__(self) -> None:
        self.size: tuple[int, int] | None = None

    def __call__(self, patch_embed: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and not isinstance(args[0], torch.fx.Proxy):
            height, width = patch_embed.dynamic_feat_size(tuple(args[0].shape[-2:]))
            self.size = (int(height), int(width))


def resample_prompt(
    prompt: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], prefix_tokens: int
) -> torch.Tensor:
    """Resample the patch rows of a `[prefix + H·W, P]` prompt to `new_grid` as timm resamples pos_embed.

    Bicubic (antialiased) interpolation on the token grid; the prefix (CLS / register) rows are kept.
    The prompt itself is returned when the grids match.
    """
    if tuple(new_grid) == tuple(old_grid):
        return prompt
    resampled = resample_abs_pos_embed(
        prompt.unsqueeze(0), new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=prefix_tokens
    )
    return resampled.squeeze(0)


@dataclass
class EPTState:
    """What a prompted attention needs besides its prompt: the grids, prefix count, path and scale recorder."""

    tracker: TokenGrid
    grid: tuple[int, int]
    prefix_tokens: int
    attention: str
    scales: list[torch.Tensor] | None = None
    # how the model resamples its position embeddings (timm's or Hugging Face's way)
    resample: Callable[[torch.Tensor, tuple[int, int], tuple[int, int], int], torch.Tensor] = resample_prompt


def token_prompt(attn: Attention, num_tokens: int) -> torch.Tensor:
    """The prompt of `attn` for the current token grid, `[num_tokens, P]`; a ValueError on a mismatch."""
    state: EPTState = attn.ept
    grid = state.tracker.size or state.grid
    prompt = attn.prompt
    if grid != state.grid:
        prompt = state.resample(prompt, grid, state.grid, state.prefix_tokens)
    if prompt.shape[0] != num_tokens:
        raise ValueError(
            f"EPT prompt has {prompt.shape[0]} rows ({state.prefix_tokens} prefix + {grid[0]}x{grid[1]} patches) "
            f"but the attention got {num_tokens} tokens; EPT needs exactly one prompt row per token, so feed the "
            "blocks through the model's forward (which records the patch grid) without token dropping or extra tokens"
        )
    return prompt


def materialised_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official concat-softmax-slice, materialised: `(out [B, H, N, Dh], probs [B, H, N, N])`.

    `probs` are the attention probabilities over the real tokens after the prompt sink took its share, so each row
    sums to less than 1. `mask` (broadcast to `[B, H, N, N]`) masks keys as in PyTorch's scaled_dot_product_attention:
    a bool mask keeps the True entries, a float mask is added to the logits; the prompt columns are never masked.
    """
    logits = (q @ k.transpose(-2, -1)).float() * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    sink = prompt.float().expand(*logits.shape[:-1], prompt.shape[-1])
    probs = torch.cat([sink, logits], dim=-1).softmax(dim=-1)[..., prompt.shape[-1] :].to(q.dtype)
    return probs @ v, probs


@torch.fx.wrap
def ept_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    attention: str,
    need_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The EPT attention core for a prompt already matched to the token grid: `(out, probs or None)`.

    Wrapped for torch.fx, so a traced model makes its choices here at run time (mask or none, one prompt row
    per token) exactly as the eager model does.
    """
    if prompt.shape[0] != q.shape[-2]:
        raise ValueError(
            f"EPT prompt has {prompt.shape[0]} rows but the attention got {q.shape[-2]} tokens; EPT needs exactly one "
            "prompt row per token: run the eager model (a torch.fx-traced one keeps the traced image size) without "
            "token dropping or extra tokens"
        )
    if mask is not None or need_weights:
        out, probs = materialised_attention(q, k, v, prompt, scale=scale, mask=mask)
        return out, (probs if need_weights else None)
    if attention == "official":
        return ept_attention_reference(q, k, v, prompt, scale=scale), None
    return sink_attention(q, k, v, torch.logsumexp(prompt, dim=-1), scale=scale), None


def prompted_attention(
    attn: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax over [prompt | q kᵀ·scale], prompt columns dropped, times v: `(out [B, H, N, Dh], probs or None)`.

    Runs the fused sink attention, or the materialised official formulation when the model was patched with
    `attention="official"`, when a `mask` is given or when the probabilities are asked for (`need_weights`);
    records the patch-wise scaling map while `ept_scales` asks for it.
    """
    state: EPTState = attn.ept
    if isinstance(q, torch.fx.Proxy):  # symbolic tracing: the grid is the configured one, checked at run time
        return ept_core(q, k, v, attn.prompt, mask, scale, state.attention, need_weights)
    prompt = token_prompt(attn, q.shape[-2])
    if state.scales is not None and mask is None:
        out, scaling = sink_attention(q, k, v, torch.logsumexp(prompt, dim=-1), scale=scale, return_scale=True)
        state.scales.append(scaling.mean(dim=1))
        return out, None
    return ept_core(q, k, v, prompt, mask, scale, state.attention, need_weights)


class EPTMixin(MethodMixin):
    """What every EPT attention (timm or Hugging Face) shows: its prompt shape and attention path."""

    method = "ept"
    prefix = "EPT"
    prompt: nn.Parameter
    ept: EPTState

    def extra_repr(self) -> str:
        own = f"prompt={tuple(self.prompt.shape)}, attention={self.ept.attention!r}"
        rest = super().extra_repr()
        return f"{rest}, {own}" if rest else own


@torch.fx.wrap
def check_not_causal(is_causal: bool) -> None:
    """Raise for is_causal=True (wrapped for torch.fx, so it runs on the real value)."""
    if is_causal:
        raise ValueError(
            "EPT does not support is_causal=True: the prompt sink is defined for full attention over all tokens; "
            "call the model without is_causal (a key mask through attn_mask is supported)"
        )


class EPTAttention(EPTMixin):
    """timm's Attention with the prompt sink folded into the softmax (the attention core; the rest is timm's).

    The q/k/v and output code repeats timm's `Attention.forward`; tests pin it to timm's own output.
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        check_not_causal(is_causal)
        batch, num_tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out, _ = prompted_attention(self, q, k, v, scale=self.scale, mask=attn_mask)
        x = out.transpose(1, 2).reshape(batch, num_tokens, self.num_heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)


def init_prompt(prompt: torch.Tensor, init: str) -> None:
    """Fill a `[N, P]` prompt in place with one of PROMPT_INITS (see `ept` for the definitions)."""
    with torch.no_grad():
        if init == "normal":
            nn.init.normal_(prompt, std=0.02)
        elif init == "uniform":
            nn.init.uniform_(prompt, -0.08, 0.08)
        elif init == "zero":
            nn.init.zeros_(prompt)
        else:  # the official kaiming_normal_ on its [layers, N, P] tensor: fan_in = N·P, gain sqrt(2)
            nn.init.normal_(prompt, std=math.sqrt(2.0 / prompt.numel()))


def _check_attention(block_index: int, attn: object) -> Attention:
    """Raise unless `attn` is timm's standard Attention without attention dropout."""
    if type(attn) is not Attention:
        raise TypeError(
            f"EPT patches timm's standard Attention, but block {block_index} has {type(attn).__name__}; "
            "use a plain timm VisionTransformer (e.g. vit_base_patch16_224) or leave that block out of prompt_layers"
        )
    if attn.attn_drop.p > 0:
        raise ValueError(
            f"block {block_index} has attention dropout {attn.attn_drop.p}, which the fused sink attention does not "
            "implement; create the model with attn_drop_rate=0"
        )
    return attn


@register_method("ept")
def ept(
    model: VisionTransformer,
    *,
    prompt_length: int = 100,
    prompt_layers: Iterable[int] | None = None,
    prompt_init: str = "normal",
    attention: str = "fused",
) -> VisionTransformer:
    """EPT: a `[N, prompt_length]` prompt per prompted block, used as a per-token attention sink.

    `prompt_layers` is any subset of block indices (default: all). `prompt_init`: "normal" (std 0.02),
    "uniform" (±0.08), "zero", or "kaiming" — He-normal as the official code's `nn.init.kaiming_normal_` on
    its `[layers, N, P]` tensor (fan_in = N·P, gain √2, so std = √(2 / (N·P))). `attention`: "fused" runs
    `fastprompt.kernels.sink_attention`; "official" materialises concat-softmax-slice as the official code
    does (the memory baseline). Trains the prompts and the classifier.
    """
    check_int("prompt_length", prompt_length, minimum=1)
    check_choice("prompt_init", prompt_init, PROMPT_INITS)
    check_choice("attention", attention, ATTENTION_PATHS)
    depth = len(model.blocks)
    layers = list(range(depth)) if prompt_layers is None else check_layers("prompt_layers", prompt_layers, depth)
    if not isinstance(model.patch_drop, nn.Identity):
        raise ValueError(
            "EPT ties one prompt row to each token, but this model drops patch tokens in training "
            "(patch_drop_rate > 0); create it with patch_drop_rate=0"
        )
    patch_embed = model.patch_embed
    if not hasattr(patch_embed, "dynamic_feat_size"):
        raise TypeError(f"EPT needs a timm patch embedding with a token grid, got {type(patch_embed).__name__}")
    attns = {i: _check_attention(i, getattr(model.blocks[i], "attn", None)) for i in layers}
    grid = (int(patch_embed.grid_size[0]), int(patch_embed.grid_size[1]))
    num_tokens = model.num_prefix_tokens + grid[0] * grid[1]
    tracker = TokenGrid()
    patch_embed.register_forward_pre_hook(tracker)
    for attn in attns.values():
        state = EPTState(tracker=tracker, grid=grid, prefix_tokens=model.num_prefix_tokens, attention=attention)
        attach_prompt(attn, num_tokens, prompt_length, prompt_init, state)
        swap_class(attn, EPTAttention)
    unfreeze_head(model)
    return model


def attach_prompt(attn: nn.Module, num_tokens: int, prompt_length: int, prompt_init: str, state: EPTState) -> None:
    """Give `attn` a trainable `[num_tokens, prompt_length]` prompt (on its weights' device and dtype) and `state`."""
    weight = next(attn.parameters())
    prompt = torch.empty(num_tokens, prompt_length, device=weight.device, dtype=weight.dtype)
    init_prompt(prompt, prompt_init)
    attn.prompt = nn.Parameter(prompt)
    attn.ept = state


def prompted_attentions(model: nn.Module) -> dict[int, nn.Module]:
    """The attention modules that carry an EPT prompt, by block index (timm or Hugging Face ViT)."""
    return {i: attn for i, attn in attention_modules(model).items() if isinstance(getattr(attn, "ept", None), EPTState)}


def prompted_layers(model: nn.Module) -> list[int]:
    """Indices of the blocks that carry an EPT prompt."""
    return list(prompted_attentions(model))


def ept_scales(model: nn.Module, images: torch.Tensor, **forward_kwargs: Any) -> dict[int, torch.Tensor]:
    """Patch-wise scaling map σ(lse − g) per prompted layer, averaged over heads: `{layer: [B, N]}`.

    Runs `model(images, **forward_kwargs)` (e.g. `interpolate_pos_encoding=True` for a Hugging Face ViT) in eval
    mode without gradients (the model's train/eval mode is restored); the map comes
    from `sink_attention(..., return_scale=True)` whichever attention path the model trains with.
    """
    attentions = prompted_attentions(model)
    if not attentions:
        raise ValueError("model has no EPT prompts; call fastprompt.apply(model, 'ept', ...) first")
    layers, states = list(attentions), [attn.ept for attn in attentions.values()]
    was_training = model.training
    try:
        model.eval()
        for state in states:
            state.scales = []
        with torch.no_grad():
            model(images, **forward_kwargs)
        return {i: state.scales[0] for i, state in zip(layers, states)}
    finally:
        for state in states:
            state.scales = None
        model.train(was_training)
