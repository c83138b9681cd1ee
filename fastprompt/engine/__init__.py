"""The training Engine: `Engine(model).fit(loader)` on DeepSpeed or plain PyTorch.

`core` holds the Engine itself, `backends` the torch/DeepSpeed step, `checkpoint` the atomic checksummed
checkpoint files, `data` the batch conventions and `report` the metrics file and curves.
"""

from fastprompt.engine.checkpoint import CheckpointError
from fastprompt.engine.core import Engine, NonFiniteLossError, TrainingInterrupted, enable_determinism

__all__ = ["CheckpointError", "Engine", "NonFiniteLossError", "TrainingInterrupted", "enable_determinism"]
