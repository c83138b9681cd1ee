"""Command-line options of the model-level suites, without torch: `fastprompt bench SUITE --help` answers at once.

A suite whose parser lives here as ``<suite>_parser()`` gets its help from this module alone; the suite module itself
(which imports torch, timm and fastprompt's models) is imported only to run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# fastprompt.checkpointing.POLICIES and the keys of benchmarks.models.PRECISIONS (tests/bench/test_benchmarks.py checks)
POLICIES = ("none", "selective", "full")
PRECISION_NAMES = ("bf16", "fp32")
HF_ARCHITECTURES = {  # ViTConfig overrides; ViTConfig's defaults are ViT-B/16
    "vit-base-patch16-224": {"image_size": 224},
    "vit-base-patch16-384": {"image_size": 384},  # google/vit-base-patch16-384, FPT's official backbone
    "vit-large-patch16-384": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=384
    ),
}


def add_row_arguments(parser: argparse.ArgumentParser, *, resolutions: list[int]) -> None:
    """The options that choose a suite's rows (model, resolutions, methods, batch, precision, checkpointing)."""
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=resolutions)
    parser.add_argument("--methods", nargs="+", help="method labels (default: every registered method)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--precision", choices=PRECISION_NAMES, default="fp32")
    parser.add_argument("--grad-checkpointing", action="store_true", help="timm's whole-model block checkpointing")
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        choices=POLICIES,
        default=["none"],
        help="fastprompt.checkpoint_activations policies: a row per method, resolution and policy",
    )


def memory_parser() -> argparse.ArgumentParser:
    """The memory suite's options (benchmarks.memory.parse_args adds the checks that need its modules)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory",
        description="Memory per method and resolution: trainable %, bytes saved for backward, peak RSS / GPU peak, "
        "batch budget.",
    )
    add_row_arguments(parser, resolutions=[224, 512])
    parser.add_argument("--budget", help="memory budget, e.g. 24GB: report the largest batch that fits")
    parser.add_argument("--budget-limit", type=int, default=4096, help="largest batch the budget search tries")
    parser.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="CPU: measure every row in this process (faster start; later rows' peak RSS may include earlier heap)",
    )
    parser.add_argument(
        "--hf-model",
        choices=sorted(HF_ARCHITECTURES),
        help="also measure this Hugging Face ViT (random weights, run at each resolution) with --hf-methods",
    )
    parser.add_argument("--hf-methods", nargs="+", default=["ept", "lora", "fpt+"], help="method labels for --hf-model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        type=Path,
        help="result JSON file, or a folder for <device>/<name>.json (default: ./benchmark-results/)",
    )
    return parser
