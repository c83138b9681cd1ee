"""Engine checkpoint files: one atomically written, checksummed file per checkpoint, plus RNG state capture."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastprompt.io import atomic_open

MAGIC = b"FASTPROMPT-CKPT-1\n"
DIGEST_LEN = 64  # hex sha256


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or from an incompatible run."""


def write_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Serialise `payload` and write it atomically to `path` with a SHA-256 of the bytes in the header."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest().encode("ascii")
    try:
        with atomic_open(path, "wb") as handle:
            handle.write(MAGIC)
            handle.write(digest + b"\n")
            handle.write(data)
    except OSError as error:
        raise CheckpointError(
            f"could not write checkpoint {path} ({error}); any previous checkpoint under that name is intact. "
            "Free disk space or choose another output_dir, then fit(resume=True)"
        ) from error


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint written by `write_checkpoint`; raise CheckpointError when it is not intact."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    header = len(MAGIC) + DIGEST_LEN + 1
    if not raw.startswith(MAGIC) or len(raw) < header:
        raise CheckpointError(f"{path} is not a fastprompt checkpoint (bad header); it may be truncated or foreign")
    digest = raw[len(MAGIC) : len(MAGIC) + DIGEST_LEN].decode("ascii", errors="replace")
    data = raw[header:]
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} failed its checksum (corrupt or truncated); delete it or use another")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def keep_previous(path: Path, previous: Path) -> None:
    """Make `previous` an intact copy of `path` (hard link when possible) before `path` is overwritten."""
    if not path.exists():
        return
    tmp = previous.with_name(f".{previous.name}.link")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(path, tmp)
        os.replace(tmp, previous)
    except OSError:
        with open(path, "rb") as source, atomic_open(previous, "wb") as target:
            shutil.copyfileobj(source, target)


def remove_stale_temporaries(directory: Path, names: tuple[str, ...]) -> None:
    """Delete temporary files a killed writer left beside the checkpoints `names` (never a checkpoint itself)."""
    for name in names:
        for stale in [*directory.glob(f".{name}.*.tmp"), directory / f".{name}.link"]:
            stale.unlink(missing_ok=True)


def read_first_good(candidates: list[Path]) -> tuple[dict[str, Any], Path] | None:
    """The first candidate that exists and verifies; warn about each corrupt one skipped; None if none exists.

    Raises CheckpointError when checkpoints exist but none of them verifies.
    """
    errors = []
    for candidate in candidates:
        if not candidate.exists():
            continue
        try:
            return read_checkpoint(candidate), candidate
        except CheckpointError as error:
            errors.append(str(error))
            warnings.warn(f"{error}; falling back to an older checkpoint", RuntimeWarning, stacklevel=3)
    if errors:
        raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(errors))
    return None


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA random states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random states captured by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
