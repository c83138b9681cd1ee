"""High-resolution train/eval transforms on torchvision.transforms.v2, normalised like the backbone's pretraining.

Inputs are what :func:`fastprompt.data.load_image` returns (PIL RGB or a float ``[3, H, W]`` tensor in [0, 1]);
outputs are float32 ``[3, H, W]`` tensors. ``AUGMENTATIONS`` (from :mod:`fastprompt.augmentations`) holds the named
training presets: ``none``, ``light``, ``standard`` (no flips; the command line's default) and the published ``ept`` and
``fpt`` recipes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.transforms import v2

from fastprompt.augmentations import AUGMENTATIONS, DEFAULT_AUGMENT

__all__ = ["AUGMENTATIONS", "build_transforms", "describe_transforms", "transforms_for_model"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


def _size(img_size: int | Sequence[int]) -> tuple[int, int]:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"img_size must be a positive int or (height, width), got {img_size!r}")
    return size


def _check_range(name: str, value: Sequence[float], low: float) -> tuple[float, float]:
    if len(value) != 2 or not low < value[0] <= value[1]:
        raise ValueError(f"{name} must be (min, max) with {low} < min <= max, got {value!r}")
    return float(value[0]), float(value[1])


def _check_probability(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def build_transforms(
    img_size: int | Sequence[int],
    *,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: Sequence[float] | None = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    vflip: float = 0.0,
    color_jitter: float = 0.0,
    rotation: float = 0.0,
    interpolation: str = "bicubic",
    crop_pct: float | None = None,
) -> v2.Compose:
    """Train: RandomResizedCrop (or a plain resize when ``scale`` is None) + rotation (up to ``rotation`` degrees)
    + flips + brightness/contrast jitter; eval: resize (+ center crop) — then normalise.

    ``crop_pct`` (eval only) resizes to ``size / crop_pct`` and center-crops ``size``; ``None`` resizes straight
    to ``img_size`` (whole image, as medical evaluation usually wants).
    """
    size = _size(img_size)
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}")
    mode = _INTERPOLATIONS[interpolation]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values (RGB) with std > 0, got mean={mean!r}, std={std!r}")
    steps: list[nn.Module] = [v2.ToImage()]
    if train:
        if scale is None:
            steps.append(v2.Resize(size, interpolation=mode, antialias=True))
        else:
            steps.append(
                v2.RandomResizedCrop(
                    size,
                    scale=_check_range("scale", scale, 0.0),
                    ratio=_check_range("ratio", ratio, 0.0),
                    interpolation=mode,
                    antialias=True,
                )
            )
        if not 0.0 <= rotation <= 180.0:
            raise ValueError(f"rotation must be a number of degrees in [0, 180], got {rotation!r}")
        if rotation:
            steps.append(v2.RandomRotation(rotation, interpolation=v2.InterpolationMode.BILINEAR))
        if _check_probability("hflip", hflip) > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if _check_probability("vflip", vflip) > 0:
            steps.append(v2.RandomVerticalFlip(vflip))
    elif crop_pct is None:
        steps.append(v2.Resize(size, interpolation=mode, antialias=True))
    else:
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        steps.append(v2.Resize(tuple(int(s / crop_pct) for s in size), interpolation=mode, antialias=True))
        steps.append(v2.CenterCrop(size))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train and color_jitter:
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter!r}")
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter))
    steps += [v2.Normalize(mean=list(mean), std=list(std)), v2.ToPureTensor()]
    return v2.Compose(steps)


def describe_transforms(transform: v2.Compose) -> list[str]:
    """The pipeline as one line per step (torchvision's own repr), for run configs and logs."""
    return [" ".join(repr(step).split()) for step in transform.transforms]


def transforms_for_model(
    model: nn.Module, img_size: int | Sequence[int], *, train: bool, augment: str = DEFAULT_AUGMENT, **overrides
) -> v2.Compose:
    """:func:`build_transforms` with mean/std/interpolation from the backbone's pretraining configuration.

    A timm model: its ``pretrained_cfg``. A Hugging Face ViT / DINOv2: its image processor, read from the
    ``preprocessor_config.json`` saved with the model (``config.name_or_path``, offline), else the processor
    defaults of its model type. ``model`` may wrap the backbone (e.g. an FPT model): the first sub-module with a
    configuration is used.

    ``augment`` picks a recipe from ``AUGMENTATIONS`` for training (default ``"standard"``: no flips, crops keeping
    70-100 % of the image; ``"ept"``/``"fpt"`` are the papers' recipes, with flips); ``overrides`` replace any
    argument.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {sorted(AUGMENTATIONS)}, got {augment!r}")
    hf_model = next((m for m in model.modules() if type(m).__module__.startswith("transformers.")), None)
    owner = next((m for m in model.modules() if getattr(m, "pretrained_cfg", None)), None)
    if hf_model is not None:  # first: an FPT around a Hugging Face backbone also holds a (timm) side ViT
        mean, std, interpolation = hf_normalisation(hf_model)
    elif owner is not None:
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=owner)
        mean, std, interpolation = config["mean"], config["std"], config.get("interpolation", "bicubic")
    else:
        raise ValueError(
            f"{type(model).__name__} carries no timm pretrained_cfg or Hugging Face config (nor does any sub-module); "
            "pass the backbone, or call build_transforms with the mean/std the backbone was pretrained with"
        )
    options = {
        "mean": tuple(mean),
        "std": tuple(std),
        "interpolation": interpolation if interpolation in _INTERPOLATIONS else "bicubic",
    }
    if train:
        options.update(AUGMENTATIONS[augment])
    options.update(overrides)
    return build_transforms(img_size, train=train, **options)


# Image processor settings of the published checkpoints, for Hugging Face models saved without a processor file
# (google/vit-*: ViTImageProcessor; facebook/dinov2-*: BitImageProcessor with ImageNet statistics).
HF_NORMALISATION = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
}
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values


def hf_normalisation(model: nn.Module) -> tuple[Sequence[float], Sequence[float], str]:
    """(mean, std, interpolation) of a Hugging Face vision model: its saved image processor, else its type's."""
    config = model.config
    source = getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")
    if source:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError):
            processor = None  # saved without preprocessor_config.json, or not on this machine
        if processor is not None and getattr(processor, "image_mean", None) is not None:
            resample = getattr(processor, "resample", None)
            interpolation = _PIL_RESAMPLE.get(int(resample), "bicubic") if resample is not None else "bicubic"
            return processor.image_mean, processor.image_std, interpolation
    model_type = getattr(config, "model_type", None)
    if model_type not in HF_NORMALISATION:
        raise ValueError(
            f"no image processor found for the Hugging Face model {type(model).__name__} (model_type "
            f"{model_type!r}); save its preprocessor_config.json next to config.json, or call build_transforms with "
            "the mean/std it was pretrained with"
        )
    return HF_NORMALISATION[model_type]
