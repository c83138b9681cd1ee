"""What the model-level suites measure: method variants from the registry, model building, one training step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fastprompt
from benchmarks.options import HF_ARCHITECTURES, add_row_arguments  # noqa: F401  (the suites' shared options)
from fastprompt.checkpointing import checkpoint_activations
from fastprompt.methods import registry

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
TABLE_ORDER = (
    "full",
    "partial",
    "linear",
    "bitfit",
    "lora",
    "adapter",
    "vpt",
    "ept",
    "ept-official",
    "fpt",
    "fpt-cached",
    "fpt+",
    "fpt+-cached",
)  # rows in this order; labels not listed follow, as registered


@dataclass(frozen=True)
class Variant:
    """One row label of the tables: a registered method with the options that distinguish it.

    `cached_features`: train an FPT model from its frozen branch's features computed once beforehand (the feature
    cache), so a step runs only the fusion module and the side network.
    """

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    cached_features: bool = False


def registered_variants() -> list[Variant]:
    """Every registered method with its default options, plus EPT official-style and FPT-from-cache variants."""
    methods = fastprompt.available_methods()
    variants = [Variant(name, name) for name in methods]
    if "attention" in methods.get("ept", ()):
        variants.append(Variant("ept-official", "ept", {"attention": "official"}))
    if hasattr(getattr(fastprompt, "FPT", None), "forward_features_cached"):
        variants += [
            Variant(f"{name}-cached", name, cached_features=True) for name in ("fpt", "fpt+") if name in methods
        ]
    rank = {label: i for i, label in enumerate(TABLE_ORDER)}
    return sorted(variants, key=lambda variant: rank.get(variant.label, len(rank)))


def select_variants(labels: list[str] | None) -> list[Variant]:
    """The variants named by `labels` (all registered ones when None); a ValueError names unknown labels."""
    variants = registered_variants()
    if not labels:
        return variants
    by_label = {variant.label: variant for variant in variants}
    unknown = [label for label in labels if label not in by_label]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(by_label)}")
    return [by_label[label] for label in labels]


HF_PREFIX = "hf:"  # a model name with this prefix is a Hugging Face architecture below (random weights)


class HFLogits(nn.Module):
    """A Hugging Face image classifier called like a timm model: images of any size in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, interpolate_pos_encoding=True).logits


def build_hf_model(variant: Variant, name: str, *, num_classes: int, grad_checkpointing: bool) -> nn.Module:
    """A randomly initialised Hugging Face ViT (`HF_ARCHITECTURES[name]`) with `variant` applied, run at any size."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    if name not in HF_ARCHITECTURES:
        raise ValueError(f"unknown Hugging Face architecture {name!r}; available: {', '.join(HF_ARCHITECTURES)}")
    config = ViTConfig(**HF_ARCHITECTURES[name])
    wrapper = registry.get_method(variant.method).wrapper  # FPT builds its own head around the bare ViTModel
    backbone = ViTModel(config, add_pooling_layer=False) if wrapper else ViTForImageClassification(config)
    if grad_checkpointing:
        backbone.activation_checkpointing_enable()
    model = fastprompt.apply(backbone, variant.method, num_classes=num_classes, **variant.options)
    return model if wrapper else HFLogits(model)


def build_model(
    variant: Variant,
    model_name: str,
    resolution: int,
    *,
    num_classes: int,
    grad_checkpointing: bool,
    device: torch.device,
) -> nn.Module:
    """A randomly initialised timm model at `resolution` with `variant` applied, in train mode on `device`
    (a Hugging Face one for a name starting with "hf:", run at `resolution` through `interpolate_pos_encoding`)."""
    import timm  # imported here, after fastprompt's torchvision shim has run

    if model_name.startswith(HF_PREFIX):
        name = model_name[len(HF_PREFIX) :]
        model = build_hf_model(variant, name, num_classes=num_classes, grad_checkpointing=grad_checkpointing)
        return model.to(device).train()
    backbone = timm.create_model(model_name, pretrained=False, img_size=resolution)
    if grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    model = fastprompt.apply(backbone, variant.method, num_classes=num_classes, **variant.options)
    return model.to(device).train()


def model_for(variant: Variant, resolution: int, args: Any, device: torch.device, policy: str = "none") -> nn.Module:
    """`build_model` with a suite's command-line settings (`args.model`, `num_classes`, `grad_checkpointing`), its
    blocks under the activation checkpointing `policy` ("none", "selective" or "full"; see
    `fastprompt.checkpoint_activations`)."""
    model = build_model(
        variant,
        args.model,
        resolution,
        num_classes=args.num_classes,
        grad_checkpointing=args.grad_checkpointing,
        device=device,
    )
    if policy != "none":
        checkpoint_activations(model, policy)
    return model


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for bf16 on `device`; a no-op for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def synthetic_batch(
    batch_size: int, resolution: int, num_classes: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images `[B, 3, R, R]` and labels, reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, resolution, resolution, generator=generator)
    labels = torch.randint(num_classes, (batch_size,), generator=generator)
    return images.to(device), labels.to(device)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a training step updates."""
    return [param for param in model.parameters() if param.requires_grad]


@dataclass
class TrainingStep:
    """One optimizer step (AdamW) of `model` on a fixed batch; `forward_loss` alone is the forward pass.

    With `cached_features` (FPT) the frozen branch runs once here, outside every measurement, and the step trains
    from its features as it would from the feature cache.
    """

    model: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    precision: str
    cached_features: bool = False
    optimizer: torch.optim.Optimizer = field(init=False)
    features: dict[str, torch.Tensor] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        params = trainable_parameters(self.model)
        if not params:
            raise ValueError("the model has no trainable parameters; apply a method before benchmarking it")
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        if self.cached_features:
            with torch.no_grad(), autocast(self.images.device, self.precision):
                self.features = self.model.extract_features(self.images)
            self.images = self.model.resize_for_side(self.images)  # the side branch's input, as the cache stores

    def forward_loss(self) -> torch.Tensor:
        """Forward pass and cross-entropy loss."""
        with autocast(self.images.device, self.precision):
            if self.features is not None:
                logits = self.model.forward_features_cached(self.features, self.images)
            else:
                logits = self.model(self.images)
        return F.cross_entropy(logits.float(), self.labels)

    def __call__(self) -> float:
        """Forward, backward and optimizer step; returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_loss()
        loss.backward()
        self.optimizer.step()
        return loss.item()


def synthetic_step(
    model: nn.Module, batch_size: int, resolution: int, args: Any, device: torch.device, cached_features: bool
) -> TrainingStep:
    """A TrainingStep of `model` on a synthetic batch, from a suite's `args.num_classes`, `seed` and `precision`."""
    images, labels = synthetic_batch(batch_size, resolution, args.num_classes, device, args.seed)
    return TrainingStep(model, images, labels, args.precision, cached_features)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (after at least one step)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def parameter_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the model's parameters (only the trainable ones when asked)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def fresh_cuda_peak(device: torch.device) -> Iterator[Callable[[], int]]:
    """Reset CUDA peak statistics; yields a function returning the peak bytes allocated since."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield lambda: torch.cuda.max_memory_allocated(device)
