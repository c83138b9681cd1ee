"""What a trained model looks at, as PNG overlays: EPT's patch-wise scaling map and the tokens FPT keeps.

EPT: per prompted layer, `σ(lse − g)` averaged over heads (`fastprompt.methods.ept.ept_scales`) — how much of each
patch's attention output survives the prompt sink. FPT / FPT+: per extracted layer, how many heads select each
token as important (0 … heads), recomputed from the frozen backbone with the same kernels FPT uses.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fastprompt.data.images import load_image
from fastprompt.io import atomic_write_bytes
from fastprompt.methods.ept import ept_scales, prompted_layers
from fastprompt.methods.fpt import FPT

__all__ = ["explain_images", "explain_maps", "fpt_token_counts"]


def fpt_token_counts(model: FPT, images: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per extracted layer, `[B, N]`: the number of heads that keep each token (prefix tokens included)."""
    indices = model.extract_features(images, return_indices=True)["indices"]  # [B, L, H, k]
    grid_h, grid_w = model.backbone.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
    batch, tokens = indices.shape[0], model.backbone.num_prefix_tokens + int(grid_h) * int(grid_w)
    counts = {}
    for position, layer in enumerate(model.layers):
        flat = indices[:, position].reshape(batch, -1)
        count = torch.zeros(batch, tokens, dtype=torch.float32, device=flat.device)
        counts[layer] = count.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32)).cpu()
    return counts


def explain_maps(model: nn.Module, images: torch.Tensor) -> tuple[str, dict[int, torch.Tensor], float | None]:
    """(kind, {layer: [B, grid_h, grid_w] map}, fixed maximum or None) for an EPT or FPT model."""
    if isinstance(model, FPT):
        backbone, kind = model.backbone, "FPT selected tokens (heads keeping each token)"
        maps = fpt_token_counts(model, images)
        vmax: float | None = float(backbone.blocks[model.layers[0]].attn.num_heads)
    elif prompted_layers(model):
        backbone, kind, vmax = model, "EPT patch-wise scale", None
        maps = ept_scales(model, images)
    else:
        method = getattr(model, "fastprompt_method", type(model).__name__)
        raise ValueError(
            f"method {method!r} has nothing to explain: `fastprompt explain` draws EPT's patch-wise scaling maps and "
            "the tokens FPT/FPT+ select; train with --method ept, fpt+ or fpt"
        )
    grid = tuple(int(s) for s in backbone.patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
    prefix = backbone.num_prefix_tokens
    return kind, {layer: m[:, prefix:].reshape(m.shape[0], *grid).float() for layer, m in maps.items()}, vmax


def _display(image: torch.Tensor, transform: Any) -> np.ndarray:
    """The transformed image `[3, H, W]` mapped back to [0, 1] RGB `[H, W, 3]` for drawing."""
    mean, std = torch.zeros(3), torch.ones(3)
    for step in getattr(transform, "transforms", ()):
        if hasattr(step, "mean") and hasattr(step, "std"):
            mean, std = torch.tensor(step.mean), torch.tensor(step.std)
    pixels = image.float() * std[:, None, None] + mean[:, None, None]
    return pixels.clamp(0, 1).permute(1, 2, 0).numpy()


def _figure(picture: np.ndarray, kind: str, maps: dict[int, np.ndarray], vmax: float | None, title: str) -> bytes:
    """A PNG: the image, then one overlay panel per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(maps) + 1
    cols = min(4, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    height, width = picture.shape[:2]
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(picture)
    axes.flat[0].set_title("input", fontsize=9)
    for ax, (layer, grid) in zip(axes.flat[1:], maps.items()):
        low, high = (0.0, vmax) if vmax is not None else (float(grid.min()), float(grid.max()))
        ax.imshow(picture)
        shown = ax.imshow(grid, cmap="inferno", alpha=0.6, extent=(0, width, height, 0), vmin=low, vmax=high)
        ax.set_title(f"layer {layer}  ({low:.3g}–{high:.3g})", fontsize=9)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"{title}: {kind}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _output_names(paths: Sequence[Path]) -> list[str]:
    """`<stem>_explain.png` per image, numbered where stems repeat."""
    stems = [path.stem for path in paths]
    names = []
    for index, stem in enumerate(stems):
        names.append(f"{stem}_explain.png" if stems.count(stem) == 1 else f"{stem}_{index}_explain.png")
    return names


def explain_images(
    model: nn.Module, paths: Sequence[Path], output_dir: Path, transform: Any, *, batch_size: int = 4
) -> list[Path]:
    """Write one PNG per image into `output_dir` (atomically) and return their paths."""
    missing = [str(path) for path in paths if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing[:5])}; pass existing image files")
    model.eval()
    names = _output_names(paths)
    written: list[Path] = []
    for start in tqdm(range(0, len(paths), batch_size), desc="explain", unit="batch", disable=len(paths) <= batch_size):
        chunk = paths[start : start + batch_size]
        images = torch.stack([transform(load_image(path)) for path in chunk])
        kind, maps, vmax = explain_maps(model, images)
        for row, path in enumerate(chunk):
            per_layer = {layer: grid[row].numpy() for layer, grid in maps.items()}
            png = _figure(_display(images[row], transform), kind, per_layer, vmax, Path(path).name)
            target = output_dir / names[start + row]
            atomic_write_bytes(target, png)
            written.append(target)
    return written
