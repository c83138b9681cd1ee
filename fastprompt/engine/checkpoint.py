"""Engine checkpoint files: one atomically written, checksummed file per checkpoint, plus RNG state capture.

A checkpoint holds only data a ``torch.load(weights_only=True)`` read accepts: tensors, plain containers, numbers
and strings, optimizer state dicts, RNG states as tensors, and a few named harmless DeepSpeed types (loss
scalers, an enum, a dataclass of two ints; `SAFE_TYPES`). Reading never unpickles anything else, so a checkpoint
from someone else cannot run code. Checkpoints written before this format (full pickles) load only with
``trust=True``, with a warning.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastprompt.engine.state import BestEpoch, TrainState
from fastprompt.io import atomic_open

MAGIC = b"FASTPROMPT-CKPT-1\n"
DIGEST_LEN = 64  # hex sha256


# Types beside plain data that a checkpoint may hold, by "module.qualname": what DeepSpeed's ZeRO / bf16 optimizer
# state dicts contain. Each is data only: loss scalers (numbers and a dtype), an int enum, a dataclass of two ints.
SAFE_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
TRUST_HINT = "pass trust=True (CLI: --trust-checkpoint) to load it anyway"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt, unsafe to read or from an incompatible run."""


def plain(value: Any) -> Any:
    """`value` with NumPy arrays as tensors and NumPy scalars as Python numbers, recursively (tuples kept)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if type(value) is dict:
        return {plain(key): plain(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(plain(item) for item in value)
    return value


def unsafe_globals(data: bytes) -> list[str]:
    """The Python objects (``module.name``) that serialized checkpoint bytes reference beyond a safe read's own.

    Reads the pickle's opcodes only: nothing is imported or run.
    """
    return [
        name
        for name in torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
        if name not in SAFE_TYPES
    ]


def _safe_types(names: list[str]) -> list[Any]:
    """The `SAFE_TYPES` among `names`, imported (only those: their modules are named here, never by the file)."""
    found = []
    for name in names:
        if name in SAFE_TYPES:
            module, _, attribute = name.rpartition(".")
            found.append(getattr(importlib.import_module(module), attribute))
    return found


def write_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Serialise `payload` and write it atomically to `path` with a SHA-256 of the bytes in the header.

    Raises CheckpointError, before writing, when the payload holds an object a safe read would refuse.
    """
    buffer = io.BytesIO()
    torch.save(plain(payload), buffer)
    data = buffer.getvalue()
    refused = unsafe_globals(data)
    if refused:
        raise CheckpointError(
            f"not writing checkpoint {path}: it would hold {', '.join(refused)}, which a safe read refuses; this is a "
            "fastprompt bug, please report it with the names"
        )
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


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> dict[str, Any]:
    """Read and verify a checkpoint written by `write_checkpoint`; raise CheckpointError when it is not intact.

    Only plain data is unpickled (``weights_only=True``). A checkpoint that holds other objects (an older
    fastprompt's, or a crafted one) is refused, naming them, unless `trust`: then it is read as a full pickle,
    with a warning, which runs whatever code the file's author put in it.
    """
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
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception as error:  # not a torch.save zip archive
        raise CheckpointError(f"{path} holds no readable torch data after its header ({error})") from error
    refused = [name for name in names if name not in SAFE_TYPES]
    if refused and not trust:
        shown = ", ".join(refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
        raise CheckpointError(
            f"{path} holds Python objects a safe read refuses ({shown}): it was written by an older fastprompt or "
            f"by another program, and reading it could run code its author chose. Only if you trust its source, "
            f"{TRUST_HINT}"
        )
    if refused:
        warnings.warn(
            f"reading {path} as a full pickle (trust=True): it holds {', '.join(refused[:5])}; this runs any code "
            "its author put in it. Checkpoints written from now on are safe to read",
            RuntimeWarning,
            stacklevel=2,
        )
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_safe_types(names)):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} could not be read safely ({str(error).splitlines()[-1]}); {TRUST_HINT}"
        ) from error


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


def read_first_good(candidates: list[Path], *, trust: bool = False) -> tuple[dict[str, Any], Path] | None:
    """The first candidate that exists and verifies; warn about each corrupt one skipped; None if none exists.

    Raises CheckpointError when checkpoints exist but none of them verifies, and at once when one is intact but
    unsafe to read (an older one is no substitute for it).
    """
    errors = []
    for candidate in candidates:
        if not candidate.exists():
            continue
        try:
            return read_checkpoint(candidate, trust=trust), candidate
        except CheckpointError as error:
            if TRUST_HINT in str(error):
                raise
            errors.append(str(error))
            warnings.warn(f"{error}; falling back to an older checkpoint", RuntimeWarning, stacklevel=3)
    if errors:
        raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(errors))
    return None


def _epoch_of(path: Path, trust: bool) -> tuple[int, int] | None:
    """(epoch, step_in_epoch) of an intact checkpoint, None when it is missing or does not verify."""
    if not path.is_file():
        return None
    try:
        state = TrainState.from_dict(read_checkpoint(path, trust=trust)["state"])
    except (CheckpointError, KeyError, TypeError):
        return None
    return state.epoch, state.step_in_epoch


def restore_best(
    directory: Path, best: BestEpoch | None, sources: list[Path], *, write: bool, trust: bool = False
) -> BestEpoch | None:
    """On resume: make ``best.pt`` hold the epoch the state calls best; returns the best record to keep.

    When best.pt is missing, corrupt or of another epoch, it is rewritten (if `write`) from the first of
    `sources` written at the end of that epoch, with a warning. When none is, a warning says so plainly and None
    is returned: the best is then tracked again from the resumed epochs on, so best.pt is written again.
    """
    if not best:
        return best
    epoch, path = best.epoch, directory / "best.pt"
    found = _epoch_of(path, trust)
    if found == (epoch, 0):
        return best
    problem = "is missing" if not path.exists() else ("does not verify" if found is None else f"holds epoch {found[0]}")
    for source in sources:
        if _epoch_of(source, trust) == (epoch, 0):
            if write:
                with open(source, "rb") as handle, atomic_open(path, "wb") as target:
                    shutil.copyfileobj(handle, target)
            warnings.warn(
                f"{path} {problem} but the run's best is epoch {epoch} ({best.metric} {best.value}); "
                f"rewrote it from {source.name}, written at the end of that epoch",
                RuntimeWarning,
                stacklevel=3,
            )
            return best
    warnings.warn(
        f"{path} {problem}, and no checkpoint of the run's best epoch {epoch} ({best.metric} "
        f"{best.value}) is left: that model is lost. The best is tracked again from the resumed epochs on; "
        "until a new best is written, only last.pt holds a trained model",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA random states, as tensors and numbers (safe to checkpoint)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random states captured by `rng_state` (or the tuple format of older checkpoints)."""
    python, numpy_state = state["python"], state["numpy"]
    if isinstance(python, dict):
        python = (python["version"], tuple(int(word) for word in python["state"].tolist()), python["gauss"])
    if isinstance(numpy_state, dict):
        numpy_state = (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
