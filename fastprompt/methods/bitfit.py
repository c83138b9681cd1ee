"""BitFit: train every bias (and the classifier), nothing else."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from fastprompt.methods.linear import unfreeze_head
from fastprompt.methods.registry import register_method


@register_method("bitfit")
def bitfit(model: VisionTransformer) -> VisionTransformer:
    """BitFit: train all bias terms (linear and norm biases) plus the classifier."""
    for name, param in model.named_parameters():
        if name.endswith(".bias") or name == "bias":
            param.requires_grad_(True)
    unfreeze_head(model)
    return model
