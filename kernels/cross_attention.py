"""Few-query cross-attention (placeholder docstring, the Triton kernels land next)."""
import torch


def cross_attention_torch(q, k, v, key_padding_mask=None):
    """The PyTorch path: Nq is small, so the (Nq, Nk) scores are small. Rows with no real key output zeros."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    if key_padding_mask is None:
        return s.softmax(-1) @ v
    s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)  # an empty row: exp(-inf - 0) = 0 everywhere
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    return (e / torch.where(den > 0, den, 1.0)) @ v


def cross_attention(q, k, v, key_padding_mask=None, backend=None):
    """softmax(q k^T / sqrt(D)) v, q (B, H, Nq, D), k/v (B, H, Nk, D), key_padding_mask (B, Nk) bool True = real."""
    B, H, Nq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[-1] != D:
        raise ValueError(f"k, v must be (B, H, Nk, D) matching q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if key_padding_mask is not None and (key_padding_mask.shape != (B, k.shape[2]) or key_padding_mask.dtype != torch.bool):
        raise ValueError(f"key_padding_mask must be bool (B, Nk) = {(B, k.shape[2])}, got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    backend = backend or ("triton" if q.is_cuda else "torch")
    if backend == "torch" or backend == "triton":  # the Triton kernels land in the next commit
        return cross_attention_torch(q, k, v, key_padding_mask)
    raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
