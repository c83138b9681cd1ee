"""Engine semantics against independent expectations: every optimizer step counted and applied, the learning rate of
each step equal to the closed-form schedule, the autocast dtype seen inside the forward, checkpoints that verify.

The training runs use a float64 linear model with a mean-squared-error loss, so the whole run can be replayed in
NumPy with the gradient written out by hand (no autograd, no torch optimizer) and compared to 1e-10.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.data import DataLoader, TensorDataset

from fastprompt.engine import CheckpointError, Engine, checkpoint
from fastprompt.engine.checkpoint import read_checkpoint, write_checkpoint

FEATURES, OUTPUTS = 5, 3


def regression_data(samples: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, FEATURES, generator=generator, dtype=torch.float64)
    targets = torch.randn(samples, OUTPUTS, generator=generator, dtype=torch.float64)
    return TensorDataset(inputs, targets)


def linear_model(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(FEATURES, OUTPUTS).double()


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean()


def closed_form_lr(step: int, *, base: float, total: int, warmup: int, schedule: str) -> float:
    """The documented schedule: linear warmup over `warmup` steps, then cosine from `base` towards 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def replay(data: TensorDataset, *, batch_size: int, grad_accum: int, epochs: int, lrs: list[float], model: nn.Linear):
    """Plain SGD (no momentum) over the data in order, by hand: dL/dW of mean((xWᵀ + b − y)²) in closed form.

    Micro-batches are grouped by `grad_accum` (their gradients averaged), a trailing incomplete group of an epoch is
    dropped, and group i uses lrs[i]. Returns (weight, bias) and the number of steps taken.
    """
    x, y = data.tensors[0].numpy(), data.tensors[1].numpy()
    weight = model.weight.detach().numpy().copy()
    bias = model.bias.detach().numpy().copy()
    starts = list(range(0, len(x), batch_size))
    groups = len(starts) // grad_accum
    step = 0
    for _ in range(epochs):
        for group in range(groups):
            grad_w, grad_b = np.zeros_like(weight), np.zeros_like(bias)
            for start in starts[group * grad_accum : (group + 1) * grad_accum]:
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                residual = xb @ weight.T + bias - yb
                scale = 2.0 / residual.size / grad_accum
                grad_w += scale * residual.T @ xb
                grad_b += scale * residual.sum(0)
            weight -= lrs[step] * grad_w
            bias -= lrs[step] * grad_b
            step += 1
    return weight, bias, step


@pytest.fixture
def optimizer_steps():
    """The learning rate of every optimizer.step() call in the process while the test runs, and whether each call
    changed the parameters (global pre/post hooks, independent of the Engine's own bookkeeping)."""
    record: dict[str, list] = {"lr": [], "changed": []}
    before: list[list[torch.Tensor]] = []

    def params(optimizer):
        return [p for group in optimizer.param_groups for p in group["params"]]

    def pre(optimizer, args, kwargs):
        record["lr"].append([group["lr"] for group in optimizer.param_groups])
        before.append([p.detach().clone() for p in params(optimizer)])

    def post(optimizer, args, kwargs):
        old = before.pop()
        record["changed"].append(any(not torch.equal(a, p) for a, p in zip(old, params(optimizer))))

    handles = [
        register_optimizer_step_pre_hook(pre),
        register_optimizer_step_post_hook(post),
    ]
    yield record
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize(
    ("samples", "batch_size", "grad_accum", "epochs", "warmup", "schedule"),
    [
        (20, 4, 1, 3, 2, "cosine"),  # 5 steps per epoch, every batch a step
        (20, 4, 2, 3, 1, "cosine"),  # 5 batches, 2 steps per epoch: the 5th batch of each epoch is dropped
        (18, 4, 1, 2, 3, "constant"),  # a last batch of 2 samples
    ],
)
def test_every_step_is_taken_at_the_closed_form_lr_and_matches_a_hand_replay(
    optimizer_steps, samples, batch_size, grad_accum, epochs, warmup, schedule
):
    data = regression_data(samples)
    model = linear_model()
    start = linear_model()
    base_lr = 0.05
    engine = Engine(
        model,
        optimizer="sgd",
        momentum=0.0,
        lr=base_lr,
        epochs=epochs,
        warmup_steps=warmup,
        schedule=schedule,
        grad_accum=grad_accum,
        loss=mse,
        backend="torch",
        precision="fp32",
        progress=False,
    )
    batches = math.ceil(samples / batch_size)
    with pytest.warns(UserWarning, match="dropped") if batches % grad_accum else contextlib.nullcontext():
        history = engine.fit(DataLoader(data, batch_size=batch_size, shuffle=False))

    steps_per_epoch = batches // grad_accum
    total = steps_per_epoch * epochs
    expected = [closed_form_lr(s, base=base_lr, total=total, warmup=warmup, schedule=schedule) for s in range(total)]
    assert len(optimizer_steps["lr"]) == total, "optimizer steps taken"
    assert all(optimizer_steps["changed"]), f"steps that left the parameters unchanged: {optimizer_steps['changed']}"
    np.testing.assert_allclose([lrs[0] for lrs in optimizer_steps["lr"]], expected, rtol=1e-12, atol=0)
    epoch_end_lrs = [expected[(e + 1) * steps_per_epoch - 1] for e in range(epochs)]
    np.testing.assert_allclose([record["lr"] for record in history], epoch_end_lrs, rtol=1e-12, atol=0)

    weight, bias, steps = replay(
        data, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, lrs=expected, model=start
    )
    assert steps == total
    np.testing.assert_allclose(model.weight.detach().numpy(), weight, rtol=0, atol=1e-10)
    np.testing.assert_allclose(model.bias.detach().numpy(), bias, rtol=0, atol=1e-10)


class AutocastProbe(nn.Module):
    """Records, at every forward, whether CPU autocast is on, its dtype, and the dtype a matmul produces."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 2)
        self.seen: list[tuple[bool, torch.dtype, torch.dtype, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        enabled = torch.is_autocast_enabled("cpu")
        self.seen.append((enabled, torch.get_autocast_dtype("cpu"), out.dtype, self.training))
        return out


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_torch_backend_runs_the_forward_under_the_requested_autocast_dtype(precision, dtype):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 4, generator=generator), torch.arange(8) % 2)
    model = AutocastProbe()
    engine = Engine(model, lr=1e-2, epochs=1, backend="torch", precision=precision, progress=False)
    engine.fit(DataLoader(data, batch_size=4), val_loader=DataLoader(data, batch_size=8))
    training = [seen for seen in model.seen if seen[3]]
    evaluation = [seen for seen in model.seen if not seen[3]]
    assert len(training) == 2 and len(evaluation) == 1
    for enabled, autocast_dtype, out_dtype, _ in model.seen:
        assert out_dtype == dtype, f"{precision}: a linear layer inside the forward produced {out_dtype}"
        assert enabled == (precision != "fp32")
        if enabled:
            assert autocast_dtype == dtype
    assert model.linear.weight.dtype == torch.float32  # autocast, not a cast of the parameters


def flip_value_byte(path, marker: bytes) -> None:
    """Change one byte inside the stored tensor data (found by `marker`, a run of known float bytes) in place."""
    raw = bytearray(path.read_bytes())
    at = raw.index(marker) + len(marker) // 2
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def test_read_checkpoint_rejects_a_silently_loadable_bit_flip(tmp_path):
    """One flipped bit in a tensor's bytes still unpickles (to a wrong value); only the checksum can reject it."""
    values = torch.full((256,), 0.5, dtype=torch.float64)
    path = tmp_path / "last.pt"
    write_checkpoint(path, {"weights": values})
    assert torch.equal(read_checkpoint(path)["weights"], values)
    flip_value_byte(path, values[:8].numpy().tobytes())
    header = len(checkpoint.MAGIC) + checkpoint.DIGEST_LEN + 1
    loaded = torch.load(io.BytesIO(path.read_bytes()[header:]), weights_only=False)["weights"]
    assert not torch.equal(loaded, values), "the corruption must load without error to test the checksum"
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(path)


def test_read_checkpoint_rejects_a_changed_digest_and_a_truncated_file(tmp_path):
    path = tmp_path / "last.pt"
    write_checkpoint(path, {"step": 3})
    raw = path.read_bytes()
    digest_at = len(checkpoint.MAGIC)
    wrong = raw[:digest_at] + (b"0" if raw[digest_at : digest_at + 1] != b"0" else b"1") + raw[digest_at + 1 :]
    path.write_bytes(wrong)
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(path)
    path.write_bytes(raw[: len(raw) - 10])
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(path)
