"""Sliding-window attention (placeholder docstring, the Triton kernels land next)."""
import math

import torch
import torch.nn.functional as F


def _resolve(window, n):
    """(left, right) with None -> unbounded, clipped to n - 1 (a wider window sees nothing more)."""
    left, right = window
    if (left is not None and left < 0) or (right is not None and right < 0):
        raise ValueError(f"window sides must be >= 0 or None, got {window}")
    return (n - 1 if left is None else min(left, n - 1)), (n - 1 if right is None else min(right, n - 1))


def band_mask(nq, nk, window, device=None):
    """(nq, nk) bool, True where query i may attend key j: i - left <= j <= i + right."""
    left, right = window
    d = torch.arange(nk, device=device)[None, :] - torch.arange(nq, device=device)[:, None]  # j - i
    keep = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left is not None:
        keep &= d >= -left
    if right is not None:
        keep &= d <= right
    return keep


def attention_reference(q, k, v, mask):
    """Dense softmax(q k^T / sqrt(D)) v with an explicit bool mask (True = attend), for tests only.
    A query row with no allowed key outputs zeros (and passes zero gradient)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = mask.expand_as(s)
    has_key = mask.any(-1, keepdim=True)
    s = torch.where(has_key, s.masked_fill(~mask, float("-inf")), 0.0)  # empty rows: finite, then zeroed
    return (s.softmax(-1) * has_key) @ v


def sliding_window_torch(q, k, v, window, block=None):
    """The PyTorch path: queries in blocks of `block`; block b sees the key span
    [b*block - left, (b+1)*block - 1 + right], taken as an overlapping `unfold` view, so the work and memory
    are N x (block + left + right), never N x N. Autograd goes through plain torch ops."""
    B, H, N, D = q.shape
    left, right = _resolve(window, N)
    if left == N - 1 and right == N - 1:  # global: nothing to skip, SDPA is exact and memory-efficient
        return F.scaled_dot_product_attention(q, k, v)
    if left == N - 1 and right == 0:  # causal
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    bq = block or min(128, max(16, triton_next_pow2(left + right + 1)))
    bq = min(bq, N)
    nb = -(-N // bq)
    span = bq + left + right  # keys one query block can see
    pad = (0, 0, left, nb * bq + right - N)  # key length nb*bq + left + right: exactly nb windows of `span`
    kb = F.pad(k, pad).unfold(2, span, bq)  # (B, H, nb, D, span), an overlapping view, no copy
    vb = F.pad(v, pad).unfold(2, span, bq)  # (B, H, nb, D, span)
    qb = F.pad(q, (0, 0, 0, nb * bq - N)).view(B, H, nb, bq, D)  # (B, H, nb, bq, D)
    s = (qb @ kb) * D ** -0.5  # (B, H, nb, bq, span)
    r = torch.arange(bq, device=q.device)[:, None]
    c = torch.arange(span, device=q.device)[None, :]
    j = torch.arange(nb, device=q.device)[:, None] * bq - left + c  # (nb, span) key index of each column
    keep = ((c - r >= 0) & (c - r <= left + right))[None] & ((j >= 0) & (j < N))[:, None, :]  # (nb, bq, span)
    # a finite fill: padded query rows past N may see no key; they must not turn into NaN (they are cut off)
    p = s.masked_fill(~keep, torch.finfo(s.dtype).min).softmax(-1)
    o = p @ vb.transpose(-1, -2)  # (B, H, nb, bq, D)
    return o.reshape(B, H, nb * bq, D)[:, :, :N]


def triton_next_pow2(x):
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def sliding_window_attention(q, k, v, window=(None, None), backend=None):
    """softmax(q k^T / sqrt(D) + band) v for (B, H, N, D) tensors; query i attends keys i-left..i+right."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(f"q, k, v must share one (B, H, N, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    backend = backend or ("triton" if q.is_cuda else "torch")
    if backend == "torch" or backend == "triton":  # the Triton kernels land in the next commit
        return sliding_window_torch(q, k, v, window)
    raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
