"""FPT+ training from the feature cache: the step before and after the lean cached step, in one run.

python -m benchmarks.fpt_cached_step --output benchmarks/results/cpu/fpt_cached_step.json

ViT-B/16 (`vit_base_patch16_384` run at 512×512, random weights), FPT+ (layers 6–11, 205 tokens per head), 5
classes, batch 16 (the published recipe), float16 cache entries, float32 training on the CPU.

- before: the fusion cross-attention as `scaled_dot_product_attention` on the features cast to float32 (the
  implementation up to commit 8a8e2e7: autograd also fills dK/dV buffers nobody reads), torch's default AdamW
  (the per-tensor loop on the CPU), the frozen backbone kept alive after preload.
- after: the library as it is: the cross-attention as two matrix products without K/V gradients
  (`fastprompt.methods.fpt_side.cross_attention`), `fastprompt.engine.core.fast_optimizer` (fused AdamW), and
  `FPT.release_backbone()` after preload.

Step time: both steps in one process, interleaved (before, after, before, ...), medians. Peak RSS: each variant in
a fresh process (MALLOC_MMAP_THRESHOLD_ fixed, so freed blocks leave the resident set), after preloading one image
through the frozen branch (as `fastprompt preload` does) and building a batch from it; the peak is reset after
preload and read after the training steps (VmHWM), and the whole process's peak (ru_maxrss) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.memory import MMAP_THRESHOLD, read_rss, reset_peak_rss
from benchmarks.results import run_record, write_record
from fastprompt import FPT
from fastprompt.engine.core import fast_optimizer
from fastprompt.methods.fpt_side import side_forward

MODEL, IMAGE_SIZE, CLASSES, LR, WEIGHT_DECAY = "vit_base_patch16_384", 512, 5, 1e-3, 0.1
VARIANTS = ("before", "after")


def legacy_fusion(fusion: torch.nn.Module, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """FusionModule.forward as it was up to commit 8a8e2e7 (FPT+ branch): features cast to the compute dtype, then
    `scaled_dot_product_attention`."""
    batch, layers, heads, count, head_dim = keys.shape
    prompts = fusion.prompts
    queries = fusion.norm(prompts)
    num_prompts = prompts.shape[1]
    queries = queries.view(1, layers, num_prompts, heads, head_dim).transpose(2, 3)
    queries = queries.expand(batch, -1, -1, -1, -1).reshape(batch * layers, heads, num_prompts, head_dim)
    dtype = queries.dtype
    context = F.scaled_dot_product_attention(
        queries.to(dtype),
        keys.to(dtype).reshape(batch * layers, heads, count, head_dim),
        values.to(dtype).reshape(batch * layers, heads, count, head_dim),
    )
    context = context.transpose(1, 2).reshape(batch, layers, num_prompts, fusion.embed_dim).to(prompts.dtype)
    return fusion.dropout(fusion.out_proj(context + prompts))


def build(batch: int, seed: int = 0) -> tuple[FPT, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The FPT+ model, a float16 feature batch preloaded from one image (plus per-row noise), side images, labels."""
    import timm  # after fastprompt (imported above), whose shim lets timm import torchvision on CPU torch

    torch.manual_seed(seed)
    model = FPT(timm.create_model(MODEL, img_size=IMAGE_SIZE, num_classes=0), CLASSES, variant="fpt+").train()
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    extracted = model.extract_features(image)  # what preload computes and stores (float16)
    features = {
        name: (value + 0.01 * torch.randn(batch, *value.shape[1:])).to(torch.float16)
        for name, value in extracted.items()
    }
    side = torch.randn(batch, 3, model.side_input_size, model.side_input_size)
    labels = torch.arange(batch) % CLASSES
    return model, features, side, labels


def make_step(variant: str, model: FPT, features: dict, side: torch.Tensor, labels: torch.Tensor) -> Any:
    """One optimizer step of `variant` (closure)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "before":
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)

        def forward() -> torch.Tensor:
            return side_forward(model.side, side, legacy_fusion(model.fusion, features["keys"], features["values"]))
    else:
        optimizer = fast_optimizer(torch.optim.AdamW, params, lr=LR, weight_decay=WEIGHT_DECAY)

        def forward() -> torch.Tensor:
            return model.forward_features_cached(features, side)

    def step() -> float:
        loss = F.cross_entropy(forward(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_steps(batch: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Median step time of both variants, interleaved in this process (each on its own copy of the model)."""
    steps, losses = {}, {}
    for variant in VARIANTS:
        model, features, side, labels = build(batch)
        if variant == "after":
            model.release_backbone()
        steps[variant] = make_step(variant, model, features, side, labels)
    for _ in range(warmup):
        for variant in VARIANTS:
            steps[variant]()
    samples: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            start = time.perf_counter()
            losses[variant] = steps[variant]()
            samples[variant].append(time.perf_counter() - start)
    return {
        variant: {"median_s": statistics.median(values), "samples_s": values, "last_loss": losses[variant]}
        for variant, values in samples.items()
    }


def rss_worker(variant: str, batch: int, steps: int) -> dict[str, Any]:
    """In a fresh process: preload, (after: release the backbone), reset the peak, train `steps` steps."""
    model, features, side, labels = build(batch)
    if variant == "after":
        model.release_backbone()
    step = make_step(variant, model, features, side, labels)
    resettable = reset_peak_rss()
    for _ in range(steps):
        step()
    current, peak = read_rss()
    return {
        "training_peak_rss_bytes": peak if resettable else None,
        "rss_after_bytes": current,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def rss_in_fresh_process(variant: str, batch: int, steps: int, threads: int) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)}
    env["OMP_NUM_THREADS"] = str(threads)
    argv = [sys.executable, "-m", "benchmarks.fpt_cached_step", "--rss-worker", variant]
    argv += ["--batch", str(batch), "--rss-steps", str(steps)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"RSS worker {variant} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["malloc_mmap_threshold"] = env["MALLOC_MMAP_THRESHOLD_"]
    return result


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per variant (interleaved)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rss-steps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("benchmark-results/cpu/fpt_cached_step.json"))
    parser.add_argument("--rss-worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_worker:
        print(json.dumps(rss_worker(args.rss_worker, args.batch, args.rss_steps)))
        return None
    threads = torch.get_num_threads()
    timing = time_steps(args.batch, args.repeats, args.warmup)
    memory = {variant: rss_in_fresh_process(variant, args.batch, args.rss_steps, threads) for variant in VARIANTS}
    rows = [{"variant": variant, **timing[variant], **memory[variant]} for variant in VARIANTS]
    before, after = rows
    speedup = 1.0 - after["median_s"] / before["median_s"]
    rss_cut = 1.0 - after["training_peak_rss_bytes"] / before["training_peak_rss_bytes"]
    rows.append(
        {
            "variant": "after vs before",
            "step_time_ratio": after["median_s"] / before["median_s"],
            "faster_pct": 100 * speedup,
            "training_peak_rss_ratio": after["training_peak_rss_bytes"] / before["training_peak_rss_bytes"],
            "training_peak_rss_lower_pct": 100 * rss_cut,
            "goal": "step >= 10% faster, peak RSS >= 30% lower",
        }
    )
    config = {
        "model": MODEL, "image_size": IMAGE_SIZE, "variant": "fpt+", "classes": CLASSES, "batch": args.batch,
        "cache_dtype": "float16", "compute_dtype": "float32", "repeats": args.repeats, "warmup": args.warmup,
        "rss_steps": args.rss_steps, "threads": threads,
    }  # fmt: skip
    notes = [
        "before: SDPA fusion on float32 copies of the features (code of 8a8e2e7), default AdamW, backbone kept",
        "after: matmul fusion without K/V gradients, fused AdamW (fast_optimizer), FPT.release_backbone()",
        "time: one process, variants interleaved, medians; RSS: a fresh process per variant, peak reset after preload",
    ]
    path = write_record(run_record("fpt_cached_step", "cpu", config, rows, notes), args.output)
    print(
        f"step: before {before['median_s'] * 1e3:.1f} ms, after {after['median_s'] * 1e3:.1f} ms "
        f"({100 * speedup:.1f} % faster); training peak RSS: before {before['training_peak_rss_bytes'] / 1e6:.0f} MB, "
        f"after {after['training_peak_rss_bytes'] / 1e6:.0f} MB ({100 * rss_cut:.1f} % lower)"
    )
    print(f"written to {path}")
    return path


if __name__ == "__main__":
    main()
