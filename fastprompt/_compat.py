"""Import-time compatibility shims.

timm imports torchvision. PyPI's torchvision wheels are CUDA builds whose compiled
operators fail to register against a CPU-only torch with
``RuntimeError: operator torchvision::nms does not exist``. fastprompt never uses
torchvision's detection ops, so in exactly that case it defines the two missing
operator schemas and imports again. Every other import error propagates.

The repair is silent by default: on these CPU machines the mismatch is expected, not a fault. PyPI is the only
registry set-up can reach, and PyPI's only torchvision for torch 2.13 (0.28.0) is the CUDA build
``0.28.0+cu130`` (checked with ``pip download --no-deps torchvision==0.28.0``: its ``version.py`` says
``+cu130`` and it bundles libcudart), so no matching CPU torchvision can be installed, and a warning on every
command would only teach users to ignore warnings. The repair is logged at DEBUG on the ``fastprompt`` logger;
set ``FASTPROMPT_TORCHVISION_WARNING=1`` to get it as a ``TorchvisionMismatchWarning`` instead.

`import fastprompt` does not import torch (the command line answers ``--help`` at once), so the
repair cannot run eagerly: `install_torchvision_repair` puts a finder on ``sys.meta_path`` that
wraps torchvision's loader, and the repair runs inside torchvision's own import, whoever triggers
it (timm, lightning, torchmetrics, the user).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings
from types import ModuleType
from typing import Any

_MISSING_OP = "operator torchvision::"
WARNING_ENV = "FASTPROMPT_TORCHVISION_WARNING"
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


def _is_op_mismatch(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and _MISSING_OP in str(err) and "does not exist" in str(err)


def _forget_torchvision_submodules() -> None:
    """Drop a failed import's partial submodules, so that the second attempt imports them afresh."""
    for name in [m for m in sys.modules if m.startswith("torchvision.")]:
        del sys.modules[name]


class _RepairingLoader(importlib.abc.Loader):
    """torchvision's own loader; on the op mismatch, defines the missing schemas and runs the module again."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:  # resource readers etc. come from the real loader
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        except RuntimeError as err:
            if not _is_op_mismatch(err):
                raise
            _forget_torchvision_submodules()
            for name in [n for n in vars(module) if not (n.startswith("__") and n.endswith("__"))]:
                delattr(module, name)  # the failed run's names: the second run starts from a fresh namespace
            _define_missing_schemas()
            self._loader.exec_module(module)
            message = (
                f"torchvision {getattr(module, '__version__', '?')} was built for another torch ({err}); fastprompt "
                "defined the missing detection-op schemas so that timm imports. Detection ops (nms) will not run. "
                "To fix, install the torchvision that matches your torch."
            )
            if os.environ.get(WARNING_ENV, "") not in ("", "0"):
                warnings.warn(message, TorchvisionMismatchWarning, stacklevel=2)
            else:  # expected on CPU machines (see the module docstring); visible with logging at DEBUG
                logging.getLogger("fastprompt").debug(message)


class _TorchvisionRepairFinder(importlib.abc.MetaPathFinder):
    """Finds torchvision through the other finders and hands back its spec with a `_RepairingLoader`."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != "torchvision":
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _TorchvisionRepairFinder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _RepairingLoader):
                    spec.loader = _RepairingLoader(spec.loader)
                return spec
        return None


def install_torchvision_repair() -> None:
    """Repair the CPU-torch / CUDA-torchvision op mismatch whenever torchvision is first imported (idempotent)."""
    if not any(isinstance(finder, _TorchvisionRepairFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionRepairFinder())
