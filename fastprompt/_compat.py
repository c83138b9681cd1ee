"""Import-time compatibility shims.

timm imports torchvision. PyPI's torchvision wheels are CUDA builds whose compiled
operators fail to register against a CPU-only torch with
``RuntimeError: operator torchvision::nms does not exist``. fastprompt never uses
torchvision's detection ops, so in exactly that case it defines the two missing
operator schemas, warns once, and imports again. Every other import error propagates.
"""

from __future__ import annotations

import sys
import warnings

_MISSING_OP = "operator torchvision::"
_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
}


class TorchvisionMismatchWarning(UserWarning):
    """torchvision's compiled ops do not match the installed torch; detection ops are unavailable."""


def _define_missing_schemas() -> None:
    import torch

    for name, schema in _SCHEMAS.items():
        try:
            torch.library.define(f"torchvision::{name}", schema)
        except RuntimeError as err:  # already defined by a partial import or by another shim
            if "already" not in str(err) and "multiple times" not in str(err):
                raise


def import_torchvision() -> None:
    """Import torchvision, repairing the CPU-torch / CUDA-torchvision op mismatch if that is the failure."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if _MISSING_OP not in str(err) or "does not exist" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _define_missing_schemas()
        import torchvision  # noqa: F401

        warnings.warn(
            f"torchvision {torchvision.__version__} was built for another torch ({err}); fastprompt defined "
            "the missing detection-op schemas so that timm imports. Detection ops (nms) will not run. "
            "To fix, install the torchvision that matches your torch.",
            TorchvisionMismatchWarning,
            stacklevel=2,
        )
