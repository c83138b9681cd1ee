"""The built-in demo task: synthetic grayscale 'scans' of three tissue patterns, written as PNG files.

Classes (each image has random geometry, contrast and noise, so the task is not memorisable by intensity alone):
``nodules`` (a few bright round blobs), ``striated`` (an oriented fibre texture) and ``diffuse`` (smooth low-frequency
mottling). `fastprompt demo` writes them into ``<output>/data/<class>/*.png`` and runs the ordinary `train` path on
that folder with a small randomly initialised ViT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fastprompt.io import atomic_open

CLASSES = ("diffuse", "nodules", "striated")
DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_MODEL_KWARGS = ("patch_size=32", "embed_dim=96", "depth=4", "num_heads=3", "global_pool=avg")


def _background(rng: np.random.Generator, size: int, low: float, high: float) -> np.ndarray:
    """A smooth vignette-like background of a random level in [low, high], with film noise."""
    axis = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    level = rng.uniform(low, high)
    return level - 0.15 * (xx**2 + yy**2) + rng.normal(0.0, 0.02, (size, size))


def _nodules(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = np.zeros((size, size))
    for _ in range(rng.integers(6, 14)):
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        radius = rng.uniform(0.03, 0.07) * size
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image[inside] = rng.uniform(0.35, 0.6)
    return image


def _striated(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    angle = rng.uniform(0.0, np.pi)
    cycles = rng.uniform(6.0, 14.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    wave = np.sin(2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    return rng.uniform(0.12, 0.25) * wave


def _diffuse(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.normal(0.0, 1.0, (6, 6)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    return rng.uniform(0.08, 0.15) * field


PATTERNS = {"diffuse": _diffuse, "nodules": _nodules, "striated": _striated}
LEVELS = {"diffuse": (0.4, 0.6), "nodules": (0.15, 0.35), "striated": (0.25, 0.45)}  # overlapping tissue densities


def synthetic_image(label: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One `size`×`size` uint8 grayscale image of class `label`."""
    if label not in PATTERNS:
        raise ValueError(f"unknown demo class {label!r}; the demo classes are {list(PATTERNS)}")
    image = _background(rng, size, *LEVELS[label]) + PATTERNS[label](rng, size)
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def write_synthetic_dataset(
    root: str | Path, *, images_per_class: int = 30, size: int = 256, seed: int = 0, progress: bool = True
) -> Path:
    """Write `root/<class>/<index>.png` for the three demo classes (deterministic per seed); returns `root`."""
    if images_per_class < 5:
        raise ValueError(
            f"images_per_class must be >= 5 (training and validation both need each class), got {images_per_class}"
        )
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    jobs = [(label, index) for label in CLASSES for index in range(images_per_class)]
    for label, index in tqdm(jobs, desc="writing demo images", unit="img", leave=False, disable=not progress):
        path = root / label / f"{label}_{index:04d}.png"
        with atomic_open(path, "wb") as handle:
            Image.fromarray(synthetic_image(label, rng, size)).save(handle, format="PNG")
    return root


def demo_train_args(data: Path, output: Path, *, method: str, epochs: int, img_size: int, seed: int) -> list[str]:
    """The `fastprompt train` arguments the demo runs."""
    return [
        "train",
        f"--data={data}",
        f"--model={DEMO_MODEL}",
        "--model-kwargs",
        *DEMO_MODEL_KWARGS,
        f"--img-size={img_size}",
        f"--method={method}",
        f"--epochs={epochs}",
        "--batch-size=16",
        "--lr=1e-2",
        "--workers=0",
        "--backend=torch",
        f"--seed={seed}",
        f"--output-dir={output}",
    ]
