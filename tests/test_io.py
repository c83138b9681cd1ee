"""Atomic writes: the final name only ever holds a complete file."""

from __future__ import annotations

import errno
import os

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
