"""fastprompt.kernels: fused attention kernels for EPT and FPT (Triton on CUDA, PyTorch elsewhere)."""
