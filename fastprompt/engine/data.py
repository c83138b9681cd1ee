"""Engine data plumbing: the batch convention, the loss, and deterministic, shardable, resumable sampling.

Batch convention: a batch is ``(inputs, targets)`` (tuple or list) or a dict with ``"image"`` and ``"target"``.
``inputs`` is a tensor (``model(inputs)``), a tuple/list of tensors (``model(*inputs)``, e.g. the FPT wrapper's
``(images, side_images)``) or a dict (``model(**inputs)``). ``targets`` are class indices (integer tensor [B]) or
multi-hot floats [B, C]. ``predict`` also accepts batches without targets (a bare ``inputs``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def split_batch(batch: Any, *, need_targets: bool = True) -> tuple[Any, torch.Tensor | None]:
    """Split a batch into (inputs, targets) following the convention in this module's docstring."""
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(f"dict batches need an 'image' key (and 'target' for training); got keys {sorted(batch)}")
        if need_targets and "target" not in batch:
            raise ValueError(f"dict batches need a 'target' key for training/evaluation; got keys {sorted(batch)}")
        return batch["image"], batch.get("target")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if not need_targets:
        return batch, None
    raise ValueError(
        "a batch must be (inputs, targets) or {'image': ..., 'target': ...}; "
        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every tensor inside nested tuples/lists/dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(item, fn) for item in value)
    return value


def call_model(model: Callable, inputs: Any) -> torch.Tensor:
    """Call `model` on inputs: tensor -> model(x), tuple/list -> model(*x), dict -> model(**x)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_size_of(inputs: Any) -> int:
    """Number of samples in `inputs` (the leading dimension of its first tensor)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    values = inputs.values() if isinstance(inputs, dict) else inputs
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError("batch inputs hold no tensor")


def is_multilabel(targets: torch.Tensor) -> bool:
    """Multi-hot targets are floating point and 2-D; class indices are integers."""
    return targets.is_floating_point() and targets.dim() == 2


def auto_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy for integer class targets, BCE-with-logits for float multi-hot targets [B, C].

    `weight`: one cross-entropy weight per class (single-label only), e.g. from `balanced_class_weights`.
    """
    logits = logits.float()
    if is_multilabel(targets):
        if weight is not None:
            raise ValueError(
                "class_weights apply to single-label targets; for multi-label data pass a custom loss "
                "(e.g. torch.nn.BCEWithLogitsLoss(pos_weight=...))"
            )
        if targets.shape != logits.shape:
            raise ValueError(f"multi-hot targets {tuple(targets.shape)} must match the logits {tuple(logits.shape)}")
        return F.binary_cross_entropy_with_logits(logits, targets.float())
    if targets.is_floating_point():
        raise ValueError(
            f"float targets of shape {tuple(targets.shape)}: pass class indices as an integer tensor [B], "
            "or multi-hot labels as a float tensor [B, num_classes]"
        )
    if weight is not None and weight.numel() != logits.shape[-1]:
        raise ValueError(
            f"class_weights has {weight.numel()} values but the model has {logits.shape[-1]} classes; "
            "give one weight per class, in class order"
        )
    check_labels(targets, logits.shape[-1])
    return F.cross_entropy(logits, targets.long(), weight=None if weight is None else weight.to(logits.device))


def dataset_targets(dataset: Any) -> np.ndarray | None:
    """The class indices of every sample of `dataset` without loading an image, or None when it does not say.

    Read from a ``targets`` attribute (fastprompt's and torchvision's folder datasets), through subsets that hold
    ``dataset`` and ``indices`` (torch's Subset, the CLI's TransformedSubset).
    """
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets)
    inner, indices = getattr(dataset, "dataset", None), getattr(dataset, "indices", None)
    if inner is not None and indices is not None:
        found = dataset_targets(inner)
        return None if found is None else found[np.asarray(list(indices), dtype=np.int64)]
    return None


def class_counts(targets: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Samples per class of single-label `targets` (class indices)."""
    targets = np.asarray(targets)
    if targets.ndim != 1:
        raise ValueError(
            "class weights and the balanced sampler need single-label targets (class indices), got multi-hot "
            f"targets of shape {targets.shape}"
        )
    return np.bincount(targets.astype(np.int64), minlength=num_classes or 0)


def balanced_class_weights(targets: np.ndarray, class_names: Sequence[str] | None = None) -> list[float]:
    """Inverse-frequency class weights ``N / (C * n_c)`` (1 for every class when balanced); a class without
    samples is an error naming it."""
    counts = class_counts(targets, len(class_names) if class_names is not None else None)
    empty = [int(c) for c in np.flatnonzero(counts == 0)]
    if empty:
        names = [class_names[c] for c in empty] if class_names is not None else empty
        raise ValueError(f"class(es) {names} have no training samples; automatic class weights need every class")
    return [float(len(targets) / (len(counts) * n)) for n in counts]


IGNORE_INDEX = -100  # cross-entropy's label for "no label": such samples add nothing to the loss


def check_labels(targets: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError naming the first class index outside ``[0, num_classes)`` (``IGNORE_INDEX`` allowed)."""
    targets = targets.reshape(-1)
    bad = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= num_classes)
    if bool(bad.any()):
        label = int(targets[bad][0])
        raise ValueError(
            f"label {label} is outside the model's {num_classes} classes (valid: 0..{num_classes - 1}, or "
            f"{IGNORE_INDEX} to ignore a sample); fix the dataset's labels or set num_classes to the class count"
        )


class EpochSampler(Sampler[int]):
    """Rank `rank`'s share of a permutation that is a function of (seed, epoch) only; can start mid-epoch.

    Like DistributedSampler (pads by repeating to a multiple of `world_size`, deals indices round-robin), so a
    global batch of `world_size * b` on N ranks is the same set of samples as a batch of `world_size * b` on 1 rank.

    With `weights` (one per sample), each epoch draws `length` samples with replacement in proportion to them
    (``torch.multinomial``), still a function of (seed, epoch): a balanced sampler that resumes exactly.
    """

    def __init__(
        self,
        length: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order, skipping the first `start` samples of this rank's share."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return math.ceil(self.length / self.world_size) - self.start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.length, replacement=True, generator=generator).tolist()
        elif self.shuffle:
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = math.ceil(self.length / self.world_size) * self.world_size
        order += order[: total - len(order)]
        return iter(order[self.rank : total : self.world_size][self.start :])


def rebuild_loader(
    loader: DataLoader, *, seed: int, rank: int, world_size: int, sample_weights: Sequence[float] | None = None
) -> tuple[DataLoader, EpochSampler | DistributedSampler | None]:
    """A copy of `loader` whose order is a function of (seed, epoch), sharded over ranks.

    Random/sequential samplers are replaced by an EpochSampler; a user DistributedSampler is kept (its order is
    already a function of its seed and the epoch). Any other sampler is kept as is in a single process, and is an
    error under several ranks (pass a DistributedSampler instead). `sample_weights` (one per sample) make the
    EpochSampler draw with replacement in proportion to them (the balanced sampler).
    """
    sampler = loader.sampler
    if sample_weights is not None and (
        not isinstance(sampler, (RandomSampler, SequentialSampler)) or loader.batch_size is None
    ):
        raise ValueError(
            f"balanced_sampler=True replaces the loader's sampler, but it has a custom {type(sampler).__name__}/"
            "batch_sampler; build the train loader with batch_size=... and shuffle=True"
        )
    if isinstance(sampler, DistributedSampler):
        return loader, sampler
    if not isinstance(sampler, (RandomSampler, SequentialSampler)) or loader.batch_size is None:
        if world_size > 1:
            raise ValueError(
                f"train_loader uses a custom {type(sampler).__name__}/batch_sampler that fastprompt cannot shard over "
                f"{world_size} ranks; build the loader with a torch.utils.data.DistributedSampler"
            )
        return loader, None
    epoch_sampler = EpochSampler(
        len(loader.dataset),
        shuffle=isinstance(sampler, RandomSampler),
        seed=seed,
        rank=rank,
        world_size=world_size,
        weights=sample_weights,
    )
    workers = {}
    if loader.num_workers > 0:
        workers = {
            "prefetch_factor": loader.prefetch_factor,
            "persistent_workers": loader.persistent_workers,
            "multiprocessing_context": loader.multiprocessing_context,
        }
    rebuilt = DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=epoch_sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        **workers,
    )
    return rebuilt, epoch_sampler


def batches_per_epoch(loader: DataLoader, sampler: EpochSampler | DistributedSampler | None) -> int:
    """Number of batches one rank sees in a full epoch."""
    if isinstance(sampler, EpochSampler):
        per_rank = math.ceil(sampler.length / sampler.world_size)
        size = loader.batch_size
        return per_rank // size if loader.drop_last else math.ceil(per_rank / size)
    return len(loader)
