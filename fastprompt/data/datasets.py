"""Datasets over image folders (``root/<class>/<image>``) and CSV lists (single- or multi-label).

Both scan their source at construction and keep one ``(path, target)`` pair per sample in ``samples``.
Unreadable images are handled by ``on_error``: ``"skip"`` records them in ``skipped`` (path -> reason), warns,
and serves the next readable sample; ``"raise"`` raises :class:`CorruptImageError`. Call :meth:`verify`
before splitting a dataset to drop unreadable files up-front, so a replacement sample can never come from
outside a split (and so the count is complete: DataLoader workers each record skips in their own copy).
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fastprompt.data.images import IMAGE_EXTENSIONS, CorruptImageError, load_image

Target = int | np.ndarray
_ON_ERROR = ("skip", "raise")


class SkippedImageWarning(UserWarning):
    """An unreadable image was skipped (``on_error="skip"``)."""


class EmptyClassWarning(UserWarning):
    """A class has no images in this dataset."""


class _ImageDataset(Dataset):
    """Shared behaviour: decoding, transforms, skip-or-raise on unreadable files, verification."""

    def __init__(
        self,
        samples: list[tuple[str, Target]],
        classes: list[str],
        *,
        multilabel: bool,
        transform: Callable | None,
        on_error: str,
        source: str,
    ):
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
        self.samples = samples
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.multilabel = multilabel
        self.transform = transform
        self.on_error = on_error
        self.source = source
        self.skipped: dict[str, str] = {}

    @property
    def targets(self) -> list[int] | np.ndarray:
        """Class indices (single-label) or a float32 ``[N, C]`` multi-hot array (multi-label)."""
        if self.multilabel:
            return np.stack([target for _, target in self.samples]).astype(np.float32)
        return [int(target) for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _target(self, target: Target) -> int | torch.Tensor:
        return torch.from_numpy(target.copy()) if self.multilabel else int(target)

    def _record_skip(self, path: str, reason: str) -> None:
        if path not in self.skipped:
            self.skipped[path] = reason
            warnings.warn(
                f"skipping unreadable image {path}: {reason} ({len(self.skipped)} skipped so far in {self.source}; "
                "call dataset.verify() before splitting to drop them up-front)",
                SkippedImageWarning,
                stacklevel=3,
            )

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        for offset in range(len(self)):  # deterministic: the next readable sample in order
            path, target = self.samples[(index + offset) % len(self)]
            try:
                image = load_image(path)
            except CorruptImageError as err:
                if self.on_error == "raise":
                    raise
                self._record_skip(path, err.reason)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, self._target(target)
        raise CorruptImageError(self.source, f"none of its {len(self)} images can be decoded")

    def verify(self, *, workers: int | None = None, progress: bool = True) -> dict[str, str]:
        """Decode every image once and drop the unreadable ones (or raise with ``on_error="raise"``).

        Returns the newly dropped ``{path: reason}``; they are also added to ``skipped``. Indices change,
        so call this before making splits.
        """
        workers = workers or min(8, os.cpu_count() or 1)

        def check(path: str) -> str | None:
            try:
                load_image(path)
            except CorruptImageError as err:
                if self.on_error == "raise":
                    raise
                return err.reason
            return None

        paths = [path for path, _ in self.samples]
        with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decoders release the GIL
            reasons = list(
                tqdm(pool.map(check, paths), total=len(paths), desc="verifying images", disable=not progress)
            )
        dropped = {path: reason for path, reason in zip(paths, reasons) if reason is not None}
        if dropped:
            self.samples = [sample for sample, reason in zip(self.samples, reasons) if reason is None]
            self.skipped.update(dropped)
            warnings.warn(
                f"{len(dropped)} unreadable image(s) in {self.source} dropped, e.g. {next(iter(dropped))}: "
                f"{next(iter(dropped.values()))}",
                SkippedImageWarning,
                stacklevel=2,
            )
        if not self.samples:
            raise ValueError(f"no readable images left in {self.source}; every file failed to decode")
        return dropped


def _is_image(path: Path, folder: Path, extensions: Sequence[str]) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)  # .DS_Store, .ipynb_checkpoints/
    return not hidden and path.suffix.lower() in extensions and path.is_file()


class ImageFolderDataset(_ImageDataset):
    """Single-label images in ``root/<class_name>/**/*.png|jpg|jpeg|bmp|tif|tiff|dcm``.

    Classes are the sorted sub-folder names, or ``classes`` (fixed order, e.g. the training set's for a
    validation folder). Empty class folders are warned about; inferred empty classes are dropped.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        *,
        on_error: str = "skip",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(
                f"image folder {root} does not exist or is not a directory; pass the folder that "
                "holds one sub-folder per class"
            )
        extensions = tuple(ext.lower() for ext in extensions)
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            if not folders:
                raise ValueError(f"{root} has no class sub-folders; arrange the images as {root}/<class_name>/<image>")
            wanted = folders
        else:
            wanted = [str(name) for name in classes]
            if len(set(wanted)) != len(wanted):
                raise ValueError(f"classes contain duplicates: {wanted}")
        files = {name: self._scan(root / name, extensions) for name in wanted}
        empty = [name for name in wanted if not files[name]]
        if empty:
            kept = "kept in the class list" if classes is not None else "ignored"
            warnings.warn(f"empty class folder(s) in {root}: {empty} ({kept})", EmptyClassWarning, stacklevel=2)
        class_list = wanted if classes is not None else [name for name in wanted if files[name]]
        if len(class_list) < 2:
            raise ValueError(
                f"{root} has {len(class_list)} class(es) with images ({class_list}); classification needs at "
                f"least two — add a sub-folder of images per class (supported: {', '.join(extensions)})"
            )
        samples = [(str(path), index) for index, name in enumerate(class_list) for path in files[name]]
        if not samples:
            raise ValueError(f"no images ({', '.join(extensions)}) found under {root}/<class>/")
        super().__init__(
            samples, class_list, multilabel=False, transform=transform, on_error=on_error, source=str(root)
        )
        self.root = root

    @staticmethod
    def _scan(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.rglob("*") if _is_image(p, folder, extensions))


def _parse_binary(value: str, line: int, column: str, csv_path: Path) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number not in (0.0, 1.0):
        raise ValueError(
            f"{csv_path} line {line}: column {column!r} holds {value!r}; multi-label columns must be 0 or 1"
        )
    return number


class CsvDataset(_ImageDataset):
    """Images listed in a CSV file with a header row.

    ``path,label`` (label = class name or class index) gives a single-label dataset; ``path,<c1>,<c2>,...``
    with 0/1 columns gives a multi-label dataset with float multi-hot targets. Paths are relative to ``root``
    (default: the CSV's folder). Missing files are skipped with a warning (``on_error="skip"``) or raise.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        *,
        on_error: str = "skip",
    ):
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise ValueError(f"CSV file {csv_path} does not exist; pass the path of a `path,label` CSV list")
        root = Path(root) if root is not None else csv_path.parent
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            rows = [(line, [cell.strip() for cell in row]) for line, row in enumerate(csv.reader(handle), 1)]
        rows = [(line, row) for line, row in rows if any(row)]
        if len(rows) < 2:
            raise ValueError(f"{csv_path} needs a header row and at least one sample row")
        (_, header), body = rows[0], rows[1:]
        if len(header) < 2:
            raise ValueError(f"{csv_path}: header {header} needs a path column and a label column (or class columns)")
        if (root / header[0]).is_file():
            raise ValueError(f"{csv_path}: the first row names an existing file; add a header row such as `path,label`")
        for line, row in body:
            if len(row) != len(header):
                raise ValueError(f"{csv_path} line {line}: {len(row)} columns, the header has {len(header)}")
        multilabel = len(header) > 2
        if multilabel:
            class_list = self._multilabel_classes(header[1:], classes, csv_path)
            order = [header[1:].index(name) for name in class_list]
            labelled = [
                (line, row[0], np.array([_parse_binary(row[1 + i], line, header[1 + i], csv_path) for i in order]))
                for line, row in body
            ]
        else:
            class_list, labelled = self._single_label(body, classes, csv_path)
        samples: list[tuple[str, Target]] = []
        missing: dict[str, str] = {}
        for line, rel, target in labelled:
            path = root / rel
            if path.is_file():
                samples.append((str(path), target.astype(np.float32) if multilabel else target))
            elif on_error == "raise":
                raise ValueError(f"{csv_path} line {line}: image {path} does not exist; fix the path or pass root=")
            else:
                missing[str(path)] = f"listed on line {line} of {csv_path} but not found"
        super().__init__(
            samples, class_list, multilabel=multilabel, transform=transform, on_error=on_error, source=str(csv_path)
        )
        self.root = root
        if missing:
            self.skipped.update(missing)
            warnings.warn(
                f"{len(missing)} image(s) listed in {csv_path} do not exist and were skipped, "
                f"e.g. {next(iter(missing))}",
                SkippedImageWarning,
                stacklevel=2,
            )
        if not samples:
            raise ValueError(f"none of the images listed in {csv_path} exist under {root}; pass the right root=")
        present = (
            np.asarray(self.targets).sum(0) if multilabel else np.bincount(self.targets, minlength=len(class_list))
        )
        empty = [name for name, count in zip(class_list, present) if count == 0]
        if empty:
            warnings.warn(f"{csv_path}: class(es) {empty} have no positive samples", EmptyClassWarning, stacklevel=2)

    @staticmethod
    def _multilabel_classes(columns: list[str], classes: Sequence[str] | None, csv_path: Path) -> list[str]:
        if len(set(columns)) != len(columns):
            raise ValueError(f"{csv_path}: duplicate class columns in the header {columns}")
        if classes is None:
            return list(columns)
        unknown = [name for name in classes if name not in columns]
        if unknown:
            raise ValueError(f"{csv_path}: classes {unknown} have no column; the header has {columns}")
        return [str(name) for name in classes]

    @staticmethod
    def _single_label(
        body: list[tuple[int, list[str]]], classes: Sequence[str] | None, csv_path: Path
    ) -> tuple[list[str], list[tuple[int, str, int]]]:
        labels = [row[1] for _, row in body]
        as_index = all(label.lstrip("-").isdigit() for label in labels)
        if classes is None:
            if as_index:
                top = max(int(label) for label in labels)
                class_list = [str(i) for i in range(max(top, 0) + 1)]
            else:
                class_list = sorted(set(labels))
        else:
            class_list = [str(name) for name in classes]
        if len(class_list) < 2:
            raise ValueError(
                f"{csv_path} has {len(class_list)} class(es) {class_list}; classification needs at least two"
            )
        lookup = {name: i for i, name in enumerate(class_list)}
        labelled = []
        for line, row in body:
            label = row[1]
            if label in lookup:
                index = lookup[label]
            elif as_index and 0 <= int(label) < len(class_list):
                index = int(label)
            else:
                raise ValueError(
                    f"{csv_path} line {line}: label {label!r} of {row[0]!r} is not in the class list {class_list} "
                    f"(or an index below {len(class_list)}); fix the row or pass classes="
                )
            labelled.append((line, row[0], index))
        return class_list, labelled
