"""Helpers for training fastprompt models inside other trainers.

- `fastprompt.integrations.trainer`: `FastpromptTrainer`, a Hugging Face `transformers.Trainer` that saves and
  resumes only the trainable weights (`fastprompt.save_trainable` / `load_trainable`).
- `fastprompt.integrations.lightning`: `TrainableCheckpoints`, a LightningModule mixin whose checkpoints hold only
  the trainable weights, and `deepspeed_strategy()`, a ready Lightning `DeepSpeedStrategy` for frozen backbones.

Each module imports its trainer library on import; this package imports neither.
"""
