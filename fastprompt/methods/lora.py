"""LoRA: low-rank updates on the attention projections, mergeable into the frozen weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fastprompt.methods.linear import unfreeze_head
from fastprompt.methods.registry import check_float, check_int, register_method

LORA_TARGETS = ("qkv", "proj")


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update `scaling · B A`.

    Keeps the wrapped layer's `weight` and `bias` under their original names, so pretrained
    state dicts load unchanged; adds `lora_A` [rank, in] (Kaiming-uniform) and `lora_B`
    [out, rank] (zeros, so the model starts as the pretrained one).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain frozen nn.Linear whose weight includes the low-rank update."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            linear.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear


@register_method("lora")
def lora(
    model: VisionTransformer,
    *,
    rank: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] = ("qkv",),
) -> VisionTransformer:
    """LoRA on each block's attention `qkv` and/or `proj` linear layers (rank·(in+out) parameters each)."""
    targets = check_lora_options(rank, alpha, dropout, targets)
    for block in model.blocks:
        for name in targets:
            wrap_linear(block.attn, name, rank, alpha, dropout)
    unfreeze_head(model)
    return model


def check_lora_options(rank: object, alpha: object, dropout: object, targets: object) -> tuple[str, ...]:
    """Validate LoRA's options; the targets as a tuple without repeats."""
    check_int("rank", rank, minimum=1)
    check_float("alpha", alpha, minimum=0.0)
    check_float("dropout", dropout, minimum=0.0, maximum=1.0)
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, (tuple, list)):
        raise TypeError(f"option 'targets' must be a name or a tuple of names, got {type(targets).__name__}")
    if not targets or any(t not in LORA_TARGETS for t in targets):
        raise ValueError(f"option 'targets' must be a non-empty subset of {list(LORA_TARGETS)}, got {targets!r}")
    return tuple(dict.fromkeys(targets))


def wrap_linear(parent: nn.Module, name: str, rank: int, alpha: float, dropout: float) -> None:
    """Replace the nn.Linear `parent.<name>` by a LoRALinear around it."""
    base = getattr(parent, name)
    if not isinstance(base, nn.Linear):
        raise TypeError(f"LoRA target attn.{name} is {type(base).__name__}, expected nn.Linear")
    setattr(parent, name, LoRALinear(base, rank, alpha, dropout))


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `model` by its merged nn.Linear (in place); returns `model`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model
