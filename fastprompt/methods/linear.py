"""Selective fine-tuning baselines: linear probe, partial (last k blocks), full fine-tuning."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from fastprompt.methods.registry import check_int, register_method


def unfreeze_head(model: VisionTransformer) -> None:
    """Make the classifier trainable: timm's `get_classifier()`, a Hugging Face model's `classifier` (if any)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "classifier", None)
    if head is not None:
        head.requires_grad_(True)


@register_method("linear")
def linear_probe(model: VisionTransformer) -> VisionTransformer:
    """Linear probe: train the classifier only."""
    unfreeze_head(model)
    return model


@register_method("partial")
def partial(model: VisionTransformer, *, blocks: int = 1) -> VisionTransformer:
    """Partial fine-tuning: train the last `blocks` transformer blocks, the final norms and the classifier."""
    check_int("blocks", blocks, minimum=1)
    if blocks > len(model.blocks):
        raise ValueError(f"option 'blocks' is {blocks} but the model has only {len(model.blocks)} blocks")
    for block in model.blocks[-blocks:]:
        block.requires_grad_(True)
    for name in ("norm", "fc_norm", "head_drop"):
        module = getattr(model, name, None)
        if module is not None:
            module.requires_grad_(True)
    unfreeze_head(model)
    return model


@register_method("full")
def full(model: VisionTransformer) -> VisionTransformer:
    """Full fine-tuning: every parameter trains."""
    model.requires_grad_(True)
    return model
