"""Atomic writes: the final name only ever holds a complete file."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from fastprompt.io import atomic_open, atomic_write_bytes, sha256_file


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["file.bin"]


def test_failure_mid_write_keeps_previous_content(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_write_bytes(target, b"good checkpoint")
    with pytest.raises(OSError, match="No space left"):
        with atomic_open(target) as handle:
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_bytes() == b"good checkpoint"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_final_file_gets_umask_permissions(tmp_path):
    target = tmp_path / "f"
    atomic_write_bytes(target, b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~mask


def test_read_modes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mode must contain 'w'"):
        with atomic_open(tmp_path / "f", "rb"):
            pass


def test_sha256_file(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"abc")
    assert sha256_file(target) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_file_is_flushed_and_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """Durability: the data reaches the disk under the temporary name (flush + fsync of the file, with every byte
    already in it), only then is it renamed over the target, and then the directory entry is fsynced."""
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"old")
    data = b"x" * 1000 + b"end"  # far below the buffer size: without flush() the OS would see 0 bytes at fsync time
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
        events.append(("fsync", kind, info.st_ino, info.st_size if kind == "file" else None))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", os.stat(src).st_ino, Path(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(target, data)

    assert target.read_bytes() == data
    kinds = [event[:2] if event[0] == "fsync" else ("replace",) for event in events]
    assert kinds == [("fsync", "file"), ("replace",), ("fsync", "dir")], events
    (_, _, file_ino, size_at_fsync), (_, renamed_ino, destination), (_, _, dir_ino, _) = events
    assert size_at_fsync == len(data), "the file was fsynced before its buffered bytes were flushed to it"
    assert renamed_ino == file_ino == os.stat(target).st_ino, "the fsynced file is the one renamed over the target"
    assert destination == target
    assert dir_ino == os.stat(tmp_path).st_ino, "the directory holding the target is fsynced after the rename"


def test_metrics_jsonl_is_strict_json_with_non_finite_values_nested(tmp_path):
    import json

    import numpy as np

    from fastprompt.engine.report import write_metrics_jsonl

    path = tmp_path / "metrics.jsonl"
    history = [{"epoch": 1, "val_loss": float("nan"), "per_class_auc": {"cat": float("nan"), "dog": np.float64(0.75)}}]
    write_metrics_jsonl(path, history)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    (record,) = [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]
    assert record == {"epoch": 1, "val_loss": None, "per_class_auc": {"cat": None, "dog": 0.75}}
