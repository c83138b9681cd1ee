"""fastprompt.kernels: fused attention kernels for EPT and FPT (Triton on CUDA, PyTorch elsewhere).

Every backend runs inside PyTorch custom ops (torch.ops.fastprompt.sink_attention_forward / _row_delta / _backward
and attention_importance), so torch.compile sees one opaque op per call and compiles models with fullgraph=True.
"""

from fastprompt.kernels.importance import attention_importance, attention_with_importance, select_tokens
from fastprompt.kernels.sink_attention import attention_forward, sink_attention

__all__ = ["attention_forward", "attention_importance", "attention_with_importance", "select_tokens", "sink_attention"]
