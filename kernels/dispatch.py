"""Device dispatch shared by every kernel: Triton on CUDA, a memory-lean PyTorch path elsewhere."""

from __future__ import annotations

import functools
import os

import torch

TRITON_DEVICE_TYPES = ("cuda",)  # device types the Triton kernels launch on (tests trace the Triton path on "meta")


@functools.cache
def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result  # torch.compile takes the answer at trace time, never traces the import
def triton_importable() -> bool:
    """Whether the `triton` package imports on this machine."""
    return _import_triton()


def interpreting() -> bool:
    """Whether Triton runs in interpreter mode (TRITON_INTERPRET=1), i.e. kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on a CUDA device (a device type of TRITON_DEVICE_TYPES) and Triton is importable.

    Setting FASTPROMPT_DISABLE_TRITON=1 forces the PyTorch path (for debugging and comparisons).
    """
    if os.environ.get("FASTPROMPT_DISABLE_TRITON", "0") == "1" or not triton_importable():
        return False
    return all(t.device.type in TRITON_DEVICE_TYPES for t in tensors)


def deterministic() -> bool:
    """Whether kernels must be run-to-run reproducible.

    True under FASTPROMPT_DETERMINISTIC=1 or torch.use_deterministic_algorithms(True). The Triton kernels then
    skip autotuning and use one fixed block configuration (the block sizes set the summation order); read at each
    launch.
    """
    return os.environ.get("FASTPROMPT_DETERMINISTIC", "0") == "1" or torch.are_deterministic_algorithms_enabled()
