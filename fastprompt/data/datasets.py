"""Datasets over image folders (``root/<class>/<image>``) and CSV lists (single- or multi-label).

Both scan their source at construction and keep one ``(path, target)`` pair per sample in ``samples``.
Unreadable images are handled by ``on_error``: ``"skip"`` records them in ``skipped`` (path -> reason), warns,
and serves the next readable sample; ``"raise"`` raises :class:`CorruptImageError`. Call :meth:`verify`
before splitting a dataset to drop unreadable files up-front, so a replacement sample can never come from
outside a split (and so the count is complete: DataLoader workers each record skips in their own copy);
:func:`write_unreadable` writes the full list (``unreadable.csv`` in a run folder).

Given ``classes`` (the trained class list), both map classes by name. Images of classes not in that list are
refused with :class:`ClassMismatchError` naming them (and the list's classes without images), or with
``unknown_classes="skip"`` left out with one :class:`UnknownClassWarning` naming them. A folder whose
sub-folders are dataset splits (``train/``, ``val/``, ``test/``) is refused with :class:`SplitLayoutError`
instead of becoming a "train vs val" classifier; :func:`split_folders` finds such splits.
"""

from __future__ import annotations

import csv
import difflib
import io
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fastprompt.data.images import IMAGE_EXTENSIONS, CorruptImageError, load_image
from fastprompt.io import atomic_write_bytes

Target = int | np.ndarray
_ON_ERROR = ("skip", "raise")
_UNKNOWN_CLASSES = ("error", "skip")
SPLIT_NAMES = {  # canonical split -> folder names (compared case-insensitively) of the usual public layouts
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing"),
}


class SkippedImageWarning(UserWarning):
    """An unreadable image was skipped (``on_error="skip"``)."""


class EmptyClassWarning(UserWarning):
    """A class of the class list has no images in this dataset (no folder, an empty folder, no CSV rows)."""


class UnknownClassWarning(UserWarning):
    """Images of classes outside the given class list were left out (``unknown_classes="skip"``)."""


class ClassMismatchError(ValueError):
    """The data holds classes outside the given class list (e.g. an evaluation set with classes never trained on).

    ``extra`` maps each such class to its image count; ``missing`` lists the class-list entries without images.
    """

    def __init__(self, message: str, *, extra: dict[str, int], missing: list[str], source: str) -> None:
        super().__init__(message)
        self.extra, self.missing, self.source = extra, missing, source


class SplitLayoutError(ValueError):
    """A dataset root holding split folders (train/, val/, test/) was given where one split was expected.

    ``splits`` maps "train" / "val" / "test" to the folders found.
    """

    def __init__(self, message: str, *, splits: dict[str, Path]) -> None:
        super().__init__(message)
        self.splits = splits


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _close_match(name: str, candidates: Sequence[str]) -> str | None:
    """A class-list entry `name` was probably meant as (same name in another case, or a close spelling)."""
    for candidate in candidates:
        if candidate.casefold() == name.casefold():
            return candidate
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.8)
    return close[0] if close else None


def _extra_classes_message(
    extra: Mapping[str, str], missing: Sequence[str], source: str, classes: Sequence[str]
) -> str:
    """`extra`: class -> a phrase naming it (and where, how many). Names every extra class and every class without
    images, with a guess at the intended class (other case, close spelling)."""
    parts = []
    for name, phrase in extra.items():
        guess = _close_match(name, missing)
        parts.append(f"{phrase}{f' (did you mean {guess!r}?)' if guess else ''}")
    verb = "is" if len(parts) == 1 else "are"
    text = f"{source}: {'; '.join(parts)} {verb} not in the class list {list(classes)}"
    if missing:
        text += f"; no images of {', '.join(missing)}"
    return text


def _lines(lines: Sequence[int]) -> str:
    shown = ", ".join(str(line) for line in lines[:3])
    return f"line {shown}" if len(lines) == 1 else f"lines {shown}{' …' if len(lines) > 3 else ''}"


def _check_unknown_classes(unknown_classes: str) -> None:
    if unknown_classes not in _UNKNOWN_CLASSES:
        raise ValueError(f"unknown_classes must be one of {_UNKNOWN_CLASSES}, got {unknown_classes!r}")


def _refuse_or_leave_out(
    unknown_classes: str,
    source: str,
    classes: Sequence[str],
    extra: dict[str, int],
    details: Mapping[str, str],
    without: list[str],
    left_out: str,
) -> None:
    """For data with classes outside `classes`: ClassMismatchError naming them (``unknown_classes="error"``), or
    one UnknownClassWarning saying what was `left_out`. `details`: class -> a phrase naming it (see
    `_extra_classes_message`); `without`: the class-list entries without images."""
    if unknown_classes == "error":
        message = _extra_classes_message(details, without, source, classes)
        raise ClassMismatchError(
            message + "; evaluate on the trained classes only by leaving them out (unknown_classes='skip')",
            extra=extra,
            missing=without,
            source=source,
        )
    warnings.warn(
        f"{source}: left out {left_out}: {'; '.join(details.values())}, not in the class list {list(classes)}",
        UnknownClassWarning,
        stacklevel=3,
    )


def split_folders(root: str | os.PathLike) -> dict[str, Path]:
    """The split folders of a dataset root laid out as ``root/train``, ``root/val`` (and/or ``root/test``).

    Returns ``{"train": path, "val": path, "test": path}`` (the splits present) when every non-hidden sub-folder
    of `root` is a split folder (train/training, val/valid/validation/dev, test/testing, any case) and there are at
    least two; otherwise ``{}`` (an ordinary ``root/<class>/`` folder).
    """
    root = Path(root)
    if not root.is_dir():
        return {}
    lookup = {alias: split for split, aliases in SPLIT_NAMES.items() for alias in aliases}
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    found: dict[str, Path] = {}
    for folder in folders:
        split = lookup.get(folder.name.casefold())
        if split is None or split in found:
            return {}
        found[split] = folder
    return dict(sorted(found.items(), key=lambda item: list(SPLIT_NAMES).index(item[0]))) if len(found) >= 2 else {}


def split_layout_error(root: str | os.PathLike, splits: Mapping[str, Path]) -> SplitLayoutError:
    """The one-line error for a dataset root with split folders, naming the folders to pass instead."""
    root = Path(root)
    train, val, test = splits.get("train"), splits.get("val"), splits.get("test")
    if train is not None and val is not None:
        advice = f"Train on {train} and validate on {val} (command line: --data {train} --val {val})"
        if test is not None:
            advice += f"; evaluate on {test} at the end"
    elif train is not None:
        advice = (
            f"Train on {train}, holding out a share for validation, and evaluate on {test} at the end (command line: "
            f"--data {train} --val-fraction 0.2, then evaluate --data {test})"
        )
    else:
        advice = f"It has no training split: pass the training images as --data and {val} as --val"
    inner = sorted(
        {p.name for split in splits.values() for p in split.iterdir() if p.is_dir() and not p.name.startswith(".")}
    )
    inside = f" (the classes {', '.join(inner)} are inside them)" if inner else ""
    names = ", ".join(f"{p.name}/" for p in splits.values())
    return SplitLayoutError(
        f"{root} holds the dataset splits {names}{inside}, not one folder per class: training on it would learn to "
        f"tell the splits apart. {advice}",
        splits=dict(splits),
    )


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
        self.skipped_classes: dict[str, int] = {}  # classes outside `classes` left out (unknown_classes="skip")

    @property
    def unreadable(self) -> list[tuple[str, str]]:
        """Every image found unreadable or missing so far, as sorted ``(path, reason)`` pairs."""
        return sorted(self.skipped.items())

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
                f"{next(iter(dropped.values()))} (every one: dataset.unreadable, or write_unreadable)",
                SkippedImageWarning,
                stacklevel=2,
            )
        if not self.samples:
            raise ValueError(f"no readable images left in {self.source}; every file failed to decode")
        return dropped


def write_unreadable(path: str | os.PathLike, *sources: _ImageDataset | Mapping[str, str]) -> int:
    """Write every unreadable or missing image of `sources` (datasets or ``{path: reason}``) as a CSV list.

    The file (``path,reason`` rows, sorted by path) is written atomically; with nothing to list, an earlier file
    at `path` is removed so that no stale list remains. Returns the number of images listed.
    """
    entries: dict[str, str] = {}
    for source in sources:
        skipped = source.skipped if isinstance(source, _ImageDataset) else source
        if not isinstance(skipped, Mapping):
            raise TypeError(f"write_unreadable takes datasets or {{path: reason}} dicts, got {type(source).__name__}")
        entries.update(skipped)
    path = Path(path)
    if not entries:
        path.unlink(missing_ok=True)
        return 0
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "reason"])
    writer.writerows(sorted(entries.items()))
    atomic_write_bytes(path, text.getvalue().encode("utf-8"))
    return len(entries)


def _is_image(path: Path, folder: Path, extensions: Sequence[str]) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)  # .DS_Store, .ipynb_checkpoints/
    return not hidden and path.suffix.lower() in extensions and path.is_file()


class ImageFolderDataset(_ImageDataset):
    """Single-label images in ``root/<class_name>/**/*.png|jpg|jpeg|bmp|tif|tiff|dcm``.

    Classes are the sorted sub-folder names, or ``classes`` (fixed order, e.g. the training set's for a
    validation folder), mapped to folders by name. Sub-folders with images outside ``classes`` raise
    ClassMismatchError, or are left out with one warning when ``unknown_classes="skip"``. Classes without images
    are warned about (no folder / empty folder); inferred empty classes are dropped. A root whose sub-folders are
    dataset splits (train/val/test) raises SplitLayoutError unless ``classes`` names them.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        *,
        on_error: str = "skip",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        unknown_classes: str = "error",
    ):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(
                f"image folder {root} does not exist or is not a directory; pass the folder that "
                "holds one sub-folder per class"
            )
        _check_unknown_classes(unknown_classes)
        extensions = tuple(ext.lower() for ext in extensions)
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            if not folders:
                raise ValueError(f"{root} has no class sub-folders; arrange the images as {root}/<class_name>/<image>")
            splits = split_folders(root)
            if splits:
                raise split_layout_error(root, splits)
            wanted = folders
        else:
            wanted = [str(name) for name in classes]
            if len(set(wanted)) != len(wanted):
                raise ValueError(f"classes contain duplicates: {wanted}")
        files = {name: self._scan(root / name, extensions) for name in wanted}
        without = [name for name in wanted if not files[name]]
        extra = {}
        if classes is not None:
            others = {name: self._scan(root / name, extensions) for name in folders if name not in files}
            extra = {name: len(found) for name, found in others.items() if found}
        details = {name: f"class folder {name} ({_count(count, 'image')})" for name, count in extra.items()}
        if extra and unknown_classes == "error" and (splits := split_folders(root)):
            raise split_layout_error(root, splits)  # e.g. a validation set pointed at the dataset root
        if extra:
            left_out = _count(sum(extra.values()), "image")
            _refuse_or_leave_out(unknown_classes, str(root), wanted, extra, details, without, left_out)
        kept = "kept in the class list" if classes is not None else "ignored"
        empty = [name for name in without if (root / name).is_dir()]
        if empty:
            warnings.warn(f"empty class folder(s) in {root}: {empty} ({kept})", EmptyClassWarning, stacklevel=2)
        absent = [name for name in without if name not in empty]
        if absent:
            warnings.warn(
                f"{root} has no folder for class(es) {absent} of the class list, so no images of them ({kept})",
                EmptyClassWarning,
                stacklevel=2,
            )
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
        self.skipped_classes = extra
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
    Given ``classes``, labels (single-label) or label columns (multi-label) outside it raise ClassMismatchError,
    or with ``unknown_classes="skip"`` are left out (rows / columns) with one UnknownClassWarning.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        *,
        on_error: str = "skip",
        unknown_classes: str = "error",
    ):
        _check_unknown_classes(unknown_classes)
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
            extra = {  # label columns the class list does not have: positives per column
                name: int(sum(_parse_binary(row[1 + i], line, name, csv_path) for line, row in body))
                for i, name in enumerate(header[1:])
                if name not in class_list
            }
            details = {name: f"label column {name!r} ({_count(n, 'positive image')})" for name, n in extra.items()}
            left_out = f"{_count(len(extra), 'label column')}"
        else:
            class_list, labelled, unknown = self._single_label(body, classes, csv_path)
            extra = {label: len(lines) for label, lines in unknown.items()}
            details = {
                label: f"{_lines(lines)}: label {label!r} ({_count(len(lines), 'image')})"
                for label, lines in unknown.items()
            }
            left_out = _count(sum(extra.values()), "row")
        if extra:
            present = {index for _, _, index in labelled} if not multilabel else set(range(len(class_list)))
            without = [name for i, name in enumerate(class_list) if i not in present]
            _refuse_or_leave_out(unknown_classes, str(csv_path), class_list, extra, details, without, left_out)
        _check_conflicting_rows(labelled, csv_path)
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
        self.skipped_classes = extra
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
    ) -> tuple[list[str], list[tuple[int, str, int]], dict[str, list[int]]]:
        """(class list, (line, path, index) per known row, {unknown label: its lines}) — unknown only with `classes`."""
        labels = [row[1] for _, row in body]
        _check_label_column(body, csv_path)
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
        unknown: dict[str, list[int]] = {}
        for line, row in body:
            label = row[1]
            if label in lookup:
                index = lookup[label]
            elif as_index and 0 <= int(label) < len(class_list):
                index = int(label)
            elif classes is not None:
                unknown.setdefault(label, []).append(line)
                continue
            else:
                raise ValueError(
                    f"{csv_path} line {line}: label {label!r} of {row[0]!r} is not a class index "
                    f"below {len(class_list)}; fix the row"
                )
            labelled.append((line, row[0], index))
        return class_list, labelled, unknown


def _check_label_column(body: list[tuple[int, list[str]]], csv_path: Path) -> None:
    """Refuse, naming the rows: an empty label, a column mixing class names and indices, names differing by case."""
    for line, row in body:
        if not row[1]:
            raise ValueError(f"{csv_path} line {line}: {row[0]!r} has an empty label; give every row its class")
    numeric = {line: row for line, row in body if row[1].lstrip("-").isdigit()}
    if numeric and len(numeric) < len(body):
        index_line = next(iter(numeric))
        name_line, name_row = next((line, row) for line, row in body if line not in numeric)
        raise ValueError(
            f"{csv_path} mixes class indices and class names in its label column (line {index_line}: "
            f"{numeric[index_line][1]!r}, line {name_line}: {name_row[1]!r}); use one kind for every row"
        )
    by_folded: dict[str, tuple[int, str]] = {}
    for line, row in body:
        first = by_folded.setdefault(row[1].casefold(), (line, row[1]))
        if first[1] != row[1]:
            raise ValueError(
                f"{csv_path}: labels {first[1]!r} (line {first[0]}) and {row[1]!r} (line {line}) differ only in "
                "case and would be two classes; spell each class one way"
            )


def _check_conflicting_rows(labelled: list[tuple[int, str, Any]], csv_path: Path) -> None:
    """Refuse the same image listed twice with different labels, naming the path and both lines."""
    seen: dict[str, tuple[int, Any]] = {}
    for line, rel, target in labelled:
        key = os.path.normpath(rel)
        if key in seen:
            first_line, first = seen[key]
            if not np.array_equal(np.asarray(first), np.asarray(target)):
                raise ValueError(
                    f"{csv_path}: {rel!r} is listed on lines {first_line} and {line} with different labels; keep "
                    "one row per image"
                )
        else:
            seen[key] = (line, target)
