"""One writer per run folder: an exclusive OS file lock (``fcntl.flock``) on ``RUN/.fastprompt.lock``.

The operating system releases the lock when its holder exits, however it exits (SIGKILL included), so a dead run
never leaves a stale lock behind. The file holds the holder's PID, to name it when another writer is refused. The
lock is re-entrant within a process (`fastprompt train` takes it, then the Engine it runs takes it again).
Feature caches are shared between runs and stay lock-free (their entries are written atomically).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

LOCK_FILE = ".fastprompt.lock"
_HELD: dict[str, list[int]] = {}  # resolved folder -> [file descriptor, depth]


class RunLockedError(RuntimeError):
    """Another process is writing the run folder."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "another process"
    return f"PID {text}" if text.isdigit() else "another process"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the run folder's lock for the block; RunLockedError at once when another process holds it.

    The folder is created when missing, and removed again when the block wrote nothing into it.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield folder / LOCK_FILE
        finally:
            _HELD[key][1] -= 1
        return
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLockedError(
                    f"{folder} is being written by {_holder(path)} (it holds {path}); wait for that run to end, "
                    "or use another --output-dir"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = [fd, 1]
        try:
            yield path
        finally:
            del _HELD[key]
            if created and [entry.name for entry in folder.iterdir()] == [LOCK_FILE]:
                path.unlink()  # a run refused before writing anything leaves no folder behind
                folder.rmdir()
    finally:
        os.close(fd)  # closing the descriptor releases the lock
