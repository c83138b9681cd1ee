"""fastprompt.kernels: fused attention kernels for EPT and FPT (Triton on CUDA, PyTorch elsewhere)."""

from fastprompt.kernels.importance import attention_importance, select_tokens

__all__ = ["attention_importance", "select_tokens"]
