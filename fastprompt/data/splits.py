"""Few-shot and train/validation splits, deterministic per seed and disjoint from held-out indices."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from sklearn.model_selection import train_test_split


def _labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim not in (1, 2) or array.shape[0] == 0:
        raise ValueError(
            f"labels must be class indices [N] or multi-hot [N, C] with N >= 1, got shape {array.shape}; "
            "pass dataset.targets"
        )
    if array.ndim == 2 and not np.isin(array, (0, 1)).all():
        raise ValueError("multi-hot labels must be 0/1")
    if array.ndim == 1 and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"single-label labels must be integer class indices, got dtype {array.dtype}")
    return array


def _as_list(value: int | Iterable[int], name: str) -> list[int]:
    values = [value] if isinstance(value, (int, np.integer)) else list(value)
    if not values or not all(isinstance(v, (int, np.integer)) for v in values):
        raise ValueError(f"{name} must be an int or a non-empty list of ints, got {value!r}")
    return [int(v) for v in values]


def make_few_shot_splits(
    labels: Sequence[int] | np.ndarray,
    shots: int | Iterable[int],
    seeds: int | Iterable[int],
    *,
    exclude: Iterable[int] | None = None,
) -> dict[tuple[int, int], list[int]]:
    """Sorted sample indices of each ``(shots, seed)`` few-shot training set.

    Single-label (``labels`` [N] class indices): exactly K samples of every class present. Multi-label
    (``labels`` [N, C] 0/1): for each class, K samples positive for it, united (so a set may hold more than K
    positives of a class). Each seed draws one permutation, so the K-shot set is a subset of the (K+1)-shot set
    of the same seed. Indices in ``exclude`` (validation/test) are never drawn. Raises ValueError naming the
    class when it has fewer than K candidates.
    """
    array = _labels(labels)
    shot_list, seed_list = _as_list(shots, "shots"), _as_list(seeds, "seeds")
    if min(shot_list) < 1:
        raise ValueError(f"shots must be >= 1, got {shot_list}")
    held_out = np.zeros(len(array), dtype=bool)
    if exclude is not None:
        excluded = np.fromiter(exclude, dtype=np.int64)
        if excluded.size and (excluded.min() < 0 or excluded.max() >= len(array)):
            raise ValueError(f"exclude holds indices outside [0, {len(array)})")
        held_out[excluded] = True
    membership = array.astype(bool) if array.ndim == 2 else array[:, None] == np.unique(array)[None, :]
    classes = list(range(array.shape[1])) if array.ndim == 2 else [int(c) for c in np.unique(array)]
    available = membership & ~held_out[:, None]
    counts = available.sum(0)
    short = [(c, int(n)) for c, n in zip(classes, counts) if n < max(shot_list)]
    if short:
        c, n = short[0]
        raise ValueError(
            f"class {c} has {n} sample(s) outside the excluded set but {max(shot_list)}-shot needs "
            f"{max(shot_list)} per class ({len(short)} class(es) short: {short}); lower shots or add data"
        )
    splits: dict[tuple[int, int], list[int]] = {}
    for seed in seed_list:
        order = np.random.default_rng(seed).permutation(len(array))
        ranked = available[order]  # candidates of each class, in this seed's random order
        for k in shot_list:
            chosen = set()
            for column in range(ranked.shape[1]):
                chosen.update(order[np.flatnonzero(ranked[:, column])[:k]].tolist())
            splits[(k, seed)] = sorted(chosen)
    return splits


def train_val_split(
    labels: Sequence[int] | np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Sorted (train, val) indices; stratified by class for single-label labels, random for multi-label."""
    array = _labels(labels)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    stratify = array if array.ndim == 1 else None
    if stratify is not None:
        values, counts = np.unique(array, return_counts=True)
        if counts.min() < 2:
            raise ValueError(
                f"class {int(values[counts.argmin()])} has a single sample and cannot appear in both train and "
                "validation; add samples or pass a separate validation set"
            )
    try:
        train, val = train_test_split(
            np.arange(len(array)), test_size=val_fraction, random_state=seed, shuffle=True, stratify=stratify
        )
    except ValueError as err:
        raise ValueError(
            f"cannot split {len(array)} samples with val_fraction={val_fraction}: {err}; change val_fraction "
            "or pass a separate validation set"
        ) from err
    return sorted(train.tolist()), sorted(val.tolist())
