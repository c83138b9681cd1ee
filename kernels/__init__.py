"""fastprompt.kernels: fused attention kernels for EPT and FPT (Triton on CUDA, PyTorch elsewhere)."""

from fastprompt.kernels.importance import attention_importance, attention_with_importance, select_tokens
from fastprompt.kernels.sink_attention import attention_forward, sink_attention

__all__ = ["attention_forward", "attention_importance", "attention_with_importance", "select_tokens", "sink_attention"]
