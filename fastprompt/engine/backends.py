"""Engine backends: plain PyTorch (autocast, GradScaler, DDP) and DeepSpeed (ZeRO 0-3), one small interface.

Both backends run the same loop: ``forward`` per micro-batch, ``backward(loss)`` per finite micro-batch (the loss is
divided by the accumulation steps), ``step()`` once per accumulation group. The learning rate is written into the
torch optimizer's param groups by the Engine before each step, so both backends follow the same schedule.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from fastprompt.engine.data import call_model, map_tensors
from fastprompt.engine.precision import store_frozen_in

_ENGINE_OWNED_KEYS = {
    "optimizer": "Engine(optimizer=..., lr=..., weight_decay=...)",
    "scheduler": "Engine(schedule=..., warmup_steps=...)",
    "gradient_accumulation_steps": "Engine(grad_accum=...)",
    "train_batch_size": "the DataLoader's batch_size and Engine(grad_accum=...)",
    "train_micro_batch_size_per_gpu": "the DataLoader's batch_size",
    "managed_gradient_accumulation": "nothing (the Engine drives accumulation itself)",
}


def world_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torch.distributed when initialised, else from the launcher's env vars."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world, int(os.environ.get("LOCAL_RANK", 0))


def deepspeed_installed() -> bool:
    """Whether `import deepspeed` can be attempted (without paying for the import)."""
    return importlib.util.find_spec("deepspeed") is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(*, required: bool) -> None:
    """Initialise torch.distributed from launcher env vars (torchrun / deepspeed launcher).

    With `required` (DeepSpeed) a single process without a launcher gets RANK=0, WORLD_SIZE=1, LOCAL_RANK=0,
    MASTER_ADDR=127.0.0.1 and a free MASTER_PORT. Backend: nccl on CUDA, gloo on CPU.
    """
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        return
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 and not required:
        return
    if required and "RANK" not in os.environ:
        defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        for key, value in defaults.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def all_finite(value: torch.Tensor, world_size: int) -> bool:
    """Whether `value` is finite on every rank (one tiny all-reduce when distributed, so ranks skip together)."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if world_size > 1:
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's `obj`, in rank order (a list of one in a single process)."""
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def barrier(world_size: int) -> None:
    """Synchronise ranks (no-op in a single process)."""
    if world_size > 1:
        torch.distributed.barrier()


@runtime_checkable
class Backend(Protocol):
    """What the Engine uses of a backend; `TorchBackend` and `DeepSpeedBackend` implement it."""

    name: ClassVar[str]  # "torch" or "deepspeed", recorded in checkpoints
    module: nn.Module  # the model as the backend placed it (for train()/eval())
    optimizer: torch.optim.Optimizer  # the torch optimizer whose param groups get the scheduled lr
    device: torch.device

    def to_device(self, value: Any, *, cast: bool = True) -> Any: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def forward(self, inputs: Any, *, train: bool) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def trainable_state(self, names: list[str]) -> dict[str, torch.Tensor]: ...

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None: ...

    def optimizer_state(self) -> dict[str, Any]: ...

    def load_optimizer_state(self, states: list[dict[str, Any]], rank: int) -> None: ...


class TorchBackend:
    """Plain PyTorch: autocast for bf16/fp16 (GradScaler for fp16) with the frozen weights stored in that dtype
    (`store_frozen_in`; trainable weights, gradients and optimizer state stay fp32), clipping, DistributedDataParallel
    on >1 rank."""

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        precision: str,
        grad_accum: int,
        clip_grad: float | None,
        world_size: int,
        local_rank: int,
    ) -> None:
        self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        self.module = model.to(self.device)
        self.optimizer = optimizer
        self.grad_accum, self.clip_grad = grad_accum, clip_grad
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if self.autocast_dtype is not None:  # autocast would cast every frozen weight at every step
            store_frozen_in(model, self.autocast_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.train_model: nn.Module = model
        if world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def to_device(self, value: Any, *, cast: bool = True) -> Any:
        """Move every tensor of a batch to the training device (autocast handles dtypes, so `cast` is unused)."""
        return map_tensors(value, lambda t: t.to(self.device, non_blocking=True))

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context a forward of `module` runs in: autocast to bf16/fp16, or nothing for fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, inputs: Any, *, train: bool) -> torch.Tensor:
        """Model outputs for one batch (through DDP when training on several ranks)."""
        with self.autocast():
            return call_model(self.train_model if train else self.module, inputs)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss / grad_accum`."""
        scaled = loss / self.grad_accum
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def step(self) -> None:
        """Clip, apply one optimizer step and clear the gradients."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def trainable_state(self, names: list[str]) -> dict[str, torch.Tensor]:
        """CPU copies of the named trainable parameters."""
        params = dict(self.module.named_parameters())
        return {name: params[name].detach().to("cpu", copy=True) for name in names}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved values into the trainable parameters."""
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def optimizer_state(self) -> dict[str, Any]:
        """Optimizer (and loss-scaler) state of this rank."""
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_optimizer_state(self, states: list[dict[str, Any]], rank: int) -> None:
        """Restore the optimizer state (replicated on every rank: rank 0's copy)."""
        self.optimizer.load_state_dict(states[0]["optimizer"])
        if self.scaler is not None and "scaler" in states[0]:
            self.scaler.load_state_dict(states[0]["scaler"])


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`, recursing into nested dicts."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_user_config(config: dict | str | os.PathLike | None) -> dict:
    """A user DeepSpeed config as a dict (from a dict or a JSON file), checked for keys the Engine owns."""
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"deepspeed_config file {str(path)!r} does not exist; pass a dict or a JSON file path")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"deepspeed_config file {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise TypeError(f"deepspeed_config must be a dict or a JSON file path, got {type(config).__name__}")
    for key, instead in _ENGINE_OWNED_KEYS.items():
        if key in config:
            raise ValueError(f"deepspeed_config key {key!r} is set by the Engine; use {instead} instead")
    return config


def deepspeed_config(
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    zero_stage: int,
    precision: str,
    clip_grad: float | None,
    user: dict,
) -> dict:
    """The generated DeepSpeed config with the user's config deep-merged over it."""
    generated = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(clip_grad) if clip_grad is not None else 0.0,
        # ZeRO-3's memory-efficient linear replaces torch.nn.functional.linear process-wide, for good; keep it off
        # unless the user's config turns it on.
        "zero_optimization": {"stage": zero_stage, "memory_efficient_linear": False},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return deep_merge(generated, user)


def import_deepspeed() -> Any:
    """Import DeepSpeed for this machine: CPU accelerator without CUDA, and no JIT build of the shm comm op."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce op (used only by inference_all_reduce) on
    # CPU when the op probes as compatible, costing about a minute at every start. The probe result is a cached
    # module dict that DeepSpeed consults before building; marking the op incompatible makes gloo do the work.
    compatible = deepspeed.ops.__compatible_ops__
    compatible["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedBackend:
    """DeepSpeed: ZeRO 0-3, bf16/fp16, clipping and gradient reduction; the Engine owns accumulation boundaries."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, config: dict, precision: str) -> None:
        self.ds = import_deepspeed()
        init_distributed(required=True)
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if (
            half is not None
        ):  # DeepSpeed casts the whole module to it anyway; this also keeps the frozen weights' record
            store_frozen_in(model, half)
        self.engine, self.wrapped_optimizer, _, _ = self.ds.initialize(model=model, optimizer=optimizer, config=config)
        self.module = self.engine.module
        self.optimizer = optimizer
        self.device = self.engine.device
        self.zero_stage = self.engine.zero_optimization_stage()
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def to_device(self, value: Any, *, cast: bool = True) -> Any:
        """Move a batch to the engine's device; with `cast`, floating tensors take the engine's half dtype."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if cast and self.input_dtype is not None and tensor.is_floating_point():
                return tensor.to(self.device, dtype=self.input_dtype)
            return tensor.to(self.device)

        return map_tensors(value, move)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context a forward of `module` runs in: nothing (the module and the cast inputs carry the dtype)."""
        return contextlib.nullcontext()

    def forward(self, inputs: Any, *, train: bool) -> torch.Tensor:
        """Model outputs for one batch (through the DeepSpeed engine, which gathers ZeRO-3 parameters)."""
        return call_model(self.engine, inputs)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients (DeepSpeed divides by the accumulation steps)."""
        self.engine.backward(loss)

    def step(self) -> None:
        """Reduce, clip and apply one optimizer step."""
        self.engine.step()

    def _gathered(self, params: list[nn.Parameter], modifier_rank: int | None) -> contextlib.AbstractContextManager:
        if self.zero_stage == 3:
            return self.ds.zero.GatheredParameters(params, modifier_rank=modifier_rank)
        return contextlib.nullcontext()

    def trainable_state(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Full (ZeRO-3-gathered) CPU copies of the named trainable parameters."""
        params = dict(self.module.named_parameters())
        selected = [params[name] for name in names]
        with self._gathered(selected, modifier_rank=None):
            return {name: params[name].detach().to("cpu", copy=True) for name in names}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved values into the (ZeRO-3-gathered) trainable parameters."""
        params = dict(self.module.named_parameters())
        selected = [params[name] for name in state]
        with self._gathered(selected, modifier_rank=0), torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's optimizer state (a ZeRO partition under ZeRO 1-3, with the fp32 master weights)."""
        return {"optimizer": self.engine.optimizer.state_dict()}

    def load_optimizer_state(self, states: list[dict[str, Any]], rank: int) -> None:
        """Restore optimizer state saved by `optimizer_state` on every rank (same world size)."""
        optimizer = self.engine.optimizer
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer.load_state_dict(states[rank]["optimizer"])
        else:
            optimizer.load_state_dict(
                [state["optimizer"] for state in states], load_optimizer_states=True, load_from_fp32_weights=True
            )
