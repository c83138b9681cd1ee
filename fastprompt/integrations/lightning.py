"""`TrainableCheckpoints`: a LightningModule mixin whose checkpoints hold only the trainable weights.

    class Classifier(TrainableCheckpoints, lightning.LightningModule): ...

`on_save_checkpoint` drops every frozen tensor from `checkpoint["state_dict"]`; loading (`load_from_checkpoint`,
`Trainer.fit(ckpt_path=...)`) takes the trainable weights and keeps the module's own frozen ones, after checking
that the checkpoint holds exactly the trainable parameters. Under DeepSpeed the module weights are DeepSpeed's to
write: `deepspeed_strategy()` returns a ready `DeepSpeedStrategy` that leaves the frozen ones out.

    trainer = lightning.Trainer(strategy=deepspeed_strategy(stage=2), accelerator="cpu", devices=2, ...)

This module does not import Lightning itself; `deepspeed_strategy` imports it (and DeepSpeed) when called.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from fastprompt.serialization import trainable_names

__all__ = ["TrainableCheckpoints", "deepspeed_strategy"]


@functools.cache
def _cpu_deepspeed_strategy_class() -> type:
    """Lightning's DeepSpeedStrategy with its CUDA-only checks lifted, to run on DeepSpeed's CPU accelerator."""
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """DeepSpeedStrategy on CPU processes (gloo): DeepSpeed's CPU accelerator instead of CUDA devices."""

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "only supported on CUDA GPUs"

        @property
        def root_device(self) -> torch.device:  # DeepSpeed reads the index as the rank's device number
            return torch.device("cpu", 0)

        def setup_distributed(self) -> None:  # DeepSpeedStrategy's, less the check that devices are CUDA indices
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

    return CPUDeepSpeedStrategy


def deepspeed_strategy(stage: int = 2, *, accelerator: str = "auto", **options: Any) -> Any:
    """A Lightning `DeepSpeedStrategy` for frozen-backbone training, ready to pass as `Trainer(strategy=...)`.

    ZeRO `stage` 0-3; checkpoints leave the frozen parameters out (`exclude_frozen_parameters=True`; list
    `TrainableCheckpoints` first in the LightningModule so that resuming loads them non-strictly); no optimizer
    section (the LightningModule's `configure_optimizers` is used). `accelerator`: "auto" (CPU when CUDA is
    unavailable), "cpu" or "gpu"; on CPU, DeepSpeed's CPU accelerator and gloo are used, with no JIT build of its
    shared-memory op (pass `Trainer(accelerator="cpu")` too). `options` go to `DeepSpeedStrategy` (e.g.
    `offload_optimizer=True`).
    """
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed_strategy: stage must be one of 0, 1, 2, 3 (ZeRO stage), got {stage!r}")
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"deepspeed_strategy: accelerator must be 'auto', 'cpu' or 'gpu', got {accelerator!r}")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        raise ValueError(
            "deepspeed_strategy(accelerator='cpu') on a machine with CUDA: DeepSpeed picks its accelerator once per "
            "process from DS_ACCELERATOR; set DS_ACCELERATOR=cpu before anything imports DeepSpeed, or use 'gpu'"
        )
    from fastprompt.engine.backends import import_deepspeed

    import_deepspeed()  # DS_ACCELERATOR=cpu without CUDA; no JIT build of the shared-memory comm op
    options = {"stage": stage, "exclude_frozen_parameters": True, **options}
    if on_cpu:
        options.setdefault("process_group_backend", "gloo")
        return _cpu_deepspeed_strategy_class()(**options)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(**options)


class TrainableCheckpoints:
    """Mixin for a `lightning.LightningModule` (list it first): checkpoints keep only `requires_grad` parameters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strict_loading = False  # the frozen weights are the module's own; on_load_checkpoint checks the rest

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable parameters in the checkpoint's state_dict."""
        super_hook = getattr(super(), "on_save_checkpoint", None)
        if super_hook is not None:
            super_hook(checkpoint)
        state = checkpoint.get("state_dict")
        if state is not None:
            keep = set(trainable_names(self))
            checkpoint["state_dict"] = {name: value for name, value in state.items() if name in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose state_dict is not exactly this module's trainable parameters."""
        super_hook = getattr(super(), "on_load_checkpoint", None)
        if super_hook is not None:
            super_hook(checkpoint)
        state = checkpoint.get("state_dict")
        if state is None:  # DeepSpeed keeps the module weights in its own files
            return
        expected = set(trainable_names(self))
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint does not hold this module's trainable weights: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}; load it into a module with the same fastprompt method and options applied"
            )
