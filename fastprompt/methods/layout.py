"""Where a supported model keeps its blocks: timm's `blocks[i].attn` or Hugging Face's `layers[i].attention`.

The one home of the layout helpers that the timm methods (`ept`) and the Hugging Face methods (`hf`) share.
This module imports `transformers` only when given a Hugging Face model.
"""

from __future__ import annotations

from torch import nn

__all__ = ["SUPPORTED", "attention_modules", "base_model", "hf_layers", "is_hf_model"]

SUPPORTED = ("ViTModel", "ViTForImageClassification", "Dinov2Model", "Dinov2ForImageClassification")


def is_hf_model(model: object) -> bool:
    """Whether `model` is a module from Hugging Face `transformers` (checked without importing it)."""
    if not isinstance(model, nn.Module):
        return False
    root = getattr(type(model), "_fastprompt_root", type(model))  # a class swapped by a method: its original class
    return root.__module__.startswith("transformers.")


def base_model(model: nn.Module) -> nn.Module:
    """The `ViTModel` / `Dinov2Model` inside `model` (the model itself when it is one); a TypeError otherwise."""
    from transformers import Dinov2ForImageClassification, Dinov2Model, ViTForImageClassification, ViTModel

    if isinstance(model, (ViTModel, Dinov2Model)):
        return model
    if isinstance(model, ViTForImageClassification):
        return model.vit
    if isinstance(model, Dinov2ForImageClassification):
        return model.dinov2
    raise TypeError(
        f"fastprompt supports the Hugging Face models {', '.join(SUPPORTED)}, got {type(model).__name__}; load one "
        "with e.g. ViTForImageClassification.from_pretrained(path) or build it from a ViTConfig"
    )


def hf_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a supported Hugging Face model, in order; a TypeError for an older layout."""
    base = base_model(model)
    layers = base.layers if hasattr(base, "layers") else getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None or not all(hasattr(layer.attention, "q_proj") for layer in layers):
        import transformers

        raise TypeError(
            f"{type(base).__name__} from transformers {transformers.__version__} lacks the attention layout fastprompt "
            "patches (attention.q_proj / k_proj / v_proj / o_proj); install transformers>=5.24 (fastprompt[hf])"
        )
    return layers


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Each block's self-attention module by block index: timm's `blocks[i].attn` or Hugging Face's `attention`."""
    if is_hf_model(model):
        return {i: layer.attention for i, layer in enumerate(hf_layers(model))}
    return {i: block.attn for i, block in enumerate(getattr(model, "blocks", ()))}
