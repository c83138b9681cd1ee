"""`TrainState`: where an Engine's training stands (epoch, optimizer step, best epoch, patience count).

A checkpoint holds it as plain data (`TrainState.to_dict`); `TrainState.from_dict` reads that and the dict the
Engine kept before this class existed (fastprompt <= cc56237: the same keys, ``stale_epochs`` missing in a
checkpoint written before the first epoch ended, ``best`` possibly with an ``is_new`` flag).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BestEpoch", "RunningLoss", "TrainState"]


@dataclass(frozen=True)
class BestEpoch:
    """The best epoch so far by the monitored metric (1-based `epoch`)."""

    metric: str
    value: float
    epoch: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> BestEpoch | None:
        if not data:
            return None
        return cls(metric=str(data["metric"]), value=float(data["value"]), epoch=int(data["epoch"]))


@dataclass
class RunningLoss:
    """This rank's sums over the current epoch, checkpointed so a resumed epoch reports the whole epoch's loss."""

    loss_sum: float = 0.0
    loss_count: int = 0
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunningLoss | None:
        if data is None:
            return None
        return cls(float(data["loss_sum"]), int(data["loss_count"]), int(data["skipped"]))


@dataclass
class TrainState:
    """The position of training: `epoch` epochs done, `step_in_epoch` optimizer steps into the next one."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: BestEpoch | None = None
    stale_epochs: int = 0  # epochs since the monitored metric last improved (for `patience`)
    # not checkpointed as part of the state:
    new_best: bool = False  # the epoch that just ended is the best: best.pt is written with it
    last_good: str | None = None  # the last checkpoint written or resumed from
    running: RunningLoss | None = None  # checkpointed per rank, beside the state

    def to_dict(self) -> dict[str, Any]:
        """The checkpointed part, as plain data."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best": None if self.best is None else self.best.to_dict(),
            "stale_epochs": self.stale_epochs,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainState:
        """A state from `to_dict`'s form or the pre-TrainState dict (unknown keys, such as ``is_new``, ignored)."""
        return cls(
            epoch=int(data["epoch"]),
            step_in_epoch=int(data["step_in_epoch"]),
            global_step=int(data["global_step"]),
            best=BestEpoch.from_dict(data.get("best")),
            stale_epochs=int(data.get("stale_epochs", 0)),
        )
