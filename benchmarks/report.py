"""Render the result tables (docs/benchmarks.md) and the PNG plots from the committed JSON under benchmarks/results/.

python -m benchmarks.report                      # committed result files only
python -m benchmarks.report --allow-uncommitted  # preview with files not yet committed

PPE / PME columns appear for memory rows that carry a `score` (an accuracy or AUC in %, from a training run).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from benchmarks import results
from fastprompt.io import atomic_write_bytes

START, END = "<!-- results:start -->", "<!-- results:end -->"
NOT_ON_GPU = "not yet measured on GPU"
MB = 1e6


def tracked_files(root: Path) -> set[Path] | None:
    """Files under `root` that git tracks (committed or staged), or None outside a git work tree."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", "."], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {(root / name).resolve() for name in out.split("\0") if name}


def load_results(root: Path, *, committed_only: bool) -> tuple[list[tuple[Path, dict]], list[str]]:
    """Every valid result record under `root` (only git-tracked files when `committed_only`), and skip notes."""
    records, skipped = [], []
    tracked = tracked_files(root) if committed_only else None
    if committed_only and tracked is None:
        raise SystemExit(f"{root} is not in a git work tree; pass --allow-uncommitted to read its files anyway")
    for path in sorted(root.rglob("*.json")):
        if tracked is not None and path.resolve() not in tracked:
            skipped.append(f"{path}: not committed")
            continue
        try:
            records.append((path, results.load_record(path)))
        except (ValueError, OSError) as error:
            skipped.append(f"{path}: {error}")
    return records, skipped


def latest_rows(records: list[tuple[Path, dict]], suite: str, key_fields: tuple[str, ...]) -> list[dict]:
    """The rows of `suite` that carry every key field, each tagged with its record's device and source; the
    newest record wins per key."""
    best: dict[tuple, dict] = {}
    for path, record in sorted(records, key=lambda item: item[1]["date"]):
        if record["suite"] != suite:
            continue
        for row in record["rows"]:
            row = {**KEY_DEFAULTS, **row}  # rows written before a key field existed take its default
            if not all(field in row for field in key_fields):
                continue
            tagged = {**row, "device": record["device"], "device_type": record["device_type"], "source": path}
            tagged["run_config"] = record["config"]
            best[(record["device"], *(repr(row.get(field)) for field in key_fields))] = tagged
    return list(best.values())


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table cell; '—' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def group_by(rows: Iterable[dict], fields: tuple[str, ...]) -> dict[tuple, list[dict]]:
    """Rows grouped by the values of `fields`, groups in sorted order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(field) for field in fields)].append(row)
    return dict(sorted(groups.items(), key=lambda item: tuple(map(str, item[0]))))


def sources_line(rows: list[dict], base: Path) -> str:
    """An italic line naming the result files a table came from (paths relative to `base`, the page.s folder)."""
    names = sorted({os.path.relpath(row["source"], base) for row in rows})
    return "_Source: " + ", ".join(f"`{name}`" for name in names) + "_"


def memory_figure(row: dict) -> float | None:
    """The row's headline memory in bytes: GPU peak allocated on a GPU, bytes saved for backward elsewhere."""
    return row.get("peak_allocated_bytes") if row["device_type"] == "cuda" else row.get("saved_bytes")


def max_batch_cell(row: dict) -> str:
    """The largest batch that fits, as '≥ limit' when the search stopped at its limit."""
    batch = row.get("max_batch")
    if batch is None:
        return "—"
    limit = row.get("run_config", {}).get("budget_limit")
    return f"≥ {batch}" if batch == limit else str(batch)


def megabytes(value: float | None) -> str:
    """Bytes as a megabyte cell."""
    return fmt(value / MB if value is not None else None)


def method_grid(group: list[dict], cell: Callable[[dict], str]) -> str:
    """A table with one row per method (in measured order) and one column per resolution."""
    resolutions = sorted({row["resolution"] for row in group})
    body = []
    for method in dict.fromkeys(row["method"] for row in group):
        by_res = {row["resolution"]: row for row in group if row["method"] == method}
        body.append([method] + [cell(by_res[r]) if r in by_res else "—" for r in resolutions])
    return markdown_table(["method"] + [str(r) for r in resolutions], body)


def memory_section(rows: list[dict], base: Path, gpu: bool) -> str:
    """Per configuration, method × resolution tables: trainable %, memory, peak RSS (CPU), batch budget."""
    rows = [row for row in rows if (row["device_type"] == "cuda") == gpu]
    if not rows:
        return NOT_ON_GPU + "." if gpu else "No CPU memory results yet."
    parts = []
    config_fields = ("device", "model", "precision", "batch_size", "grad_checkpointing")
    for (device, model, precision, batch, checkpointing), group in group_by(rows, config_fields).items():
        title = f"**{model}**, {device}, {precision}, batch {batch}" + (
            ", activation checkpointing" if checkpointing else ""
        )
        tables = [("trainable %", method_grid(group, lambda row: fmt(row["trainable_pct"], 3)))]
        if gpu:
            tables.append(
                (
                    "GPU peak MB (one full training step)",
                    method_grid(group, lambda row: megabytes(row.get("peak_allocated_bytes"))),
                )
            )
        else:
            tables.append(("saved for backward, MB", method_grid(group, lambda row: megabytes(row["saved_bytes"]))))
            tables.append(("peak RSS, MB", method_grid(group, lambda row: megabytes(row.get("peak_rss_bytes")))))
        budgeted = [row for row in group if "max_batch" in row]
        for how, same_model in group_by(budgeted, ("budget_method",)).items():  # one table per memory model
            gb = same_model[0]["budget_bytes"] / 1e9
            caption = f"largest batch within {gb:g} GB ({how[0]})"
            tables.append((caption, method_grid(same_model, max_batch_cell)))
        body = "\n\n".join(f"{caption}:\n\n{table}" for caption, table in tables)
        parts.append(f"{title}\n\n{body}\n\n{sources_line(group, base)}")
    return "\n\n".join(parts)


def throughput_section(rows: list[dict], base: Path, gpu: bool) -> str:
    """Step time, images/s (and model FLOPs utilisation on GPU) per method and resolution."""
    rows = [row for row in rows if (row["device_type"] == "cuda") == gpu]
    if not rows:
        return NOT_ON_GPU + "." if gpu else "No CPU throughput results yet."
    parts = []
    for (device, model), group in group_by(rows, ("device", "model")).items():
        header = ["method", "res", "batch", "precision", "step ms (median)", "IQR ms", "images/s"]
        header += ["MFU %"] if gpu else []
        body = []
        methods = {method: i for i, method in enumerate(dict.fromkeys(row["method"] for row in group))}
        order = lambda r, rank=methods: (r["resolution"], r["precision"], r["batch_size"], rank[r["method"]])
        for row in sorted(group, key=order):
            line = [
                row["method"] + (" +ckpt" if row.get("grad_checkpointing") else ""),
                str(row["resolution"]),
                str(row["batch_size"]),
                row["precision"],
                fmt(row["step_seconds"]["median"] * 1e3),
                fmt(row["step_seconds"]["iqr"] * 1e3),
                fmt(row["images_per_second"], 2),
            ]
            if gpu:
                line.append(fmt(100.0 * row["mfu"] if row.get("mfu") is not None else None))
            body.append(line)
        note = ""
        if gpu:
            peaks = {row.get("peak_tflops_source") for row in group if row.get("peak_tflops_source")}
            note = "\n\nMFU against " + "; ".join(sorted(peaks)) + "." if peaks else ""
        parts.append(f"**{model}**, {device}\n\n{markdown_table(header, body)}{note}\n\n{sources_line(group, base)}")
    return "\n\n".join(parts)


def baseline_time(rows: list[dict], row: dict) -> tuple[str, float] | None:
    """The fastest SDPA backend's median time for the same device, shape, dtype and pass as `row`."""
    shape = ("device", "n", "d", "batch", "heads", "dtype", "pass")
    candidates = [
        other
        for other in rows
        if other["impl"].startswith("sdpa")
        and "time_seconds" in other
        and all(other.get(field) == row.get(field) for field in shape)
    ]
    if not candidates:
        return None
    best = min(candidates, key=lambda other: other["time_seconds"]["median"])
    return best["impl"], best["time_seconds"]["median"]


def kernel_section(rows: list[dict], base: Path, gpu: bool) -> str:
    """Kernel time, TFLOP/s, peak memory and speed relative to the fastest SDPA backend."""
    rows = [row for row in rows if (row["device_type"] == "cuda") == gpu]
    if not rows:
        return NOT_ON_GPU + "." if gpu else "No CPU kernel results yet."
    parts = []
    for (device, dtype), group in group_by(rows, ("device", "dtype")).items():
        header = ["op", "impl", "N", "D", "pass", "ms (median)", "TFLOP/s", "peak MB", "speed vs SDPA"]
        body, skipped = [], set()
        order = lambda r: (r["op"], r["pass"], r["d"], r["n"], r["impl"])
        for row in sorted(group, key=order):
            if "time_seconds" not in row:
                skipped.add(f"{row['impl']} ({row.get('skipped', 'not measured')})")
                continue
            baseline = baseline_time(group, row)
            relative = f"{baseline[1] / row['time_seconds']['median']:.2f}× ({baseline[0]})" if baseline else "—"
            peak = row.get("peak_bytes")
            body.append(
                [
                    row["op"],
                    row["impl"],
                    str(row["n"]),
                    str(row["d"]),
                    row["pass"],
                    fmt(row["time_seconds"]["median"] * 1e3, 3),
                    fmt(row.get("tflops"), 3),
                    fmt(peak / MB if peak is not None else None),
                    relative,
                ]
            )
        title = f"{device}, {dtype}" + (
            "" if gpu else " — CPU, tiny sizes, fp32: a functional check, not a speed claim"
        )
        note = f"\n\nSkipped: {'; '.join(sorted(skipped))}." if skipped else ""
        parts.append(f"{title}\n\n{markdown_table(header, body)}{note}\n\n{sources_line(group, base)}")
    return "\n\n".join(parts)


def efficiency_section(rows: list[dict], base: Path) -> str | None:
    """PPE and PME (the FPT papers' efficiency scores) for rows whose result file gives an accuracy `score`."""
    scored = [row for row in rows if row.get("score") is not None]
    if not scored:
        return None
    config = ("device", "model", "resolution", "precision", "batch_size", "grad_checkpointing")
    groups = group_by(rows, config)
    body = []
    for row in sorted(scored, key=lambda r: (r["device"], r["model"], r["resolution"], r["method"])):
        full = next((o for o in groups[tuple(row.get(f) for f in config)] if o["method"] == "full"), None)
        memory, full_memory = memory_figure(row), memory_figure(full) if full else None
        ppe = row["score"] * math.exp(-math.log10(row["trainable_pct"] / 100.0 + 1.0))
        pme = row["score"] * math.exp(-math.log10(memory / full_memory + 1.0)) if memory and full_memory else None
        body.append(
            [
                row["method"],
                row["model"],
                str(row["resolution"]),
                row["device"],
                fmt(row["score"], 2),
                fmt(row["trainable_pct"], 3),
                fmt(ppe, 2),
                fmt(pme, 2),
            ]
        )
    header = ["method", "model", "res", "device", "score", "trainable %", "PPE", "PME"]
    formula = (
        "PPE = score·exp(−log10(r/100 + 1)), r = trainable %; PME = score·exp(−log10(m/m_full + 1)), "
        "m = GPU peak memory (bytes saved for backward on CPU) relative to full fine-tuning."
    )
    return f"{markdown_table(header, body)}\n\n{formula}\n\n{sources_line(scored, base)}"


def gpu_check_section(records: list[tuple[Path, dict]], base: Path) -> str | None:
    """The newest `python -m benchmarks.gpu` run on a GPU: every goal with its measured figure, every part's status."""
    runs = [
        (path, record) for path, record in records if record["suite"] == "gpu_check" and record["device_type"] == "cuda"
    ]
    if not runs:
        return None
    path, record = max(runs, key=lambda item: item[1]["date"])
    verdicts = {True: "met", False: "missed", None: "not measured"}
    goals = [
        [row["what"], fmt(row["measured"], 3), ("≤ " if row["better"] == "lower" else "≥ ") + f"{row['target']:g}",
         verdicts[row["passes"]]]
        for row in record["rows"] if "goal" in row
    ]  # fmt: skip
    parts = [[row["part"], row["status"], fmt(row["seconds"])] for row in record["rows"] if "part" in row]
    return (
        f"{record['device']}, {record['date']}\n\n{markdown_table(['goal', 'measured', 'target', 'verdict'], goals)}"
        f"\n\n{markdown_table(['part', 'status', 'seconds'], parts)}\n\n_Source: `{os.path.relpath(path, base)}`_"
    )


MEMORY_KEY = ("model", "method", "resolution", "batch_size", "precision", "grad_checkpointing", "checkpointing")
THROUGHPUT_KEY = MEMORY_KEY
BUDGET_KEY = ("model", "method", "resolution", "checkpointing", "budget_bytes")
KEY_DEFAULTS = {"checkpointing": "none"}  # fastprompt.checkpoint_activations policy; older rows had none


def policy_labels(rows: list[dict]) -> list[dict]:
    """Rows whose method label names their activation checkpointing policy, e.g. 'ept (selective)'."""
    return [
        {**row, "method": f"{row['method']} ({row['checkpointing']})"}
        if row.get("checkpointing", "none") != "none"
        else row
        for row in rows
    ]


def tradeoff_points(memory: list[dict], throughput: list[dict]) -> list[dict]:
    """CPU memory rows joined with the throughput row of the same configuration and policy: one point per
    (method, policy) for the memory-versus-step-time plots (rows measured with more than one policy only)."""
    fields = ("device", "model", "method", "resolution", "batch_size", "precision", "grad_checkpointing")
    times = {tuple(row[f] for f in fields) + (row["checkpointing"],): row for row in throughput}
    configs = {tuple(row[f] for f in fields) for row in memory if row["checkpointing"] != "none"}
    points = []
    for row in memory:
        key = tuple(row[f] for f in fields)
        timed = times.get(key + (row["checkpointing"],))
        if key in configs and timed is not None and row.get("step_peak_bytes") is not None:
            points.append({**row, "step_seconds": timed["step_seconds"]["median"], "time_source": timed["source"]})
    return points


def budget_section(rows: list[dict], base: Path) -> str | None:
    """The memory model's largest batch per method and checkpointing policy (benchmarks.budget)."""
    if not rows:
        return None
    parts = []
    for (device, model, resolution, limit), group in group_by(
        rows, ("device", "model", "resolution", "budget_bytes")
    ).items():
        checked = [row for row in group if "check_batch" in row]
        header = ["method", "policy", "largest batch"]
        if checked:
            header += [f"batch {checked[0]['check_batch']}: GB", "fits"]
        body = []
        for row in group:
            line = [row["method"], row["checkpointing"], max_batch_cell(row)]
            if checked:
                line += (
                    [fmt(row["check_bytes"] / 1e9, 2), "yes" if row["check_fits"] else "no"]
                    if "check_batch" in row
                    else ["—", "—"]
                )
            body.append(line)
        title = f"**{model}** at {resolution}, {device}, within {limit / 1e9:g} GB ({group[0]['budget_method']})"
        parts.append(f"{title}\n\n{markdown_table(header, body)}\n\n{sources_line(group, base)}")
    return "\n\n".join(parts)


KERNEL_KEY = ("op", "impl", "n", "d", "batch", "heads", "dtype", "pass")


def render_markdown(records: list[tuple[Path, dict]], base: Path, plots: list[Path]) -> str:
    """The results block between the markers (of docs/benchmarks.md)."""
    memory = policy_labels(latest_rows(records, "memory", MEMORY_KEY))
    throughput = policy_labels(latest_rows(records, "throughput", THROUGHPUT_KEY))
    kernels = latest_rows(records, "kernels", KERNEL_KEY)
    budgets = latest_rows(records, "budget", BUDGET_KEY)
    used = {row["source"] for row in memory + throughput + kernels + budgets}
    commands = sorted({record["command"] for path, record in records if path in used})
    blocks = [
        "_Generated by `python -m benchmarks.report` from the committed JSON files under `benchmarks/results/`; "
        "do not edit by hand._",
        "### Memory (GPU)\n\n" + memory_section(memory, base, gpu=True),
        "### Memory (CPU)\n\nsaved MB: activations autograd keeps for backward in one training step (de-duplicated "
        "by storage, parameters excluded) — the device-independent figure. peak RSS: the whole process over one "
        "step (forward, backward, AdamW).\n\n" + memory_section(memory, base, gpu=False),
        "### Throughput (GPU)\n\n" + throughput_section(throughput, base, gpu=True),
        "### Throughput (CPU)\n\nWall-clock step times on the CPU named (shared with other work while measured: "
        "read the IQR before comparing methods).\n\n" + throughput_section(throughput, base, gpu=False),
        "### Kernels (GPU)\n\n" + kernel_section(kernels, base, gpu=True),
        "### Kernels (CPU)\n\n" + kernel_section(kernels, base, gpu=False),
    ]
    gpu_check = gpu_check_section(records, base)
    if gpu_check:
        blocks.append("### GPU check (`python -m benchmarks.gpu`) against the goals\n\n" + gpu_check)
    budget = budget_section(budgets, base)
    if budget:
        blocks.append("### Batch budget by activation checkpointing policy (memory model)\n\n" + budget)
    efficiency = efficiency_section(memory, base)
    if efficiency:
        blocks.append("### Efficiency (PPE / PME)\n\n" + efficiency)
    if plots:
        blocks.append("### Plots\n\n" + "\n".join(f"![{p.stem}]({os.path.relpath(p, base)})" for p in plots))
    if commands:
        blocks.append("Commands that produced these files:\n\n```\n" + "\n".join(commands) + "\n```")
    return "\n\n".join(blocks)


def replace_block(text: str, block: str) -> str:
    """`text` with everything between the result markers replaced by `block` (markers appended when missing)."""
    if text.count(START) > 1 or text.count(END) > 1:
        raise ValueError(f"README has more than one {START} / {END} marker; keep exactly one pair")
    if START not in text and END not in text:
        return text.rstrip("\n") + f"\n\n{START}\n{block}\n{END}\n"
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"README has an unpaired or reversed result marker; it needs {START} before {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def render_plots(records: list[tuple[Path, dict]], plots_dir: Path) -> list[Path]:
    """PNG plots: memory vs resolution per method, kernel time vs N; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from benchmarks import plots

    written = []
    memory = latest_rows(records, "memory", MEMORY_KEY)
    plain = [row for row in memory if row["checkpointing"] == "none"]  # the policies have their own plot
    for key, group in group_by(plain, ("device", "model", "precision", "batch_size", "grad_checkpointing")).items():
        written.append(plots.memory_plot(plt, group, key, plots_dir))
    throughput = latest_rows(records, "throughput", THROUGHPUT_KEY)
    points = tradeoff_points([row for row in memory if row["device_type"] == "cpu"], throughput)
    for key, group in group_by(points, ("device", "model", "resolution", "precision", "batch_size")).items():
        written.append(plots.tradeoff_plot(plt, group, key, plots_dir))
    kernels = [row for row in latest_rows(records, "kernels", KERNEL_KEY) if "time_seconds" in row]
    for key, group in group_by(kernels, ("device", "dtype", "d", "pass")).items():
        written.append(plots.kernel_plot(plt, group, key, plots_dir))
    return written


def render(root: Path, readme: Path, plots_dir: Path, *, committed_only: bool) -> list[str]:
    """Render plots and the README block from the result files under `root`; returns notes on skipped files."""
    records, skipped = load_results(root, committed_only=committed_only)
    written = render_plots(records, plots_dir)
    block = render_markdown(records, readme.resolve().parent, written)
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    atomic_write_bytes(readme, replace_block(text, block).encode())
    return skipped


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=results.RESULTS_DIR)
    parser.add_argument(
        "--markdown",
        "--readme",
        dest="readme",
        type=Path,
        default=results.MARKDOWN,
        help="markdown file whose results block is replaced (default: docs/benchmarks.md; the README links to it)",
    )
    parser.add_argument("--plots", type=Path, default=results.RESULTS_DIR / "plots")
    parser.add_argument("--allow-uncommitted", action="store_true", help="also read result files git does not track")
    args = parser.parse_args(argv)
    for note in render(args.results, args.readme, args.plots, committed_only=not args.allow_uncommitted):
        print(f"skipped {note}", file=sys.stderr)
    print(f"rendered {args.readme} and plots under {args.plots}")


if __name__ == "__main__":
    main()
