"""Test set-up: CPU runs execute Triton kernels through the interpreter."""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before any @triton.jit runs

import pytest  # noqa: E402
import torch  # noqa: E402

import fastprompt  # noqa: E402,F401  (repairs the torchvision mismatch before any test module imports timm)


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models run fastest on one intra-op thread (and in-process runs then match the one-thread worker
    subprocesses bit for bit); tests marked `slow` (ViT-B sized) keep every thread."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
