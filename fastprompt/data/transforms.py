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

from fastprompt.augmentations import AUGMENTATIONS

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
    model: nn.Module, img_size: int | Sequence[int], *, train: bool, augment: str = "ept", **overrides
) -> v2.Compose:
    """:func:`build_transforms` with mean/std/interpolation from the timm model's pretrained config.

    ``model`` may wrap the timm backbone (e.g. an FPT model): the first sub-module with a config is used.

    ``augment`` picks a recipe from ``AUGMENTATIONS`` for training; ``overrides`` replace any argument.
    """
    from timm.data import resolve_data_config

    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {sorted(AUGMENTATIONS)}, got {augment!r}")
    owner = next((m for m in model.modules() if getattr(m, "pretrained_cfg", None)), None)
    if owner is None:
        raise ValueError(
            f"{type(model).__name__} carries no timm pretrained_cfg (nor does any sub-module); pass the timm "
            "backbone, or call build_transforms with the mean/std the backbone was pretrained with"
        )
    config = resolve_data_config({}, model=owner)
    interpolation = config.get("interpolation", "bicubic")
    options = {
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "interpolation": interpolation if interpolation in _INTERPOLATIONS else "bicubic",
    }
    if train:
        options.update(AUGMENTATIONS[augment])
    options.update(overrides)
    return build_transforms(img_size, train=train, **options)
