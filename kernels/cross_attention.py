"""Few-query cross-attention: a split-KV Triton forward, a Triton backward, and a PyTorch path.

    O = softmax(c Q K^T + mask) V,   Q (B, H, Nq, D) with Nq small (1-256: learned queries, a question, a [CLS]),
    K, V (B, H, Nk, D) with Nk large (32k and more voxel tokens), c = 1/sqrt(D),
    key_padding_mask (B, Nk) bool, True = a real key; padded keys get -inf scores.

Why split-KV. FlashAttention gives one program a block of queries and lets it walk every key. With B x H x Nq small
there are few query blocks (B = 1, H = 8, Nq = 32 is 8 programs on a 132-SM GPU), so most of the GPU idles while
each program walks 32k keys. Split-KV (FlashDecoding) also cuts the keys into S chunks: program (query block,
head, chunk s) produces a partial output O_s, normalised over its own chunk, and its log-sum-exp L_s. The partials
merge exactly, because softmax over a union of chunks is a weighted mix of the per-chunk softmaxes:

    L = log sum_s exp(L_s),     O = sum_s exp(L_s - L) O_s

S is picked so that (query blocks x B x H x S) fills the GPU about twice over. The kernels are the band kernels of
kernels.sliding_window with an unbounded band, a key mask, and the chunk index as a third grid axis (see the math,
the blocked algorithm and the backward's formulas there). The backward takes the merged L and rowsum(dO * O): dK
and dV come from one program per key block walking the few query blocks; dQ is a sum over all keys, so it is
split the same way (one fp32 partial per chunk, summed afterwards).

A query row with no real key (every key of its batch element padded): the output is defined as zeros, and since
that output is the constant 0 whatever q, k, v are, its gradients are zero too. The reference and both paths agree
on this (the kernels store L = -inf for such a row and treat its P as 0 in the backward).
"""
import torch
import torch.nn.functional as F

from kernels.sliding_window import attention_backward, attention_forward, triton


def merge_splits(o, lse):
    """Merge split-KV partials o (S, B, H, Nq, D) and lse (S, B, H, Nq) (log2 units) into o (B, H, Nq, D), lse."""
    if o.shape[0] == 1:
        return o[0], lse[0]
    m = lse.amax(0)
    m = torch.where(torch.isfinite(m), m, 0.0)  # all chunks empty: every weight below is 0
    w = torch.exp2(lse - m)  # (S, B, H, Nq), 0 for an empty chunk
    den = w.sum(0)
    out = (w[..., None] * o).sum(0) / torch.where(den > 0, den, 1.0)[..., None]
    return out, torch.where(den > 0, m + torch.log2(den), float("-inf"))


def num_splits(q, nk):
    """Chunks of keys so that query blocks x B x H x chunks is about twice the SM count (4 programs on CPU, which
    only happens under the interpreter in tests), with at least 256 keys per chunk."""
    B, H, Nq, _ = q.shape
    target = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    work = B * H * -(-Nq // 64)
    return max(1, min(-(-target // work), -(-nk // 256)))


class _CrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, splits):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        unbounded = q.shape[2] + k.shape[2]
        o, lse = merge_splits(*attention_forward(q, k, v, unbounded, unbounded, key_padding_mask, splits))
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
        ctx.splits = splits
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        unbounded = q.shape[2] + k.shape[2]
        return (*attention_backward(do, q, k, v, o, lse, unbounded, unbounded, mask, ctx.splits), None, None)


def cross_attention_torch(q, k, v, key_padding_mask=None):
    """The PyTorch path. Without a mask it is SDPA; with one, Nq is small, so the (Nq, Nk) scores are small and
    written out, to give rows with no real key their defined zeros (SDPA leaves such rows NaN or undefined)."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)  # an empty row: exp(-inf - 0) = 0 everywhere
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    return (e / torch.where(den > 0, den, 1.0)) @ v


def cross_attention(q, k, v, key_padding_mask=None, backend=None, splits=None):
    """softmax(q k^T / sqrt(D)) v for q (B, H, Nq, D) and k/v (B, H, Nk, D); key_padding_mask (B, Nk) bool,
    True = a real key. backend: None (Triton for CUDA tensors with D <= 128, torch otherwise), "triton" or "torch".
    splits: number of split-KV chunks for the Triton path (default: enough to fill the GPU)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}")
    B, H, Nq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[-1] != D:
        raise ValueError(f"k, v must be (B, H, Nk, D) matching q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if key_padding_mask is not None and (key_padding_mask.shape != (B, k.shape[2]) or key_padding_mask.dtype != torch.bool):
        raise ValueError(f"key_padding_mask must be bool (B, Nk) = {(B, k.shape[2])}, "
                         f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    backend = backend or ("triton" if q.is_cuda and triton is not None and q.shape[-1] <= 128 else "torch")
    if backend == "torch":
        return cross_attention_torch(q, k, v, key_padding_mask)
    if backend == "triton":
        return _CrossAttention.apply(q, k, v, key_padding_mask, splits or num_splits(q, k.shape[2]))
    raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
