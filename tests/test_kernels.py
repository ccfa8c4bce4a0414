"""kernels/: both backends against the dense masked reference, forward and every gradient.

The Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py) with 16 x 16 blocks, so the shapes below are
small but awkward: N not a multiple of 16, B, H > 1, windows wider than N, padding that empties a whole row.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import cross_attention, sliding_window_attention
from kernels.cross_attention import merge_splits
from kernels.sliding_window import attention_reference, band_mask, sliding_window_torch

BACKENDS = ["triton", "torch"]
ROOT = Path(__file__).resolve().parents[1]


def _inputs(B, H, Nq, Nk, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H, Nk, D, generator=g, dtype=dtype) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]


def _check(fn, q, k, v, mask, atol=2e-5):
    """fn(q, k, v) and its dQ, dK, dV against the float64 reference with `mask`."""
    out = fn(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, mask)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    for name, a, b in zip(["out", "dq", "dk", "dv"], (out, *got), (ref, *want)):
        assert a.shape == b.shape and a.dtype == q.dtype, name
        err = (a.double() - b).abs().max().item()
        assert err < atol, f"{name}: max abs err {err:.2e}"
    return out, got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(0, 0), (2, 0), (0, 2), (3, 3), (None, 0), (0, None), (None, None), (100, 7)])
def test_sliding_window_windows(backend, window):
    q, k, v = _inputs(2, 2, 37, 37, 16)  # 37: a ragged tail after two 16-blocks
    _check(lambda *a: sliding_window_attention(*a, window=window, backend=backend), q, k, v, band_mask(37, 37, window))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,D,window", [(70, 32, (15, 0)), (70, 64, (5, 20)), (50, 24, (0, 9)), (1, 16, (3, 3))])
def test_sliding_window_shapes(backend, N, D, window):
    q, k, v = _inputs(2, 3, N, N, D, seed=N + D)
    _check(lambda *a: sliding_window_attention(*a, window=window, backend=backend), q, k, v, band_mask(N, N, window))


@pytest.mark.parametrize("window", [(2, 0), (0, 19), (7, 3)])
def test_sliding_window_torch_chunks(window):
    """The PyTorch path with one 16-row query block per chunk (many chunks, spans crossing both ends)."""
    q, k, v = _inputs(2, 2, 53, 53, 16, seed=7)
    _check(lambda *a: sliding_window_torch(*a, window, block=16, chunk=1), q, k, v, band_mask(53, 53, window))


def test_sliding_window_fp16_triton():
    q, k, v = _inputs(1, 2, 40, 40, 32, dtype=torch.float16)
    _check(lambda *a: sliding_window_attention(*a, window=(4, 1), backend="triton"), q, k, v,
           band_mask(40, 40, (4, 1)), atol=2e-2)


def test_sliding_window_non_contiguous_inputs():
    q, k, v = torch.randn(3, 2, 37, 3, 16).transpose(2, 3).unbind(0)  # (B, H, N, D) views of (B, N, H, D)
    a = sliding_window_attention(q, k, v, (2, 2), backend="triton")
    b = sliding_window_attention(q, k, v, (2, 2), backend="torch")
    assert not q.is_contiguous() and (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_skips_blocks_outside_the_band(backend):
    """NaN keys/values from position 64 on must not reach rows < 64 with window (2, 0) (blocks are 16 or 32 rows):
    a kernel that visited key blocks outside the band, or a dense N x N product, would spread the NaN (0 * NaN)."""
    q, k, v = (t.detach() for t in _inputs(1, 2, 100, 100, 16))
    k[:, :, 64:], v[:, :, 64:] = float("nan"), float("nan")
    out = sliding_window_attention(q, k, v, (2, 0), backend=backend)
    assert out[:, :, :64].isfinite().all() and out[:, :, 66:].isnan().all()
    # backward: NaN queries and output gradients from 64 on must not reach dK, dV of keys < 32 nor dQ of rows < 64
    q, k, v = _inputs(1, 2, 100, 100, 16)
    with torch.no_grad():
        q[:, :, 64:] = float("nan")
    out = sliding_window_attention(q, k, v, (2, 0), backend=backend)
    grad = torch.ones_like(out)
    grad[:, :, 64:] = float("nan")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    assert dk[:, :, :32].isfinite().all() and dv[:, :, :32].isfinite().all() and dq[:, :, :64].isfinite().all()


def test_figure3_masks():
    """CT-Scroll Figure 3 (n = 5, q = 3), as drawn in the sliding_window docstring."""
    cau_cra = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(band_mask(5, 5, (2, 0)).long(), cau_cra)
    assert torch.equal(band_mask(5, 5, (0, 2)).long(), cau_cra.T)
    assert band_mask(5, 5, (None, None)).all() and torch.equal(band_mask(5, 5, (None, 0)), band_mask(5, 5, (4, 0)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,H,Nq,Nk,D,padded,splits", [
    (2, 2, 1, 1, 16, False, None),
    (2, 2, 64, 1, 32, True, None),
    (2, 2, 1, 997, 32, True, 3),  # three split-KV chunks of 384, 384, 229 keys, merged by log-sum-exp
    (2, 2, 1, 997, 16, False, None),
    (1, 1, 64, 1000, 64, True, 2),
    (2, 3, 64, 45, 16, True, None),
])
def test_cross_attention(backend, B, H, Nq, Nk, D, padded, splits):
    q, k, v = _inputs(B, H, Nq, Nk, D, seed=Nq + Nk)
    mask = torch.ones(B, Nk, dtype=torch.bool)
    if padded:
        mask = torch.rand(B, Nk, generator=torch.Generator().manual_seed(2)) > 0.3
        mask[:, 0] = True  # the length-1 case keeps its only key, B > 1 below loses all of them
        if B > 1:
            mask[-1] = False
    kpm = mask if padded else None
    out, (dq, dk, dv) = _check(lambda *a: cross_attention(*a, key_padding_mask=kpm, backend=backend, splits=splits),
                               q, k, v, mask[:, None, None, :])
    if padded and B > 1:  # the documented convention: a row with no real key outputs 0 and passes no gradient
        assert out[-1].abs().max() == 0 and dq[-1].abs().max() == 0
        assert dk[-1].abs().max() == 0 and dv[-1].abs().max() == 0


def test_merge_splits_is_exact():
    """Two halves' softmaxes, merged by their log-sum-exps, equal the softmax over all keys (and an empty chunk)."""
    s, v = torch.randn(3, 10), torch.randn(10, 4)
    parts, lses = [], []
    for sl in (slice(0, 4), slice(4, 10), slice(10, 10)):
        p = s[:, sl].softmax(-1) if sl.stop > sl.start else torch.zeros(3, 0)
        parts.append(p @ v[sl])
        lses.append(torch.logsumexp(s[:, sl], -1) / torch.log(torch.tensor(2.0)))  # log2 units, -inf when empty
    o, lse = merge_splits(torch.stack(parts), torch.stack(lses))
    assert torch.allclose(o, s.softmax(-1) @ v, atol=1e-6)
    assert torch.allclose(lse, torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0)), atol=1e-6)


def test_dispatch_and_errors():
    q, k, v = (t.detach() for t in _inputs(1, 2, 20, 20, 16))
    assert torch.allclose(sliding_window_attention(q, k, v, (1, 1)), sliding_window_attention(q, k, v, (1, 1), backend="torch"))
    with pytest.raises(ValueError, match="backend"):
        sliding_window_attention(q, k, v, (1, 1), backend="cuda")
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, (-1, 1))
    with pytest.raises(ValueError, match="shape"):
        sliding_window_attention(q, k[:, :, :5], v, (1, 1))
    with pytest.raises(ValueError, match="key_padding_mask"):
        cross_attention(q, k, v, key_padding_mask=torch.ones(1, 20))
    with pytest.raises(ValueError, match="dtype"):
        sliding_window_attention(q, k.double(), v, (1, 1), backend="triton")


def test_works_without_triton():
    """Without the triton package the PyTorch path still imports and runs (and "triton" says what is missing)."""
    code = ("import sys; sys.modules['triton'] = None; import torch; from kernels import sliding_window_attention as f\n"
            "q = torch.randn(1, 1, 9, 16); print(f(q, q, q, (1, 0)).shape)\n"
            "try: f(q, q, q, (1, 0), backend='triton')\nexcept RuntimeError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "torch.Size([1, 1, 9, 16])" in out and "needs the triton package" in out


AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.sliding_window as sw
assert not sw.INTERPRET
T, I = "*bf16", {n: "i32" for n in ("H", "Nq", "Nk", "D", "left", "right")}
const = dict(HAS_MASK=True, PREC="tf32", BLOCK_D=64, BLOCK_M=64, BLOCK_N=32)
# the scales as a launch from Python types them (fp32) and as torch.compile's inductor does (fp64)
for F in ("fp32", "fp64"):
  for kernel, sig in [
    (sw._fwd_kernel, dict(Q=T, K=T, V=T, KM="*u8", O=T, LSE="*fp32", **I, split="i32", qk_scale=F)),
    (sw._bwd_dkdv_kernel, dict(Q=T, K=T, V=T, KM="*u8", DO=T, LSE="*fp32", DELTA="*fp32", DK=T, DV=T, **I,
                               qk_scale=F, sm_scale=F)),
    (sw._bwd_dq_kernel, dict(Q=T, K=T, V=T, KM="*u8", DO=T, LSE="*fp32", DELTA="*fp32", DQ=T, **I, split="i32",
                             qk_scale=F, sm_scale=F)),
  ]:
    src = ASTSource(fn=kernel.fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
    print(F, kernel.fn.__name__, len(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]))
"""


def test_triton_kernels_compile_for_h100():
    """The interpreter does not type-check like the compiler (bf16 dots, layouts): compile the three kernels in bf16
    with a key mask down to an sm_90 cubin through Triton's bundled ptxas, with the float scales typed fp32 (a plain
    launch) and fp64 (how torch.compile passes them: ct_scroll's compiled paper preset failed so on an H200). Needs no
    GPU; it does not run them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", AOT], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert all(f"{f} {name}" in out.stdout
               for f in ("fp32", "fp64") for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"))
