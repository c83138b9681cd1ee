"""What the tests share, each defined once: tiny models and data, the sink-attention checks, CLI arguments, paths.

Every test module and worker imports it as `from helpers import ...` (tests/ is on pytest's pythonpath; a worker run
as a script puts tests/ on sys.path itself). Test modules never import each other: tests/test_layout.py checks.
"""

from __future__ import annotations

import fastprompt  # first: installs the torchvision repair before timm imports torchvision

# isort: split
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fastprompt.kernels.reference import sink_attention_reference

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORKERS = TESTS / "workers"  # the scripts tests run in subprocesses


def tiny_vit(
    img_size: int = 32, patch_size: int = 8, num_classes: int = 4, *, seed: int = 0, **kwargs
) -> VisionTransformer:
    """A 2-block ViT small enough for CPU tests (embed 32, 4 heads); the same weights for the same seed."""
    torch.manual_seed(seed)
    options = dict(
        img_size=img_size, patch_size=patch_size, embed_dim=32, depth=2, num_heads=4, num_classes=num_classes
    )
    options.update(kwargs)
    return VisionTransformer(**options)


def ept_vit(**kwargs) -> VisionTransformer:
    """The EPT tests' ViT: tiny_vit with 3 blocks and 5 classes (8-pixel patches on 32×32: 16 patches + CLS)."""
    return tiny_vit(**{"depth": 3, "num_classes": 5, **kwargs})


def prompted(model: VisionTransformer, attention: str = "fused", **options) -> VisionTransformer:
    """EPT on `model` with large random prompts (std 1, so the sink visibly competes with the logits)."""
    fastprompt.apply(model, "ept", attention=attention, **options)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(block.attn, "prompt"):
                block.attn.prompt.copy_(torch.randn(block.attn.prompt.shape, generator=generator))
    return model


def prompt_params(model: VisionTransformer) -> dict[int, torch.nn.Parameter]:
    """EPT's prompt of each prompted block, by block index."""
    return {i: b.attn.prompt for i, b in enumerate(model.blocks) if hasattr(b.attn, "prompt")}


ENGINE_CLASSES = 3  # the classes of tiny_tuned_vit and tiny_data


def tiny_tuned_vit(method: str = "lora", seed: int = 0, **options) -> torch.nn.Module:
    """tiny_vit with `method` applied and a 3-class head, as the Engine tests train it; the same weights for the
    same seed."""
    return fastprompt.apply(
        tiny_vit(num_classes=ENGINE_CLASSES, seed=seed), method, num_classes=ENGINE_CLASSES, **options
    )


def tiny_data(n: int = 24, seed: int = 1, multilabel: bool = False) -> TensorDataset:
    """Learnable random 32×32 images of 3 classes: the class shifts the mean of one colour channel."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % ENGINE_CLASSES
    images = torch.randn(n, 3, 32, 32, generator=generator) * 0.5
    images[torch.arange(n), labels] += 1.0
    if multilabel:
        targets = torch.nn.functional.one_hot(labels, ENGINE_CLASSES).float()
        targets[::2, (labels[::2] + 1) % ENGINE_CLASSES] = 1.0
        return TensorDataset(images, targets)
    return TensorDataset(images, labels)


def shuffled(dataset: Dataset, batch_size: int = 4) -> DataLoader:
    """A shuffling loader (the Engine makes its order a function of seed and epoch)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True)


def tiny_fpt(**options) -> fastprompt.FPT:
    """FPT+ on a headless tiny_vit (layers 0 and 1, 16-pixel side input, 3 classes)."""
    return fastprompt.FPT(tiny_vit(num_classes=0), 3, side_input_size=16, **{"layers": [0, 1], **options})


def small_backbone(**kwargs) -> VisionTransformer:
    """The FPT tests' backbone: tiny_vit with 4 blocks of embed 64 and no head (17 tokens at 32×32)."""
    return tiny_vit(**{"embed_dim": 64, "depth": 4, "num_classes": 0, **kwargs})


def small_fpt(variant: str = "fpt+", **options) -> fastprompt.FPT:
    """FPT (`variant`) with 3 classes on small_backbone; 16-pixel side input unless `options` say otherwise."""
    options.setdefault("side_input_size", 16)
    model = fastprompt.FPT(small_backbone(), 3, variant=variant, **options)
    torch.manual_seed(1)
    return model


def fpt_reference_features(backbone: VisionTransformer, x: torch.Tensor, layers, ratio: float, mode: str):
    """FPT's frozen branch materialised: timm's own blocks, full softmax probabilities, stable top-k; the selected
    keys, values and token indices stacked over `layers`."""
    from fastprompt.kernels.reference import attention_importance_reference, select_tokens_reference

    x = backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(x)))
    keys, values, indices = [], [], []
    for i, block in enumerate(backbone.blocks):
        if i in layers:
            attn = block.attn
            qkv = attn.qkv(block.norm1(x)).reshape(x.shape[0], x.shape[1], 3, attn.num_heads, attn.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            scores = attention_importance_reference(q, k, mode=mode, scale=attn.scale)
            k_sel, v_sel, chosen = select_tokens_reference(k, v, scores, ratio)
            keys.append(k_sel)
            values.append(v_sel)
            indices.append(chosen)
        x = block(x)
    return torch.stack(keys, 1), torch.stack(values, 1), torch.stack(indices, 1)


def images(size: int | tuple[int, int] = 32, count: int = 2, seed: int = 1) -> torch.Tensor:
    """`count` standard-normal RGB images, `size` square or (height, width)."""
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def feature_images(count: int = 12) -> torch.Tensor:
    """The images the feature-cache tests preload into tiny_fpt's cache."""
    return images(count=count, seed=5)


def learnable_task(num_classes: int = 4, count: int = 16, img_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose class is a per-class colour shift: learnable in a few steps by any method."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(count) % num_classes
    colours = 2.0 * torch.randn(num_classes, 3, 1, 1, generator=generator)
    images = 0.3 * torch.randn(count, 3, img_size, img_size, generator=generator) + colours[labels]
    return images, labels


TINY = [  # `fastprompt train` model arguments: a 2-block ViT on 32x32 images
    "--model=vit_tiny_patch16_224",
    "--model-kwargs",
    "depth=2",
    "embed_dim=32",
    "num_heads=2",
    "patch_size=8",
    "--img-size=32",
]
CLI_TRAINING = ["--batch-size=4", "--lr=1e-2", "--workers=0", "--backend=torch", "--quiet"]
FAST = ["--epochs=2", *CLI_TRAINING]
CLI_TINY = [*TINY, *CLI_TRAINING]  # trained in seconds; add --epochs


def stop_trainer_at(step: int):
    """A transformers TrainerCallback that ends training after `step` optimizer steps (the checkpoint at `step`
    exists), as a killed job would."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= step
            return control

    return StopAt()


CLASSES = ("benign", "malignant")  # write_image_folder's class folders


def write_image_folder(root, per_class: int | dict[str, int] = 4, *, classes=CLASSES, seed: int = 0, size: int = 40):
    """Class-coloured noisy PNGs: root/<class>/<i>.png (`per_class` images each, or a {class: count} dict; a class
    missing from it gets none); returns root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class.get(name, 0) if isinstance(per_class, dict) else per_class):
            pixels = rng.normal(90 + 80 * label, 30, (size, size, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def train_argv(folders, out, *extra) -> list[str]:
    """`fastprompt train` arguments: a linear head on the tiny ViT for 2 epochs on (train, val) folders, into out."""
    train, val = folders
    return ["train", f"--data={train}", f"--val={val}", *TINY, "--method=linear", *FAST, f"--output-dir={out}", *extra]


def logits_predicting(predicted, num_classes: int):
    """NumPy logits whose argmax is `predicted` (+3 on the predicted class, -3 elsewhere)."""
    import numpy as np

    logits = np.full((len(predicted), num_classes), -3.0)
    logits[np.arange(len(predicted)), predicted] = 3.0
    return logits


def tiny_hf_model(cls="ViTForImageClassification", seed: int = 0, *, add_pooling_layer: bool | None = None, **config):
    """A 2-layer Hugging Face ViT or DINOv2 (hidden 32, 4 heads, MLP 64, 3 labels, a 4×4 patch grid: ViT on 32×32
    images with 8-pixel patches, DINOv2 on 28×28 with 7-pixel ones), in eval mode.

    `cls`: a transformers model class or its name (ViTModel, ViTForImageClassification, Dinov2Model, ...); `config`
    overrides the config; `add_pooling_layer` goes to ViTModel.
    """
    import transformers

    model_cls = getattr(transformers, cls) if isinstance(cls, str) else cls
    options = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_labels=3)
    if model_cls.__name__.startswith("Dinov2"):
        model_config = transformers.Dinov2Config(
            **{**options, "mlp_ratio": 2, "image_size": 28, "patch_size": 7, **config}
        )
    else:
        options.update(intermediate_size=64, image_size=32, patch_size=8)
        model_config = transformers.ViTConfig(**{**options, **config})
    extra = {} if add_pooling_layer is None else {"add_pooling_layer": add_pooling_layer}
    torch.manual_seed(seed)
    return model_cls(model_config, **extra).eval()


# Sink attention (fastprompt.kernels.sink_attention) against its float64 reference.
SINK_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}  # fp16/bf16: flash-attention's rule (assert_matches)


def make_qkv(batch, heads, tokens, dim, dtype=torch.float32, seed=0, device="cpu"):
    """q, k, v as the strided views timm's Attention produces from one fused qkv projection."""
    torch.manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3 * heads * dim, dtype=dtype).to(device)
    return [t.requires_grad_() for t in qkv.reshape(batch, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)]


def leaves(*tensors):
    """Detached copies of `tensors` that require grad."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def outputs_and_grads(fn, q, k, v, sink, dout, **kwargs):
    """Output and gradients (q, k, v, sink) of fn for upstream gradient dout."""
    q, k, v, sink = leaves(q, k, v, sink)
    out = fn(q, k, v, sink, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v, sink), dout)
    return out.detach(), grads


def assert_matches(fn, q, k, v, sink, dtype, tol=None, **kwargs):
    """fn in `dtype` agrees with the fp64 reference in output and all four gradients.

    fp64/fp32 (or an explicit `tol`): max error ≤ tol · max(1, max |reference|). fp16/bf16: flash-attention's rule,
    max error ≤ 2 × the max error of PyTorch's own materialised computation in the same dtype + one rounding unit
    of that dtype at the reference's magnitude.
    """
    torch.manual_seed(1)
    dout = torch.randn(q.shape, dtype=torch.float64).to(q.device)
    want_out, want_grads = outputs_and_grads(
        sink_attention_reference, *(t.double() for t in (q, k, v, sink)), dout, **kwargs
    )
    cast = [t.detach().to(dtype) for t in (q, k, v)]
    sink = sink.double() if dtype == torch.float64 else sink.float()  # low-precision q, k, v with an fp32 prompt
    got_out, got_grads = outputs_and_grads(fn, *cast, sink, dout.to(dtype), **kwargs)
    assert got_out.dtype == dtype
    flash_rule = tol is None and dtype in (torch.float16, torch.bfloat16)
    if flash_rule:
        torch_out, torch_grads = outputs_and_grads(sink_attention_reference, *cast, sink, dout.to(dtype), **kwargs)
        torch_results = (torch_out, *torch_grads)
    else:
        tol = SINK_TOLERANCE[dtype] if tol is None else tol
    named = zip(("out", "dq", "dk", "dv", "dsink"), (got_out, *got_grads), (want_out, *want_grads))
    for i, (name, got, want) in enumerate(named):
        assert got.shape == want.shape, name
        assert torch.isfinite(got).all(), name
        err = (got.double() - want).abs().max().item()
        size = max(1.0, want.abs().max().item())
        if flash_rule:
            torch_err = (torch_results[i].double() - want).abs().max().item()
            bound = 2 * torch_err + torch.finfo(dtype).eps * size
            assert err <= bound, f"{name}: max error {err} > 2 × PyTorch's {dtype} error {torch_err} + atol"
        else:
            assert err <= tol * size, f"{name}: max error {err}"


def sink_of_shape(shape, seed=2, device="cpu"):
    """A random EPT sink (mean 1, std 2) of `shape` that requires grad."""
    torch.manual_seed(seed)
    return (torch.randn(shape) * 2 + 1).to(device).requires_grad_()


def flip_byte(path: Path, offset: int = -10) -> None:
    """Corrupt the file at `path` in place: invert the byte at `offset` (near the end: inside the payload, so only a
    checksum notices)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- the offline sm_90 compile check (tests/sm90_kernels.py)


def nvidia_tools() -> bool:
    """Whether Triton ships its NVIDIA backend with ptxas and cuobjdump (Linux x86-64 and aarch64 wheels do)."""
    from fastprompt.kernels.dispatch import triton_importable

    if not triton_importable():
        return False
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (tools / "ptxas").exists() and (tools / "cuobjdump").exists()


def sm90_compile_check(out: Path, *options: str) -> dict:
    """Run tests/sm90_kernels.py (compiled, never interpreted) writing `out`; returns its JSON payload."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "FASTPROMPT_DETERMINISTIC": "0"}
    done = subprocess.run(
        [sys.executable, str(TESTS / "sm90_kernels.py"), str(out), *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())
