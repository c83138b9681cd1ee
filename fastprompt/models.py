"""Backbone creation through timm's own paths: hub weights, a local weight file, or random initialisation.

Every backbone is built without a classifier (``num_classes=0``); ``fastprompt.apply(model, method,
num_classes=K)`` adds the head for the task. A local file goes through timm's pretrained-loading path
(``pretrained_cfg_overlay=dict(file=...)``), so position embeddings and patch kernels are resampled to the
requested image size exactly as timm does for hub weights.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

__all__ = ["create_backbone", "hub_reachable", "network_errors", "offline_hub"]

RESERVED_KWARGS = ("img_size", "pretrained", "pretrained_cfg_overlay", "num_classes", "dynamic_img_size")
_TIMM_BUILDER_LOGGER = "timm.models._builder"
_KEYS_MESSAGE = re.compile(r"^(Missing|Unexpected) keys \((.*)\) (discovered|found) while loading")


def network_errors() -> tuple[type[BaseException], ...]:
    """Exception types a failed weight download raises (OSError covers urllib, requests and huggingface_hub)."""
    errors: list[type[BaseException]] = [OSError]
    for module_name in ("httpx", "httpx2"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        errors.append(module.HTTPError)
    return tuple(errors)


class _KeyReport(logging.Handler):
    """Collects the missing / unexpected state_dict keys that timm's loader logs."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.keys: dict[str, list[str]] = {"Missing": [], "Unexpected": []}

    def emit(self, record: logging.LogRecord) -> None:
        match = _KEYS_MESSAGE.match(record.getMessage())
        if match:
            self.keys[match.group(1)].extend(key.strip() for key in match.group(2).split(",") if key.strip())


@contextmanager
def _timm_key_report() -> Iterator[_KeyReport]:
    """Listen to timm's builder logger while weights load."""
    logger = logging.getLogger(_TIMM_BUILDER_LOGGER)
    handler, level = _KeyReport(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _check_name(name: object) -> str:
    """The model name, or a ValueError suggesting close timm names."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"model name must be a non-empty string such as 'vit_base_patch16_384', got {name!r}")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(
            f"unknown model {name!r}; {hint}timm.list_models('vit_*') lists the Vision Transformers timm provides"
        )
    return name


def _probe(name: str, img_size: int, kwargs: dict[str, Any]) -> VisionTransformer:
    """Build the architecture on the meta device (no memory, no weights) to check it before any real work."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0, **kwargs)
    except TypeError as err:
        if "'img_size'" in str(err):
            raise ValueError(_not_a_vit(name, str(err).split(".", 1)[0])) from None
        given = ", ".join(f"{key}={value!r}" for key, value in kwargs.items()) or "none"
        raise ValueError(
            f"model {name!r} does not accept these model options ({given}): {err}; use constructor arguments of "
            "timm's VisionTransformer such as depth=2, embed_dim=64, num_heads=2, patch_size=8"
        ) from None
    if not isinstance(model, VisionTransformer):
        raise ValueError(_not_a_vit(name, type(model).__name__))
    return model


def _not_a_vit(name: str, kind: str) -> str:
    return (
        f"model {name!r} ({kind}) is not a timm VisionTransformer, which fastprompt methods need; pick a vit_* model "
        "such as vit_base_patch16_384"
    )


def _check_img_size(name: str, img_size: int, model: VisionTransformer) -> None:
    """Raise when the image size is smaller than, or not a multiple of, the model's patch size."""
    patch_h, patch_w = model.patch_embed.patch_size
    for patch in {patch_h, patch_w}:
        if img_size < patch:
            raise ValueError(
                f"image size {img_size} is smaller than one {patch}-pixel patch of {name}; use an image size of at "
                f"least {patch} that is a multiple of {patch} (e.g. {max(patch, 512 // patch * patch)})"
            )
        if img_size % patch:
            lower, upper = img_size // patch * patch, (img_size // patch + 1) * patch
            raise ValueError(
                f"image size {img_size} is not divisible by the {patch}-pixel patch of {name}; use {lower} or {upper}"
            )


def _load_file(name: str, checkpoint: Path, build: dict[str, Any]) -> VisionTransformer:
    """Build `name` with weights from a local file through timm's pretrained-loading path."""
    overlay = dict(file=str(checkpoint))
    fix = "pass the weights of the same architecture (the --model and --model-kwargs they were saved from)"
    readable = "pass a PyTorch (.pth/.pt/.bin) or safetensors state_dict"
    with _timm_key_report() as report:
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **build)
        except RuntimeError as err:
            text = str(err)
            if "loading state_dict" in text or "size mismatch" in text or "shape" in text:
                detail = " ".join(line.strip() for line in text.splitlines()[:4])
                raise ValueError(f"checkpoint {checkpoint} does not match model {name!r}: {detail}; {fix}") from None
            raise ValueError(
                f"cannot read {checkpoint} as a weight file ({text.splitlines()[0]}); {readable}"
            ) from None
        except Exception as err:  # unreadable / non-weight files fail in torch.load or safetensors with many types
            raise ValueError(
                f"cannot read {checkpoint} as a weight file ({type(err).__name__}: {err}); {readable}"
            ) from None
    missing = [key for key in report.keys["Missing"] if not key.startswith("head.")]
    unexpected = report.keys["Unexpected"]
    if missing or unexpected:
        parts = [f"{label} keys {keys[:5]}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]  # fmt: skip
        raise ValueError(f"checkpoint {checkpoint} does not match model {name!r}: {'; '.join(parts)}; {fix}")
    return model


def _weights_location(name: str) -> str:
    """Where timm fetches `name`'s weights from, for a user who has to download them by hand."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        return f"model.safetensors from https://huggingface.co/{cfg.hf_hub_id}"
    if cfg is not None and cfg.url:
        return cfg.url
    return f"see timm's pretrained_cfg of {name}"


HUB_PROBE_SECONDS = 3.0
_HUB_PROBE: dict[str, bool] = {}  # endpoint -> reachable, probed once per process


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the Hugging Face hub answers one short request (False in offline mode); probed once per process.

    Without a network, huggingface_hub retries each file for about a minute before failing; this probe takes at
    most `timeout` seconds, and its answer is kept for the rest of the process.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return False
    endpoint = constants.ENDPOINT
    if endpoint not in _HUB_PROBE:
        try:
            get_session().head(endpoint, timeout=timeout)
            _HUB_PROBE[endpoint] = True
        except Exception:  # DNS, connection, proxy, TLS: any failure means a download would only retry and fail
            _HUB_PROBE[endpoint] = False
    return _HUB_PROBE[endpoint]


@contextmanager
def offline_hub() -> Iterator[None]:
    """huggingface_hub in offline mode (local cache only) inside the block, restored after it."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub.is_offline_mode()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def offline_advice(name: str) -> str:
    """How to use `name`'s pretrained weights without a network."""
    return (
        f"without internet access, download the weights elsewhere ({_weights_location(name)}) and pass the local "
        "file: --weights FILE on the command line, create_backbone(..., checkpoint=FILE) or "
        "fastprompt.load(..., backbone=FILE) in Python, or timm's "
        f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file=FILE)); weights already in "
        "the Hugging Face cache load with HF_HUB_OFFLINE=1"
    )


def _load_hub(name: str, build: dict[str, Any]) -> VisionTransformer:
    """Build `name` with its hub weights; when the hub does not answer a ≤ 3 s probe, from the local cache only
    (no minute of retries); a clear error with offline advice when the weights cannot be had."""
    reachable = hub_reachable()
    try:
        if reachable:
            return timm.create_model(name, pretrained=True, **build)
        with offline_hub():
            return timm.create_model(name, pretrained=True, **build)
    except network_errors() as err:
        why = "the Hugging Face hub did not answer" if not reachable else "the download failed"
        raise ValueError(
            f"could not load the pretrained weights of {name!r}: {why} and they are not in the local cache "
            f"({type(err).__name__}); {offline_advice(name)}"
        ) from None
    except RuntimeError as err:
        if "No pretrained weights exist" not in str(err):
            raise
        raise ValueError(
            f"timm has no pretrained weights for {name!r}; drop --pretrained (random init) or pass --checkpoint FILE"
        ) from None


def create_backbone(
    name: str,
    *,
    img_size: int,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    dynamic_img_size: bool = False,
    **model_kwargs: Any,
) -> VisionTransformer:
    """A timm VisionTransformer `name` at `img_size`, without classifier, from hub weights, a file, or random init.

    `pretrained=True` downloads timm's weights; `checkpoint` loads a local state_dict file (safetensors or
    PyTorch) through timm, resampling position embeddings to `img_size`. `model_kwargs` override constructor
    arguments (e.g. depth=2, embed_dim=64). Problems a user can fix raise ValueError naming the fix.
    """
    name = _check_name(name)
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"image size must be a positive integer, got {img_size!r}")
    reserved = sorted(set(model_kwargs) & set(RESERVED_KWARGS))
    if reserved:
        raise ValueError(f"model options {reserved} are set by fastprompt itself; remove them from the model options")
    if pretrained and checkpoint is not None:
        raise ValueError("pass either --pretrained (download timm's weights) or --checkpoint FILE, not both")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise ValueError(f"checkpoint file {checkpoint} does not exist; pass the path of a weight file")
    _check_img_size(name, img_size, _probe(name, img_size, model_kwargs))
    build = dict(img_size=img_size, num_classes=0, dynamic_img_size=dynamic_img_size, **model_kwargs)
    if checkpoint is not None:
        model = _load_file(name, checkpoint, build)
    elif pretrained:
        model = _load_hub(name, build)
    else:
        model = timm.create_model(name, pretrained=False, **build)
    # the recipe fastprompt.save_trainable records, so that fastprompt.load can rebuild this architecture
    model.fastprompt_backbone = {
        "name": name, "img_size": img_size, "dynamic_img_size": dynamic_img_size, "model_kwargs": dict(model_kwargs)
    }  # fmt: skip
    return model
