"""fastprompt: parameter-efficient prompt tuning of frozen ViTs at high resolution.

`import fastprompt` is light: it imports no torch. The public names below load on first use (PEP 562), so the
command line's ``--help`` answers at once. It also installs the torchvision repair (`fastprompt._compat`), which runs
when torchvision is first imported, by timm or anyone else: import fastprompt before timm/torchvision.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastprompt._compat import install_torchvision_repair

install_torchvision_repair()

__version__ = "0.1.0"

# public name -> module that defines it; add new exports here (and to the TYPE_CHECKING imports below)
_EXPORTS = {
    "Engine": "fastprompt.engine",
    "EngineConfig": "fastprompt.engine",
    "FPT": "fastprompt.methods.fpt",
    "apply": "fastprompt.patch",
    "available_methods": "fastprompt.patch",
    "checkpoint_activations": "fastprompt.checkpointing",
    "count_parameters": "fastprompt.patch",
    "ept_scales": "fastprompt.methods.ept",
    "merge": "fastprompt.patch",
    "predict_images": "fastprompt.predict",
    "load": "fastprompt.serialization",
    "load_run": "fastprompt.serialization",
    "load_trainable": "fastprompt.serialization",
    "read_checkpoint": "fastprompt.serialization",
    "save_trainable": "fastprompt.serialization",
}

__all__ = [  # the same names as _EXPORTS (tests/integrations/test_compat.py checks)
    "FPT",
    "Engine",
    "EngineConfig",
    "__version__",
    "apply",
    "available_methods",
    "checkpoint_activations",
    "count_parameters",
    "ept_scales",
    "load",
    "load_run",
    "load_trainable",
    "merge",
    "predict_images",
    "read_checkpoint",
    "save_trainable",
]

if TYPE_CHECKING:  # what static tools see; at run time `__getattr__` imports these on first use
    from fastprompt.checkpointing import checkpoint_activations
    from fastprompt.engine import Engine, EngineConfig
    from fastprompt.methods.ept import ept_scales
    from fastprompt.methods.fpt import FPT
    from fastprompt.patch import apply, available_methods, count_parameters, merge
    from fastprompt.predict import predict_images
    from fastprompt.serialization import load, load_run, load_trainable, read_checkpoint, save_trainable


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastprompt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
