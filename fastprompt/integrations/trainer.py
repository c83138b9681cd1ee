"""`FastpromptTrainer`: Hugging Face's `transformers.Trainer` saving only a fastprompt model's trainable weights.

The model trains as under any Trainer (the loss comes from `labels`, as the model computes it). What changes is
what is written: `save_model` and every checkpoint hold `trainable.safetensors` + `trainable.json` from
`fastprompt.save_trainable` instead of the full model, and resuming or loading the best model goes through
`fastprompt.load_trainable`. One exception: under DeepSpeed, a checkpoint folder also holds DeepSpeed's own engine
checkpoint (`global_stepN/`), which includes the frozen parameters because the Trainer resumes it with a strict
module load; `save_model` itself writes the trainable weights only.

DeepSpeed on a CPU machine: call `import_deepspeed()` before creating the `TrainingArguments` (it selects the CPU
accelerator and avoids DeepSpeed's one-minute JIT build of a shared-memory op), give the config no "optimizer"
section (the Trainer's torch AdamW is used; set "zero_allow_untested_optimizer": true), and run with the usual
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT environment (torchrun or the deepspeed launcher).
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from fastprompt.engine.backends import import_deepspeed
from fastprompt.serialization import DEFAULT_FILE, load_trainable, save_trainable

__all__ = ["FastpromptTrainer", "import_deepspeed"]

TRAINING_ARGS_FILE = "training_args.bin"  # what transformers.Trainer names it


class FastpromptTrainer(Trainer):
    """A `transformers.Trainer` whose saved models and checkpoints hold only the trainable weights."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write `trainable.safetensors` / `trainable.json` (and the training arguments) to `output_dir`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_trainable(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Resume: the trainable weights from the checkpoint folder (the frozen ones are the model's own)."""
        target = model if model is not None else self.model
        weights = os.path.join(resume_from_checkpoint, DEFAULT_FILE)
        if not os.path.isfile(weights):
            raise ValueError(
                f"{resume_from_checkpoint} holds no {DEFAULT_FILE}; resume from a checkpoint FastpromptTrainer wrote"
            )
        load_trainable(self.accelerator.unwrap_model(target, keep_torch_compile=False), weights)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
