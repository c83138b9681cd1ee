"""`TrainableCheckpoints`: a LightningModule mixin whose checkpoints hold only the trainable weights.

    class Classifier(TrainableCheckpoints, lightning.LightningModule): ...

`on_save_checkpoint` drops every frozen tensor from `checkpoint["state_dict"]`; loading (`load_from_checkpoint`,
`Trainer.fit(ckpt_path=...)`) takes the trainable weights and keeps the module's own frozen ones, after checking
that the checkpoint holds exactly the trainable parameters. Under `DeepSpeedStrategy` the module weights are
DeepSpeed's to write: pass `DeepSpeedStrategy(stage=2, exclude_frozen_parameters=True)` for the same effect.
This module does not import Lightning itself.
"""

from __future__ import annotations

from typing import Any

from fastprompt.serialization import trainable_names

__all__ = ["TrainableCheckpoints"]


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
