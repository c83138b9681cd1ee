"""Image decoding for medical data: 8/16-bit and float PNG/TIFF, palette/gray/alpha, EXIF orientation, DICOM.

:func:`load_image` returns a PIL RGB image for 8-bit sources and a float32 tensor ``[3, H, W]`` in [0, 1] for
higher bit depths (16-bit, 32-bit integer or float images, DICOM), so no precision is lost to an 8-bit round
trip. Files are decoded by content, not by extension. Anything that cannot be decoded raises
:class:`CorruptImageError`. Limitation: Pillow decodes 16-bit *colour* PNGs to 8 bits (16-bit grayscale,
the usual medical case, keeps its precision). Transparency is composited over black; an image that is
transparent everywhere keeps its stored colour instead (compositing would make it all black) and warns with
:class:`TransparentImageWarning`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
_DICOM_MAGIC_OFFSET = 128
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class TransparentImageWarning(UserWarning):
    """An image is transparent everywhere (alpha 0): its stored colour is used, since compositing gives black."""


class CorruptImageError(ValueError):
    """An image file that cannot be decoded: truncated, corrupt, or not an image at all."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode image {self.path}: {reason}")


def has_dicom_marker(path: str | os.PathLike) -> bool:
    """True when the file carries the DICOM 'DICM' marker after its 128-byte preamble."""
    with open(path, "rb") as handle:
        head = handle.read(_DICOM_MAGIC_OFFSET + 4)
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def _scale_to_unit(array: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] by the image's own value range (a constant image becomes zeros)."""
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if not np.isfinite(low) or not np.isfinite(high):
        raise ValueError("pixel values contain NaN or inf")
    if high <= low:
        return np.zeros_like(array)
    return (array - low) / (high - low)


def _gray_to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).unsqueeze(0).expand(3, -1, -1).clone()


def _decode_pil(path: str) -> Image.Image | torch.Tensor:
    with Image.open(path) as opened:
        opened.load()  # a truncated or corrupt file fails here
        image = ImageOps.exif_transpose(opened)  # a transposed copy (a plain copy without an orientation tag)
        if image.mode in _HIGH_DEPTH_MODES:
            return _gray_to_tensor(_scale_to_unit(np.asarray(image)))
        if image.mode == "RGB":
            return image
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            return _flatten_alpha(image.convert("RGBA"), path)
        return image.convert("RGB")


def _flatten_alpha(rgba: Image.Image, path: str) -> Image.Image:
    """RGB from RGBA: composited over black, except an image transparent everywhere, which keeps its colour."""
    if rgba.getchannel("A").getextrema()[1] > 0:
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    rgb = rgba.convert("RGB")  # the colour stored under alpha 0 (some exporters write it so)
    low, high = zip(*rgb.getextrema())
    if max(high) == 0:
        what = "and its colour channels are all zero: it holds no image (it decodes as all black)"
    else:
        what = "(alpha 0); its stored colour is used, ignoring the alpha channel"
    warnings.warn(f"{path} is fully transparent {what}", TransparentImageWarning, stacklevel=4)
    return rgb


def _first_value(value) -> float:
    """A DICOM numeric attribute may be multi-valued (several windows); the first one is the default."""
    try:
        return float(value)
    except TypeError:
        return float(value[0])


def _window(values: np.ndarray, dataset) -> np.ndarray | None:
    """Linear VOI window (DICOM PS3.3 C.11.2.1.2) to [0, 1], or None when the file has no window."""
    center, width = getattr(dataset, "WindowCenter", None), getattr(dataset, "WindowWidth", None)
    if center is None or width is None:
        return None
    center, width = _first_value(center), _first_value(width)
    if width < 1:
        return None
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0).astype(np.float32)


def _decode_dicom(path: str) -> torch.Tensor:
    try:
        import pydicom
    except ImportError as err:
        raise ImportError(
            f"{path} is a DICOM file but pydicom is not installed; install it with `pip install fastprompt[dicom]`"
        ) from err
    dataset = pydicom.dcmread(path, force=True)  # force: files without the 128-byte preamble
    if "PixelData" not in dataset:
        raise ValueError("the DICOM file holds no pixel data")
    pixels = dataset.pixel_array
    samples = int(getattr(dataset, "SamplesPerPixel", 1))
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"multi-frame DICOM ({frames} frames) is not a 2-D image; export the frame you need")
    if samples == 3:  # colour DICOM: pydicom already converted to RGB
        scale = float(np.iinfo(pixels.dtype).max) if np.issubdtype(pixels.dtype, np.integer) else 1.0
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32) / scale).permute(2, 0, 1).contiguous()
    values = pixels.astype(np.float64) * float(getattr(dataset, "RescaleSlope", 1.0) or 1.0)
    values += float(getattr(dataset, "RescaleIntercept", 0.0) or 0.0)
    unit = _window(values, dataset)
    if unit is None:
        unit = _scale_to_unit(values)
    if str(getattr(dataset, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1: low values are bright
    return _gray_to_tensor(unit)


def too_small(size: tuple[int, int], patch: int) -> str | None:
    """Why an image of `size` (width, height) is not admitted by a model with `patch`-pixel patches, or None.

    The one rule train (which drops such images) and predict (which gives them a row without a score) share.
    """
    width, height = size
    if min(width, height) < patch:
        return f"{width}x{height} pixels, smaller than one {patch}-pixel patch"
    return None


def image_size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(width, height) of a decoded image (PIL, or a ``[C, H, W]`` tensor)."""
    return image.size if isinstance(image, Image.Image) else (int(image.shape[-1]), int(image.shape[-2]))


def load_image(path: str | os.PathLike) -> Image.Image | torch.Tensor:
    """Decode an image file: PIL RGB for 8-bit sources, float32 ``[3, H, W]`` in [0, 1] for higher depths.

    Raises :class:`CorruptImageError` (with the path and the reason) for anything undecodable, and
    FileNotFoundError for a missing file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        if has_dicom_marker(path):
            return _decode_dicom(path)
        try:
            return _decode_pil(path)
        except UnidentifiedImageError:
            if Path(path).suffix.lower() != ".dcm":
                raise
            return _decode_dicom(path)  # a DICOM file written without its preamble
    except (ImportError, MemoryError):
        raise
    except Image.DecompressionBombError as err:
        raise CorruptImageError(path, f"{err} (raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)") from err
    except Exception as err:  # any decoder failure on untrusted bytes means the file is unusable
        raise CorruptImageError(path, f"{type(err).__name__}: {err}") from err
