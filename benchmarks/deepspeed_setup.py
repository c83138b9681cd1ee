"""Engine set-up cost on the DeepSpeed backend (CPU): import times, then `Engine._setup` per ZeRO stage.

python -m benchmarks.deepspeed_setup                                # 3 set-ups per stage, CPU accelerator
python -m benchmarks.deepspeed_setup --output benchmarks/results    # write into the committed results folder

Run in a fresh process: the import times are those of this interpreter. The Engine imports DeepSpeed without the
JIT-built shared-memory comm op and uses a torch optimizer, so no C++ extension should be built: the row
`jit_extensions_built` lists what appeared in a fresh TORCH_EXTENSIONS_DIR while the set-ups ran.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()
import fastprompt  # noqa: E402  (timed with the Engine's module: the library's first import, torch included)
import fastprompt.engine  # noqa: E402

IMPORTED_FASTPROMPT = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks import results  # noqa: E402


def tiny_model() -> torch.nn.Module:
    """A 2-block ViT (width 32, 32×32 inputs) with LoRA: the set-up cost, not the model, is measured."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3)
    return fastprompt.apply(model, "lora", num_classes=3)


def setup_seconds(stage: int, batch: int) -> float:
    """Wall seconds of one Engine's backend set-up (process group, DeepSpeed initialize) at ZeRO `stage`."""
    engine = fastprompt.Engine(tiny_model(), backend="deepspeed", zero_stage=stage, epochs=1, progress=False)
    started = time.perf_counter()
    engine._setup(batch)  # what fit() does first; the model and data are irrelevant to its cost
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> Path:
    """Time the imports and `repeats` set-ups per stage; print them and write the result JSON; return its path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--repeats", type=int, default=3, help="Engine set-ups per stage")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--output", type=Path, help="result JSON file or folder (default: ./benchmark-results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    extensions = Path(tempfile.mkdtemp(prefix="fastprompt-ds-ext-"))
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions)

    from fastprompt.engine.backends import import_deepspeed

    started = time.perf_counter()
    deepspeed = import_deepspeed()
    rows: list[dict] = [
        {"what": "import fastprompt and fastprompt.engine (torch included)", "seconds": IMPORTED_FASTPROMPT - STARTED},
        {
            "what": "import deepspeed (fastprompt.engine.backends.import_deepspeed)",
            "seconds": time.perf_counter() - started,
        },
    ]
    for stage in args.stages:
        times = [setup_seconds(stage, args.batch_size) for _ in range(args.repeats)]
        rows.append(
            {
                "what": f"Engine set-up, DeepSpeed ZeRO-{stage}",
                "zero_stage": stage,
                "seconds": statistics.median(times),
                "seconds_first": times[0],
                "seconds_all": times,
            }
        )
    built = sorted(path.name for path in extensions.iterdir())
    rows.append({"what": "JIT extensions built during the set-ups", "jit_extensions_built": built})
    for row in rows:
        figure = f"{row['seconds']:.2f} s" if "seconds" in row else f"{row['jit_extensions_built'] or 'none'}"
        print(f"{row['what']:<66} {figure}")
    notes = [
        f"DeepSpeed {deepspeed.__version__}, accelerator {deepspeed.get_accelerator().device_name()}, "
        f"{args.threads} torch thread(s), on a CPU shared with other work; a set-up's first run includes "
        "one-time work (process group, DeepSpeed's lazy imports), later ones reuse it",
    ]
    return results.save_suite_run("deepspeed_setup", "cpu", args, rows, notes, "engine_deepspeed_setup")


if __name__ == "__main__":
    main()
