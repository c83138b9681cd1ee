"""FPT and FPT+: a frozen high-resolution ViT tap, important-token fusion, and a small trainable side ViT.

Trainable parameters (D = backbone width, S = side width, L = extracted layers = side depth, P = prompts,
C = input channels, p = patch size, T = (side input / p)² + 1 side tokens, K = classes):

    side ViT  = (C·p²·S + S) + S + T·S + L·(12·S² + 13·S) + 2·S + (S·K + K)
    fusion    = L·P·D + 2·D + (D·S + S)              FPT+: prompts, LayerNorm, output Linear
              = L·P·S + (S·D + D) + (D·S + S)        FPT:  prompts, query Linear, output Linear

ViT-B/16 (D = 768, 12 heads), 5 classes, S = 96, P = 16:
FPT+ (L = 6, side 128, T = 65): 751,877 + 149,088 = 900,965;
FPT (L = 12, side 224, T = 197): 1,435,589 + 166,752 = 1,602,341 — both as published.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from fastprompt import kernels
from fastprompt.io import tensor_digest
from fastprompt.methods.fpt_side import FusionModule, build_side_vit, side_forward
from fastprompt.methods.registry import check_choice, check_float, check_int, check_layers, register_method

VARIANTS = ("fpt+", "fpt")
IMPORTANCE_MODES = ("global", "cls")
FEATURE_FORMAT = 1  # bump when the layout of extract_features' output changes
SIDE_INPUT_SIZE = {"fpt+": 128, "fpt": 224}
SIDE_REDUCTION = 8  # side width = backbone width / 8


def _check_backbone(backbone: object) -> VisionTransformer:
    """Raise unless `backbone` is a timm ViT whose blocks FPT can run itself (pre-norm Block + Attention)."""
    if not isinstance(backbone, VisionTransformer):
        raise TypeError(
            "FPT wraps a timm VisionTransformer or a Hugging Face ViTModel / Dinov2Model, got "
            f"{type(backbone).__name__}; "
            "create one with timm.create_model('vit_base_patch16_384', img_size=512)"
        )
    for i, block in enumerate(backbone.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise TypeError(
                f"FPT runs the frozen blocks itself and supports timm's Block with Attention; block {i} is "
                f"{type(block).__name__} with {type(block.attn).__name__}. Use a plain ViT (vit_*_patch16_*)."
            )
    return backbone


def _qkv(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block input's normalised tokens and their q, k, v `[B, H, N, Dh]` exactly as timm's Attention makes them."""
    attn = block.attn
    normed = block.norm1(x)
    batch, tokens, _ = normed.shape
    qkv = attn.qkv(normed).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return normed, attn.q_norm(q), attn.k_norm(k), v


def _finish_block(block: Block, x: torch.Tensor, normed: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of timm's Block after softmax(q kᵀ)·v: output projection, residuals and MLP."""
    attn = block.attn
    out = attended.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    norm, gate = getattr(attn, "norm", None), getattr(attn, "gate", None)  # absent in older timm releases
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate(normed).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    x = x + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class TimmTap:
    """How FPT runs a frozen timm ViT block by block (the Hugging Face counterpart is `methods.hf.HFTap`)."""

    def __init__(self, backbone: VisionTransformer) -> None:
        self.backbone = _check_backbone(backbone)
        self.blocks = list(backbone.blocks)
        self.embed_dim = backbone.embed_dim
        self.num_heads = backbone.blocks[0].attn.num_heads
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.in_chans = backbone.patch_embed.proj.in_channels
        self.num_prefix_tokens = backbone.num_prefix_tokens
        self.image_size = list(backbone.patch_embed.img_size)
        self.name = getattr(backbone, "pretrained_cfg", {}).get("architecture") or type(backbone).__name__
        patch_embed = backbone.patch_embed
        flexible = getattr(patch_embed, "dynamic_img_pad", False) or not getattr(patch_embed, "strict_img_size", True)
        self.fixed_size = None if flexible or getattr(backbone, "dynamic_img_size", False) else tuple(self.image_size)
        self.pads = bool(getattr(patch_embed, "dynamic_img_pad", False))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens entering block 0."""
        backbone = self.backbone
        x = backbone.patch_embed(images.to(next(backbone.parameters()).dtype))
        return backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(x)))

    qkv = staticmethod(_qkv)
    finish = staticmethod(_finish_block)

    @staticmethod
    def scale(block: Block) -> float:
        return block.attn.scale

    def grid(self, image_size: tuple[int, int] | None) -> tuple[int, int]:
        """Patch grid at `image_size` (default: the backbone's)."""
        patch_embed = self.backbone.patch_embed
        return tuple(patch_embed.grid_size if image_size is None else patch_embed.dynamic_feat_size(image_size))


def backbone_tap(backbone: nn.Module) -> Any:
    """The tap FPT runs `backbone` through: timm's ViT or a Hugging Face ViT / DINOv2."""
    from fastprompt.methods.hf import HFTap, is_hf_model

    return HFTap(backbone) if is_hf_model(backbone) else TimmTap(backbone)


class FPT(nn.Module):
    """FPT / FPT+ around a frozen timm ViT: only the fusion module and the side ViT train.

    The backbone sees the full-resolution image without gradients and always stays in eval mode; per extracted
    layer it yields, per head, the keys and values of the `int(N·token_ratio)` most attended tokens. Learnable
    prompts attend to them (fusion) and join the side ViT, which sees the image at `side_input_size`.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        *,
        variant: str = "fpt+",
        layers: list[int] | None = None,
        num_prompts: int = 16,
        token_ratio: float = 0.2,
        token_importance: str = "global",
        side_width: int | None = None,
        side_input_size: int | None = None,
    ) -> None:
        super().__init__()
        tap = backbone_tap(backbone)
        check_int("num_classes", num_classes, minimum=1)
        variant = check_choice("variant", variant.lower() if isinstance(variant, str) else variant, VARIANTS)
        depth = len(tap.blocks)
        if layers is None:
            layers = range(depth // 2, depth) if variant == "fpt+" else range(depth)
        self.layers = check_layers("layers", layers, depth)
        check_int("num_prompts", num_prompts, minimum=1)
        self.token_ratio = check_float("token_ratio", token_ratio, minimum=0.0, maximum=1.0)
        if self.token_ratio == 0.0:
            raise ValueError("option 'token_ratio' must be > 0 (the share of tokens kept per head), got 0")
        self.token_importance = check_choice("token_importance", token_importance, IMPORTANCE_MODES)
        embed_dim, num_heads = tap.embed_dim, tap.num_heads
        if side_width is None:
            side_width = embed_dim // SIDE_REDUCTION
        check_int("side_width", side_width, minimum=1)
        if side_width % num_heads:
            raise ValueError(
                f"option 'side_width' ({side_width}) must be divisible by the backbone's {num_heads} heads "
                "(the side ViT uses as many heads); pass a multiple of it"
            )
        self.side_input_size = check_int(
            "side_input_size", SIDE_INPUT_SIZE[variant] if side_input_size is None else side_input_size, minimum=1
        )
        side_patch = tap.patch_size
        if self.side_input_size % side_patch:
            nearest = max(1, round(self.side_input_size / side_patch)) * side_patch
            raise ValueError(
                f"option 'side_input_size' ({self.side_input_size}) must be a multiple of the side ViT's patch size "
                f"({side_patch}, the backbone's); pass e.g. {nearest}"
            )
        self.variant = variant
        self.num_classes = num_classes

        backbone.requires_grad_(False)
        self.backbone = backbone.eval()
        self.tap = tap  # a plain object (not a submodule) viewing self.backbone
        ref = next(backbone.parameters())
        self.fusion = FusionModule(
            len(self.layers), num_prompts, embed_dim, num_heads, side_width, query_projection=variant == "fpt"
        ).to(device=ref.device, dtype=ref.dtype)
        self.side = build_side_vit(
            img_size=self.side_input_size,
            patch_size=side_patch,
            in_chans=tap.in_chans,
            width=side_width,
            depth=len(self.layers),
            num_heads=num_heads,
            num_classes=num_classes,
        ).to(device=ref.device, dtype=ref.dtype)
        self._weights_digest: tuple[tuple, str] | None = None  # (storage/version fingerprint, digest)
        self._released: dict[str, Any] | None = None  # set by release_backbone

    def train(self, mode: bool = True) -> FPT:
        """Set the trainable parts' mode; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor, *, return_indices: bool = False) -> dict[str, torch.Tensor]:
        """The frozen branch alone: selected `keys` and `values`, each `[B, L, H, int(N·ratio), Dh]`.

        Runs the backbone blocks up to the last extracted layer (no further); what the feature cache stores.
        With `return_indices`, also `indices` `[B, L, H, int(N·ratio)]`: the token index of each selection.
        """
        self.restore_backbone()
        tap = self.tap
        x = tap.embed(images)
        wanted, last = set(self.layers), self.layers[-1]
        keys, values, indices = [], [], []
        for i, block in enumerate(tap.blocks[: last + 1]):
            if i not in wanted:
                x = block(x)
                continue
            normed, q, k, v = tap.qkv(block, x)
            options = dict(mode=self.token_importance, scale=tap.scale(block))
            if i == last:
                scores = kernels.attention_importance(q, k, **options)
            else:
                attended, scores = kernels.attention_with_importance(q, k, v, **options)
                x = tap.finish(block, x, normed, attended)
            k_sel, v_sel, chosen = kernels.select_tokens(k, v, scores, self.token_ratio, return_indices=True)
            keys.append(k_sel)
            values.append(v_sel)
            indices.append(chosen)
        features = {"keys": torch.stack(keys, dim=1), "values": torch.stack(values, dim=1)}
        if return_indices:
            features["indices"] = torch.stack(indices, dim=1)
        return features

    def resize_for_side(self, images: torch.Tensor) -> torch.Tensor:
        """`images` resized to the side input size (bilinear, antialiased)."""
        size = (self.side_input_size, self.side_input_size)
        if tuple(images.shape[-2:]) == size:
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)

    def forward_features_cached(self, features: dict[str, torch.Tensor], side_images: torch.Tensor) -> torch.Tensor:
        """Logits from frozen-branch features (from `extract_features` or the cache) and the side images."""
        if not isinstance(features, dict) or not {"keys", "values"} <= set(features):
            raise TypeError("features must be the dict {'keys': ..., 'values': ...} that extract_features returns")
        prompts = self.fusion(features["keys"], features["values"])
        return side_forward(self.side, side_images, prompts)

    def forward(
        self,
        images: torch.Tensor | None = None,
        side_images: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> Any:
        """Logits: frozen branch on `images` (full resolution), side branch on `side_images` or resized `images`.

        Hugging Face style (what `transformers.Trainer` passes): `pixel_values=` instead of `images`, optional
        `labels=` (class indices, or multi-hot floats `[B, C]`), and cached frozen-branch features as `keys=` and
        `values=` (each `[B, L, H, k, Dh]`, e.g. the columns `fastprompt.data.hf_feature_transform` adds); then the
        result is a `transformers` `ImageClassifierOutput` with `logits` and, given labels, `loss` (cross-entropy,
        or BCE-with-logits for multi-hot labels), as `ViTForImageClassification` returns. `return_dict` forces
        either form. The side input is `side_images` when given, else the frozen-branch input resized.
        """
        if images is not None and pixel_values is not None:
            raise ValueError("pass the image as images= (timm style) or pixel_values= (Hugging Face style), not both")
        source = images if images is not None else pixel_values
        if (keys is None) != (values is None):
            raise ValueError("cached features need both keys= and values= (the two tensors the feature cache stores)")
        if keys is not None:
            features = {"keys": keys, "values": values}
            if side_images is None and source is None:
                raise ValueError(
                    "with cached keys/values the side network still needs its image: pass pixel_values= (resized to "
                    f"{self.side_input_size}×{self.side_input_size}) or side_images="
                )
        else:
            if source is None:
                raise ValueError("FPT needs the image: pass images= (timm style) or pixel_values= (Hugging Face style)")
            self.check_input(source)
            features = self.extract_features(source)
        if side_images is None:
            side_images = self.resize_for_side(source)
        logits = self.forward_features_cached(features, side_images)
        if return_dict is None:
            return_dict = pixel_values is not None or labels is not None or keys is not None
        if not return_dict:
            return logits
        from transformers.modeling_outputs import ImageClassifierOutput

        from fastprompt.engine.data import auto_loss  # the Engine's loss rule: one definition

        loss = None if labels is None else auto_loss(logits, labels.to(logits.device))
        return ImageClassifierOutput(loss=loss, logits=logits)

    def check_input(self, images: torch.Tensor) -> None:
        """Raise unless `images` is a `[B, C, H, W]` batch the frozen backbone can take, naming the size it needs."""
        tap = self.tap
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != tap.in_chans:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"FPT takes images as a [batch, {tap.in_chans}, height, width] tensor, got {shape}")
        height, width = (int(size) for size in images.shape[-2:])
        fixed = getattr(tap, "fixed_size", None)
        if fixed is not None and (height, width) != tuple(fixed):
            raise ValueError(
                f"the frozen backbone {tap.name} takes {fixed[0]}×{fixed[1]} images only, got {height}×{width}; "
                f"resize to {fixed[0]}×{fixed[1]} (or create it with that img_size, or dynamic_img_size=True)"
            )
        patch = tap.patch_size
        if not getattr(tap, "pads", False) and (height % patch or width % patch or min(height, width) < patch):
            fit = tuple(max(1, round(size / patch)) * patch for size in (height, width))
            raise ValueError(
                f"the frozen backbone {tap.name} needs image height and width that are multiples of its patch size "
                f"{patch}, got {height}×{width}; resize to e.g. {fit[0]}×{fit[1]} (its configured size is "
                f"{tap.image_size[0]}×{tap.image_size[1]})"
            )

    def _apply(self, fn: Callable, recurse: bool = True) -> FPT:
        """`Module.to` and friends, skipping a released backbone (meta tensors have no data to move)."""
        if self._released is None or not recurse:
            return super()._apply(fn, recurse)
        modules = self._modules
        self._modules = {name: module for name, module in modules.items() if name != "backbone"}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._modules = modules

    @property
    def backbone_released(self) -> bool:
        """Whether `release_backbone` freed the frozen weights (and no reload has happened since)."""
        return self._released is not None

    def release_backbone(self, reload: Callable[[], nn.Module] | None = None) -> None:
        """Free the frozen backbone's weights: training from the feature cache never runs it.

        The weights become meta tensors (no memory); the weight digest, the feature signature and the record
        `save_trainable` writes stay those of the real weights, so cache keys and saved files are unchanged. When
        the frozen branch is needed again (`extract_features`, e.g. validation on uncached images), `reload()` is
        called for a backbone with the same weights (checked by digest); without `reload` that is an error.
        """
        if self._released is not None:
            return
        from fastprompt.serialization import frozen_record_of

        record = frozen_record_of(self)  # while the weights exist; what save_trainable / load_trainable compare
        self._released = {"digest": self.weights_digest(), "record": record, "reload": reload}
        self.backbone.to("meta")
        # DistributedDataParallel (the HF Trainer under torchrun, Lightning's ddp) refuses a module with parameters on
        # two device types and would broadcast the buffers: it skips the names listed here.
        self._ddp_params_and_buffers_to_ignore = [
            f"backbone.{name}" for name, _ in [*self.backbone.named_parameters(), *self.backbone.named_buffers()]
        ]

    def restore_backbone(self) -> None:
        """Load the released frozen weights back through the `reload` given to `release_backbone`."""
        released = self._released
        if released is None:
            return
        if released["reload"] is None:
            raise RuntimeError(
                "the frozen backbone was released after preloading (FPT.release_backbone) and no reload was given, so "
                "features of uncached images cannot be computed; preload those images too, or call "
                "release_backbone(reload=lambda: <create the same backbone>)"
            )
        fresh = released["reload"]()
        self.backbone.load_state_dict(fresh.state_dict(), assign=True)
        self.backbone.requires_grad_(False).eval().to(next(self.fusion.parameters()).device)
        self._released, self._weights_digest = None, None
        del self._ddp_params_and_buffers_to_ignore
        if self.weights_digest() != released["digest"]:
            raise RuntimeError(
                "the reloaded backbone's weights differ from the released ones (SHA-256 mismatch); reload= must "
                "create the backbone FPT was built with, with the same weights"
            )
        self.tap = backbone_tap(self.backbone)

    def frozen_record(self) -> dict[str, Any] | None:
        """The frozen-weights record saved files carry, kept from before `release_backbone` (None: not released)."""
        return None if self._released is None else self._released["record"]

    def num_selected_tokens(self, image_size: tuple[int, int] | None = None) -> int:
        """Tokens kept per head and layer, `int(N·token_ratio)`, at `image_size` (default: the backbone's)."""
        grid = self.tap.grid(image_size)
        return int((grid[0] * grid[1] + self.tap.num_prefix_tokens) * self.token_ratio)

    def weights_digest(self) -> str:
        """SHA-256 of the frozen backbone's weights (names, dtypes, shapes, bytes).

        Reused until a weight tensor is replaced or modified in place (tracked by storage and version counter).
        """
        if self._released is not None:
            return self._released["digest"]
        state = sorted(self.backbone.state_dict().items())
        fingerprint = tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in state)
        if self._weights_digest is None or self._weights_digest[0] != fingerprint:
            self._weights_digest = (fingerprint, tensor_digest(dict(state)))
        return self._weights_digest[1]

    def feature_signature(self) -> dict[str, Any]:
        """Everything the frozen features depend on besides the image: backbone identity and selection settings."""
        return {
            "format": FEATURE_FORMAT,
            "backbone": self.tap.name,
            "weights_sha256": self.weights_digest(),
            "image_size": list(self.tap.image_size),
            "layers": list(self.layers),
            "token_ratio": self.token_ratio,
            "token_importance": self.token_importance,
        }


def _register_variant(variant: str, summary: str) -> None:
    """Register `fastprompt.apply(vit, variant, num_classes=..., **options)` as a wrapper building an FPT."""

    def build(
        model: VisionTransformer,
        num_classes: int,
        *,
        layers: list[int] | None = None,
        num_prompts: int = 16,
        token_ratio: float = 0.2,
        token_importance: str = "global",
        side_width: int | None = None,
        side_input_size: int | None = None,
    ) -> FPT:
        return FPT(
            model,
            num_classes,
            variant=variant,
            layers=layers,
            num_prompts=num_prompts,
            token_ratio=token_ratio,
            token_importance=token_importance,
            side_width=side_width,
            side_input_size=side_input_size,
        )

    build.__doc__ = summary
    register_method(variant, wrapper=True)(build)


_register_variant(
    "fpt+", "FPT+: layers 6–11 (last half), prompts of backbone width with LayerNorm, side ViT at 128×128."
)
_register_variant("fpt", "FPT: all layers, side-width prompts with a query projection, side ViT at 224×224.")
