"""What a trained model looks at, as PNG figures: its prediction, where the evidence for it lies, and the method's
own internals (EPT's patch-wise scaling map, the tokens FPT keeps).

Prediction: the class with the highest probability (softmax; sigmoid for a multi-label run) and that probability.
Class evidence (`class_evidence`): gradient × input of the predicted class's logit, summed over colour channels
and averaged per patch, positive part — the patches whose pixels raise that class's score (class-discriminative:
another class gives another map). EPT: per prompted layer, `σ(lse − g)` averaged over heads
(`fastprompt.methods.ept.ept_scales`) — the share of each patch's attention output kept after the prompt sink
(1: unchanged, 0: absorbed by the prompts), all layers on one colour scale. FPT / FPT+: per extracted layer, how
many heads select each token as important (0 … heads), recomputed from the frozen backbone with FPT's kernels.
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
from fastprompt.predict import backbone_of, class_probabilities

__all__ = ["class_evidence", "explain_images", "explain_maps", "fpt_token_counts"]

EPT_MEANING = (
    "colour: share of each patch's attention output kept after EPT's prompt sink, σ(lse − g), mean over heads "
    "(1 = unchanged, lower = absorbed by the prompts); one scale for every layer"
)
FPT_MEANING = "colour: number of attention heads that keep each token as important (0 … heads)"


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


def _token_grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    patch_embed = backbone_of(model).patch_embed
    return tuple(int(s) for s in patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))


def class_evidence(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`[B, grid_h, grid_w]`: gradient × input of logit `target[b]` per patch (channel sum, patch mean, ≥ 0).

    The positive part is the evidence *for* the class: pixels whose value raises its logit. It needs only the
    gradient of the model's output with respect to its input, so it works for every method (FPT: through its side
    network; the frozen branch runs without gradients).
    """
    return _logits_and_evidence(model, images, target)[1]


def _logits_and_evidence(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor | None = None, *, multilabel: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, `class_evidence`) from one forward pass; `target` None: each image's predicted class."""
    grid = _token_grid(model, images)
    inputs = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs)
        if target is None:
            target, _ = predictions(logits.detach(), multilabel=multilabel)
        chosen = logits.gather(1, target.to(logits.device).view(-1, 1)).sum()
        (gradient,) = torch.autograd.grad(chosen, inputs)
    attribution = (gradient * inputs.detach()).sum(dim=1, keepdim=True).float()  # [B, 1, H, W]
    pooled = torch.nn.functional.adaptive_avg_pool2d(attribution, grid)[:, 0]
    return logits.detach(), pooled.clamp_min(0).cpu()


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


def _figure(
    picture: np.ndarray,
    kind: str,
    maps: dict[int, np.ndarray],
    vmax: float | None,
    title: str,
    prediction: str,
    evidence: np.ndarray,
) -> bytes:
    """A PNG: the image with the prediction, the class evidence, then the method's per-layer maps on one scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(maps) + 2
    cols = min(4, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.5 * rows + 0.6), squeeze=False, layout="constrained")
    height, width = picture.shape[:2]
    extent = (0, width, height, 0)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(picture)
    axes.flat[0].set_title(f"predicted: {prediction}", fontsize=9, fontweight="bold")
    axes.flat[1].imshow(picture)
    top = float(evidence.max()) or 1.0
    shown = axes.flat[1].imshow(evidence, cmap="viridis", alpha=0.6, extent=extent, vmin=0.0, vmax=top)
    axes.flat[1].set_title(f"evidence for {prediction.split(' (')[0]}\n(gradient × input per patch)", fontsize=9)
    fig.colorbar(shown, ax=axes.flat[1], fraction=0.046, pad=0.02)
    values = np.concatenate([grid.ravel() for grid in maps.values()]) if maps else np.zeros(1)
    low, high = (0.0, vmax) if vmax is not None else (float(values.min()), float(values.max()))
    if high <= low:
        high = low + 1e-6
    for ax, (layer, grid) in zip(axes.flat[2:], maps.items()):
        ax.imshow(picture)
        shown = ax.imshow(grid, cmap="inferno", alpha=0.6, extent=extent, vmin=low, vmax=high)
        ax.set_title(f"layer {layer}", fontsize=9)
    if maps:
        layer_axes = list(axes.flat[2 : 2 + len(maps)])
        fig.colorbar(shown, ax=layer_axes, fraction=0.03, pad=0.02, label=f"{low:.3g} … {high:.3g}")
    meaning = FPT_MEANING if kind.startswith("FPT") else EPT_MEANING
    fig.suptitle(f"{title}: {kind}\n{meaning}", fontsize=9)
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


def predictions(logits: torch.Tensor, *, multilabel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class `[B]`, its probability `[B]`): softmax over classes, or per-class sigmoid (multi-label)."""
    top, index = class_probabilities(logits, multilabel=multilabel).max(dim=1)
    return index, top


def explain_images(
    model: nn.Module,
    paths: Sequence[Path],
    output_dir: Path,
    transform: Any,
    *,
    batch_size: int = 4,
    classes: Sequence[str] | None = None,
    multilabel: bool = False,
) -> list[Path]:
    """Write one PNG per image into `output_dir` (atomically) and return their paths.

    Each figure shows the predicted class (named from `classes`) and its probability, the class evidence map and
    the method's per-layer maps.
    """
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
        logits, evidence = _logits_and_evidence(model, images, multilabel=multilabel)  # the evidence of the prediction
        predicted, probability = predictions(logits, multilabel=multilabel)
        for row, path in enumerate(chunk):
            per_layer = {layer: grid[row].numpy() for layer, grid in maps.items()}
            index = int(predicted[row])
            name = classes[index] if classes is not None else str(index)
            prediction = f"{name} (p = {float(probability[row]):.2f})"
            picture = _display(images[row], transform)
            png = _figure(picture, kind, per_layer, vmax, Path(path).name, prediction, evidence[row].numpy())
            target = output_dir / names[start + row]
            atomic_write_bytes(target, png)
            written.append(target)
    return written
