"""Reading training runs back: a `fastprompt train` run folder or an Engine checkpoint file.

A run folder holds ``config.json`` (everything needed to rebuild the model) and ``checkpoints/{best,last}.pt``.
``load_run`` rebuilds the trained model; ``read_checkpoint`` returns a checkpoint's payload. Checkpoints are read
without unpickling code (see `fastprompt.engine.checkpoint`). Weights files (``save_trainable``) are in
`fastprompt.serialization`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastprompt.serialization import WeightsError, assign_trainable

__all__ = ["RUN_CONFIG", "LoadedRun", "build_run_model", "load_run", "read_checkpoint", "recorded_option"]

RUN_CONFIG = "config.json"  # written by `fastprompt train` into the run folder


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> dict[str, Any]:
    """Read and verify an Engine / `fastprompt train` checkpoint; `path` is a ``.pt`` file or a run folder.

    A run folder means its ``checkpoints/best.pt`` (``last.pt``, with a warning, when the run never had a best;
    an error when the best it had is missing). The payload is the dict described in the README ("Run folders and
    checkpoints"); ``payload["trainable"]`` holds the trained tensors. Raises fastprompt.engine.CheckpointError
    when the file is not intact, or holds more than plain data and `trust` is False (see
    `fastprompt.engine.checkpoint.read_checkpoint`).
    """
    return _resolve(Path(path), "best", trust=trust)[1]


def _resolve(path: Path, which: str, *, trust: bool) -> tuple[Path, dict[str, Any]]:
    """The checkpoint file `which` of a run folder (or `path` itself when it is a file) and its payload.

    `last` stands in for a missing `best` only when the run never had a best (no finite monitored metric), with
    a warning; a best the run recorded but which is missing is an error naming it.
    """
    from fastprompt.engine.checkpoint import CheckpointError
    from fastprompt.engine.checkpoint import read_checkpoint as read

    if which not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {which!r}")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run folder or its checkpoints/best.pt")
    if path.is_file():
        return path, read(path, trust=trust)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    wanted, last = folder / f"{which}.pt", folder / "last.pt"
    if wanted.is_file():
        return wanted, read(wanted, trust=trust)
    if not last.is_file():
        raise FileNotFoundError(f"{path} holds no checkpoints/{which}.pt or checkpoints/last.pt; train first")
    payload = read(last, trust=trust)
    state = payload.get("state") or {}
    best = state.get("best")
    if best:
        raise CheckpointError(
            f"{wanted} is missing: the run's best checkpoint (epoch {best.get('epoch')}, {best.get('metric')} "
            f"{best.get('value')}) was not written or was deleted. To use the last one instead (epoch "
            f"{state.get('epoch')}), pass {last} (load_run: checkpoint='last')"
        )
    warnings.warn(
        f"{path} has no best checkpoint (no epoch had a finite monitored metric); using {last} "
        f"(epoch {state.get('epoch')})",
        RuntimeWarning,
        stacklevel=3,
    )
    return last, payload


def _run_folder(checkpoint: Path) -> Path:
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / RUN_CONFIG).is_file():
            return folder
    raise FileNotFoundError(
        f"no {RUN_CONFIG} next to {checkpoint} or in its parent folder; load_run reads folders written by "
        "`fastprompt train` (for an Engine's own output_dir, build the model and use Engine.load or read_checkpoint)"
    )


@dataclass
class LoadedRun:
    """A trained model rebuilt from a run folder, with what the run recorded about it."""

    model: nn.Module  # the patched model with the checkpoint's trainable weights, in eval mode
    config: dict[str, Any]  # the run's config.json (model, method, options, classes, data, engine settings, ...)
    classes: list[str]  # class names in output order
    checkpoint: Path  # the checkpoint file the weights came from
    epoch: int  # completed epochs when the checkpoint was written (1-based number of the last one; 0: none)
    step_in_epoch: int  # optimizer steps into the next epoch (0 for an end-of-epoch checkpoint)
    metrics: dict[str, Any] | None  # epoch `epoch`'s record (train loss, validation metrics); None if epoch 0
    best: dict[str, Any] | None  # which metric selected the best checkpoint, its value and epoch
    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's record up to the checkpoint


# config.json written before the run's Engine options were EngineConfig.to_dict() (fastprompt <= cc56237) kept the
# class names only at the top level, under this name; every other option it recorded is in its "engine" too.
_LEGACY_TOP_LEVEL = {"class_names": "classes"}


def recorded_option(config: Mapping[str, Any], name: str) -> Any:
    """The Engine option `name` (an `EngineConfig` field) a run's config.json records under "engine"."""
    engine = config.get("engine") or {}
    if name in engine:
        return engine[name]
    legacy = _LEGACY_TOP_LEVEL.get(name)
    return config.get(legacy) if legacy is not None else None


def build_run_model(config: Mapping[str, Any], run_dir: str | os.PathLike | None = None) -> nn.Module:
    """The untrained patched model a run's config.json describes: its backbone (and frozen weights), the method.

    Frozen weights come from the hub (``weights.source == "pretrained"``), the weight file the run recorded, or
    the run's own ``backbone.safetensors`` (random initialisation). A recorded ``weights.sha256`` of that file is
    verified (WeightsError when the file changed since training).
    """
    from fastprompt.io import sha256_file
    from fastprompt.models import create_backbone
    from fastprompt.patch import apply

    weights = config["weights"]
    file = weights.get("file")
    if file is not None and run_dir is not None and not Path(file).is_absolute():
        file = Path(run_dir) / file
    if file is not None:
        if not Path(file).is_file():
            raise FileNotFoundError(
                f"the run's frozen weights {file} do not exist any more; put the file back where training read it"
            )
        expected = weights.get("sha256")
        if expected is not None:
            actual = sha256_file(file)
            if actual != expected:
                raise WeightsError(
                    f"the weight file {file} changed since training (SHA-256 {actual[:16]}…, the run recorded "
                    f"{expected[:16]}…): restore the file the run was trained with"
                )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(recorded_option(config, "seed") or 0))
        backbone = create_backbone(
            config["model"],
            img_size=int(config["img_size"]),
            pretrained=weights.get("source") == "pretrained",
            checkpoint=file,
            **dict(config.get("model_kwargs") or {}),
        )
        classes = recorded_option(config, "class_names")
        return apply(backbone, config["method"], num_classes=len(classes), **config["method_options"])


def load_run(run: str | os.PathLike, *, checkpoint: str = "best", trust: bool = False) -> LoadedRun:
    """Rebuild the trained model of a `fastprompt train` run folder (or of one of its checkpoint files).

    `checkpoint`: "best" (the epoch the run's monitor chose) or "last"; a run that never had a best falls back
    to last with a warning, a run whose best is missing is an error. The checkpoint is verified (checksum, plain
    data only unless `trust`), its tensors checked by name and shape.
    """
    path, payload = _resolve(Path(run), checkpoint, trust=trust)
    run_dir = _run_folder(path)
    config = json.loads((run_dir / RUN_CONFIG).read_text())
    model = build_run_model(config, run_dir)
    hint = f" (the run trained {config['method']!r} on {config['model']} at image size {config['img_size']})"
    assign_trainable(model, payload["trainable"], source=path, hint=hint)
    history = list(payload.get("history") or [])
    state = payload.get("state") or {}
    epoch = int(state.get("epoch", len(history)))
    record = next((dict(item) for item in history if item.get("epoch") == epoch), None)
    return LoadedRun(
        model=model.eval(),
        config=config,
        classes=list(recorded_option(config, "class_names")),
        checkpoint=path,
        epoch=epoch,
        step_in_epoch=int(state.get("step_in_epoch", 0)),
        metrics=record,
        best=state.get("best"),
        run_dir=run_dir,
        history=history,
    )
