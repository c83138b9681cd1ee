"""`fastprompt.Engine`: train, evaluate and checkpoint a parameter-efficient model on PyTorch or DeepSpeed.

Batches follow the convention of `fastprompt.engine.data`: ``(inputs, targets)`` or ``{"image", "target"}``, where
``inputs`` is a tensor, a tuple of tensors (passed as ``*args``) or a dict (passed as ``**kwargs``).

Only parameters with ``requires_grad`` are optimised and checkpointed (by name). The training order is a function of
``(seed, epoch)``, so a run killed at any point resumes from its last checkpoint (``fit(resume=True)``) and, on the CPU
torch backend, ends with bit-identical parameters. Under several ranks (torchrun or the deepspeed launcher) the
training loader is sharded like a DistributedSampler; evaluate/predict run the full loader on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fastprompt.engine.activation import PlanChoice, format_bytes, plan_engine_step
from fastprompt.engine.backends import (
    Backend,
    DeepSpeedBackend,
    TorchBackend,
    all_finite,
    barrier,
    deepspeed_config,
    deepspeed_installed,
    gather_objects,
    init_distributed,
    world_info,
)
from fastprompt.engine.checkpoint import (
    CheckpointError,
    keep_previous,
    read_checkpoint,
    read_first_good,
    remove_stale_temporaries,
    restore_best,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from fastprompt.engine.config import CHECKPOINT_VERSION, EngineConfig, Resolved, check_version, saved_config
from fastprompt.engine.data import (
    EpochSampler,
    LossFn,
    auto_loss,
    balanced_class_weights,
    batch_size_of,
    batches_per_epoch,
    class_counts,
    dataset_targets,
    is_multilabel,
    rebuild_loader,
    split_batch,
)
from fastprompt.engine.precision import cpu_bf16_support
from fastprompt.engine.report import (
    TENSORBOARD_DIR,
    TensorBoardLogger,
    write_curves,
    write_metrics_csv,
    write_metrics_jsonl,
)
from fastprompt.engine.state import BestEpoch, RunningLoss, TrainState
from fastprompt.runlock import run_lock

_LOG = logging.getLogger("fastprompt.engine")

__all__ = ["CheckpointError", "Engine", "NonFiniteLossError", "TrainingInterrupted"]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss and `skip_nonfinite` was off."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `fit`: training stopped after an optimizer step and saved its position to `checkpoint`."""

    def __init__(self, checkpoint: str | None, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> None:
        where = f"epoch {epoch + 1}, after step {step_in_epoch} of {steps_per_epoch}"
        saved = f"saved {checkpoint}" if checkpoint else "nothing saved (no output_dir)"
        super().__init__(f"training interrupted in {where}; {saved}")
        self.checkpoint, self.epoch, self.step_in_epoch = checkpoint, epoch, step_in_epoch


@contextlib.contextmanager
def _stop_on_interrupt(engine: Engine):
    """While training, a first Ctrl-C asks `engine` to stop at the next optimizer step (a second one aborts).

    Only in the main thread of a single-process run: ranks that stopped at different steps would deadlock.
    """
    engine._stop_requested = False
    if threading.current_thread() is not threading.main_thread() or engine.world_size > 1:
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        engine._stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("interrupt: saving a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based): linear warmup, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


FUSED_OPTIMIZER_DEVICES = ("cuda", "cpu", "xpu")  # where torch's fused AdamW / SGD kernels run (CPU: torch >= 2.4)


def fast_optimizer(cls: type[torch.optim.Optimizer], params: list, **options: Any) -> torch.optim.Optimizer:
    """`cls(params, fused=True, **options)` when every parameter is a floating-point tensor on a device with fused
    kernels, else the multi-tensor `foreach=True` form: the same update as torch's default per-tensor loop (the
    CPU's default), with fewer passes over memory."""
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in FUSED_OPTIMIZER_DEVICES for p in params)
    return cls(params, fused=True, **options) if fused else cls(params, foreach=True, **options)


class Engine:
    """Trains the trainable parameters of `model` (everything with requires_grad) on PyTorch or DeepSpeed.

    The options are the fields of `EngineConfig` (`fastprompt.engine.config`), given as keywords, as
    ``config=EngineConfig(...)``, or both (keywords replace the config's values).

    optimizer: "adamw" or "sgd" (with `momentum`); `weight_decay` applies to every trainable parameter.
    schedule: "cosine" (per optimizer step, to 0) or "constant", after `warmup_steps` of linear warmup.
    precision: "auto" (bf16 on a CUDA device that supports it, else fp32), "bf16", "fp16" or "fp32". The torch
    backend uses autocast (+ GradScaler for fp16) with the frozen weights stored once in bf16/fp16 (trainable ones,
    their gradients and optimizer state stay fp32); DeepSpeed casts the whole model to bf16/fp16 and keeps fp32
    master weights. On a CPU without native bf16 (avx512_bf16 / amx_bf16), "bf16" warns and trains in fp32.
    backend: "auto" picks DeepSpeed when it is installed and useful (CUDA, several ranks, or zero_stage > 0).
    zero_stage 0-3, `grad_accum` micro-batches per optimizer step (a trailing incomplete group of an epoch is
    dropped), `clip_grad` (max global L2 norm), `deepspeed_config` (dict or JSON path) deep-merged over the generated
    DeepSpeed config. grad_checkpointing: calls ``model.set_grad_checkpointing(True)``; timm ViTs then recompute
    every block in backward, the frozen ones included, trading compute for activation memory.
    activation_memory: None, "auto" (the device's free memory) or a size ("4GB", or bytes): before training, pick the
    least-recompute activation plan (`fastprompt.checkpoint_activations`: none, selective on k blocks, ..., full on
    all) whose step fits the budget at the loader's batch size, from a measured step; the plan is printed and
    written to metrics.jsonl (every backend, measured in the precision it trains in; see fastprompt.engine.activation).
    loss: "auto" (cross-entropy for class indices, BCE-with-logits for multi-hot float targets) or a callable.
    output_dir: checkpoints/{last,prev,best}.pt, metrics.jsonl and curves.png; `checkpoint_every` optimizer steps
    (and every epoch end) `last` is rewritten; `best` follows `monitor` ("auto": val AUC, else val/train loss).
    skip_nonfinite: a micro-batch with a NaN/inf loss contributes no gradient (a step whose micro-batches all failed
    is not taken) and is counted in the history's ``skipped_batches``; otherwise training stops with
    NonFiniteLossError naming the step and the last good checkpoint.
    deterministic: run-to-run reproducible GPU training: torch.use_deterministic_algorithms(True),
    CUBLAS_WORKSPACE_CONFIG=:4096:8, cuDNN benchmarking off, and fastprompt's Triton kernels on one fixed block
    configuration instead of autotuning (slower). CPU runs are reproducible without it.
    class_names: the output classes' names, used by evaluate's per-class metrics and warnings (default: the train or
    evaluated loader's dataset's ``classes`` when it has them, else indices).
    positive_class: the class (name or index) whose sensitivity, specificity, PPV, NPV and sensitivity at 90/95 %
    specificity are the headline metrics (`fastprompt.metrics.compute_metrics`). Default for two classes: the partner
    of a recognised negative name (normal, healthy, benign, ...), else index 1, with a printed line naming it.
    loggers: "csv" (``metrics.csv``, always written with ``metrics.jsonl``) and/or "tensorboard" (written to
    output_dir/tensorboard; needs ``pip install 'fastprompt[tensorboard]'``).
    patience: stop when the monitored metric has not improved for this many epochs (needs a validation loader);
    ``checkpoints/best.pt`` keeps the best epoch. A finished run resumed with more `epochs` continues, its learning-rate
    schedule recomputed for the new length (a printed note says so).
    class_weights: None/"none", "auto" (``N / (C * n_c)`` from the training labels) or one weight per class: weighted
    cross-entropy (single-label, loss="auto"). balanced_sampler: each epoch draws training samples with replacement in
    inverse proportion to their class's size (still a function of seed and epoch, so resume stays exact).
    """

    def __init__(self, model: nn.Module, config: EngineConfig | None = None, **options: Any) -> None:
        """Validate the configuration; nothing heavy (DeepSpeed, process groups) happens before the first fit.

        The options are `EngineConfig`'s fields, given as keywords (``Engine(model, lr=1e-2)``), as an
        `EngineConfig` (``Engine(model, config=cfg)``), or both: keywords then replace the config's values
        (``Engine(model, config=cfg, epochs=5)`` trains with ``dataclasses.replace(cfg, epochs=5)``).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.config: EngineConfig = EngineConfig.from_options(config, **options)
        self.model = model
        self.trainable_names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not self.trainable_names:
            raise ValueError(
                "the model has no trainable parameters (nothing with requires_grad=True); "
                "apply a method first, e.g. fastprompt.apply(model, 'linear', num_classes=...)"
            )
        cfg = self.config
        self.loss_fn: LossFn = auto_loss if cfg.loss == "auto" else cfg.loss
        if isinstance(cfg.class_weights, tuple):
            self.loss_fn = self._weighted_loss
        self._notes_shown: set[str] = set()
        self._tensorboard: TensorBoardLogger | None = None  # opened by fit when loggers has "tensorboard"
        self.activation_choice: PlanChoice | None = None
        self._stop_requested = False  # set by a Ctrl-C during fit (see _stop_on_interrupt)
        if cfg.deterministic:
            enable_determinism()
        if cfg.grad_checkpointing:
            if hasattr(model, "set_grad_checkpointing"):
                model.set_grad_checkpointing(True)  # timm ViTs checkpoint every block, the frozen ones included
            else:
                warnings.warn(
                    f"grad_checkpointing=True but {type(model).__name__} has no set_grad_checkpointing(); ignored",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.backend: Backend | None = None
        self.resolved: Resolved | None = None  # backend and precision chosen at set-up
        self.state = TrainState()
        self.total_steps = 0
        self.rank, self.world_size = 0, 1
        self.history: list[dict[str, Any]] = []
        self._dataset_class_names: list[str] | None = None  # the training dataset's, when the config has none

    @property
    def output_dir(self) -> Path | None:
        return self.config.output_dir

    @property
    def class_names(self) -> list[str] | None:
        """The class names in use: the config's, else (from fit on) the training dataset's ``classes``; checkpoints
        record them as the config's."""
        names = self.config.class_names if self.config.class_names is not None else self._dataset_class_names
        return list(names) if names is not None else None

    def _weighted_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight = torch.tensor(self.config.class_weights, dtype=torch.float32)
        return auto_loss(logits, targets, weight=weight)

    def _note(self, line: str) -> None:
        """Print a line the user should see once (rank 0, above the progress bars) and log it."""
        if line in self._notes_shown:
            return
        self._notes_shown.add(line)
        _LOG.info(line)
        if self.rank == 0:
            tqdm.write(line, file=sys.stderr)

    def _training_labels(self, loader: DataLoader, why: str) -> np.ndarray:
        targets = dataset_targets(loader.dataset)
        if targets is None:
            raise ValueError(
                f"{why} needs the training labels, but {type(loader.dataset).__name__} has no `targets`; give the "
                "dataset a `targets` list of class indices (class weights: or pass class_weights=[w1, w2, ...])"
            )
        return targets

    def _prepare_imbalance(self, loader: DataLoader) -> list[float] | None:
        """Resolve class_weights='auto' from the training labels; the balanced sampler's per-sample weights."""
        if self.config.class_weights == "auto":
            labels = self._training_labels(loader, "class_weights='auto'")
            weights = tuple(balanced_class_weights(labels, self.class_names))
            self.config = dataclasses.replace(self.config, class_weights=weights)  # recorded as trained with
            self.loss_fn = self._weighted_loss
            self._note(f"class weights (auto, N / (C * n_c)): {', '.join(f'{w:.3g}' for w in weights)}")
        if not self.config.balanced_sampler:
            return None
        labels = self._training_labels(loader, "balanced_sampler=True").astype(np.int64)
        counts = class_counts(labels)
        return (1.0 / counts[labels]).tolist()

    # ------------------------------------------------------------------ set-up

    def _resolve_backend(self, world_size: int) -> str:
        choice = self.config.backend
        if choice != "auto":
            return choice
        useful = torch.cuda.is_available() or world_size > 1 or self.config.zero_stage > 0
        if useful and deepspeed_installed():
            try:
                import deepspeed  # noqa: F401
            except Exception as error:  # a broken DeepSpeed install falls back to plain PyTorch
                warnings.warn(f"DeepSpeed failed to import ({error}); using the torch backend", stacklevel=3)
                return "torch"
            return "deepspeed"
        if self.config.zero_stage > 0:
            raise ValueError("option 'zero_stage' > 0 needs DeepSpeed: pip install deepspeed")
        return "torch"

    def _resolve_precision(self) -> str:
        precision = self.config.precision
        if precision == "bf16" and not torch.cuda.is_available():
            native, reason = cpu_bf16_support()
            if not native:  # emulated bf16 is slower than fp32: never train slower than asked for silently
                message = f"precision='bf16' on CPU: {reason}, where bf16 runs slower than fp32; training in fp32"
                _LOG.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=4)
                return "fp32"
        if precision != "auto":
            return precision
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = dict(self.model.named_parameters())
        trainable = [params[name] for name in self.trainable_names]
        cfg = self.config
        if cfg.optimizer == "sgd":
            return fast_optimizer(
                torch.optim.SGD, trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        return fast_optimizer(torch.optim.AdamW, trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _setup(self, micro_batch: int) -> None:
        """Create the backend once: process group, device placement, optimizer, DeepSpeed engine."""
        if self.backend is not None:
            return
        _, env_world, local_rank = world_info()
        kind = self._resolve_backend(env_world)
        init_distributed(required=kind == "deepspeed")
        self.rank, self.world_size, local_rank = world_info()
        precision = self._resolve_precision()
        self.resolved = Resolved(backend=kind, precision=precision, world_size=self.world_size)
        optimizer = self._make_optimizer()
        if kind == "deepspeed" and precision == "fp16" and not torch.cuda.is_available():
            raise ValueError(
                "precision='fp16' with DeepSpeed needs a CUDA device (its CPU accelerator has no fp16); "
                "use precision='bf16' or 'fp32', or backend='torch'"
            )
        if kind == "deepspeed":
            ds_config = deepspeed_config(
                micro_batch=micro_batch,
                grad_accum=self.config.grad_accum,
                world_size=self.world_size,
                zero_stage=self.config.zero_stage,
                precision=precision,
                clip_grad=self.config.clip_grad,
                user=self.config.deepspeed_config or {},
            )
            self.backend = DeepSpeedBackend(self.model, optimizer, config=ds_config, precision=precision)
        else:
            self.backend = TorchBackend(
                self.model,
                optimizer,
                precision=precision,
                grad_accum=self.config.grad_accum,
                clip_grad=self.config.clip_grad,
                world_size=self.world_size,
                local_rank=local_rank,
            )

    # ------------------------------------------------------------------ training

    def fit(
        self,
        train_loader: DataLoader,
        val_loader: DataLoader | None = None,
        resume: bool = False,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        *,
        trust_checkpoint: bool = False,
    ) -> list[dict]:
        """Train for `epochs` epochs; returns the per-epoch history (train loss, lr, skipped batches, val metrics).

        `on_epoch_end(record)` sees each epoch's record (train loss, val metrics) after its checkpoint is written.
        Ctrl-C stops after the current optimizer step, writes ``checkpoints/last.pt`` at that position (mid-epoch)
        and raises `TrainingInterrupted`; `fit(resume=True)` continues from there.

        With `resume`, continue from ``output_dir/checkpoints/last.pt`` (or the previous checkpoint when `last` is
        corrupt); the already-consumed batches of the interrupted epoch are skipped in the same order.
        `trust_checkpoint`: also resume from a checkpoint that holds more than plain data (an older fastprompt's),
        which can run code.
        """
        if not isinstance(train_loader, DataLoader):
            raise TypeError(f"train_loader must be a torch.utils.data.DataLoader, got {type(train_loader).__name__}")
        if resume and self.output_dir is None:
            raise ValueError("fit(resume=True) needs Engine(output_dir=...) where the checkpoints are")
        if self.config.patience is not None and val_loader is None:
            raise ValueError(
                f"patience={self.config.patience} stops on a validation metric: pass val_loader (the CLI: --val "
                "or --val-fraction), or drop patience"
            )
        if self.config.class_names is None:
            self._dataset_class_names = _dataset_classes(train_loader.dataset)
        self._setup(train_loader.batch_size or 1)
        weights = self._prepare_imbalance(train_loader)
        cfg = self.config
        loader, sampler = rebuild_loader(
            train_loader, seed=cfg.seed, rank=self.rank, world_size=self.world_size, sample_weights=weights
        )
        if cfg.activation_memory is not None and self.activation_choice is None:
            self._plan_activation_memory(loader)
        per_epoch = batches_per_epoch(loader, sampler)
        steps_per_epoch = per_epoch // cfg.grad_accum
        if per_epoch == 0:
            raise ValueError(
                f"the training loader yielded no batches (dataset of {_length(loader.dataset)} samples, batch_size "
                f"{loader.batch_size}, drop_last={loader.drop_last}, {self.world_size} rank(s)); give it data, or "
                "lower batch_size / set drop_last=False"
            )
        if steps_per_epoch == 0:
            raise ValueError(
                f"grad_accum={cfg.grad_accum} exceeds the {per_epoch} batches per epoch (per rank); lower it"
            )
        if per_epoch % cfg.grad_accum and self.rank == 0:
            warnings.warn(
                f"{per_epoch} batches per epoch is not a multiple of grad_accum={cfg.grad_accum}; "
                f"the last {per_epoch % cfg.grad_accum} batch(es) of each epoch are dropped",
                stacklevel=2,
            )
        self.state = TrainState()
        self.total_steps = steps_per_epoch * cfg.epochs
        self.history = []
        writer = self.output_dir is not None and self.rank == 0
        with run_lock(self.output_dir) if writer else contextlib.nullcontext():  # one writer per output_dir
            if not (resume and self._resume(trust=trust_checkpoint)):
                _seed_everything(cfg.seed)
            self._tensorboard = None
            if "tensorboard" in cfg.loggers and self.rank == 0:
                self._tensorboard = TensorBoardLogger(self.output_dir / TENSORBOARD_DIR)
            try:
                with _stop_on_interrupt(self):
                    self._train_epochs(loader, sampler, steps_per_epoch, val_loader, on_epoch_end)
            finally:
                if self._tensorboard is not None:
                    self._tensorboard.close()
        return self.history

    def _train_epochs(
        self,
        loader: DataLoader,
        sampler: Any,
        steps_per_epoch: int,
        val_loader: DataLoader | None,
        on_epoch_end: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        cfg = self.config
        while self.state.epoch < cfg.epochs and not self._patience_spent():
            self._stop_if_requested(steps_per_epoch)
            record = self._train_epoch(loader, sampler, steps_per_epoch)
            if self.activation_choice is not None:
                record.update(self.activation_choice.record())
            if val_loader is not None:
                val = self.evaluate(val_loader)
                record.update({f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))})
                record["positive_class"] = val.get("positive_class")
            self.history.append(record)
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            self._update_best(record)
            self._checkpoint_epoch_end()
            if self._tensorboard is not None:
                self._tensorboard.log(record)
            if on_epoch_end is not None and self.rank == 0:
                on_epoch_end(record)
        if self._patience_spent() and self.state.epoch < cfg.epochs:
            best = self.state.best
            self._note(
                f"early stopping after epoch {self.state.epoch}: {best.metric} has not improved for "
                f"{cfg.patience} epoch(s) (best {best.value:.4f} at epoch {best.epoch}, kept in "
                "checkpoints/best.pt)"
            )

    def _patience_spent(self) -> bool:
        """Whether `patience` epochs have passed since the monitored metric last improved."""
        patience = self.config.patience
        return patience is not None and self.state.stale_epochs >= patience

    def _stop_if_requested(self, steps_per_epoch: int) -> None:
        """After Ctrl-C: save the position (mid-epoch when inside one) to last.pt and raise TrainingInterrupted."""
        if not self._stop_requested:
            return
        state = self.state
        if state.step_in_epoch > 0 or state.last_good is None:
            self._checkpoint_last()
        raise TrainingInterrupted(state.last_good, state.epoch, state.step_in_epoch, steps_per_epoch)

    def _train_epoch(self, loader: DataLoader, sampler: Any, steps_per_epoch: int) -> dict[str, Any]:
        cfg, state, backend = self.config, self.state, self.backend
        epoch, start_step = state.epoch, state.step_in_epoch
        grad_accum = cfg.grad_accum
        skip_batches = start_step * grad_accum
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(epoch, start=skip_batches * loader.batch_size)
            skip_batches = 0
        elif hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        backend.module.train()
        iterator = _rng_neutral_iter(loader, cfg.seed, epoch)
        if skip_batches:  # a sampler fastprompt cannot start mid-epoch: load and discard, RNG untouched
            saved = rng_state()
            for _ in itertools.islice(iterator, skip_batches):
                pass
            set_rng_state(saved)
        bar = tqdm(
            total=steps_per_epoch * grad_accum,
            initial=start_step * grad_accum,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress or self.rank != 0,
            leave=False,
        )
        if start_step == 0:
            state.running = RunningLoss()
        running = state.running  # checkpointed, so a resumed epoch reports the whole epoch's loss
        images, good_in_group = 0, 0
        started = time.perf_counter()
        micro = 0
        for batch in iterator:
            inputs, targets = split_batch(batch)
            inputs, targets = backend.to_device(inputs), backend.to_device(targets, cast=False)
            loss = self.loss_fn(backend.forward(inputs, train=True), targets)
            if all_finite(loss, self.world_size):
                backend.backward(loss)
                running.loss_sum += loss.item()
                running.loss_count += 1
                good_in_group += 1
            elif cfg.skip_nonfinite:
                running.skipped += 1
            else:
                self._raise_nonfinite(loss, targets)
            images += batch_size_of(inputs) * self.world_size
            micro += 1
            bar.update(1)
            if micro % grad_accum:
                continue
            if good_in_group:
                self._set_lr(state.global_step)
                backend.step()
            good_in_group = 0
            state.global_step += 1
            state.step_in_epoch += 1
            elapsed = time.perf_counter() - started
            mean_loss = running.loss_sum / max(1, running.loss_count)
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images / max(elapsed, 1e-9):.1f}")
            every = cfg.checkpoint_every
            if every and state.global_step % every == 0 and state.step_in_epoch < steps_per_epoch:
                self._checkpoint_last()
            if state.step_in_epoch >= steps_per_epoch:
                break
            if self._stop_requested:
                bar.close()
                self._stop_if_requested(steps_per_epoch)
        bar.close()
        elapsed = time.perf_counter() - started
        totals = torch.tensor([running.loss_sum, running.loss_count, running.skipped], dtype=torch.float64)
        if self.world_size > 1:
            totals = _all_reduce_sum(totals)
        return {
            "epoch": epoch + 1,
            "train_loss": float(totals[0] / totals[1]) if totals[1] > 0 else float("nan"),
            "lr": self._current_lr(),
            "skipped_batches": int(totals[2]),
            "images_per_s": images / max(elapsed, 1e-9),
            "time_s": elapsed,
        }

    def _plan_activation_memory(self, loader: DataLoader) -> None:
        """Choose and apply the activation plan for `activation_memory` from measured steps; report it."""
        choice = plan_engine_step(self, loader, self.config.activation_memory)
        self.activation_choice = choice
        line = (
            f"activation memory: plan {choice.description} (step {format_bytes(choice.fixed + choice.measured_peak)} "
            f"of budget {format_bytes(choice.budget)}; without recomputation "
            f"{format_bytes(choice.fixed + choice.unrecomputed_peak)})"
        )
        _LOG.info(line)
        if self.rank == 0 and self.config.progress:
            tqdm.write(line, file=sys.stderr)

    def _set_lr(self, step: int) -> None:
        cfg = self.config
        factor = _lr_factor(step, total=self.total_steps, warmup=cfg.warmup_steps, schedule=cfg.schedule)
        for group in self.backend.optimizer.param_groups:
            group["lr"] = cfg.lr * factor

    def _current_lr(self) -> float:
        return float(self.backend.optimizer.param_groups[0]["lr"])

    def _raise_nonfinite(self, loss: torch.Tensor, targets: Any = None) -> None:
        last = self.state.last_good
        where = f"epoch {self.state.epoch + 1}, step {self.state.step_in_epoch + 1} of the epoch"
        if isinstance(targets, torch.Tensor) and not targets.is_floating_point() and bool((targets == -100).all()):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at {where}: every label in this batch is -100 (ignored), so the "
                "loss has nothing to average over. Give each batch some labelled samples (shuffle the data), or "
                "pass skip_nonfinite=True to skip such batches"
            )
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at {where} (global step {self.state.global_step + 1}); "
            f"parameters were not updated with it. Last good checkpoint: {last or 'none written yet'}. "
            "Lower the learning rate, enable clip_grad, check the data, or pass skip_nonfinite=True to skip such steps."
        )

    def _update_best(self, record: dict[str, Any]) -> None:
        """Track the best epoch by `monitor` (auto: val AUC, else val loss, else train loss)."""
        monitor = self.config.monitor
        if monitor == "auto":
            usable = [k for k in ("val_auc", "val_loss", "train_loss") if not math.isnan(record.get(k, math.nan))]
            key = usable[0] if usable else None
        else:
            key = f"val_{monitor}" if f"val_{monitor}" in record else ("train_loss" if monitor == "loss" else None)
        self.state.stale_epochs += 1  # reset below on an improvement
        if key is None or math.isnan(record.get(key, math.nan)):
            return
        value, minimise = record[key], key.endswith("loss")
        best = self.state.best
        if best is None or (value < best.value if minimise else value > best.value):
            self.state.best = BestEpoch(metric=key, value=value, epoch=record["epoch"])
            self.state.new_best = True
            self.state.stale_epochs = 0

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_dir(self) -> Path | None:
        return self.output_dir / "checkpoints" if self.output_dir is not None else None

    def _payload(self) -> dict[str, Any] | None:
        """This rank's contribution gathered; the full payload on rank 0, None elsewhere."""
        trainable = self.backend.trainable_state(self.trainable_names)
        for name, value in trainable.items():
            if not torch.isfinite(value.float()).all():
                raise NonFiniteLossError(f"parameter {name!r} holds NaN/inf values; refusing to write a checkpoint")
        optim = gather_objects(self.backend.optimizer_state(), self.world_size)
        rngs = gather_objects(rng_state(), self.world_size)
        running = self.state.running
        running = gather_objects(None if running is None else running.to_dict(), self.world_size)
        if self.rank != 0:
            return None
        return {
            "version": CHECKPOINT_VERSION,
            "config": {**self.config.to_dict(), "class_names": self.class_names},
            "resolved": self.resolved.to_dict(),
            "trainable": trainable,
            "optimizer": optim,
            "scheduler": {"global_step": self.state.global_step, "total_steps": self.total_steps},
            "rng": rngs,
            "running": running,
            "state": self.state.to_dict(),
            "history": self.history,
            "world_size": self.world_size,
            "backend": self.backend.name,
            "model": _model_summary(self.model, self.class_names),
        }

    def _write(self, payload: dict[str, Any] | None, path: Path, *, keep_prev: bool) -> None:
        if self.rank == 0:
            if keep_prev:
                keep_previous(path, path.with_name("prev.pt"))
            write_checkpoint(path, payload)
        barrier(self.world_size)

    def _checkpoint_last(self) -> None:
        directory = self._checkpoint_dir()
        if directory is None:
            return
        payload = self._payload()
        path = directory / "last.pt"
        self._write(payload, path, keep_prev=True)
        self.state.last_good = str(path)

    def _checkpoint_epoch_end(self) -> None:
        if self.output_dir is None:
            return
        is_new_best, self.state.new_best = self.state.new_best, False
        self._checkpoint_last()
        if is_new_best:
            directory = self._checkpoint_dir()
            self._write(self._payload(), directory / "best.pt", keep_prev=False)
        self._write_reports()

    def _write_reports(self) -> None:
        """metrics.jsonl, metrics.csv and curves.png from the history (rank 0, with an output_dir)."""
        if self.rank == 0 and self.output_dir is not None:
            write_metrics_jsonl(self.output_dir / "metrics.jsonl", self.history)
            write_metrics_csv(self.output_dir / "metrics.csv", self.history)
            write_curves(self.output_dir / "curves.png", self.history)

    def _resume(self, *, trust: bool = False) -> bool:
        """Restore the last intact checkpoint; False (and a warning) when there is none yet."""
        directory = self._checkpoint_dir()
        if self.rank == 0:
            remove_stale_temporaries(directory, ("last.pt", "prev.pt", "best.pt"))
        found = read_first_good([directory / "last.pt", directory / "prev.pt"], trust=trust)
        if found is None:
            warnings.warn(f"fit(resume=True): no checkpoint in {directory}; starting from scratch", stacklevel=3)
            return False
        payload, path = found
        self._check_compatible(payload, path)
        state = TrainState.from_dict(payload["state"])  # today's form and the dict of fastprompt <= cc56237
        state.best = restore_best(
            directory, state.best, [directory / "last.pt", directory / "prev.pt"], write=self.rank == 0, trust=trust
        )
        self.backend.load_trainable(payload["trainable"])
        self.backend.load_optimizer_state(payload["optimizer"], self.rank)
        self.state = state
        self.state.last_good = str(path)
        self.history = list(payload["history"])
        if self.history:  # a kill between the epoch's checkpoint and its reports must not lose them
            self._write_reports()
        set_rng_state(payload["rng"][self.rank])
        self.state.running = RunningLoss.from_dict(payload["running"][self.rank])
        return True

    def _check_compatible(self, payload: dict[str, Any], path: Path) -> None:
        check_version(payload, path)
        self._check_set_up(payload.get("model") or {}, path)
        self._check_names(payload["trainable"], path)
        config = saved_config(payload, loss=self.config.loss, output_dir=self.output_dir)
        saved = (payload["backend"], config.zero_stage)
        if saved != (self.backend.name, self.config.zero_stage):
            raise CheckpointError(
                f"{path} was written by the {saved[0]} backend with zero_stage={saved[1]}; resume with the same "
                f"backend and zero_stage (this run: {self.backend.name}, zero_stage={self.config.zero_stage})"
            )
        if payload["world_size"] != self.world_size and payload["backend"] == "deepspeed":
            raise CheckpointError(
                f"{path} was written by {payload['world_size']} DeepSpeed ranks; resume with the same number of ranks"
            )
        saved_total, saved_epochs = payload["scheduler"]["total_steps"], config.epochs
        epochs = self.config.epochs
        if saved_total == self.total_steps:
            return
        if epochs > saved_epochs and saved_total * epochs == self.total_steps * saved_epochs:
            self._note(
                f"extending the run from {saved_epochs} to {epochs} epochs: the learning-rate schedule is recomputed "
                f"for {epochs} epochs ({self.total_steps} optimizer steps instead of {saved_total})"
            )
            return
        raise CheckpointError(
            f"{path} was written for {saved_total} optimizer steps ({saved_epochs} epochs), this run has "
            f"{self.total_steps} ({epochs} epochs); resume with the same data, batch size and grad_accum, and the "
            f"same or more epochs (more extend the run)"
        )

    def _check_set_up(self, saved: dict[str, Any], path: Path) -> None:
        """A checkpoint of another method, backbone or class list is named by what differs, not by tensor names."""
        mine = _model_summary(self.model, self.class_names)
        differ = [
            f"{key} {saved[key]!r} in the checkpoint, {mine[key]!r} now"
            for key in ("method", "options", "model", "classes")
            if saved.get(key) is not None and mine.get(key) is not None and saved[key] != mine[key]
        ]
        if differ:
            raise CheckpointError(
                f"{path} belongs to another training set-up: {'; '.join(differ)}; resume with the same method, "
                "options, model and classes, or train into a new output_dir"
            )

    def save(self, path: str | Path) -> None:
        """Write a checkpoint (trainable parameters, optimizer, schedule position, RNG, config) atomically."""
        if self.backend is None:
            self._setup(1)
        self._write(self._payload(), Path(path), keep_prev=False)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, *, trust: bool = False, **overrides: Any) -> Engine:
        """An Engine for `model` with the checkpoint's configuration and trainable parameters.

        `model` must have the same method applied (same trainable parameter names). `overrides` replace saved
        settings (e.g. ``loss=my_loss_fn``, which is never saved, or ``output_dir``). `trust`: also read a checkpoint
        that holds more than plain data (an older fastprompt's), which can run code (see `read_checkpoint`).
        """
        payload = read_checkpoint(path, trust=trust)
        check_version(payload, path)
        engine = cls(model, config=saved_config(payload, **overrides))
        engine._check_names(payload["trainable"], path)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in payload["trainable"].items():
                params[name].copy_(value)
        engine.history = list(payload["history"])
        return engine

    def _check_names(self, trainable: dict[str, torch.Tensor], path: str | Path) -> None:
        missing = sorted(set(self.trainable_names) - set(trainable))
        extra = sorted(set(trainable) - set(self.trainable_names))
        if missing or extra:
            raise CheckpointError(
                f"{path} does not match this model's trainable parameters (missing {missing[:5]}, "
                f"unexpected {extra[:5]}); apply the same method with the same options"
            )
        shapes = {  # ZeRO-3 partitions parameters: their full shape is ds_shape
            name: tuple(getattr(param, "ds_shape", param.shape)) for name, param in self.model.named_parameters()
        }
        wrong = [
            f"{name} is {list(trainable[name].shape)} in the checkpoint but {list(shapes[name])} in the model"
            for name in self.trainable_names
            if name in shapes and tuple(trainable[name].shape) != shapes[name]
        ]
        if wrong:
            raise CheckpointError(
                f"{path} does not fit this model: {'; '.join(wrong[:3])}; apply the same method with the same options "
                "(e.g. the same rank)"
            )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable parameters by name (gathered under ZeRO-3)."""
        if self.backend is None:
            params = dict(self.model.named_parameters())
            return {name: params[name].detach().to("cpu", copy=True) for name in self.trainable_names}
        return self.backend.trainable_state(self.trainable_names)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def _run(self, loader: DataLoader, *, need_targets: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._setup(loader.batch_size or 1)
        backend = self.backend
        backend.module.eval()
        outputs, targets_all = [], []
        for batch in _rng_neutral_iter(loader, None, None):
            inputs, targets = split_batch(batch, need_targets=need_targets)
            logits = backend.forward(backend.to_device(inputs), train=False)
            outputs.append(logits.float().cpu())
            if targets is not None:
                targets_all.append(targets.cpu())
        if not outputs:
            raise ValueError("the loader yielded no batches")
        return torch.cat(outputs), (torch.cat(targets_all) if targets_all else None)

    def evaluate(self, loader: DataLoader) -> dict[str, Any]:
        """Loss and classification metrics (acc, auc; map for multi-label) of the model on `loader`."""
        from fastprompt.metrics import compute_metrics, resolve_positive_class  # scikit-learn: imported when used

        logits, targets = self._run(loader, need_targets=True)
        loss = float(self.loss_fn(logits, targets))
        multilabel = is_multilabel(targets)
        names = self.class_names or _dataset_classes(loader.dataset)
        if names is not None and len(names) != logits.shape[1]:
            names = None
        positive = None if multilabel else self.config.positive_class
        if not multilabel and positive is None and logits.shape[1] == 2:
            self._note(resolve_positive_class(names, None, num_classes=2)[1])
        metrics = compute_metrics(
            logits.numpy(), targets.numpy(), multilabel=multilabel, class_names=names, positive_class=positive
        )
        return {"loss": loss, **metrics}

    def predict(self, loader: DataLoader) -> torch.Tensor:
        """Model outputs (float32 logits on the CPU) for every sample of `loader`, in order."""
        return self._run(loader, need_targets=False)[0]


def _length(dataset: Any) -> str:
    try:
        return str(len(dataset))
    except TypeError:
        return "unknown"


def enable_determinism() -> None:
    """Switch torch, cuBLAS, cuDNN and fastprompt's kernels to their reproducible modes (process-wide)."""
    os.environ["FASTPROMPT_DETERMINISTIC"] = "1"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _model_summary(model: nn.Module, class_names: Sequence[str] | None) -> dict[str, Any]:
    """The training set-up a resume must match, in words: method and options, backbone name, class names."""
    from fastprompt.serialization import unwrap

    inner = unwrap(model)
    config = getattr(inner, "fastprompt_config", None) or {}
    backbone = getattr(inner, "backbone", inner)  # wrapper methods (FPT) hold the pretrained network
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture") or type(backbone).__name__
    return {
        "method": getattr(inner, "fastprompt_method", None),
        "options": dict(config.get("options") or {}),
        "model": name,
        "classes": list(class_names) if class_names is not None else None,
    }


def _dataset_classes(dataset: Any) -> list[str] | None:
    """The class names a dataset (or a subset of one: ``.dataset``) carries as ``classes``, else None."""
    while dataset is not None:
        classes = getattr(dataset, "classes", None)
        if isinstance(classes, (list, tuple)) and classes:
            return [str(name) for name in classes]
        dataset = getattr(dataset, "dataset", None)
    return None


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    tensor = tensor.to(device)
    torch.distributed.all_reduce(tensor)
    return tensor.cpu()


def _rng_neutral_iter(loader: DataLoader, seed: int | None, epoch: int | None):
    """iter(loader) without consuming the global torch RNG (DataLoader draws a worker base seed from it).

    Worker seeds then come from (seed, epoch) when given, so a resumed epoch's workers match the original run's.
    """
    state = torch.get_rng_state()
    if seed is not None and loader.generator is None:
        torch.manual_seed(seed * 1_000_003 + epoch + 7)
    iterator = iter(loader)
    torch.set_rng_state(state)
    return iterator
