"""Test set-up: CPU runs execute Triton kernels through the interpreter."""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before any @triton.jit runs

import pytest  # noqa: E402
import torch  # noqa: E402

import fastprompt  # noqa: E402,F401  (repairs the torchvision mismatch before any test module imports timm)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
