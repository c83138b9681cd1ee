"""The training Engine: `Engine(model).fit(loader)` on DeepSpeed or plain PyTorch.

`core` holds the Engine itself, `config` its options (`EngineConfig`), `state` its training position (`TrainState`),
`backends` the torch/DeepSpeed step (`Backend`), `checkpoint` the atomic checksummed checkpoint files, `data` the
batch conventions and `report` the metrics file and curves.
"""

from fastprompt.engine.backends import Backend
from fastprompt.engine.checkpoint import CheckpointError
from fastprompt.engine.config import EngineConfig, Resolved
from fastprompt.engine.core import Engine, NonFiniteLossError, TrainingInterrupted, enable_determinism
from fastprompt.engine.state import BestEpoch, TrainState

__all__ = [
    "Backend",
    "BestEpoch",
    "CheckpointError",
    "Engine",
    "EngineConfig",
    "NonFiniteLossError",
    "Resolved",
    "TrainState",
    "TrainingInterrupted",
    "enable_determinism",
]
