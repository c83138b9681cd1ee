"""PNG plots of result rows: memory vs resolution per method, kernel time vs sequence length."""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import ModuleType

from fastprompt.io import atomic_write_bytes

MB = 1e6


def slug(*parts: object) -> str:
    """A file-name-safe name from `parts`."""
    return re.sub(r"[^A-Za-z0-9.+]+", "-", "_".join(str(part) for part in parts)).strip("-").lower()


def save(plt: ModuleType, figure: object, path: Path) -> Path:
    """Write `figure` to `path` as PNG, atomically, and close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def line_style(plt: ModuleType, index: int) -> dict:
    """A distinct colour, marker and dash pattern for line `index` (20 colours, then the markers differ)."""
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v"
    return {
        "color": colors[index % len(colors)],
        "marker": markers[(index // len(colors)) % len(markers)],
        "linestyle": "-" if index % 2 == 0 else "--",
    }


def memory_plot(plt: ModuleType, rows: list[dict], key: tuple, plots_dir: Path) -> Path:
    """Memory (GPU peak, or bytes saved for backward on CPU) against resolution, one line per method."""
    device, model, precision, batch, checkpointing = key
    gpu = rows[0]["device_type"] == "cuda"
    field = "peak_allocated_bytes" if gpu else "saved_bytes"
    figure, axis = plt.subplots(figsize=(6, 4))
    for i, method in enumerate(dict.fromkeys(row["method"] for row in rows)):
        points = sorted((r["resolution"], r[field] / MB) for r in rows if r["method"] == method and r.get(field))
        if points:
            axis.plot(*zip(*points), label=method, **line_style(plt, i))
    axis.set_xlabel("resolution (pixels)")
    axis.set_ylabel(("GPU peak" if gpu else "saved for backward") + " (MB)")
    axis.set_yscale("log")
    axis.set_title(f"{model}, {precision}, batch {batch}" + (", ckpt" if checkpointing else "") + f"\n{device}")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    axis.grid(True, which="both", alpha=0.3)
    suffix = "gc" if checkpointing else "nogc"
    return save(plt, figure, plots_dir / f"{slug('memory', device, model, precision, f'b{batch}', suffix)}.png")


def kernel_plot(plt: ModuleType, rows: list[dict], key: tuple, plots_dir: Path) -> Path:
    """Median kernel time against N, one line per (op, implementation)."""
    device, dtype, head_dim, kind = key
    figure, axis = plt.subplots(figsize=(6, 4))
    for i, (op, impl) in enumerate(sorted({(row["op"], row["impl"]) for row in rows})):
        points = sorted((r["n"], r["time_seconds"]["median"] * 1e3) for r in rows if (r["op"], r["impl"]) == (op, impl))
        axis.plot(*zip(*points), label=f"{op}: {impl}", **line_style(plt, i))
    axis.set_xlabel("tokens N")
    axis.set_ylabel("median time (ms)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_title(f"{kind}, D = {head_dim}, {dtype}\n{device}")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    axis.grid(True, which="both", alpha=0.3)
    return save(plt, figure, plots_dir / f"{slug('kernels', device, dtype, f'd{head_dim}', kind)}.png")


def tradeoff_plot(plt: ModuleType, rows: list[dict], key: tuple, plots_dir: Path) -> Path:
    """Step peak of live tensor bytes against step time, one line per method through its checkpointing policies."""
    device, model, resolution, precision, batch = key
    figure, axis = plt.subplots(figsize=(6, 4))
    order = {"none": 0, "selective": 1, "full": 2}
    for i, method in enumerate(dict.fromkeys(row["method"] for row in rows)):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: order.get(r["checkpointing"], 3))
        xs = [r["step_seconds"] for r in mine]
        ys = [r["step_peak_bytes"] / MB for r in mine]
        axis.plot(xs, ys, label=method, **line_style(plt, i))
        for x, y, r in zip(xs, ys, mine):
            axis.annotate(r["checkpointing"], (x, y), fontsize=6, textcoords="offset points", xytext=(4, 3))
    axis.set_xlabel("training step time, median (s)")
    axis.set_ylabel("step peak of live tensors (MB)")
    axis.set_yscale("log")
    axis.set_title(f"{model} at {resolution}, {precision}, batch {batch}: recomputation trade-off\n{device}")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    axis.grid(True, which="both", alpha=0.3)
    return save(
        plt, figure, plots_dir / f"{slug('tradeoff', device, model, f'r{resolution}', precision, f'b{batch}')}.png"
    )
