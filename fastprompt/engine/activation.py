"""Fit a training step into a memory budget with the least recomputation: plans, step measurement, the planner.

A plan checkpoints the first `full` blocks whole and the next `selective` blocks selectively (see
`fastprompt.checkpointing`). Plans form one chain from no recomputation to full recomputation of every block:

    none → selective on 1 … L blocks → full on 1 block + selective on L−1 → … → full on all L blocks

Each step of the chain recomputes more and keeps less. The planner measures one training step without
recomputation, block by block (bytes each block keeps alive for backward, and the bytes of its attention
outputs, which selective recomputation keeps), predicts every plan's step peak from that, and takes the first
plan in the chain predicted to fit. It then measures the chosen plan's real step peak and moves along the chain
(down while the cheaper neighbour also fits, up while the chosen one does not), so the result is the
least-recompute plan whose measured peak fits.

Memory is what the step holds on its device: the model's tensors, optimizer state, and the step's peak above
them. On CUDA the step peak is `torch.cuda.max_memory_allocated`; elsewhere it is the peak of the bytes of
tensor storages alive during the step, tracked op by op (`LiveBytes`), which counts what an allocator would
have to hold (not allocator caching or fragmentation).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastprompt.checkpointing import _model_blocks, activation_plan, checkpoint_activations, is_kept_op, tracking_qkv

__all__ = [
    "ActivationMemoryError",
    "LiveBytes",
    "Plan",
    "StepProfile",
    "choose_plan",
    "format_bytes",
    "parse_bytes",
    "plan_chain",
    "profile_step",
    "resolve_budget",
    "step_peak",
]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
MEMINFO = Path("/proc/meminfo")


class ActivationMemoryError(ValueError):
    """No plan fits the training step into the memory budget."""


def parse_bytes(text: str | int) -> int:
    """Parse a size such as '24GB', '80 GiB', '512MB', '1000' or an int (bytes) into a number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"memory size must be positive, got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read memory size {text!r}; write a number and a unit, e.g. 24GB, 80GiB or 512MB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return value


def format_bytes(count: float) -> str:
    """A size in MiB or GiB with one decimal, e.g. '1.5 GiB'."""
    return f"{count / 2**30:.2f} GiB" if abs(count) >= 2**30 else f"{count / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """Checkpoint blocks [0, full) whole and blocks [full, full + selective) selectively; the rest keep everything."""

    full: int = 0
    selective: int = 0

    def policies(self, depth: int) -> list[str]:
        """The policy of each of `depth` blocks, input side first."""
        if self.full < 0 or self.selective < 0 or self.full + self.selective > depth:
            raise ValueError(f"{self} does not fit a {depth}-block model")
        rest = depth - self.full - self.selective
        return ["full"] * self.full + ["selective"] * self.selective + ["none"] * rest

    def describe(self, depth: int) -> str:
        """E.g. 'none', 'selective on 4/12 blocks', 'full on 3/12 blocks + selective on 9/12'."""
        parts = [
            f"{name} on {count}/{depth} blocks"
            for name, count in (("full", self.full), ("selective", self.selective))
            if count
        ]
        return " + ".join(parts) if parts else "none"

    def apply(self, model: nn.Module) -> nn.Module:
        """Set every block of `model` to this plan's policy (replacing any earlier setting); returns `model`."""
        return _set_policies(model, self.policies(len(_model_blocks(model))))


def _set_policies(model: nn.Module, policies: list[str]) -> nn.Module:
    """Give block i of `model` the checkpointing policy `policies[i]`, input side first; returns `model`."""
    for index, policy in enumerate(policies):
        checkpoint_activations(model, policy, [index])
    return model


def plan_chain(depth: int, *, selective: bool = True) -> list[Plan]:
    """Every plan, least recomputation first: none, selective on 1..L, then full on 1..L (selective on the rest).

    Without `selective` (DeepSpeed ZeRO-3, whose parameter gathering inside a block differs between the forward and
    its recomputation, which selective checkpointing refuses): none, then full on 1..L (the rest kept)."""
    if not selective:
        return [Plan(j, 0) for j in range(depth + 1)]
    return [Plan(0, k) for k in range(depth + 1)] + [Plan(j, depth - j) for j in range(1, depth + 1)]


# ---------------------------------------------------------------------------------------------------- measuring


def _output_bytes(output: Any) -> int:
    """Bytes of the distinct storages behind the tensors in `output`."""
    storages = {
        t.untyped_storage()._cdata: t.untyped_storage().nbytes()
        for t in tree_leaves(output)
        if isinstance(t, torch.Tensor)
    }
    return sum(storages.values())


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages that ops allocate while this mode is active: alive now (`current`) and at most (`peak`).

    Each op output whose storage is new is counted until the last tensor that the mode saw on it dies; views and
    in-place results of memory allocated before the mode are not counted. Works on the meta device too, where a
    step costs no arithmetic: the same op sequence allocates the same bytes. Optionally attributes the bytes of the
    outputs selective checkpointing keeps (attention ops, q/k/v; `is_kept_op`) to the block running them
    (`attention_bytes`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors alive]
        self.block: int | None = None
        self.attention_bytes: dict[int, int] = {}
        self._kept: set[int] = set()

    def reset_peak(self) -> None:
        """Start a new peak from the current level."""
        self.peak = self.current

    def _release(self, key: int, entry: list[int]) -> None:
        entry[1] -= 1
        if entry[1] == 0 and self._storages.get(key) is entry:
            del self._storages[key]
            self._kept.discard(key)  # a later storage at the same address is another tensor, kept or not
            self.current -= entry[0]

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        if tensor.is_sparse:
            return
        storage = tensor.untyped_storage()
        key, size = storage._cdata, storage.nbytes()  # the storage's identity, on every device (meta included)
        if size == 0:
            return
        entry = self._storages.get(key)
        if entry is None:
            if key in inputs:  # a view or in-place result of memory this mode never saw allocated
                return
            entry = self._storages[key] = [size, 0]
            self.current += size
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key, entry)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and not t.is_sparse
        }
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        for tensor in outputs:
            self._track(tensor, inputs)
        if self.block is not None and is_kept_op(func):
            fresh = {}  # count each storage once (q, k and v are views of one projection output)
            for tensor in outputs:
                storage = tensor.untyped_storage()
                if storage._cdata in self._storages and storage._cdata not in self._kept:  # allocated in the step
                    self._kept.add(storage._cdata)
                    fresh[storage._cdata] = storage.nbytes()
            self.attention_bytes[self.block] = self.attention_bytes.get(self.block, 0) + sum(fresh.values())
        return out


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


@contextlib.contextmanager
def _peak_meter(device: torch.device) -> Iterator[Callable[[], int]]:
    """Yields a function returning the step's peak bytes above the level at entry (CUDA allocator or LiveBytes)."""
    if _cuda(device):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield lambda: torch.cuda.max_memory_allocated(device) - base
        return
    with LiveBytes() as meter:
        yield lambda: meter.peak


def step_peak(run_step: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes above the starting level while `run_step()` runs (one forward + backward, say) on `device`."""
    device = torch.device(device)
    with _peak_meter(device) as peak:
        run_step()
        if _cuda(device):
            torch.cuda.synchronize(device)
        return peak()


@dataclass(frozen=True)
class StepProfile:
    """One training step without recomputation, block by block.

    peak: step peak above the level before it. kept[i]: bytes block i's forward leaves alive for backward (its
    output included). selective[i] / full[i]: what block i keeps under selective / full recomputation (its output,
    plus, for selective, its attention and q/k/v outputs).
    """

    peak: int
    kept: tuple[int, ...]
    selective: tuple[int, ...]
    full: tuple[int, ...]

    def predict(self, plan: Plan) -> int:
        """Predicted step peak of `plan`: the backward of block i holds what blocks < i keep plus all of block i
        (recomputed, with a second copy of its output, when checkpointed); the rest of the step (inputs, head,
        gradients) is as measured."""
        depth = len(self.kept)
        kept = {"none": self.kept, "selective": self.selective, "full": self.full}
        policies = plan.policies(depth)
        held = [kept[policy][i] for i, policy in enumerate(policies)]
        # a recomputed block rebuilds its output next to the original one, which is still alive
        rebuilt = [self.full[i] if policy != "none" else 0 for i, policy in enumerate(policies)]
        worst = max(sum(held[:i]) + self.kept[i] + rebuilt[i] for i in range(depth))
        return self.peak - sum(self.kept) + worst


def profile_step(model: nn.Module, run_step: Callable[[], Any], device: torch.device | str = "cpu") -> StepProfile:
    """Run `run_step()` once with no block recomputed and measure the peak and each block's kept bytes."""
    device = torch.device(device)
    blocks = _model_blocks(model)
    saved_plan = activation_plan(model)
    Plan().apply(model)
    entry: dict[int, int] = {}
    kept: dict[int, int] = {}
    outputs: dict[int, int] = {}
    meter = LiveBytes()

    def level() -> int:
        return torch.cuda.memory_allocated(device) if _cuda(device) else meter.current

    def before(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if index not in entry:
                entry[index] = level()
                meter.block = index

        return hook

    def after(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if index not in kept:
                kept[index] = level() - entry[index]
                outputs[index] = _output_bytes(output)
                meter.block = None

        return hook

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(before(index)))
        handles.append(block.register_forward_hook(after(index)))
    try:
        with meter, tracking_qkv(blocks):
            if _cuda(device):  # the allocator's peak; the mode only attributes attention outputs here
                step = step_peak(run_step, device)
            else:
                run_step()
                step = meter.peak
    finally:
        for handle in handles:
            handle.remove()
        _set_policies(model, saved_plan)
    missing = [i for i in range(len(blocks)) if i not in kept]
    if missing:
        raise RuntimeError(
            f"the measured step did not run blocks {missing}; the planner needs a step through every block"
        )
    depth = len(blocks)
    kept_t = tuple(max(0, kept[i]) for i in range(depth))
    full = tuple(min(outputs[i], kept_t[i]) for i in range(depth))
    selective = tuple(min(full[i] + meter.attention_bytes.get(i, 0), kept_t[i]) for i in range(depth))
    return StepProfile(peak=step, kept=kept_t, selective=selective, full=full)


# ---------------------------------------------------------------------------------------------------- planning


def available_bytes(device: torch.device | str) -> int:
    """Free memory of `device`: CUDA free memory (cudaMemGetInfo), else MemAvailable of /proc/meminfo."""
    device = torch.device(device)
    if _cuda(device):
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", MEMINFO.read_text(), flags=re.MULTILINE)
    except OSError:
        match = None
    if match is None:
        raise ActivationMemoryError(
            "activation_memory='auto' on CPU reads MemAvailable from /proc/meminfo, which this system lacks; "
            "give the budget explicitly, e.g. activation_memory='16GB'"
        )
    return int(match.group(1)) * 1024


def _is_auto(budget: object) -> bool:
    """Whether a budget option asks for the device's free memory ('auto', any case and spacing)."""
    return isinstance(budget, str) and budget.strip().lower() == "auto"


def resolve_budget(budget: str | int, device: torch.device | str, resident_bytes: int) -> int:
    """Bytes the step may use in total. 'auto': the device's free memory plus what the model already holds there
    (`resident_bytes`, counted by the budget); otherwise a size ('4GB', '512MiB') or a number of bytes."""
    if _is_auto(budget):
        return available_bytes(device) + resident_bytes
    return parse_bytes(budget)


def _walk_tensors(value: Any, seen: set[int], depth: int = 4) -> Iterator[torch.Tensor]:
    """Tensors inside `value`: itself, or inside its lists, tuples, sets and dicts (at most `depth` levels down)."""
    if isinstance(value, torch.Tensor):
        yield value
        return
    if depth == 0 or id(value) in seen or not isinstance(value, (list, tuple, set, dict)):
        return
    seen.add(id(value))
    for item in value.values() if isinstance(value, dict) else value:
        yield from _walk_tensors(item, seen, depth - 1)


def resident_bytes(*holders: Any) -> int:
    """Bytes of the distinct storages behind the tensors that modules / optimizers hold (parameters, buffers, grads,
    state, and for a torch optimizer its params too). Any other object (DeepSpeed's ZeRO or bf16 optimizer wrapper)
    counts the tensors its attributes hold directly or in containers: its fp32 master partitions, flat buffers, and
    the state of the torch optimizer it wraps."""
    storages: dict[tuple[str, int], int] = {}
    seen: set[int] = set()

    def add(tensor: Any) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()

    def add_holder(holder: Any) -> None:
        if id(holder) in seen:
            return
        seen.add(id(holder))
        if isinstance(holder, nn.Module):
            for tensor in [*holder.parameters(), *holder.buffers()]:
                add(tensor)
                add(tensor.grad)
                add(getattr(tensor, "ds_tensor", None))  # this rank's ZeRO-3 partition of a parameter
        elif isinstance(holder, torch.optim.Optimizer):
            for group in holder.param_groups:
                for param in group["params"]:
                    add(param)
                    add(param.grad)
            for state in holder.state.values():
                for value in state.values():
                    add(value)
        elif holder is not None:
            for value in vars(holder).values():
                if isinstance(value, (nn.Module, torch.optim.Optimizer)):
                    add_holder(value)
                for tensor in _walk_tensors(value, seen):
                    add(tensor)

    for holder in holders:
        add_holder(holder)
    return sum(storages.values())


@dataclass(frozen=True)
class PlanChoice:
    """The planner's answer: the plan, the budget, and the figures it was chosen on (bytes)."""

    plan: Plan
    description: str
    budget: int
    fixed: int
    measured_peak: int
    predicted_peak: int
    unrecomputed_peak: int

    def record(self) -> dict[str, Any]:
        """JSON-ready fields for metrics.jsonl."""
        return {
            "activation_plan": self.description,
            "activation_plan_full_blocks": self.plan.full,
            "activation_plan_selective_blocks": self.plan.selective,
            "activation_budget_bytes": self.budget,
            "activation_step_bytes": self.fixed + self.measured_peak,
        }


def choose_plan(
    model: nn.Module,
    run_step: Callable[[], Any],
    budget: int,
    *,
    fixed: int,
    device: torch.device | str = "cpu",
    profile: StepProfile | None = None,
    selective: bool = True,
) -> PlanChoice:
    """The least-recompute plan whose step (`fixed` bytes + measured step peak) fits `budget`; applied to `model`.

    `run_step()` runs one forward + backward (the caller restores gradients and RNG afterwards). `profile`: a
    `profile_step` result to predict from (measured here when None). `selective`: whether plans may use selective
    recomputation (see `plan_chain`). Raises
    ActivationMemoryError naming the smallest budget that would work when even full recomputation does not fit.
    """
    device = torch.device(device)
    depth = len(_model_blocks(model))
    chain = plan_chain(depth, selective=selective)
    measured: dict[int, int] = {}
    if profile is None:
        profile = profile_step(model, run_step, device)
        measured[0] = profile.peak  # the profile step is plan "none"
    limit = budget - fixed

    def peak_of(position: int) -> int:
        if position not in measured:
            chain[position].apply(model)
            measured[position] = step_peak(run_step, device)
        return measured[position]

    predicted = [profile.predict(plan) for plan in chain]
    start = next((i for i, value in enumerate(predicted) if value <= limit), len(chain) - 1)
    position = start
    while position < len(chain) - 1 and peak_of(position) > limit:
        position += 1
    if peak_of(position) > limit:
        Plan().apply(model)
        needed = fixed + peak_of(position)
        raise ActivationMemoryError(
            f"the training step does not fit activation_memory={format_bytes(budget)} even with every block fully "
            f"recomputed: it needs {format_bytes(needed)} ({needed} bytes; model and optimizer "
            f"{format_bytes(fixed)} + step peak {format_bytes(peak_of(position))}); give at least that, or lower the "
            "batch size"
        )
    while position > 0 and peak_of(position - 1) <= limit:
        position -= 1
    plan = chain[position]
    plan.apply(model)
    return PlanChoice(
        plan=plan,
        description=plan.describe(depth),
        budget=budget,
        fixed=fixed,
        measured_peak=peak_of(position),
        predicted_peak=predicted[position],
        unrecomputed_peak=profile.peak,
    )


# ---------------------------------------------------------------------------------------------------- the Engine


def check_budget_option(value: object, grad_checkpointing: bool) -> str | int | None:
    """Validate Engine's `activation_memory` option (None, 'auto', a size such as '4GB', or bytes)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(
            f"option 'activation_memory' must be None, 'auto', a size such as '4GB' or bytes, got {value!r}"
        )
    if not _is_auto(value):
        try:
            parse_bytes(value)
        except ValueError as error:
            raise ValueError(f"option 'activation_memory': {error}") from None
    if grad_checkpointing:
        raise ValueError(
            "options 'activation_memory' and 'grad_checkpointing' both decide what to recompute; pass only one "
            "(activation_memory picks the recomputation itself)"
        )
    return value


def _optimizer_state_to_come(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state not yet allocated: AdamW/Adam keep two tensors per parameter, SGD with momentum one."""
    slots = 0
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        slots = 2
    elif isinstance(optimizer, torch.optim.SGD) and any(group.get("momentum", 0) for group in optimizer.param_groups):
        slots = 1
    return sum(
        slots * p.numel() * p.element_size()
        for group in optimizer.param_groups
        for p in group["params"]
        if p not in optimizer.state or not optimizer.state[p]
    )


def _backend_bytes(backend: Any) -> tuple[int, int]:
    """(held now, to come) by the backend besides the step itself: the model, gradients, optimizer state and, under
    DeepSpeed, its master copies and flat buffers; then the optimizer state its first step will allocate."""
    holders: list[Any] = [backend.module, backend.optimizer]
    wrapper = getattr(getattr(backend, "engine", None), "optimizer", None)
    if wrapper is not None and wrapper is not backend.optimizer:
        holders.append(wrapper)  # DeepSpeed's ZeRO / bf16 optimizer: fp32 partitions, gradient buffers
    return resident_bytes(*holders), _optimizer_state_to_come(backend.optimizer)


def plan_engine_step(engine: Any, loader: Any, budget: str | int) -> PlanChoice:
    """Choose and apply the activation plan for an Engine's training step on the first batch of `loader`.

    Works on every backend: the measured steps run the bare training module (not DDP or DeepSpeed's engine, so ranks
    need not agree on the number of probes) in the precision the backend trains in (autocast on the torch backend;
    DeepSpeed's bf16/fp16 module and inputs), and take gradients with `torch.autograd.grad`, so no `.grad` and no
    DeepSpeed gradient hook is touched. The fixed bytes are what the backend holds (`_backend_bytes`). Every RNG is
    restored afterwards, so training is unchanged.
    """
    from fastprompt.engine.checkpoint import rng_state, set_rng_state
    from fastprompt.engine.data import call_model, split_batch

    backend = engine.backend
    model = backend.module
    device = backend.device
    saved_rng = rng_state()
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise ValueError("the training loader yielded no batches") from None
    inputs, targets = split_batch(batch)
    inputs, targets = backend.to_device(inputs), backend.to_device(targets, cast=False)
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.train()

    def run_step() -> None:
        with backend.autocast():
            loss = engine.loss_fn(call_model(model, inputs), targets)
        torch.autograd.grad(loss, params, allow_unused=True)

    try:
        resident, to_come = _backend_bytes(backend)
        fixed = resident + to_come
        limit = resolve_budget(budget, device, resident)
        state = rng_state()

        def seeded_step() -> None:  # every probe sees the same dropout / augmentation draws
            set_rng_state(state)
            run_step()

        selective = getattr(backend, "zero_stage", 0) != 3
        choice = choose_plan(model, seeded_step, limit, fixed=fixed, device=device, selective=selective)
    finally:
        model.train(was_training)
        set_rng_state(saved_rng)
    return choice
