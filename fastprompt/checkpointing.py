"""Activation checkpointing of a frozen ViT's blocks: recompute in backward what is cheap, keep what is not.

`checkpoint_activations(model, policy, blocks)` wraps the chosen blocks' forward in PyTorch's non-reentrant
`torch.utils.checkpoint.checkpoint`:

- ``"full"`` keeps only each block's input and re-runs the whole block in backward (timm's
  `set_grad_checkpointing`, per block);
- ``"selective"`` also keeps the outputs of the attention ops (the attention output and its log-sum-exp, which
  the fused kernels produce anyway) and of the q/k/v projection that feeds them, through PyTorch's selective
  checkpoint contexts, so backward re-runs the norms, the output projection and the MLP with its GELU input but
  never the attention or the q/k/v matmul (a quarter of a block's matmul work, for 3 token-by-width tensors);
- ``"none"`` removes the wrapper again.

Frozen weights make the cheap-and-large activations the whole story: autograd keeps no input of a frozen linear
layer, so what a block keeps is its norms' inputs, q/k/v, the attention output and lse, and the GELU input.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from fastprompt.methods.classes import MethodMixin, restore_class, swap_class
from fastprompt.methods.registry import check_layers

__all__ = [
    "POLICIES",
    "activation_plan",
    "attention_ops",
    "checkpoint_activations",
    "is_attention_op",
    "is_kept_op",
    "tracking_qkv",
]

POLICIES = ("none", "selective", "full")
_POLICY_ATTR = "_fastprompt_activation_policy"

# Attention ops whose outputs "selective" keeps, by identity (aten namespace): the kernels PyTorch's
# scaled_dot_product_attention dispatches to, which return the output and its log-sum-exp.
_ATEN_ATTENTION = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)
# fastprompt's own attention forward ops (torch.library custom ops registered by fastprompt.kernels).
_FASTPROMPT_ATTENTION = ("sink_attention_forward",)


@functools.cache
def attention_ops() -> frozenset[torch._ops.OpOverloadPacket]:
    """The op packets whose outputs the selective policy keeps (those that exist in this torch / fastprompt)."""
    import fastprompt.kernels  # noqa: F401  (registers fastprompt's custom ops)

    found = set()
    for namespace, names in (("aten", _ATEN_ATTENTION), ("fastprompt", _FASTPROMPT_ATTENTION)):
        for name in names:
            try:
                found.add(getattr(getattr(torch.ops, namespace), name))
            except (AttributeError, RuntimeError):  # an op this build / kernel version does not define
                continue
    return frozenset(found)


def is_attention_op(op: Any) -> bool:
    """Whether `op` (an OpOverload) is one of `attention_ops()`."""
    packet = getattr(op, "overloadpacket", op)
    return packet in attention_ops()


# q/k/v projections of a block's attention, by attribute name under `block.attn` (timm: one fused `qkv`; EVA-style
# models: separate projections). While one runs, `_QKV.depth` > 0 and the selective policy keeps every op's output.
_QKV_NAMES = ("qkv", "q_proj", "k_proj", "v_proj")
_QKV_HOOKS_ATTR = "_fastprompt_qkv_hooks"
_QKV = threading.local()


def _qkv_depth() -> int:
    return getattr(_QKV, "depth", 0)


def _enter_qkv(module: nn.Module, args: Any) -> None:
    _QKV.depth = _qkv_depth() + 1


def _leave_qkv(module: nn.Module, args: Any, output: Any) -> None:
    _QKV.depth = _qkv_depth() - 1


def _qkv_modules(block: nn.Module) -> list[nn.Module]:
    attn = getattr(block, "attn", None)
    return [getattr(attn, name) for name in _QKV_NAMES if isinstance(getattr(attn, name, None), nn.Module)]


def _track_qkv(block: nn.Module) -> list[Any]:
    """Hooks that mark the forward of `block`'s q/k/v projections; returns their handles."""
    handles = []
    for module in _qkv_modules(block):
        handles.append(module.register_forward_pre_hook(_enter_qkv))
        handles.append(module.register_forward_hook(_leave_qkv, always_call=True))
    return handles


@contextlib.contextmanager
def tracking_qkv(blocks: Iterable[nn.Module]) -> Iterator[None]:
    """While active, ops run by the q/k/v projections of `blocks` count as kept (`is_kept_op`), as under selective
    checkpointing; the activation planner measures what selective recomputation keeps with it."""
    handles = [handle for block in blocks for handle in _track_qkv(block)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def is_kept_op(op: Any) -> bool:
    """Whether selective checkpointing keeps the output of `op` here: an attention op, or an op of a q/k/v projection
    (tracked by `tracking_qkv` or a selectively checkpointed block) that computes a new tensor. Views are recomputed
    for free, and keeping one would keep its base alive (the projection's input)."""
    return is_attention_op(op) or (_qkv_depth() > 0 and not getattr(op, "is_view", False))


def _keep_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective policy: save the outputs of the attention ops and of the q/k/v projection, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if is_kept_op(op) else CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE_CONTEXT = functools.partial(create_selective_checkpoint_contexts, _keep_attention)


class CheckpointedBlock(MethodMixin):
    """A block whose forward runs under torch's non-reentrant checkpoint (the block's own forward inside)."""

    method = "checkpoint_activations"
    prefix = "Checkpointed"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inner = super().forward
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        options: dict[str, Any] = {"use_reentrant": False}
        if getattr(self, _POLICY_ATTR) == "selective":
            options["context_fn"] = _SELECTIVE_CONTEXT
        return checkpoint(inner, *args, **options, **kwargs)

    def extra_repr(self) -> str:
        own = f"activation_policy={getattr(self, _POLICY_ATTR)!r}"
        rest = super().extra_repr()
        return f"{rest}, {own}" if rest else own


def _model_blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise TypeError(
            "checkpoint_activations works on timm ViTs (a model with a `blocks` sequence), "
            f"got {type(model).__name__}; "
            "FPT / FPT+ already run their frozen backbone without gradients, so there is nothing to recompute there"
        )
    return blocks


def _resolve_blocks(blocks: int | Iterable[int] | None, depth: int) -> list[int]:
    if blocks is None:
        return list(range(depth))
    if isinstance(blocks, bool):
        raise TypeError("blocks must be None, a count of blocks from the input side, or an iterable of block indices")
    if isinstance(blocks, int):
        if not 0 <= blocks <= depth:
            raise ValueError(f"blocks={blocks}: a count from the input side must be between 0 and the depth {depth}")
        return list(range(blocks))
    return check_layers("blocks", blocks, depth)


def checkpoint_activations(
    model: nn.Module, policy: str = "full", blocks: int | Iterable[int] | None = None
) -> nn.Module:
    """Recompute activations of `model`'s blocks in backward instead of keeping them; returns `model`.

    Call it after `fastprompt.apply` (any method that back-propagates through the backbone: ept, vpt, lora,
    adapter, bitfit, partial, full). `policy`: "full" re-runs whole blocks; "selective" keeps the attention output,
    its log-sum-exp and q/k/v, and re-runs the norms, the output projection and the MLP; "none" turns checkpointing
    off for those blocks.
    `blocks`: None (all), a count k (the first k blocks from the input side) or an iterable of block indices;
    blocks not named keep their current setting, so policies can be mixed by calling it more than once.
    Gradients are those of the model without recomputation; only memory and time change. In no-grad mode
    (evaluation) blocks run as usual.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
    block_list = _model_blocks(model)
    if getattr(model, "grad_checkpointing", False):
        raise ValueError(
            "the model has timm's whole-model gradient checkpointing on, which would checkpoint the blocks twice; "
            "call model.set_grad_checkpointing(False) first (checkpoint_activations(model, 'full') does the same job)"
        )
    for index in _resolve_blocks(blocks, len(block_list)):
        block = block_list[index]
        wrapped = hasattr(block, _POLICY_ATTR)
        for handle in block.__dict__.pop(_QKV_HOOKS_ATTR, []):
            handle.remove()
        if policy == "none":
            if wrapped:
                restore_class(block, CheckpointedBlock)
                delattr(block, _POLICY_ATTR)
            continue
        if not wrapped:
            if "forward" in block.__dict__:
                raise TypeError(
                    f"block {index} has a forward bound on the instance, which would bypass the checkpoint; "
                    "patch blocks by subclassing (as fastprompt's methods do) before checkpoint_activations"
                )
            swap_class(block, CheckpointedBlock)
        setattr(block, _POLICY_ATTR, policy)
        if policy == "selective":
            block.__dict__[_QKV_HOOKS_ATTR] = _track_qkv(block)
    return model


def activation_plan(model: nn.Module) -> list[str]:
    """The checkpointing policy of each block of `model`, input side first ("none", "selective" or "full")."""
    return [getattr(block, _POLICY_ATTR, "none") for block in _model_blocks(model)]
