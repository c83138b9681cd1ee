"""The shared timing harness: warm-up, repetitions, median and inter-quartile range, device-synchronised."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in seconds."""

    median: float
    q1: float
    q3: float
    iqr: float
    mean: float
    minimum: float
    maximum: float
    repeats: int

    def as_dict(self) -> dict[str, Any]:
        """The statistics as a JSON-ready dict."""
        return asdict(self)


def summarize(samples: list[float]) -> Stats:
    """Median, quartiles (inclusive method), IQR, mean, min and max of `samples`."""
    if not samples:
        raise ValueError("summarize needs at least one timing sample")
    if len(samples) == 1:
        q1 = q3 = samples[0]
    else:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return Stats(
        median=statistics.median(samples),
        q1=q1,
        q3=q3,
        iqr=q3 - q1,
        mean=statistics.fmean(samples),
        minimum=min(samples),
        maximum=max(samples),
        repeats=len(samples),
    )


def check_counts(warmup: int, repeats: int) -> None:
    """Raise a ValueError unless warmup >= 0 and repeats >= 1."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")


def time_cpu(
    fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, timer: Callable[[], float] = time.perf_counter
) -> Stats:
    """Time `fn()` with a wall clock: `warmup` untimed calls, then `repeats` timed ones."""
    check_counts(warmup, repeats)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = timer()
        fn()
        samples.append(timer() - start)
    return summarize(samples)


def time_cuda(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20) -> Stats:
    """Time `fn()` on the current CUDA stream with CUDA events, synchronising around each repetition."""
    check_counts(warmup, repeats)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1000.0)
    return summarize(samples)


def time_fn(fn: Callable[[], Any], device: torch.device | str, *, warmup: int, repeats: int) -> Stats:
    """Time `fn()` on `device`: CUDA events on a GPU, `time.perf_counter` elsewhere."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, warmup=warmup, repeats=repeats)
    return time_cpu(fn, warmup=warmup, repeats=repeats)


def device_or_exit(name: str) -> torch.device:
    """`torch.device(name)`, or exit with a clear message when CUDA is asked for but not available."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was asked for but torch.cuda.is_available() is False")
    return device
