"""Fused attention for the five scripts: Triton kernels on CUDA, PyTorch paths elsewhere (see each module)."""
from kernels.cross_attention import cross_attention
from kernels.sliding_window import sliding_window_attention

__all__ = ["sliding_window_attention", "cross_attention"]
