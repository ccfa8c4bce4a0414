"""Sliding-window attention: a fused Triton kernel (forward + backward) and a PyTorch path.

The math. For one head, Q, K, V in R^{N x D}, scale c = 1/sqrt(D), and a band (left, right):

    S = c Q K^T,     S_ij = -inf unless  i - left <= j <= i + right      (None = unbounded)
    P = softmax(S) row-wise,   O = P V,   LSE_i = log sum_j exp(S_ij)

global = (None, None), causal = (None, 0). CT-Scroll (papers/ct_scroll.md, Figure 3; n = 5 slices, window q = 3,
"itself and q - 1 neighbours" as in the authors' code; 1 = may attend):

    (a) global f_G       (b) CAU->CRA (q-1, 0)   (c) CRA->CAU (0, q-1)
        1 1 1 1 1            1 0 0 0 0               1 1 1 0 0
        1 1 1 1 1            1 1 0 0 0               0 1 1 1 0
        1 1 1 1 1            1 1 1 0 0               0 0 1 1 1
        1 1 1 1 1            0 1 1 1 0               0 0 0 1 1
        1 1 1 1 1            0 0 1 1 1               0 0 0 0 1

The blocked algorithm (FlashAttention-2). One program owns BLOCK_M query rows and walks the key blocks of
BLOCK_N columns that intersect the band: for rows [m0, m0 + BLOCK_M) that is keys [m0 - left, m0 + BLOCK_M - 1 + right],
so a row costs (left + right + BLOCK_M + BLOCK_N) work, not N: blocks outside the band are never loaded. It keeps a
running max m, a running sum l and an unnormalised accumulator acc (online softmax):

    m' = max(m, rowmax(S_blk)),   P_blk = exp(S_blk - m'),
    l = l e^{m - m'} + rowsum(P_blk),   acc = acc e^{m - m'} + P_blk V_blk

and at the end O = acc / l, LSE = m + log l (saved for the backward; the kernels work in base 2, exp2 and log2,
with c log2(e) folded into the scores). Nothing N x N is ever stored.

The backward (vector-Jacobian products, recomputing P = exp(S - LSE) block by block):

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dO * O)),   dQ = c dS K,   dK = c dS^T Q

(rowsum(dO * O) = rowsum(P * dP), the softmax Jacobian's correction term). One kernel owns a block of keys and
walks the query blocks whose band reaches it (rows [n0 - right, n0 + BLOCK_N - 1 + left]) to build dK and dV;
another owns a block of queries and walks its key band for dQ. Both skip blocks outside the band.

The same kernels serve kernels.cross_attention (an unbounded band with Nq != Nk, a key-padding mask, and the keys
split into chunks; see there). The PyTorch path (CPU, no Triton) is the same algorithm in torch ops: query blocks of
bq rows, each gathering its key span of bq + left + right keys (a few thousand blocks batched per matmul, in chunks
that bound the temporaries), saving only O and recomputing P in its backward: N x (bq + left + right) work and
memory, never N x N. Global and causal windows, which have nothing to skip, go to SDPA there.
"""
import os

import torch
import torch.nn.functional as F

try:  # optional: without Triton only the PyTorch path exists
    import triton
    import triton.language as tl
except ImportError:
    triton = None

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter runs programs one by one on the CPU


def _configs():
    if INTERPRET:  # one small config: the interpreter is slow and autotuning there is meaningless
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4 if bm == 64 else 8, num_stages=s)
            for bm in (64, 128) for bn in (32, 64) for s in (2, 3)]


if triton is not None:
    _KEY = ["Nq", "Nk", "left", "right", "BLOCK_D", "HAS_MASK"]

    @triton.jit
    def _scores(q, k, offs_m, offs_n, KM, Nq, Nk, left, right, qk_scale, HAS_MASK: tl.constexpr,
                PREC: tl.constexpr):
        """Masked base-2 scores (BLOCK_M, BLOCK_N) of query rows offs_m against key rows offs_n."""
        # fp32 whatever the caller passed: torch.compile hands a Python float to a user kernel as fp64, which would
        # turn the running max and sum of the online softmax into fp64 (a compile error in the loop)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * tl.cast(qk_scale, tl.float32)
        d = offs_n[None, :] - offs_m[:, None]  # j - i
        keep = (d >= -left) & (d <= right) & (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        if HAS_MASK:
            keep &= tl.load(KM + offs_n, mask=offs_n < Nk, other=0)[None, :] != 0
        return tl.where(keep, s, float("-inf"))

    @triton.autotune(configs=_configs(), key=_KEY)
    @triton.jit
    def _fwd_kernel(Q, K, V, KM, O, LSE,  # q (BH, Nq, D), k/v (BH, Nk, D), key mask (B, Nk) u8,
                    #                       o (S, BH, Nq, D) and lse (S, BH, Nq): one slice per split-KV chunk
                    H, Nq, Nk, D, left, right,  # heads, lengths, head dim, band (ints, "unbounded" = Nq + Nk)
                    split, qk_scale,  # keys per split-KV chunk (a multiple of 128), c * log2(e)
                    HAS_MASK: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m, bh, sid = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d[None, :] < D
        q_mask = (offs_m[:, None] < Nq) & dmask
        q = tl.load(Q + bh * Nq * D + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
        KM += (bh // H) * Nk
        # the key blocks this program needs: the band of its rows, cut to its split-KV chunk
        lo = tl.maximum(tl.maximum(pid_m * BLOCK_M - left, 0), sid * split) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.minimum(pid_m * BLOCK_M + BLOCK_M + right, Nk), (sid + 1) * split)
        m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: a row whose block is all masked stays NaN-free
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_off = bh * Nk * D + offs_n[:, None] * D + offs_d[None, :]
            kv_mask = (offs_n[:, None] < Nk) & dmask
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
            s = _scores(q, k, offs_m, offs_n, KM, Nq, Nk, left, right, qk_scale, HAS_MASK, PREC)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        has_key = l_i > 0  # False only for a row with no real key in this chunk
        l_i = tl.where(has_key, l_i, 1.0)
        o = acc / l_i[:, None]
        row = (sid * tl.num_programs(1) + bh) * Nq + offs_m
        tl.store(O + row[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=q_mask)
        tl.store(LSE + row, tl.where(has_key, m_i + tl.math.log2(l_i), float("-inf")), mask=offs_m < Nq)

    @triton.autotune(configs=_configs(), key=_KEY)
    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, KM, DO, LSE, DELTA, DK, DV,  # delta = rowsum(dO * O) (BH, Nq); dk/dv like k/v
                         H, Nq, Nk, D, left, right, qk_scale, sm_scale,
                         HAS_MASK: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d[None, :] < D
        kv_off = bh * Nk * D + offs_n[:, None] * D + offs_d[None, :]
        kv_mask = (offs_n[:, None] < Nk) & dmask
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        KM += (bh // H) * Nk
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # the query blocks whose band reaches these keys: i in [j - right, j + left]
        lo = tl.maximum(pid_n * BLOCK_N - right, 0) // BLOCK_M * BLOCK_M
        hi = tl.minimum(pid_n * BLOCK_N + BLOCK_N + left, Nq)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_off = bh * Nq * D + offs_m[:, None] * D + offs_d[None, :]
            q_mask = (offs_m[:, None] < Nq) & dmask
            q = tl.load(Q + q_off, mask=q_mask, other=0.0)
            do = tl.load(DO + q_off, mask=q_mask, other=0.0)
            lse = tl.load(LSE + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)  # a row with no real key: P = 0 there anyway
            delta = tl.load(DELTA + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
            s = _scores(q, k, offs_m, offs_n, KM, Nq, Nk, left, right, qk_scale, HAS_MASK, PREC)
            p = tl.math.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N), recomputed
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)  # dV = P^T dO
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # dP = dO V^T
            ds = p * (dp - delta[:, None])  # dS = P * (dP - rowsum(dO * O))
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)  # dK = c dS^T Q
        dk *= tl.cast(sm_scale, tl.float32)
        tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.autotune(configs=_configs(), key=_KEY)
    @triton.jit
    def _bwd_dq_kernel(Q, K, V, KM, DO, LSE, DELTA, DQ,  # dq (S, BH, Nq, D): a partial sum per split (fp32 if S > 1)
                       H, Nq, Nk, D, left, right, split, qk_scale, sm_scale,
                       HAS_MASK: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m, bh, sid = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d[None, :] < D
        q_off = bh * Nq * D + offs_m[:, None] * D + offs_d[None, :]
        q_mask = (offs_m[:, None] < Nq) & dmask
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(DELTA + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
        KM += (bh // H) * Nk
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo = tl.maximum(tl.maximum(pid_m * BLOCK_M - left, 0), sid * split) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.minimum(pid_m * BLOCK_M + BLOCK_M + right, Nk), (sid + 1) * split)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_off = bh * Nk * D + offs_n[:, None] * D + offs_d[None, :]
            kv_mask = (offs_n[:, None] < Nk) & dmask
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
            s = _scores(q, k, offs_m, offs_n, KM, Nq, Nk, left, right, qk_scale, HAS_MASK, PREC)
            p = tl.math.exp2(s - lse[:, None])
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)  # dQ = c dS K
        row = (sid * tl.num_programs(1) + bh) * Nq + offs_m
        dq *= tl.cast(sm_scale, tl.float32)
        tl.store(DQ + row[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _bwd_delta_kernel(O, DO, DELTA, Nq, D, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        """delta = rowsum(dO * O), the softmax Jacobian's correction term, (BH, Nq) fp32."""
        pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        off = bh * Nq * D + offs_m[:, None] * D + offs_d[None, :]
        mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
        o = tl.load(O + off, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + bh * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


def _launch_args(q, k, v, key_mask, num_splits):
    """Shared launch arguments; split-KV chunks are multiples of 128 so every BLOCK_N tiles them exactly."""
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton); use backend='torch'")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if D > 128 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or {k.dtype, v.dtype} != {q.dtype}:
        raise ValueError(f"the Triton kernels take head dims <= 128 and one dtype among fp16/bf16/fp32, got D={D}, "
                         f"q {q.dtype}, k {k.dtype}, v {v.dtype}; use backend='torch'")
    split = triton.cdiv(triton.cdiv(Nk, num_splits), 128) * 128
    km = q if key_mask is None else key_mask.contiguous().view(torch.uint8)  # any pointer when unused
    meta = dict(HAS_MASK=key_mask is not None, PREC="ieee" if q.dtype == torch.float32 else "tf32",
                BLOCK_D=max(16, triton.next_power_of_2(D)))
    return B, H, Nq, Nk, D, split, triton.cdiv(Nk, split), km, meta


def attention_forward(q, k, v, left, right, key_mask=None, num_splits=1):
    """Launch the forward on contiguous q (B, H, Nq, D), k/v (B, H, Nk, D); band (left, right) as ints.
    Returns o (S, B, H, Nq, D) (q's dtype when S == 1, else fp32 partials) and lse (S, B, H, Nq) in log2 units."""
    B, H, Nq, Nk, D, split, S, km, meta = _launch_args(q, k, v, key_mask, num_splits)
    o = torch.empty((S, B, H, Nq, D), device=q.device, dtype=q.dtype if S == 1 else torch.float32)
    lse = torch.empty((S, B, H, Nq), device=q.device, dtype=torch.float32)
    grid = lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * H, S)  # noqa: E731
    _fwd_kernel[grid](q, k, v, km, o, lse, H, Nq, Nk, D, left, right, split, D ** -0.5 * LOG2E, **meta)
    return o, lse


def attention_backward(do, q, k, v, o, lse, left, right, key_mask=None, num_splits=1):
    """dQ, dK, dV for the forward above (o, lse merged over splits)."""
    B, H, Nq, Nk, D, split, S, km, meta = _launch_args(q, k, v, key_mask, num_splits)
    do = do.contiguous()
    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    _bwd_delta_kernel[(triton.cdiv(Nq, 16 if INTERPRET else 64), B * H)](
        o, do, delta, Nq, D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=16 if INTERPRET else 64)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq = torch.empty((S, B, H, Nq, D), device=q.device, dtype=q.dtype if S == 1 else torch.float32)
    c = D ** -0.5
    _bwd_dkdv_kernel[lambda m: (triton.cdiv(Nk, m["BLOCK_N"]), B * H)](
        q, k, v, km, do, lse, delta, dk, dv, H, Nq, Nk, D, left, right, c * LOG2E, c, **meta)
    _bwd_dq_kernel[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * H, S)](
        q, k, v, km, do, lse, delta, dq, H, Nq, Nk, D, left, right, split, c * LOG2E, c, **meta)
    return (dq[0] if S == 1 else dq.sum(0).to(q.dtype)), dk, dv


class _SlidingWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, left, right):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = attention_forward(q, k, v, left, right)
        ctx.save_for_backward(q, k, v, o[0], lse[0])
        ctx.window = (left, right)
        return o[0]

    @staticmethod
    def backward(ctx, do):
        return (*attention_backward(do, *ctx.saved_tensors, *ctx.window), None, None)


def _resolve(window, n):
    """(left, right) with None -> unbounded, clipped to n - 1 (a wider window sees nothing more)."""
    left, right = window
    if (left is not None and left < 0) or (right is not None and right < 0):
        raise ValueError(f"window sides must be >= 0 or None, got {window}")
    return (n - 1 if left is None else min(left, n - 1)), (n - 1 if right is None else min(right, n - 1))


def _chunks(q, k, v, left, right, bq, chunk):
    """The PyTorch path's blocking: query blocks of bq rows, block b seeing the key span [b*bq - left, b*bq + bq - 1
    + right]. Yields, per chunk of n blocks: the (padded) query rows [r0, r1), the span's key indices idx (n * span,)
    (clipped into [0, N), the clipped ones masked), the gathered spans kb, vb (B, H, n, span, D) and drop
    (n, bq, span), True outside the band or the sequence."""
    N = k.shape[2]
    span = bq + left + right
    nb = -(-q.shape[2] // bq)
    n = max(1, chunk // (q.shape[0] * q.shape[1] * span * q.shape[3]))  # blocks per chunk: bounded temporaries
    r = torch.arange(bq, device=q.device)[:, None]
    c = torch.arange(span, device=q.device)[None, :]
    band = (c - r >= 0) & (c - r <= left + right)  # (bq, span): j - i = c - left - r in [-left, right]
    for b0 in range(0, nb, n):
        j = torch.arange(b0, min(nb, b0 + n), device=q.device)[:, None] * bq - left + c  # (n, span) key index
        idx = j.clamp(0, N - 1).flatten()
        kb, vb = (t.index_select(2, idx).unflatten(2, (-1, span)) for t in (k, v))  # (B, H, n, span, D)
        yield b0 * bq, (b0 + j.shape[0]) * bq, idx, kb, vb, ~(band & ((j >= 0) & (j < N))[:, None, :])


def _probs(qb, kb, drop):
    """P = softmax(c qb kb^T) inside the band, (B, H, n, bq, span). The fill is finite so that a padded query row
    past N, which may see no key, gives no NaN (its dO is zero, so it never contributes)."""
    s = (qb @ kb.transpose(-1, -2)).mul_(qb.shape[-1] ** -0.5)
    return s.masked_fill_(drop, torch.finfo(s.dtype).min).softmax(-1)


class _SlidingWindowTorch(torch.autograd.Function):
    """The kernels' algorithm in torch ops: per chunk of query blocks, gather each block's key span and softmax
    inside the band; save only q, k, v and O, and recompute P in the backward. Work and memory N x (bq + left + right)."""

    @staticmethod
    def forward(ctx, q, k, v, left, right, bq, chunk):
        N = q.shape[2]
        qp = F.pad(q, (0, 0, 0, -N % bq)) if N % bq else q  # (B, H, nb*bq, D): a ragged tail padded to a block
        o = torch.empty_like(qp)
        for r0, r1, _, kb, vb, drop in _chunks(q, k, v, left, right, bq, chunk):
            p = _probs(qp[:, :, r0:r1].unflatten(2, (-1, bq)), kb, drop)  # (B, H, n, bq, span)
            o[:, :, r0:r1] = (p @ vb).flatten(2, 3)
        ctx.save_for_backward(q, k, v, o)
        ctx.args = (left, right, bq, chunk)
        return o[:, :, :N]

    @staticmethod
    def backward(ctx, do):
        q, k, v, o = ctx.saved_tensors
        left, right, bq, chunk = ctx.args
        pad = o.shape[2] - q.shape[2]
        qp, dop = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q, do))  # zero dO: padded rows add nothing
        dq, dk, dv = torch.empty_like(qp), torch.zeros_like(k), torch.zeros_like(v)
        for r0, r1, idx, kb, vb, drop in _chunks(q, k, v, left, right, bq, chunk):
            qb, dob, ob = (t[:, :, r0:r1].unflatten(2, (-1, bq)) for t in (qp, dop, o))  # (B, H, n, bq, D)
            p = _probs(qb, kb, drop)  # recomputed
            dv.index_add_(2, idx, (p.transpose(-1, -2) @ dob).flatten(2, 3))  # dV = P^T dO
            ds = (dob @ vb.transpose(-1, -2)).sub_((dob * ob).sum(-1, keepdim=True)).mul_(p)  # P * (dP - rowsum(dO*O))
            ds.mul_(q.shape[-1] ** -0.5)
            dq[:, :, r0:r1] = (ds @ kb).flatten(2, 3)  # dQ = c dS K
            dk.index_add_(2, idx, (ds.transpose(-1, -2) @ qb).flatten(2, 3))  # dK = c dS^T Q
        return dq[:, :, :q.shape[2]], dk, dv, None, None, None, None


def sliding_window_torch(q, k, v, window, block=None, chunk=1 << 21):
    """The PyTorch path (CPU, or no Triton). Global and causal windows go to SDPA, which has nothing to skip; other
    bands to _SlidingWindowTorch with query blocks of `block` rows and about `chunk` elements of temporaries."""
    N = q.shape[2]
    left, right = _resolve(window, N)
    if left == N - 1 and right == N - 1:
        return F.scaled_dot_product_attention(q, k, v)
    if left == N - 1 and right == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    bq = min(block or min(128, max(32, 1 << (left + right).bit_length())), N)
    return _SlidingWindowTorch.apply(q, k, v, left, right, bq, chunk)


def sliding_window_attention(q, k, v, window=(None, None), backend=None):
    """softmax(q k^T / sqrt(D) + band) v for (B, H, N, D) tensors: query i attends keys i-left..i+right
    (inclusive; None = unbounded). backend: None (Triton for CUDA tensors with D <= 128, torch otherwise), "triton" or "torch"."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, N, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    backend = backend or ("triton" if q.is_cuda and triton is not None and q.shape[-1] <= 128 else "torch")
    if backend == "torch":
        return sliding_window_torch(q, k, v, window)
    if backend == "triton":
        return _SlidingWindowAttention.apply(q, k, v, *_resolve(window, q.shape[2]))
    raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")


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
