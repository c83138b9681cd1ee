"""Small models and tasks shared by the tests."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

import fastprompt  # noqa: F401  (runs the torchvision shim before timm)


def tiny_vit(img_size: int = 32, patch_size: int = 8, num_classes: int = 4, **kwargs) -> VisionTransformer:
    """A 2-block ViT small enough for CPU tests (embed 32, 4 heads)."""
    torch.manual_seed(0)
    options = dict(
        img_size=img_size, patch_size=patch_size, embed_dim=32, depth=2, num_heads=4, num_classes=num_classes
    )
    options.update(kwargs)
    return VisionTransformer(**options)


def learnable_task(num_classes: int = 4, count: int = 16, img_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose class is a per-class colour shift: learnable in a few steps by any method."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(count) % num_classes
    colours = 2.0 * torch.randn(num_classes, 3, 1, 1, generator=generator)
    images = 0.3 * torch.randn(count, 3, img_size, img_size, generator=generator) + colours[labels]
    return images, labels


_COMPILE_SCRIPT = """
import importlib, json, sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module_name, kernels = sys.argv[1], json.loads(sys.argv[2])
pointers, fp32_pointers = set(json.loads(sys.argv[3])), set(json.loads(sys.argv[4]))
module = importlib.import_module(module_name)
blocks = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128}
for name, dtype, precision in kernels:
    kernel = getattr(module, name)
    fn = kernel if isinstance(kernel, triton.runtime.JITFunction) else kernel.fn  # unwrap @triton.autotune
    signature, constants = {}, {}
    for arg in fn.arg_names:
        if arg in blocks or arg == "PRECISION":
            signature[arg] = "constexpr"
            constants[arg] = blocks.get(arg, precision)
        elif arg in fp32_pointers:
            signature[arg] = "*fp32"
        elif arg in pointers:
            signature[arg] = "*" + dtype
        elif "scale" in arg or arg.startswith("inv_"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    assert compiled.asm["cubin"], name
print("compiled for sm_90 with triton", triton.__version__)
"""


def compile_for_sm90(
    module: str, kernels: list[tuple[str, str, str]], pointers: list[str], fp32_pointers: list[str], cache_dir
):
    """Compile Triton kernels to sm_90 machine code in a subprocess (no GPU needed), as (name, dtype, precision).

    Arguments named in `pointers` point to `dtype` elements, those in `fp32_pointers` to fp32; `*scale*` and
    `inv_*` are fp32 scalars, BLOCK_M/N/D are 64/64/128, anything else i32. Returns the CompletedProcess.
    """
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(cache_dir)}
    args = [sys.executable, "-c", _COMPILE_SCRIPT, module, *(json.dumps(x) for x in (kernels, pointers, fp32_pointers))]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
