"""Weights-only save and load of a fastprompt model (what peft users expect), and reading training runs back.

``save_trainable(model, "adapter.safetensors")`` writes two files, each atomically:

- ``adapter.safetensors``: exactly the trainable parameters (``requires_grad``) under their names in the model,
  with the record below stored in the safetensors metadata (key ``"fastprompt"``), so the file alone suffices;
- ``adapter.json``: the same record plus the file's SHA-256, for people and tools.

The record holds the method, its options (defaults filled in), the number of classes, the backbone (library,
name, image size, the recipe ``fastprompt.models.create_backbone`` used, and a SHA-256 of its frozen weights)
and a SHA-256 of the trainable tensors, verified on every read. ``load_trainable`` loads the file into a model
with the same method applied; ``load`` rebuilds the patched model from a backbone in one call. Run folders and
Engine checkpoints (``load_run``, ``read_checkpoint``) live in `fastprompt.run_folders`; they are importable from
here too.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastprompt.io import atomic_write_bytes, safetensors_metadata, tensor_digest
from fastprompt.methods import registry
from fastprompt.patch import CONFIG_ATTR, METHOD_ATTR

if TYPE_CHECKING:
    from fastprompt.run_folders import LoadedRun, build_run_model, load_run, read_checkpoint

__all__ = [  # the run-folder names come from fastprompt.run_folders (see __getattr__)
    "BackboneWeightsWarning",
    "LoadedRun",
    "WeightsError",
    "build_run_model",
    "load",
    "load_run",
    "load_trainable",
    "read_checkpoint",
    "read_trainable",
    "save_trainable",
    "tensor_digest",
    "trainable_names",
    "unwrap",
]

FORMAT = "fastprompt-trainable"
FORMAT_VERSION = 1
METADATA_KEY = "fastprompt"
DEFAULT_FILE = "trainable.safetensors"  # used when `path` is a folder
_SHOWN = 5  # names listed in an error before "... and N more"


class WeightsError(ValueError):
    """A trainable-weights file that is corrupt or modified, or does not fit the model it is loaded into."""


class BackboneWeightsWarning(UserWarning):
    """The frozen backbone weights could not be compared with those the trainable weights were saved with."""


# ---------------------------------------------------------------------------------------------- digests


def _frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything in the state_dict that is not a trainable parameter: the frozen weights and the buffers."""
    trainable = set(trainable_names(model))
    return {name: value for name, value in model.state_dict().items() if name not in trainable}


# set by fastprompt.engine.precision.store_frozen_in: (digest of the frozen state after the dtype cast, the record
# before it), so that a model whose frozen weights the Engine stored in bf16/fp16 still names its original weights
FROZEN_CAST_ATTR = "_fastprompt_frozen_cast"


def _frozen_record(model: nn.Module) -> dict[str, Any] | None:
    if any(getattr(param, "ds_id", None) is not None for param in model.parameters()):
        return None  # DeepSpeed ZeRO-3 partitions parameters: the local shards are not the weights
    frozen = _frozen_state(model)
    digest = tensor_digest(frozen)
    cast = getattr(model, FROZEN_CAST_ATTR, None)
    if cast is not None and cast[0] == digest:
        return cast[1]
    return {
        "sha256": digest,
        "tensors": len(frozen),
        "dtypes": sorted({str(value.dtype).removeprefix("torch.") for value in frozen.values()}),
    }


def frozen_record_of(model: nn.Module) -> dict[str, Any] | None:
    """The frozen-weights record of `model`: the one it kept (an FPT whose backbone was released), else computed."""
    kept = getattr(model, "frozen_record", None)
    record = kept() if callable(kept) else None
    return record if record is not None else _frozen_record(model)


# ---------------------------------------------------------------------------------------------- the record


def _jsonable(value: Any, where: str) -> Any:
    """Method options as JSON values (tuples and ranges become lists); a clear error for anything else."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"option {where} is {value}; only finite numbers can be saved")
        return value
    if isinstance(value, (list, tuple, range)):
        return [_jsonable(item, where) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item, f"{where}.{key}") for key, item in value.items()}
    raise TypeError(
        f"option {where} = {value!r} ({type(value).__name__}) cannot be saved as JSON; pass plain numbers, strings "
        "or lists to fastprompt.apply"
    )


def _full_options(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The method's options with its defaults filled in, as JSON values.

    The registered function's signature defines them (`fastprompt.apply` checks options against it, also for the
    Hugging Face versions of the methods, which take the same options).
    """
    defaults = {
        p.name: p.default
        for p in inspect.signature(registry.get_method(method).fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }
    return {name: _jsonable(value, repr(name)) for name, value in sorted({**defaults, **given}.items())}


def _method_config(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, CONFIG_ATTR, None)
    if not isinstance(config, Mapping):
        raise ValueError(
            f"{type(model).__name__} has no fastprompt method applied; call fastprompt.apply(model, method, "
            "num_classes=...) first (save_trainable records the method so that fastprompt.load can rebuild it)"
        )
    return dict(config)


def _inner_backbone(model: nn.Module, method: str) -> nn.Module:
    """The pretrained network: the wrapped backbone for wrapper methods (FPT), else the model itself."""
    return getattr(model, "backbone", model) if registry.get_method(method).wrapper else model


def _backbone_record(backbone: nn.Module) -> dict[str, Any]:
    """Library, name, image size and recipe of the pretrained network, for the record and for rebuilding it."""
    cls = type(backbone)
    library = cls.__module__.split(".", 1)[0]
    recipe = getattr(backbone, "fastprompt_backbone", None)
    name = None
    if isinstance(recipe, Mapping):
        name = recipe.get("name")
    if name is None:
        name = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture")
    if name is None:
        config = getattr(backbone, "config", None)
        name = getattr(config, "_name_or_path", None) or getattr(backbone, "name_or_path", None) or None
    img_size = None
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        img_size = [int(s) for s in patch_embed.img_size]
    elif getattr(getattr(backbone, "config", None), "image_size", None) is not None:
        size = backbone.config.image_size
        img_size = [int(s) for s in size] if isinstance(size, (list, tuple)) else [int(size), int(size)]
    return {
        "library": library,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "name": name,
        "img_size": img_size,
        "recipe": _jsonable(dict(recipe), "backbone recipe") if isinstance(recipe, Mapping) else None,
    }


def _num_classes(model: nn.Module, given: int | None) -> int | None:
    if given is not None:
        return int(given)
    count = getattr(model, "num_classes", None)  # timm: the head the method trains
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def _make_record(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    from fastprompt import __version__

    config = _method_config(model)
    method = config["method"]
    backbone = _backbone_record(_inner_backbone(model, method))
    backbone["frozen"] = frozen_record_of(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastprompt_version": __version__,
        "method": method,
        "num_classes": _num_classes(model, config.get("num_classes")),
        "options": _full_options(method, config.get("options") or {}),
        "backbone": backbone,
        "weights": {
            "sha256": tensor_digest(tensors),
            "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values()),
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        },
    }


# ---------------------------------------------------------------------------------------------- files


def _weights_path(path: str | os.PathLike) -> Path:
    """`path` itself, or `path/trainable.safetensors` when `path` is a folder (or has no suffix)."""
    path = Path(path)
    return path / DEFAULT_FILE if path.is_dir() or not path.suffix else path


def _sidecar_path(weights: Path) -> Path:
    return weights.with_suffix(".json") if weights.suffix != ".json" else weights.with_name(weights.name + ".json")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers (their names lack prefixes)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _trainable_tensors(model: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(module, CPU copies of its trainable parameters); an Engine gives its gathered state (ZeRO-3 too)."""
    if not isinstance(model, nn.Module) and hasattr(model, "trainable_state_dict") and hasattr(model, "model"):
        module, tensors = unwrap(model.model), model.trainable_state_dict()
    elif isinstance(model, nn.Module):
        module = model = unwrap(model)
        tensors = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    else:
        raise TypeError(f"save_trainable takes a torch.nn.Module or a fastprompt.Engine, got {type(model).__name__}")
    if not tensors:
        raise ValueError(
            "the model has no trainable parameters (nothing with requires_grad=True) to save; apply a method first"
        )
    return module, {name: tensor.contiguous() for name, tensor in tensors.items()}


def save_trainable(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the trainable parameters of a fastprompt model (or an Engine's) to safetensors, plus a JSON sidecar.

    `path` is the ``.safetensors`` file (``NAME.json`` is written beside it), or a folder that receives
    ``trainable.safetensors`` and ``trainable.json``. Both files are written atomically. Returns the weights path.
    """
    from safetensors.torch import save

    module, tensors = _trainable_tensors(model)
    record = _make_record(module, tensors)
    weights = _weights_path(path)
    data = save(tensors, metadata={METADATA_KEY: json.dumps(record, sort_keys=True)})
    atomic_write_bytes(weights, data)
    sidecar = {**record, "file": weights.name, "file_sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_bytes(_sidecar_path(weights), (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
    return weights


def _parse(raw: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and record from a safetensors byte string; WeightsError for anything unreadable."""
    from safetensors.torch import load as load_tensors

    try:
        metadata = safetensors_metadata(raw)
        tensors = load_tensors(raw)
    except Exception as err:  # JSON errors, SafetensorError on truncated or damaged files
        raise WeightsError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); it is corrupt or truncated: "
            "save it again with fastprompt.save_trainable"
        ) from None
    text = metadata.get(METADATA_KEY)
    if text is None:
        raise WeightsError(
            f"{path} holds no fastprompt record, so it was not written by fastprompt.save_trainable; load a plain "
            "state_dict with model.load_state_dict(safetensors.torch.load_file(path), strict=False)"
        )
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: absurdly deep nesting
        reason = "nested too deeply to read" if isinstance(err, RecursionError) else str(err)
        raise WeightsError(f"{path}: its fastprompt record is damaged ({reason}); save the weights again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise WeightsError(f"{path}: its fastprompt record is not a {FORMAT} record; save the weights again")
    if record.get("format_version") != FORMAT_VERSION:
        raise WeightsError(
            f"{path} has format version {record.get('format_version')}, this fastprompt reads version "
            f"{FORMAT_VERSION}; load it with the fastprompt version that wrote it ({record.get('fastprompt_version')})"
        )
    _check_record(record, path)
    return tensors, record


_RECORD_FIELDS = {  # field: (accepted types, required)
    "method": ((str,), True),
    "weights": ((dict,), True),
    "options": ((dict, type(None)), False),
    "num_classes": ((int, type(None)), False),
    "backbone": ((dict, type(None)), False),
}


def _check_record(record: dict[str, Any], path: Path) -> None:
    """WeightsError naming the file for a record without `method` / `weights` (and its SHA-256) or mistyped."""
    for name, (types, required) in _RECORD_FIELDS.items():
        if name not in record:
            if required:
                raise WeightsError(f"{path}: its fastprompt record has no {name!r} entry; save the weights again")
        elif not isinstance(record[name], types) or isinstance(record[name], bool):
            kind = type(record[name]).__name__
            raise WeightsError(f"{path}: its fastprompt record's {name!r} is a {kind}; save the weights again")
    if not isinstance(record["weights"].get("sha256"), str):
        raise WeightsError(f"{path}: its fastprompt record names no weights SHA-256; save the weights again")


def read_trainable(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the record of a file written by `save_trainable`, verified against their SHA-256.

    Raises FileNotFoundError when it is missing and WeightsError when it is corrupt, modified, or disagrees with
    its JSON sidecar.
    """
    weights = _weights_path(path)
    if not weights.is_file():
        raise FileNotFoundError(
            f"trainable weights {weights} do not exist; pass the .safetensors file (or the folder) that "
            "fastprompt.save_trainable wrote"
        )
    raw = weights.read_bytes()
    tensors, record = _parse(raw, weights)
    expected, actual = record["weights"]["sha256"], tensor_digest(tensors)
    if actual != expected:
        raise WeightsError(
            f"{weights} failed its digest check (tensors SHA-256 {actual[:16]}…, recorded {expected[:16]}…): the "
            "weights were modified or corrupted after saving; save them again from the trained model"
        )
    sidecar = _sidecar_path(weights)
    if sidecar.is_file():
        try:
            described = json.loads(sidecar.read_text())
        except (OSError, ValueError, RecursionError) as err:
            raise WeightsError(
                f"{sidecar} (the JSON beside {weights.name}) is unreadable: {err!r}; delete it"
            ) from None
        if described.get("file_sha256") != hashlib.sha256(raw).hexdigest():
            raise WeightsError(
                f"{sidecar} describes other weights than {weights} holds (its file_sha256 does not match): one of the "
                f"two files was replaced. The .safetensors file carries its own record: delete {sidecar.name} to "
                "load it as it is, or restore the matching pair"
            )
    return tensors, record


# ---------------------------------------------------------------------------------------------- loading


def _describe_backbone(record: Mapping[str, Any]) -> str:
    info = record.get("backbone") or {}
    size = info.get("img_size")
    at = f" at image size {size[0]}x{size[1]}" if size else ""
    return f"{info.get('name') or info.get('class') or 'an unnamed backbone'}{at}"


def _check_method(model: nn.Module, record: Mapping[str, Any], source: Path) -> None:
    method = record["method"]
    applied = getattr(model, METHOD_ATTR, None)
    if applied is None:
        raise WeightsError(
            f"{type(model).__name__} has no fastprompt method applied, and {source} holds {method!r} weights: use "
            f"fastprompt.load({str(source)!r}, backbone=model), which applies {method!r} with the saved options, or "
            f"fastprompt.apply(model, {method!r}, num_classes=..., **options) first"
        )
    if applied != method:
        raise WeightsError(f"{source} holds {method!r} weights but the model has {applied!r} applied; apply {method!r}")
    config = getattr(model, CONFIG_ATTR, None)
    if isinstance(config, Mapping):
        mine = _full_options(method, config.get("options") or {})
        saved = record.get("options") or {}
        differ = [f"{k}: saved {saved.get(k)!r}, model {mine.get(k)!r}" for k in sorted({*mine, *saved})
                  if mine.get(k) != saved.get(k)]  # fmt: skip
        if differ:
            raise WeightsError(
                f"{source} was saved from {method!r} with other options ({'; '.join(differ)}); apply {method!r} with "
                "the saved options, or let fastprompt.load(path, backbone=...) do it"
            )


def _listed(names: list[str]) -> str:
    more = f" … and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_fit(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str | os.PathLike, hint: str = "",
    strict: bool = True,
) -> list[str]:  # fmt: skip
    """The names of `tensors` to load into `model`'s trainable parameters, after checking names and shapes.

    Errors name the missing and unexpected tensors and each shape mismatch; `hint` is appended (e.g. which
    backbone the weights were saved from). With ``strict=False`` missing and unexpected names are warned about.
    """
    params = dict(model.named_parameters())
    trainable = {name for name, param in params.items() if param.requires_grad}
    missing = sorted(trainable - set(tensors))
    unexpected = sorted(set(tensors) - trainable)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} trainable tensor(s) of the model are not in the file: {_listed(missing)}")
        if unexpected:
            count = len(unexpected)
            parts.append(f"{count} tensor(s) in the file are not trainable in the model: {_listed(unexpected)}")
        message = f"{source} does not match the model: {'; '.join(parts)}{hint}"
        if strict:
            raise WeightsError(message + "; apply the same method with the same options, or pass strict=False")
        warnings.warn(message + " (strict=False: loading the matching tensors)", RuntimeWarning, stacklevel=3)
    matching = sorted(set(tensors) & trainable)
    wrong = [
        f"{name} is {list(tensors[name].shape)} in the file but {list(params[name].shape)} in the model"
        for name in matching
        if tuple(tensors[name].shape) != tuple(params[name].shape)
    ]
    if wrong:
        raise WeightsError(f"{source} does not fit this model: {'; '.join(wrong[:_SHOWN])}{hint}")
    return matching


def _copy(model: nn.Module, tensors: Mapping[str, torch.Tensor], names: list[str]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].copy_(tensors[name].to(dtype=params[name].dtype))


def assign_trainable(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str | os.PathLike, hint: str = "",
    strict: bool = True,
) -> None:  # fmt: skip
    """Copy `tensors` into `model`'s trainable parameters once `check_fit` passes (all or nothing)."""
    _copy(model, tensors, check_fit(model, tensors, source=source, hint=hint, strict=strict))


def _check_backbone(model: nn.Module, record: Mapping[str, Any], source: Path) -> None:
    saved = (record.get("backbone") or {}).get("frozen")
    if not saved:
        return
    mine = frozen_record_of(model)
    if mine is None:
        return
    if mine["tensors"] == saved["tensors"] and mine["dtypes"] != saved["dtypes"]:  # e.g. a bf16 copy for inference
        warnings.warn(
            f"cannot verify the frozen backbone against {source}: it was saved with {saved['dtypes']} weights, "
            f"this model holds {mine['dtypes']}",
            BackboneWeightsWarning,
            stacklevel=3,
        )
        return
    if mine["sha256"] != saved["sha256"]:
        raise WeightsError(
            f"the frozen weights of this model differ from those {source} was trained on "
            f"({_describe_backbone(record)}; frozen SHA-256 {mine['sha256'][:16]}…, saved {saved['sha256'][:16]}…), "
            "so it would compute something else: pass the backbone with the weights it was trained on, or "
            "check_backbone=False to load anyway"
        )


def load_trainable(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, check_backbone: bool = True
) -> nn.Module:
    """Load weights written by `save_trainable` into `model`, which has the same method applied; returns `model`.

    Checks, before changing anything: the file's digest, the method and its options, the tensor names and
    shapes, and (``check_backbone``) that the frozen weights are those the file was saved with.
    """
    tensors, record = read_trainable(path)
    _load_checked(unwrap(model), tensors, record, _weights_path(path), strict=strict, check_backbone=check_backbone)
    return model


def _load_checked(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any], source: Path, *,
    strict: bool, check_backbone: bool,
) -> None:  # fmt: skip
    """Method and options, names and shapes, then the frozen weights; only then copy."""
    _check_method(model, record, source)
    hint = f" (the weights were saved from {_describe_backbone(record)})"
    names = check_fit(model, tensors, source=source, hint=hint, strict=strict)
    if check_backbone and len(names) == len(tensors) == len(trainable_names(model)):
        _check_backbone(model, record, source)
    elif check_backbone:  # strict=False with other trainable names: the frozen sets differ by construction
        warnings.warn(
            f"cannot verify the frozen backbone against {source}: the model trains other tensors than the file holds",
            BackboneWeightsWarning,
            stacklevel=3,
        )
    _copy(model, tensors, names)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters with requires_grad, in model order."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def _create_timm(name: str, img_size: list[int] | None, checkpoint: Path | None, recipe: Mapping | None) -> nn.Module:
    from fastprompt.models import create_backbone

    if not img_size or img_size[0] != img_size[1]:
        raise ValueError(f"cannot rebuild {name!r}: the record holds no square image size ({img_size})")
    same = recipe is not None and recipe.get("name") == name
    kwargs = dict(recipe.get("model_kwargs") or {}) if same else {}
    dynamic = bool(recipe.get("dynamic_img_size")) if same else False
    return create_backbone(
        name, img_size=img_size[0], pretrained=checkpoint is None, checkpoint=checkpoint, dynamic_img_size=dynamic,
        **kwargs,
    )  # fmt: skip


@contextlib.contextmanager
def _hub_offline() -> Any:
    """Hugging Face hub in offline mode for the block: the local cache only, never a download."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if saved[1] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[1]


def _what_is_fetched(info: Mapping[str, Any]) -> str:
    """The hub download the record's backbone would need, in words."""
    name = info.get("name")
    if info.get("library") == "transformers":
        return f"the Hugging Face repo {name!r}"
    try:
        import timm

        repo = timm.models.get_pretrained_cfg(name).hf_hub_id if name else None
    except Exception:  # an unknown name: say what is known
        repo = None
    return f"timm's pretrained weights for {name!r}" + (f" (Hugging Face repo {repo!r})" if repo else "")


def _create_backbone(
    record: Mapping[str, Any], backbone: str | os.PathLike | None, *, allow_download: bool = True, source: Path
) -> nn.Module:
    """The pretrained network named by `backbone` (timm name, weight file, HF folder/name) or by the record.

    A name taken from the record (`backbone` None) is the file author's choice: without `allow_download` only the
    local cache is used, and a WeightsError names what a download would fetch.
    """
    info = record.get("backbone") or {}
    if backbone is None and not allow_download and info.get("name"):
        refusal = WeightsError(
            f"{source} names {_what_is_fetched(info)} as its backbone, which is not in the local cache, and "
            "fastprompt.load downloads only with allow_download=True; pass that if you trust the file's source, or "
            "backbone=<model, local weight file or folder>"
        )
        if info.get("library") == "transformers" and not Path(info["name"]).is_dir():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(info["name"], "config.json"), str):
                raise refusal  # decided before importing the model class (which alone can take seconds)
        with _hub_offline():
            try:
                return _create_backbone(record, None, source=source)
            except Exception as error:  # not cached (each library words it its own way)
                raise refusal from error
    library, name = info.get("library"), info.get("name")
    if library == "transformers":
        import transformers

        class_name = (info.get("class") or "").rsplit(".", 1)[-1]
        cls = getattr(transformers, class_name, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ValueError(f"cannot rebuild the Hugging Face backbone {info.get('class')}; pass backbone=model")
        return cls.from_pretrained(os.fspath(backbone) if backbone is not None else name)
    if library != "timm":
        raise ValueError(
            f"the weights were saved from a {info.get('class')} backbone, which fastprompt cannot rebuild by name; "
            "pass the backbone itself: fastprompt.load(path, backbone=model)"
        )
    if backbone is None:
        if not name:
            raise ValueError(
                "the record names no timm architecture (the backbone was built without timm.create_model); pass "
                "backbone=<model, timm name or weight file>"
            )
        return _create_timm(name, info.get("img_size"), None, info.get("recipe"))
    if Path(backbone).is_file():
        if not name:
            raise ValueError(
                f"the record names no timm architecture to load {backbone} into; pass backbone=<model object>"
            )
        return _create_timm(name, info.get("img_size"), Path(backbone), info.get("recipe"))
    import timm

    text = os.fspath(backbone)
    if not timm.is_model(text):
        raise ValueError(
            f"backbone {text!r} is neither an existing weight file nor a timm model name; pass a model object, a "
            f"local weight file, or a timm name (the weights were saved from {_describe_backbone(record)})"
        )
    return _create_timm(text, info.get("img_size"), None, info.get("recipe"))


def load(
    path: str | os.PathLike,
    backbone: nn.Module | str | os.PathLike | None = None,
    *,
    check_backbone: bool = True,
    strict: bool = True,
    allow_download: bool = False,
) -> nn.Module:
    """Rebuild a patched model from `save_trainable` output in one call; returned in eval mode.

    `backbone`: a model object (plain, or with the method already applied), a local weight file of the recorded
    architecture, a timm model name (timm's pretrained weights), a Hugging Face folder/name, or None for the
    recorded name (or, for a patched Hugging Face model's `save_pretrained` folder, that folder). The method is
    applied with the saved options and number of classes, then `load_trainable`'s checks run. A name you pass loads
    through timm's / Hugging Face's usual cache and download. The recorded name (``backbone=None``) was chosen by
    the file's author: it is fetched from the hub only with ``allow_download=True``; otherwise only the local cache
    is used (WeightsError, at once, naming what would be fetched).
    """
    tensors, record = read_trainable(path)
    source = _weights_path(path)
    if isinstance(backbone, nn.Module):
        backbone = unwrap(backbone)
    if isinstance(backbone, nn.Module) and getattr(backbone, METHOD_ATTR, None) is not None:
        model = backbone
    else:
        if isinstance(backbone, nn.Module):
            base = backbone
        elif backbone is None or isinstance(backbone, (str, os.PathLike)):
            library = (record.get("backbone") or {}).get("library")
            if backbone is None and library == "transformers" and (Path(path) / "config.json").is_file():
                backbone = path  # a patched model's save_pretrained folder holds its own backbone
            base = _create_backbone(record, backbone, allow_download=allow_download, source=source)
        else:
            raise TypeError(
                f"backbone must be a model, a weight file, a model name or None, got {type(backbone).__name__}"
            )
        num_classes = record.get("num_classes")
        with torch.random.fork_rng(devices=[]):  # trainable parts are overwritten; leave the caller's RNG alone
            torch.manual_seed(0)
            from fastprompt.patch import apply

            model = apply(base, record["method"], num_classes=num_classes, **(record.get("options") or {}))
    _load_checked(model, tensors, record, source, strict=strict, check_backbone=check_backbone)
    return model.eval()


_RUN_FOLDER_NAMES = ("RUN_CONFIG", "LoadedRun", "build_run_model", "load_run", "read_checkpoint")


def __getattr__(name: str) -> Any:
    """Run folders and checkpoints live in `fastprompt.run_folders`; importable from here as before."""
    if name in _RUN_FOLDER_NAMES:
        from fastprompt import run_folders

        return getattr(run_folders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
