"""What a trained model looks at, as PNG figures: its prediction, where the evidence for it lies, and the method's
own internals (EPT's patch-wise scaling map, the tokens FPT keeps) or, for every other method, the attention each
patch receives at the last layer. timm and Hugging Face (ViT, DINOv2) backbones alike.

Prediction: the class with the highest probability (softmax; sigmoid for a multi-label run) and that probability.
Class evidence (`class_evidence`): gradient × input of the predicted class's logit, summed over colour channels
and averaged per patch, positive part — the patches whose pixels raise that class's score (class-discriminative:
another class gives another map). EPT: per prompted layer, `σ(lse − g)` averaged over heads
(`fastprompt.methods.ept.ept_scales`) — the share of each patch's attention output kept after the prompt sink
(1: unchanged, 0: absorbed by the prompts), all layers on one colour scale. FPT / FPT+: per extracted layer, how
many heads select each token as important (0 … heads), recomputed from the frozen backbone with FPT's kernels.
Other methods (LoRA, VPT, Adapter, BitFit, linear, ...): the attention each patch receives in the last block,
`mean_i softmax(q_i kᵀ · scale)_j` over all queries, averaged over heads, from that block's own q and k (adapted
by LoRA where LoRA is) through the same importance kernel FPT ranks tokens with.
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

from fastprompt import kernels
from fastprompt.data.images import load_image
from fastprompt.io import atomic_write_bytes
from fastprompt.methods import hf
from fastprompt.methods.ept import ept_scales, prompted_layers
from fastprompt.methods.fpt import FPT, TimmTap
from fastprompt.predict import backbone_of, class_probabilities

__all__ = ["attention_received", "class_evidence", "explain_images", "explain_maps", "fpt_token_counts"]

EPT_MEANING = (
    "colour: share of each patch's attention output kept after EPT's prompt sink, σ(lse − g), mean over heads "
    "(1 = unchanged, lower = absorbed by the prompts); one scale for every layer"
)
FPT_MEANING = "colour: number of attention heads that keep each token as important (0 … heads)"
ATTENTION_MEANING = (
    "colour: attention each patch receives in the last block (softmax row mean over all queries, mean over heads)"
)
EPT_KIND, FPT_KIND, ATTENTION_KIND = (
    "EPT patch-wise scale",
    "FPT selected tokens (heads keeping each token)",
    "attention received at the last layer",
)
MEANINGS = {EPT_KIND: EPT_MEANING, FPT_KIND: FPT_MEANING, ATTENTION_KIND: ATTENTION_MEANING}


def fpt_token_counts(model: FPT, images: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per extracted layer, `[B, N]`: the number of heads that keep each token (prefix tokens included)."""
    indices = model.extract_features(images, return_indices=True)["indices"]  # [B, L, H, k]
    grid_h, grid_w = model.tap.grid(tuple(images.shape[-2:]))
    batch, tokens = indices.shape[0], model.tap.num_prefix_tokens + int(grid_h) * int(grid_w)
    counts = {}
    for position, layer in enumerate(model.layers):
        flat = indices[:, position].reshape(batch, -1)
        count = torch.zeros(batch, tokens, dtype=torch.float32, device=flat.device)
        counts[layer] = count.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32)).cpu()
    return counts


def _token_grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """The patch grid of `images` in `model`'s backbone: timm, Hugging Face, or an FPT around either."""
    size = tuple(int(s) for s in images.shape[-2:])
    if isinstance(model, FPT):
        return tuple(int(s) for s in model.tap.grid(size))
    if hf.is_hf_model(model):
        patch = hf.patch_size(model)
        return (size[0] // patch[0], size[1] // patch[1])
    return tuple(int(s) for s in backbone_of(model).patch_embed.dynamic_feat_size(size))


def _forward_options(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments a forward at any image size needs: Hugging Face ViT interpolates only when asked."""
    if hf.is_hf_model(model) and type(hf.base_model(model)).__name__ == "ViTModel":
        return {"interpolate_pos_encoding": True}
    return {}


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`model`'s logits on `images` (a Hugging Face output's `.logits`)."""
    out = model(images, **_forward_options(model))
    return out if isinstance(out, torch.Tensor) else out.logits


def attention_received(model: nn.Module, images: torch.Tensor) -> dict[int, torch.Tensor]:
    """`{last block: [B, N]}`: the attention each token receives there, mean over queries and heads.

    Works for any method on a timm or Hugging Face ViT: the last block's input is captured during one forward
    (eval mode, no gradients) and its q and k are recomputed by the block's own projections (LoRA included), then
    scored by `fastprompt.kernels.attention_importance` ('global': softmax row mean; no N×N tensor). Tokens a
    method inserts (VPT's prompts) are included in N.
    """
    if hf.is_hf_model(model):
        tap = hf.HFTap(model)
        block = tap.blocks[-1]
        qkv, scale = tap.qkv, tap.scale(block)
    else:
        blocks = getattr(backbone_of(model), "blocks", None)
        if not blocks:
            raise TypeError(f"{type(model).__name__} has no transformer blocks to explain; pass a timm or HF ViT")
        block = blocks[-1]
        qkv, scale = TimmTap.qkv, block.attn.scale
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(images, **_forward_options(model))
            _, q, k, _ = qkv(block, captured[0])
            scores = kernels.attention_importance(q, k, mode="global", scale=scale)
    finally:
        handle.remove()
        model.train(was_training)
    index = len(hf.hf_layers(model)) - 1 if hf.is_hf_model(model) else len(backbone_of(model).blocks) - 1
    return {index: scores.mean(dim=1).cpu()}


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
        logits = _logits(model, inputs)
        if target is None:
            target, _ = predictions(logits.detach(), multilabel=multilabel)
        chosen = logits.gather(1, target.to(logits.device).view(-1, 1)).sum()
        (gradient,) = torch.autograd.grad(chosen, inputs)
    attribution = (gradient * inputs.detach()).sum(dim=1, keepdim=True).float()  # [B, 1, H, W]
    pooled = torch.nn.functional.adaptive_avg_pool2d(attribution, grid)[:, 0]
    return logits.detach(), pooled.clamp_min(0).cpu()


def explain_maps(model: nn.Module, images: torch.Tensor) -> tuple[str, dict[int, torch.Tensor], float | None]:
    """(kind, {layer: [B, grid_h, grid_w] map}, fixed maximum or None) for any fastprompt model.

    EPT: its patch-wise scale per prompted layer; FPT / FPT+: the heads keeping each token per extracted layer;
    every other method: the attention each patch receives at the last layer (`attention_received`).
    """
    vmax: float | None = None
    if isinstance(model, FPT):
        kind, maps, vmax = FPT_KIND, fpt_token_counts(model, images), float(model.tap.num_heads)
    elif prompted_layers(model):
        kind, maps = EPT_KIND, ept_scales(model, images, **_forward_options(model))
    else:
        kind, maps = ATTENTION_KIND, attention_received(model, images)
    grid = _token_grid(model, images)
    patches = grid[0] * grid[1]  # the patch tokens are the last ones (after CLS, registers or VPT prompts)
    return kind, {layer: m[:, -patches:].reshape(m.shape[0], *grid).float() for layer, m in maps.items()}, vmax


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
    meaning = MEANINGS[kind]
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
