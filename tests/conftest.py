"""Test set-up: CPU runs execute Triton kernels through the interpreter."""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before any @triton.jit runs

import pytest  # noqa: E402
import torch  # noqa: E402

import fastprompt  # noqa: E402,F401  (repairs the torchvision mismatch before any test module imports timm)


def bf16_dot_as_fp32(original):
    """The interpreter's `create_dot` with bf16 operands widened to fp32 first.

    The interpreter stores bf16 as uint16 and its `create_dot` hands that storage to numpy's matmul, which multiplies
    the raw integers. bf16 is the top half of an fp32, so shifting the bits up 16 gives the exact value; products and
    sums then run in fp32 as a GPU's bf16 tensor cores do. Test-only: the kernels are unchanged.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot.original = original
    return create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime.interpreter import InterpreterBuilder

    InterpreterBuilder.create_dot = bf16_dot_as_fp32(InterpreterBuilder.create_dot)


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


@pytest.fixture(autouse=True)
def no_determinism_leaks():
    """`Engine(deterministic=True)` switches FASTPROMPT_DETERMINISTIC and torch's deterministic mode on for the
    process; give the next test the mode this one found, or a kernel test silently takes the deterministic path.
    (A single-process DeepSpeed run's RANK/WORLD_SIZE and process group stay: DeepSpeed keeps handles to them.)"""
    before = os.environ.get("FASTPROMPT_DETERMINISTIC")
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    if before is None:
        os.environ.pop("FASTPROMPT_DETERMINISTIC", None)
    else:
        os.environ["FASTPROMPT_DETERMINISTIC"] = before
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
