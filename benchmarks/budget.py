"""Memory budgets: parse '24GB'-style sizes and search for the largest batch that fits."""

from __future__ import annotations

import re
from collections.abc import Callable

UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_bytes(text: str) -> int:
    """Parse a size such as '24GB', '80 GiB', '512MB' or '1000' (bytes) into a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in UNITS:
        raise ValueError(f"cannot read memory size {text!r}; write a number and a unit, e.g. 24GB, 80GiB or 512MB")
    value = int(float(match.group(1)) * UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return value


def largest_fitting(fits: Callable[[int], bool], *, limit: int = 1 << 16) -> tuple[int, int]:
    """The largest batch size b <= `limit` with `fits(b)`, assuming `fits` is monotone (true up to a threshold).

    Doubles from 1 until a size fails, then bisects between the last success and the first failure.
    Returns (batch, number of `fits` calls); batch is 0 when even a batch of 1 does not fit.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    calls = 0

    def probe(batch: int) -> bool:
        nonlocal calls
        calls += 1
        return fits(batch)

    if not probe(1):
        return 0, calls
    good, bad = 1, None
    while bad is None:
        candidate = min(good * 2, limit)
        if candidate == good:
            return good, calls
        if probe(candidate):
            good = candidate
        else:
            bad = candidate
    while bad - good > 1:
        middle = (good + bad) // 2
        if probe(middle):
            good = middle
        else:
            bad = middle
    return good, calls
