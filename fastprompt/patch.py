"""`fastprompt.apply`: turn a timm VisionTransformer into a parameter-efficient model in place."""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fastprompt.methods import hf, registry
from fastprompt.methods.classes import set_input_requires_grad, swap_class
from fastprompt.methods.registry import available_methods, check_int

__all__ = ["apply", "available_methods", "count_parameters", "merge"]

METHOD_ATTR = "fastprompt_method"
CLASS_METHODS = ("ept", "vpt", "adapter")  # timm methods installed as classes (not TorchScript-able)
CONFIG_ATTR = "fastprompt_config"  # {"method", "num_classes", "options"} as given to apply: what rebuilds it


def check_vit(model: object) -> VisionTransformer:
    """Raise a TypeError unless `model` is a timm VisionTransformer."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"fastprompt methods patch timm VisionTransformer models and the Hugging Face models "
            f"{', '.join(hf.SUPPORTED)}, got {type(model).__name__}; "
            "create one with timm.create_model('vit_base_patch16_224', ...)"
        )
    return model


def timm_reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether a timm model recomputes its blocks with reentrant checkpointing (timm's global switch)."""
    from timm.layers import use_reentrant_ckpt

    return bool(getattr(model, "grad_checkpointing", False)) and use_reentrant_ckpt()


def apply(model: nn.Module, method: str, *, num_classes: int | None = None, **options: Any) -> nn.Module:
    """Apply a parameter-efficient `method` to a timm ViT or a Hugging Face ViT / DINOv2 and return the model.

    Patch methods (linear, partial, full, bitfit, lora, adapter, vpt, ept) change `model` in place
    and return the same object; wrapper methods (fpt, fpt+) return a new module around it.
    Everything the method does not train is frozen. When `num_classes` is given the classifier is
    reset to that many outputs (and trained).
    """
    spec = registry.get_method(method)
    if hf.is_hf_model(model):
        hf.hf_layers(model)  # a TypeError for an unsupported Hugging Face model or transformers release
        method_fn, reset_classifier = hf.method_fn(spec), hf.reset_classifier
    else:
        check_vit(model)
        method_fn, reset_classifier = spec.fn, type(model).reset_classifier
    if getattr(model, METHOD_ATTR, None) is not None:
        raise ValueError(
            f"model already has method {getattr(model, METHOD_ATTR)!r} applied; apply methods to a fresh model"
        )
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(("num_classes",) + spec.options)
        raise ValueError(f"unknown option(s) {unknown} for method {spec.name!r}; valid options: {valid}")
    if num_classes is not None:
        check_int("num_classes", num_classes, minimum=1)
    model.requires_grad_(False)
    if spec.wrapper:
        if num_classes is None:
            raise ValueError(f"method {spec.name!r} builds a new classifier: pass num_classes=<number of classes>")
        result = method_fn(model, num_classes, **options)
    else:
        if num_classes is not None:
            reset_classifier(model, num_classes)
            model.requires_grad_(False)
        result = method_fn(model, **options)
        if hf.is_hf_model(model):
            swap_class(model, hf.HFPatched)  # reentrant checkpointing and save_pretrained know the method
        elif spec.name in CLASS_METHODS:  # a hook would stop TorchScript, which the other methods support
            set_input_requires_grad(model.patch_embed, True, active=timm_reentrant_checkpointing, model=model)
    setattr(result, METHOD_ATTR, spec.name)
    setattr(result, CONFIG_ATTR, {"method": spec.name, "num_classes": num_classes, "options": dict(options)})
    return result


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter counted once."""
    trainable = total = 0
    for param in model.parameters():  # nn.Module.parameters() already de-duplicates shared tensors
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def merge(model: nn.Module) -> nn.Module:
    """Fold mergeable method weights (LoRA) into the frozen weights, in place, for inference."""
    from fastprompt.methods.lora import merge_lora

    return merge_lora(model)
