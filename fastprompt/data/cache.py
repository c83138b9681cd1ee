"""FPT feature cache: each image's selected frozen-branch keys and values, stored once, verified on every read.

An entry is keyed by the SHA-256 of the image content (the file's bytes, or the input tensor's dtype, shape and
bytes) together with everything the features depend on: the backbone's name and weight digest, the input
resolution, the extracted layers, the token ratio and importance mode, the stored dtype and a preprocessing tag.
Same-named files never collide and a changed setting never reuses stale features. Each entry is a safetensors
file written atomically, with its key and a checksum of its tensors in the metadata; a corrupt or truncated entry
is reported with a warning, removed and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from fastprompt.io import atomic_write_bytes, safetensors_metadata, sha256_file

CACHE_FORMAT = "1"
FEATURE_NAMES = ("keys", "values")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

Features = dict[str, torch.Tensor]


class FeatureModel(Protocol):
    """What the cache needs from a model: FPT's frozen-branch interface."""

    def extract_features(self, images: torch.Tensor) -> Features: ...

    def feature_signature(self) -> dict[str, Any]: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _checksum(tensors: Features) -> str:
    """SHA-256 over the named tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(f"{name}:{tensor_digest(tensors[name])};".encode())
    return digest.hexdigest()


class FeatureCache:
    """A directory of verified safetensors entries, one per image (see the module docstring for the key)."""

    def __init__(self, directory: str | os.PathLike, *, dtype: torch.dtype = torch.float16) -> None:
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of torch.float16, torch.bfloat16, torch.float32, got {dtype}")
        self.directory = Path(directory)
        self.dtype = dtype

    def signature(self, model: FeatureModel) -> dict[str, Any]:
        """The model's feature signature plus this cache's storage dtype and format."""
        dtype_name = next(name for name, value in DTYPES.items() if value == self.dtype)
        return {**model.feature_signature(), "dtype": dtype_name, "cache_format": CACHE_FORMAT}

    def key(
        self,
        model: FeatureModel,
        *,
        image: torch.Tensor | None = None,
        path: str | os.PathLike | None = None,
        preprocess: str = "",
    ) -> str:
        """Entry key for one image given as its frozen-branch input tensor `[C, H, W]` or as its file.

        For a file, `preprocess` names the transform that turns it into the frozen-branch input (resize,
        normalisation); the backbone's input resolution is part of the model signature either way.
        """
        if (image is None) == (path is None):
            raise ValueError("pass exactly one of image= (the frozen-branch input tensor) or path= (the image file)")
        if not isinstance(preprocess, str):
            raise TypeError(f"preprocess must be a string naming the transform, got {type(preprocess).__name__}")
        if image is not None:
            content = {"tensor": tensor_digest(image)}
        else:
            content = {"file": sha256_file(path)}
        payload = {"content": content, "preprocess": preprocess, "signature": self.signature(model)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        """Where the entry for `key` lives."""
        return self.directory / key[:2] / f"{key}.safetensors"

    def save(self, key: str, features: Features) -> int:
        """Store one image's features (`keys`, `values`, each `[L, H, k, Dh]`) atomically; return the file size."""
        tensors = {name: features[name].detach().to("cpu", self.dtype).contiguous() for name in FEATURE_NAMES}
        metadata = {"key": key, "sha256": _checksum(tensors), "format": CACHE_FORMAT}
        data = save_safetensors(tensors, metadata=metadata)
        try:
            atomic_write_bytes(self.path(key), data)
        except OSError as err:
            raise OSError(
                err.errno,
                f"{err.strerror}: could not write feature cache entry {self.path(key)}; every entry already written "
                "is intact. Free disk space (or choose another cache directory) and run preload again: it resumes",
            ) from err
        return len(data)

    def load(self, key: str, shape: Sequence[int] | None = None) -> Features | None:
        """The verified features for `key`, or None if absent; a bad entry is warned about (named) and removed.

        Bad: unreadable, for another key or format, failing its checksum, holding NaN/inf, or (given `shape`, from
        `feature_shape(model)`) of another shape than the cache's model produces.
        """
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            tensors = load_safetensors(data)
            metadata = safetensors_metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as error:
            return self._discard(path, f"unreadable ({error})")
        if metadata.get("key") != key or metadata.get("format") != CACHE_FORMAT:
            return self._discard(path, "written for another key or format")
        if set(tensors) != set(FEATURE_NAMES) or _checksum(tensors) != metadata.get("sha256"):
            return self._discard(path, "checksum mismatch")
        for name in FEATURE_NAMES:
            if shape is not None and tuple(tensors[name].shape) != tuple(shape):
                found = list(tensors[name].shape)
                return self._discard(path, f"{name} is {found}, the model's features are {list(shape)}")
            if not torch.isfinite(tensors[name]).all():
                return self._discard(path, f"{name} holds NaN or inf values")
        return tensors

    def _discard(self, path: Path, reason: str) -> None:
        message = f"feature cache entry {path} is corrupt ({reason}); removing it to recompute"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        path.unlink(missing_ok=True)
        return None

    def get_or_compute(self, key: str, compute: Callable[[], Features], shape: Sequence[int] | None = None) -> Features:
        """The cached features for `key`, computing and storing them (as `[L, H, k, Dh]`) when missing or bad."""
        features = self.load(key, shape)
        if features is None:
            self.save(key, compute())
            features = self.load(key, shape)
            if features is None:
                raise RuntimeError(f"feature cache entry {self.path(key)} did not verify right after writing it")
        return features

    def entries(self) -> list[Path]:
        """Every entry file in the cache directory."""
        return sorted(self.directory.glob("*/*.safetensors"))

    def bytes_per_image(self) -> float:
        """Mean size of an entry on disk, in bytes (0 for an empty cache)."""
        sizes = [entry.stat().st_size for entry in self.entries()]
        return sum(sizes) / len(sizes) if sizes else 0.0


def feature_shape(model: Any) -> tuple[int, int, int, int] | None:
    """`[L, H, k, Dh]` of one image's cached keys/values for an FPT model; None for a model that does not say."""
    try:
        heads = int(model.tap.num_heads)
        return (len(model.layers), heads, int(model.num_selected_tokens()), int(model.tap.embed_dim) // heads)
    except (AttributeError, TypeError):
        return None


def _image_of(item: Any) -> torch.Tensor:
    """The frozen-branch image of a dataset item: the item itself, its first element, or item['image']."""
    if isinstance(item, dict):
        item = item.get("image")
    elif isinstance(item, (tuple, list)) and item:
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise TypeError(
            "preload needs dataset items that are an image tensor, a tuple/list starting with one, or a dict with "
            f"an 'image' tensor; got {type(item).__name__}"
        )
    return item


@dataclass
class PreloadReport:
    """What `preload` did: the entry key of every item (in order) and how many it computed or found valid."""

    keys: list[str] = field(default_factory=list)
    computed: int = 0
    skipped: int = 0
    bytes_per_image: float = 0.0


def _rows(data: Any, model: FeatureModel, cache: FeatureCache, paths: Sequence | None, preprocess: str) -> Iterator:
    """(key, image loader) per item, from an indexable dataset or an iterable of batches."""
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, torch.utils.data.DataLoader):
        if paths is not None and len(paths) != len(data):
            raise ValueError(f"paths has {len(paths)} entries but the dataset has {len(data)} items")
        for index in range(len(data)):
            if paths is not None:
                yield cache.key(model, path=paths[index], preprocess=preprocess), lambda i=index: _image_of(data[i])
            else:
                image = _image_of(data[index])
                yield cache.key(model, image=image, preprocess=preprocess), lambda image=image: image
        return
    if paths is not None:
        raise ValueError("paths= needs an indexable dataset; pass the dataset itself rather than a loader")
    for batch in data:
        for image in _image_of(batch):
            yield cache.key(model, image=image, preprocess=preprocess), lambda image=image: image


def _total(data: Any) -> int | None:
    if isinstance(data, torch.utils.data.DataLoader):
        return len(data.dataset) if hasattr(data.dataset, "__len__") else None
    return len(data) if hasattr(data, "__len__") else None


def preload(
    model: FeatureModel,
    data: Iterable,
    cache: FeatureCache,
    *,
    batch_size: int = 8,
    paths: Sequence[str | os.PathLike] | None = None,
    preprocess: str = "",
    progress: bool = True,
) -> PreloadReport:
    """Fill `cache` with the frozen-branch features of every image in `data`, resuming an interrupted run.

    `data` is a dataset whose items are (or start with) the frozen-branch input `[C, H, W]`, or a loader of such
    batches. Valid entries are skipped; missing or corrupt ones are computed `batch_size` images at a time and each
    written atomically as soon as it exists. With `paths` (one file per dataset item) entries are keyed by file
    content and images are loaded only for the entries still missing.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = next(model.parameters()).device
    report = PreloadReport()
    pending: list[tuple[str, torch.Tensor]] = []
    shape = feature_shape(model)

    def flush() -> None:
        features = model.extract_features(torch.stack([image for _, image in pending]).to(device))
        for row, (key, _) in enumerate(pending):
            cache.save(key, {name: features[name][row] for name in FEATURE_NAMES})
        report.computed += len(pending)
        bar.update(len(pending))  # the bar counts images done: a queued image counts once its features are written
        pending.clear()

    bar = tqdm(total=_total(data), desc="preload", unit="img", disable=not progress)
    with bar:
        for key, load_image in _rows(data, model, cache, paths, preprocess):
            report.keys.append(key)
            if cache.load(key, shape) is not None:
                report.skipped += 1
                bar.update(1)
            else:
                pending.append((key, load_image()))
                if len(pending) == batch_size:
                    flush()
            bar.set_postfix(computed=report.computed, skipped=report.skipped)
        if pending:
            flush()
    report.bytes_per_image = cache.bytes_per_image()
    if progress:
        tqdm.write(
            f"preload: {report.computed} computed, {report.skipped} already cached, "
            f"{report.bytes_per_image:,.0f} bytes per image in {cache.directory}"
        )
    return report


class FeatureDataset(torch.utils.data.Dataset):
    """Training items `(features, *dataset[i])`, e.g. `(features, side_image, label)`, features from the cache.

    `keys` are the entry keys in dataset order (`preload(...).keys`). A missing or corrupt entry is recomputed
    when `model` and `source` (the dataset of frozen-branch inputs) are given, and is an error otherwise.
    """

    def __init__(
        self,
        cache: FeatureCache,
        keys: Sequence[str],
        dataset: Sequence,
        *,
        model: FeatureModel | None = None,
        source: Sequence | None = None,
    ) -> None:
        if len(keys) != len(dataset):
            raise ValueError(f"got {len(keys)} cache keys for a dataset of {len(dataset)} items; they must match")
        if (model is None) != (source is None):
            raise ValueError("pass both model= and source= (to recompute missing entries) or neither")
        self.cache, self.keys, self.dataset, self.model, self.source = cache, list(keys), dataset, model, source

    def __len__(self) -> int:
        return len(self.keys)

    def _recompute(self, index: int) -> Features:
        if self.model is None:
            raise RuntimeError(
                f"no valid cached features for item {index} ({self.cache.path(self.keys[index])}); run "
                "fastprompt.data.preload(model, dataset, cache) first, or pass model= and source= to recompute"
            )
        device = next(self.model.parameters()).device
        features = self.model.extract_features(_image_of(self.source[index])[None].to(device))
        return {name: features[name][0] for name in FEATURE_NAMES}

    def __getitem__(self, index: int) -> tuple:
        shape = feature_shape(self.model) if self.model is not None else None
        features = self.cache.get_or_compute(self.keys[index], lambda: self._recompute(index), shape)
        item = self.dataset[index]
        return (features, *item) if isinstance(item, (tuple, list)) else (features, item)


def hf_feature_transform(
    cache: FeatureCache,
    transform: Callable[[dict[str, list]], dict[str, Any]] | None = None,
    *,
    key_column: str = "cache_key",
) -> Callable[[dict[str, list]], dict[str, Any]]:
    """A batch transform for a Hugging Face `datasets.Dataset` (`set_transform` / `with_transform`) that feeds FPT
    from the feature cache.

    Each row names its entry in `key_column` (`preload(...).keys`, in dataset order). The transform replaces that
    column by `keys` and `values` (the cached tensors, in their stored dtype), then applies `transform` to the rest
    of the batch (e.g. decode and augment the side image into `pixel_values`). FPT's forward takes exactly these
    columns: train with `TrainingArguments(remove_unused_columns=False)`, as for any `set_transform` dataset.
    """
    if not isinstance(cache, FeatureCache):
        raise TypeError(f"cache must be a fastprompt FeatureCache, got {type(cache).__name__}")

    def apply(batch: dict[str, list]) -> dict[str, Any]:
        if key_column not in batch:
            raise KeyError(
                f"the dataset has no {key_column!r} column (columns: {', '.join(batch)}); add the entry keys of "
                "preload(...).keys as that column, or pass key_column="
            )
        rows = dict(batch)
        found = []
        for key in rows.pop(key_column):
            features = cache.load(key)
            if features is None:
                raise RuntimeError(
                    f"no valid cached features for entry {key} ({cache.path(key)}); run "
                    "fastprompt.data.preload(model, dataset, cache) for these images first"
                )
            found.append(features)
        if transform is not None:
            rows = dict(transform(rows))
        for name in FEATURE_NAMES:
            rows[name] = [features[name] for features in found]
        return rows

    return apply
