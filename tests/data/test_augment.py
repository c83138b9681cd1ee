"""Training augmentation presets: the default never flips and keeps most of the image; flags override presets."""

from __future__ import annotations

import pytest
import torch

from fastprompt.augmentations import AUGMENTATIONS, DEFAULT_AUGMENT, resolve_augmentation
from fastprompt.data.transforms import build_transforms, describe_transforms


def ramp(size: int = 64) -> torch.Tensor:
    """A left-to-right brightness ramp: any horizontal flip makes the left side the brighter one."""
    row = torch.linspace(0.05, 0.95, size)
    return row.expand(3, size, size).clone()


def count_flips(transform, draws: int = 200) -> int:
    """How many of `draws` seeded runs of `transform` leave the ramp brighter on the left than on the right."""
    image, flips = ramp(), 0
    for seed in range(draws):
        torch.manual_seed(seed)
        out = transform(image)
        flips += bool(out[:, :, :8].mean() > out[:, :, -8:].mean())
    return flips


def flipped_draws(preset: str, draws: int = 200, **overrides) -> int:
    """`count_flips` of the training transform of `preset` with `overrides`."""
    options = resolve_augmentation(preset, **overrides)
    options.pop("augment")
    return count_flips(build_transforms(32, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, **options), draws)


def test_default_preset_never_flips_an_asymmetric_image():
    assert DEFAULT_AUGMENT == "standard"
    assert flipped_draws(DEFAULT_AUGMENT) == 0  # 200 seeds: crops, rotations and jitter, never a mirror image


def test_the_library_default_for_a_model_never_flips_either():
    """transforms_for_model (the README's Engine recipe) takes the same default preset as the CLI."""
    import timm

    from fastprompt.data.transforms import transforms_for_model

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    assert count_flips(transforms_for_model(vit, 32, train=True)) == 0
    assert 60 < count_flips(transforms_for_model(vit, 32, train=True, augment="ept")) < 140  # it can see flips


def test_the_flip_check_sees_flips_when_they_are_on():  # the check above can fail
    assert 60 < flipped_draws(DEFAULT_AUGMENT, hflip=True) < 140  # p = 0.5 over 200 draws
    assert 60 < flipped_draws("ept") < 140


def test_presets_without_flips_keep_most_of_the_image():
    for name, options in AUGMENTATIONS.items():
        if name in ("ept", "fpt"):
            continue  # the published recipes, kept as the papers ran them
        assert options["hflip"] == 0.0, name
        assert options["scale"] is None or options["scale"][0] >= 0.7, name


def test_flags_override_the_preset_and_bad_values_say_what_is_allowed():
    assert resolve_augmentation("standard", scale=(0.9, 1.0))["scale"] == (0.9, 1.0)
    assert resolve_augmentation("ept", hflip=False)["hflip"] == 0.0
    assert resolve_augmentation("none", scale=(0.5, 1.0))["scale"] == (0.5, 1.0)
    with pytest.raises(ValueError, match=r"unknown augmentation preset 'standart' \(did you mean 'standard'\?\)"):
        resolve_augmentation("standart")
    with pytest.raises(ValueError, match="0 < MIN <= MAX <= 1"):
        resolve_augmentation("light", scale=(0.9, 0.5))


def test_none_resizes_the_whole_image_and_the_pipeline_is_described():
    options = resolve_augmentation("none")
    options.pop("augment")
    transform = build_transforms(16, train=True, mean=(0.0,) * 3, std=(1.0,) * 3, **options)
    image = ramp(64)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    assert torch.equal(first, transform(image))  # nothing random
    steps = describe_transforms(transform)
    assert steps[1].startswith("Resize(size=[16, 16]") and not any("Random" in step for step in steps)
