"""Engine run reports: per-epoch metrics as JSON lines and CSV, an optional TensorBoard log, and a PNG of the curves.

``metrics.jsonl`` and ``metrics.csv`` are always written (one row per epoch, rewritten atomically); ``loggers`` may
add ``"tensorboard"`` (``torch.utils.tensorboard``, needs the ``tensorboard`` package: ``pip install
'fastprompt[tensorboard]'``), which writes the same scalars to ``output_dir/tensorboard`` with the epoch as step.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastprompt.io import atomic_open, json_safe

LOGGERS = ("csv", "tensorboard")
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_HINT = "pip install 'fastprompt[tensorboard]' (or pip install tensorboard)"


def check_loggers(loggers: str | Sequence[str] | None) -> tuple[str, ...]:
    """The validated logger names (``csv`` is always on); a missing TensorBoard names the install command."""
    names = (loggers,) if isinstance(loggers, str) else tuple(loggers or ())
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}; choose from {list(LOGGERS)}")
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            raise ImportError(f"the tensorboard logger needs the tensorboard package: {TENSORBOARD_HINT}") from None
    return tuple(dict.fromkeys(("csv", *names)))


def write_metrics_jsonl(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite `path` atomically with one JSON object per epoch (NaN written as null)."""
    with atomic_open(path, "w") as handle:
        for record in history:
            handle.write(json.dumps(json_safe(record), sort_keys=True) + "\n")


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite `path` atomically: one row per epoch, a column per scalar or text value (epoch first; NaN empty)."""
    columns: dict[str, None] = {"epoch": None}
    for record in history:
        columns.update((key, None) for key, value in record.items() if isinstance(value, (int, float, str)))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({key: _csv_value(record.get(key, "")) for key in columns})
    with atomic_open(path, "w") as handle:
        handle.write(buffer.getvalue())


class TensorBoardLogger:
    """Scalars of each epoch's record into ``folder`` through ``torch.utils.tensorboard`` (step = epoch)."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, record: dict[str, Any]) -> None:
        """Write every finite number of `record` (except the epoch itself) as a scalar at step ``record['epoch']``."""
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(value):
                    self.writer.add_scalar(key, value, global_step=record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def write_curves(path: Path, history: list[dict[str, Any]]) -> None:
    """Plot train/val loss and every scalar validation metric per epoch into a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [record["epoch"] for record in history]
    metrics = sorted(
        {k for record in history for k, v in record.items() if k.startswith("val_") and k != "val_loss"
         and isinstance(v, (int, float))}
    )  # fmt: skip
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        if any(key in record for record in history):
            loss_ax.plot(epochs, [record.get(key, math.nan) for record in history], marker="o", label=key)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_ax.legend()
    for key in metrics:
        metric_ax.plot(epochs, [record.get(key, math.nan) for record in history], marker="o", label=key)
    metric_ax.set(xlabel="epoch", title="validation metrics")
    if metrics:
        metric_ax.legend(fontsize="small")
    for ax in (loss_ax, metric_ax):  # whole epochs only: matplotlib would otherwise tick 1.5 on a two-epoch run
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
