"""Named training-augmentation presets, resolved without importing torch (the command line checks them at once).

``fastprompt.data.build_transforms`` turns a resolved preset into torchvision ``v2`` transforms. The default,
``standard``, is meant for grayscale / medical images: no flips (a horizontal flip changes laterality in a chest
X-ray: heart side, situs), crops that keep 70-100 % of the image, rotations of at most 10 degrees and
brightness/contrast jitter of 0.2. ``ept`` and ``fpt`` are the published recipes (both flip).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

__all__ = ["AUGMENTATIONS", "DEFAULT_AUGMENT", "resolve_augmentation"]

# scale: RandomResizedCrop area range (None: no crop, resize the whole image); ratio: its aspect-ratio range;
# hflip: flip probability; rotation: maximum degrees either way; color_jitter: brightness and contrast strength.
AUGMENTATIONS: dict[str, dict[str, Any]] = {
    "none": {"scale": None, "ratio": (3 / 4, 4 / 3), "hflip": 0.0, "rotation": 0.0, "color_jitter": 0.0},
    "light": {"scale": (0.85, 1.0), "ratio": (0.9, 1.1), "hflip": 0.0, "rotation": 0.0, "color_jitter": 0.1},
    "standard": {"scale": (0.7, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.0, "rotation": 10.0, "color_jitter": 0.2},
    # EPT (Zu et al.): RandomResizedCrop(scale 0.08-1, bicubic) + horizontal flip 0.5
    "ept": {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "rotation": 0.0, "color_jitter": 0.0},
    # FPT/FPT+ side branch (Huang et al.): RandomResizedCrop(scale 0.8-1, ratio 0.7-1.3), flip, brightness/contrast 0.2
    "fpt": {"scale": (0.8, 1.0), "ratio": (0.7, 1.3), "hflip": 0.5, "rotation": 0.0, "color_jitter": 0.2},
}
DEFAULT_AUGMENT = "standard"


def check_preset(name: str) -> str:
    """The preset name, or a ValueError naming the presets (and the closest one)."""
    if name not in AUGMENTATIONS:
        close = difflib.get_close_matches(str(name), AUGMENTATIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown augmentation preset {name!r}{hint}; choose one of {', '.join(AUGMENTATIONS)}")
    return name


def check_scale(scale: Sequence[float]) -> tuple[float, float]:
    """A crop scale range (min, max) with 0 < min <= max <= 1, or a ValueError saying what is allowed."""
    try:
        low, high = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ValueError(f"crop scale must be two numbers MIN,MAX (e.g. 0.7,1.0), got {scale!r}") from None
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"crop scale must satisfy 0 < MIN <= MAX <= 1 (share of the image kept), got {low},{high}")
    return low, high


def resolve_augmentation(
    preset: str = DEFAULT_AUGMENT, *, hflip: bool | None = None, scale: Sequence[float] | None = None
) -> dict[str, Any]:
    """The preset's options with the overrides applied: ``hflip`` True/False (flip with p=0.5 / never) and
    ``scale`` (crop area range; it also turns on cropping for ``none``). Returns ``{"augment": preset, ...}``."""
    options = dict(AUGMENTATIONS[check_preset(preset)])
    if hflip is not None:
        options["hflip"] = 0.5 if hflip else 0.0
    if scale is not None:
        options["scale"] = check_scale(scale)
    return {"augment": preset, **options}
