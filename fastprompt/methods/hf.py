"""Hugging Face vision transformers under `fastprompt.apply`: ViT and DINOv2 from `transformers`.

Supported models: `ViTModel`, `ViTForImageClassification`, `Dinov2Model`, `Dinov2ForImageClassification`
(built from a config or `from_pretrained`). The methods are the timm ones, mapped onto the Hugging Face layout
(`layers[i].attention.{q,k,v,o}_proj`, `layers[i].mlp`, `embeddings.patch_embeddings`, `classifier`); every
option and every error mirrors the timm path. What differs, and why:

- `lora` with `targets=("qkv",)` puts one low-rank update on each of `q_proj`, `k_proj`, `v_proj` (the layers
  Hugging Face keeps separate, as peft does): 6·r·D parameters per block where timm's fused `qkv` has 4·r·D.
- Images at another size than the config's: pass `interpolate_pos_encoding=True` as Hugging Face asks (DINOv2
  always interpolates). EPT's prompt rows follow the token grid the same way, resampled as Hugging Face
  resamples position embeddings (bicubic, align_corners=False, in float32, CLS row kept).
- `partial` (last blocks) is timm-only; `fpt` / `fpt+` wrap the backbone through `HFTap`.

This module imports `transformers` only when given a Hugging Face model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.methods import adapter as adapter_method
from fastprompt.methods import ept as ept_method
from fastprompt.methods import lora as lora_method
from fastprompt.methods import vpt as vpt_method
from fastprompt.methods.classes import MethodMixin, set_input_requires_grad, swap_class
from fastprompt.methods.layout import SUPPORTED, attention_modules, base_model, hf_layers, is_hf_model  # noqa: F401
from fastprompt.methods.linear import unfreeze_head
from fastprompt.methods.registry import MethodSpec, check_choice, check_float, check_int, check_layers

TIMM_ONLY_METHODS = ("partial",)


def _is_dinov2(model: nn.Module) -> bool:
    return type(base_model(model)).__name__ == "Dinov2Model"


def patch_size(model: nn.Module) -> tuple[int, int]:
    size = base_model(model).embeddings.patch_embeddings.patch_size
    return (int(size[0]), int(size[1]))


def token_grid(model: nn.Module) -> tuple[int, int]:
    """The patch grid of the config's image size (the grid the position embeddings were made for)."""
    embeddings = base_model(model).embeddings.patch_embeddings
    return (embeddings.image_size[0] // embeddings.patch_size[0], embeddings.image_size[1] // embeddings.patch_size[1])


def reset_classifier(model: nn.Module, num_classes: int) -> None:
    """Give `model` a fresh frozen `classifier` with `num_classes` outputs (Hugging Face's init); a ValueError
    for a model without a classifier."""
    if not hasattr(model, "classifier"):
        raise ValueError(
            f"{type(model).__name__} has no classifier, so num_classes cannot apply; load the "
            "...ForImageClassification model (e.g. ViTForImageClassification) or leave num_classes out"
        )
    config = base_model(model).config
    in_features = config.hidden_size * (2 if _is_dinov2(model) else 1)  # DINOv2's head sees [CLS, mean patch]
    ref = next(base_model(model).parameters())
    head = nn.Linear(in_features, num_classes, device=ref.device, dtype=ref.dtype)
    if head.weight.device.type != "meta":
        with torch.no_grad():
            nn.init.trunc_normal_(head.weight, std=config.initializer_range)
            nn.init.zeros_(head.bias)
    model.classifier = head.requires_grad_(False)
    model.config.num_labels = num_classes
    model.num_labels = num_classes


class HFTokenGrid(ept_method.TokenGrid):
    """Forward pre-hook on Hugging Face `patch_embeddings` recording the patch grid of the images it embeds."""

    def __call__(self, patch_embed: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            height, width = args[0].shape[-2:]
            self.size = (int(height) // patch_embed.patch_size[0], int(width) // patch_embed.patch_size[1])


def resample_prompt(
    prompt: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], prefix_tokens: int
) -> torch.Tensor:
    """Resample the patch rows of a `[prefix + H·W, P]` prompt to `new_grid` as Hugging Face's
    `interpolate_pos_encoding` resamples position embeddings (bicubic, align_corners=False, float32)."""
    if tuple(new_grid) == tuple(old_grid):
        return prompt
    prefix, patches = prompt[:prefix_tokens], prompt[prefix_tokens:]
    grid = patches.reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = grid.to(prompt.dtype).permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1)
    return torch.cat([prefix, patches], dim=0)


def _qkv_heads(attn: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v `[B, H, N, Dh]` exactly as the Hugging Face attention makes them."""
    shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
    return q, k, v


class EPTHFAttention(ept_method.EPTMixin):
    """Hugging Face ViT / DINOv2 self-attention with the EPT prompt sink folded into the softmax.

    The fused sink attention by default. A call with `output_attentions=True` or an attention mask runs the
    materialised path instead and returns the probabilities over the real tokens after the sink (rows sum to < 1).
    """

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = _qkv_heads(self, hidden_states)
        # as transformers' capture_outputs decides: the call's flag, else the config's
        wanted = kwargs.get("output_attentions", getattr(getattr(self, "config", None), "output_attentions", False))
        out, probs = ept_method.prompted_attention(
            self, q, k, v, scale=self.scaling, mask=attention_mask, need_weights=bool(wanted)
        )
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out), probs


def ept(
    model: nn.Module,
    *,
    prompt_length: int = 100,
    prompt_layers: Iterable[int] | None = None,
    prompt_init: str = "normal",
    attention: str = "fused",
) -> nn.Module:
    """EPT on a Hugging Face ViT / DINOv2 (see `fastprompt.methods.ept.ept` for the options)."""
    check_int("prompt_length", prompt_length, minimum=1)
    check_choice("prompt_init", prompt_init, ept_method.PROMPT_INITS)
    check_choice("attention", attention, ept_method.ATTENTION_PATHS)
    attentions = attention_modules(model)
    depth = len(attentions)
    layers = list(range(depth)) if prompt_layers is None else check_layers("prompt_layers", prompt_layers, depth)
    for i in layers:
        dropout = attentions[i].attention_dropout
        if dropout > 0:
            raise ValueError(
                f"block {i} has attention dropout {dropout}, which the fused sink attention does not implement; "
                "create the model with attention_probs_dropout_prob=0.0"
            )
    base = base_model(model)
    grid = token_grid(model)
    tracker = HFTokenGrid()
    base.embeddings.patch_embeddings.register_forward_pre_hook(tracker)
    for i in layers:
        attn = attentions[i]
        state = ept_method.EPTState(
            tracker=tracker, grid=grid, prefix_tokens=1, attention=attention, resample=resample_prompt
        )
        ept_method.attach_prompt(attn, 1 + grid[0] * grid[1], prompt_length, prompt_init, state)
        swap_class(attn, EPTHFAttention)
    unfreeze_head(model)
    return model


LORA_LAYERS = {"qkv": ("q_proj", "k_proj", "v_proj"), "proj": ("o_proj",)}


def lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] = ("qkv",),
) -> nn.Module:
    """LoRA on each layer's `q_proj`, `k_proj`, `v_proj` ("qkv") and/or `o_proj` ("proj")."""
    targets = lora_method.check_lora_options(rank, alpha, dropout, targets)
    for attn in attention_modules(model).values():
        for target in targets:
            for name in LORA_LAYERS[target]:
                lora_method.wrap_linear(attn, name, rank, alpha, dropout)
    unfreeze_head(model)
    return model


def widen_mask(mask: torch.Tensor, prefix: int, count: int) -> torch.Tensor:
    """An attention mask `[..., N, N]` (or `[..., 1, N]`) for the sequence with `count` prompt tokens after the
    `prefix` tokens: the prompts attend to and are seen by every token; the real tokens keep their mask."""
    fill = True if mask.dtype == torch.bool else 0.0
    for dim in (-1, -2):
        if mask.shape[dim] == 1:
            continue
        shape = list(mask.shape)
        shape[dim] = count
        size = mask.shape[dim]
        head, tail = mask.narrow(dim, 0, prefix), mask.narrow(dim, prefix, size - prefix)
        mask = torch.cat([head, mask.new_full(shape, fill), tail], dim=dim)
    return mask


class InsertPrompts:
    """Forward pre-hook of layer `index`: insert (layer 0) or replace (deep VPT) the prompt tokens after CLS, and
    widen an attention mask to the prompted sequence."""

    def __init__(self, index: int, vpt: vpt_method.VisualPrompts) -> None:
        self.index, self.vpt = index, vpt

    def __call__(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, *rest = args
        if self.index == 0 or self.vpt.deep:
            x = self.vpt.insert(x, self.index, prefix=1)
        if rest and rest[0] is not None:
            rest[0] = widen_mask(rest[0], 1, self.vpt.num_tokens)
        if kwargs.get("attention_mask") is not None:
            kwargs = {**kwargs, "attention_mask": widen_mask(kwargs["attention_mask"], 1, self.vpt.num_tokens)}
        return (x, *rest), kwargs


class RemovePrompts:
    """Forward pre-hook of the final layer norm: drop the prompt tokens before the head."""

    def __init__(self, vpt: vpt_method.VisualPrompts) -> None:
        self.vpt = vpt

    def __call__(self, norm: nn.Module, args: tuple) -> tuple:
        return (self.vpt.remove(args[0], prefix=1), *args[1:])


def vpt(model: nn.Module, *, num_tokens: int = 10, deep: bool = True, dropout: float = 0.0) -> nn.Module:
    """VPT on a Hugging Face ViT / DINOv2: prompts after CLS in every layer (deep) or at the input (shallow)."""
    check_int("num_tokens", num_tokens, minimum=0)
    check_float("dropout", dropout, minimum=0.0, maximum=1.0)
    if not isinstance(deep, bool):
        raise TypeError(f"option 'deep' must be a bool, got {type(deep).__name__}")
    base, layers = base_model(model), hf_layers(model)
    height, width = patch_size(model)
    ref = base.embeddings.cls_token
    count = len(layers) if deep else 1
    prompts = vpt_method.VisualPrompts(count, num_tokens, base.config.hidden_size, height * width, dropout)
    base.vpt = prompts.to(device=ref.device, dtype=ref.dtype)
    for i, layer in enumerate(layers):  # every layer: a mask needs widening after the prompts are in
        layer.register_forward_pre_hook(InsertPrompts(i, base.vpt), with_kwargs=True)
    base.layernorm.register_forward_pre_hook(RemovePrompts(base.vpt))
    unfreeze_head(model)
    return model


def adapter(model: nn.Module, *, reduction: int = 8) -> nn.Module:
    """Sequential bottleneck adapter after every layer's MLP (as timm's `adapter`)."""
    check_int("reduction", reduction, minimum=1)
    hidden = base_model(model).config.hidden_size
    for layer in hf_layers(model):
        adapter_method.attach_adapter(layer.mlp, hidden, reduction)
    unfreeze_head(model)
    return model


def reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether a Hugging Face model recomputes its layers with reentrant checkpointing."""
    for layer in hf_layers(model):
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(layer, "gradient_checkpointing", False) and func is not None:
            return bool(getattr(func, "keywords", {}).get("use_reentrant", True))
    return False


class HFPatched(MethodMixin):
    """A Hugging Face model patched by `fastprompt.apply` (same class name, so `save_pretrained` records it as usual).

    - `gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})` also makes the
      embedding output require grad, so the method's parameters train (reentrant checkpointing skips parameters
      of blocks whose inputs need no gradient);
    - `save_pretrained(folder)` also writes fastprompt's record (`trainable.safetensors` + `trainable.json`), so
      `fastprompt.load(folder)` gives the patched model back (`from_pretrained` alone gives the unpatched one).
    """

    method = "fastprompt"
    prefix = ""

    def _set_gradient_checkpointing(self, *args: Any, **kwargs: Any) -> None:
        super()._set_gradient_checkpointing(*args, **kwargs)
        set_input_requires_grad(base_model(self).embeddings, reentrant_checkpointing(self))

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        from fastprompt.serialization import save_trainable

        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and any(p.requires_grad for p in self.parameters()):
            save_trainable(self, save_directory)  # nothing trainable (frozen for inference): HF's files only
        return result


HF_METHODS: dict[str, Callable[..., nn.Module]] = {"ept": ept, "lora": lora, "vpt": vpt, "adapter": adapter}


def method_fn(spec: MethodSpec) -> Callable[..., nn.Module]:
    """The function applying `spec` to a Hugging Face model: its HF version, or the timm one where that works as is
    (linear, bitfit, full: only parameters and the classifier; fpt, fpt+: FPT takes HF backbones)."""
    if spec.name in TIMM_ONLY_METHODS:
        raise ValueError(
            f"method {spec.name!r} is implemented for timm ViTs only; on Hugging Face models use one of "
            f"{', '.join(sorted(available_hf_methods()))}"
        )
    return HF_METHODS.get(spec.name, spec.fn)


def available_hf_methods() -> tuple[str, ...]:
    """The registered methods that run on Hugging Face models."""
    from fastprompt.methods.registry import available_methods

    return tuple(name for name in available_methods() if name not in TIMM_ONLY_METHODS)


class HFTap:
    """How FPT runs a frozen Hugging Face ViT / DINOv2 layer by layer (the timm counterpart is `fpt.TimmTap`).

    Images at another size than the config's go through `interpolate_pos_encoding`, as Hugging Face does it.
    """

    def __init__(self, backbone: nn.Module) -> None:
        base = base_model(backbone)
        config = base.config
        self.base = base
        self.dinov2 = _is_dinov2(backbone)
        self.blocks = list(hf_layers(backbone))
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.patch_size = patch_size(backbone)[0]
        self.in_chans = config.num_channels
        self.num_prefix_tokens = 1
        self.image_size = list(base.embeddings.patch_embeddings.image_size)
        self.name = getattr(config, "name_or_path", "") or type(base).__name__
        self._grid = token_grid(backbone)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens entering layer 0 (position embeddings interpolated to the image size as Hugging Face does)."""
        embeddings = self.base.embeddings
        images = images.to(embeddings.patch_embeddings.projection.weight.dtype)
        if self.dinov2:
            return embeddings(images)
        return embeddings(images, interpolate_pos_encoding=True)

    def qkv(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        normed = layer.norm1(x) if self.dinov2 else layer.layernorm_before(x)
        return (normed, *_qkv_heads(layer.attention, normed))

    def finish(self, layer: nn.Module, x: torch.Tensor, normed: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the Hugging Face layer after softmax(q kᵀ)·v: output projection, residuals and MLP."""
        out = layer.attention.o_proj(attended.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        if self.dinov2:
            x = x + layer.drop_path(layer.layer_scale1(out))
            return x + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))
        x = x + layer.dropout(out)
        return x + layer.dropout(layer.mlp(layer.layernorm_after(x)))

    @staticmethod
    def scale(layer: nn.Module) -> float:
        return layer.attention.scaling

    def grid(self, image_size: tuple[int, int] | None) -> tuple[int, int]:
        """Patch grid at `image_size` (default: the config's)."""
        if image_size is None:
            return self._grid
        return (int(image_size[0]) // self.patch_size, int(image_size[1]) // self.patch_size)
