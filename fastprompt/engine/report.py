"""Engine run reports: per-epoch metrics as JSON lines and a PNG of loss / validation-metric curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastprompt.io import atomic_open, json_safe


def write_metrics_jsonl(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite `path` atomically with one JSON object per epoch (NaN written as null)."""
    with atomic_open(path, "w") as handle:
        for record in history:
            handle.write(json.dumps(json_safe(record), sort_keys=True) + "\n")


def write_curves(path: Path, history: list[dict[str, Any]]) -> None:
    """Plot train/val loss and every scalar validation metric per epoch into a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [record["epoch"] for record in history]
    metrics = sorted({k for record in history for k in record if k.startswith("val_") and k != "val_loss"})
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
        metric_ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
