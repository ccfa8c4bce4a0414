"""Benchmark the attention kernels: python -m kernels.bench [--device cpu|cuda] [--sizes 1024,4096] [--threads 1]

CUDA (bf16, B = 4, H = 16, D = 64, N = 1k-16k, windows (15, 0) and (255, 255)): the Triton kernel against
scaled_dot_product_attention with a dense (N, N) bool mask and FlexAttention (torch.compile'd) with a BlockMask,
forward and forward + backward. Time from triton.testing.do_bench (median, ms); memory = peak allocated during one
call minus what was allocated before it (inputs and the masks, built once outside, are not counted; the dense
mask's own size is its own column). "forward" runs under torch.no_grad(), "fwd+bwd" is forward + .backward().
TFLOP/s counts only the band's useful work, the same for every provider:

    pairs = #{(i, j): 0 <= i, j < N, i - left <= j <= i + right}
    FLOPs(forward) = 4 B H D pairs            (two matmuls, QK^T and PV, 2 FLOPs per multiply-add)
    FLOPs(forward + backward) = 3.5 x forward (backward = 2.5 x forward: dV, dP, dQ, dK plus recomputing S)

CPU (fp32, B = 1, H = 8, D = 64, N = 4096 and 16384, window (15, 0)): the PyTorch path against SDPA with a dense
bool mask and, forward only (torch has no FlexAttention backward on CPU), FlexAttention compiled by torch.compile
for CPU with the band as a BlockMask (built and compiled by a first call before anything is measured; --flex false
skips it, as its compile takes about a minute per N). Each case runs in a fresh subprocess; peak extra memory = the process's RSS high-water mark (VmHWM, reset
through /proc/self/clear_refs after the inputs exist) minus its RSS then, over the first call. For SDPA the dense
mask is built inside the measured call: it exists only to express the band. "forward" runs under torch.no_grad();
"fwd+bwd" is a forward with autograd and .backward() of a fixed random gradient. Time: best of a few warm calls
(one when a call takes over 5 s). Outputs and gradients of both are compared (max abs difference). On a machine
shared with other jobs, --threads 1 gives steadier numbers: OpenMP threads that get descheduled stall every op.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from kernels.sliding_window import sliding_window_attention


def band_pairs(n, left, right):
    """Number of (query, key) pairs inside the band, counted exactly (the ragged ends included)."""
    i = torch.arange(n, dtype=torch.int64)
    return int((torch.clamp(i + right, max=n - 1) - torch.clamp(i - left, min=0) + 1).sum())


def flops(B, H, N, D, window, backward):
    return 4 * B * H * D * band_pairs(N, *window) * (3.5 if backward else 1.0)


def dense_band(n, window, device):
    """The (n, n) bool mask a user would build for SDPA: one byte per pair, no index arithmetic."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(window[1]).triu(-window[0])


def _status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))  # MiB


def _flex_band(n, window):
    """FlexAttention compiled for CPU (forward only: torch has no FlexAttention backward on CPU) and the band as a
    BlockMask, both built outside the measured call (the dense mask of SDPA is built inside: see the docstring)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    left, right = window
    block = create_block_mask(lambda b, h, i, j: (j >= i - left) & (j <= i + right), None, None, n, n, device="cpu")
    return torch.compile(flex_attention, dynamic=False), block


def _cpu_call(impl, q, k, v, do, window, backward, flex=None):
    if impl == "ours":
        o = sliding_window_attention(q, k, v, window, backend="torch")
    elif impl == "flex":
        o = flex[0](q, k, v, block_mask=flex[1])
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_band(q.shape[2], window, q.device))
    if backward:
        q.grad = k.grad = v.grad = None
        o.backward(do)
    return o


def _cpu_case(impl, N, backward, out_path, threads):
    """One measurement in this (fresh) process; prints a JSON line and saves results for the comparison."""
    if threads:
        torch.set_num_threads(threads)
    B, H, D, window = 1, 8, 64, (15, 0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).requires_grad_(backward) for _ in range(3))
    do = torch.randn(B, H, N, D, generator=g)

    small = [t[:, :, :64].detach().requires_grad_(backward) for t in (q, k, v)]
    flex = None
    if impl == "flex":  # compiled for this N by a first call: neither time nor memory counts the compiler
        flex = _flex_band(N, window)
        _cpu_call(impl, q, k, v, do, window, backward, flex)
    else:
        with torch.set_grad_enabled(backward):  # one-time library set-up (threads, BLAS) is not the op's memory
            _cpu_call(impl, *small, do[:, :, :64], window, backward)
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        o = _cpu_call(impl, q, k, v, do, window, backward, flex)
        cold = time.perf_counter() - t0
        peak = _status("VmHWM") - base
        times = [cold]
        for _ in range(0 if cold > 5 else 3):
            t0 = time.perf_counter()
            _cpu_call(impl, q, k, v, do, window, backward, flex)
            times.append(time.perf_counter() - t0)
    torch.save([o.detach()] + ([q.grad, k.grad, v.grad] if backward else []), out_path)
    print(json.dumps(dict(impl=impl, N=N, backward=backward, seconds=min(times), peak_mb=peak)))


def bench_cpu(sizes, threads, flex=True):
    torch.set_num_threads(threads or torch.get_num_threads())
    load = os.getloadavg()
    print(f"CPU: PyTorch path vs SDPA + dense bool mask{' and compiled FlexAttention + BlockMask' if flex else ''}, "
          f"B=1 H=8 D=64 fp32, window (15, 0), {torch.get_num_threads()} threads, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rows = ["| N | pass | ours s | SDPA+mask s | speedup | Flex s | Flex / ours | ours extra MB | SDPA+mask extra MB | "
            "memory ratio | Flex extra MB | max abs diff vs SDPA (out, dq, dk, dv) | vs Flex (out) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for N in sizes:
            for backward in (False, True):
                res, saved = {}, {}
                for impl in ("ours", "sdpa") + (("flex",) if flex and not backward else ()):
                    path = os.path.join(tmp, f"{impl}.pt")
                    cmd = [sys.executable, "-m", "kernels.bench", "--case", f"{impl},{N},{int(backward)},{path},{threads or 0}"]
                    line = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                    line = line.stdout.strip().splitlines()[-1]
                    res[impl], saved[impl] = json.loads(line), torch.load(path)
                    print("  ", line, flush=True)
                diff = ", ".join(f"{(a - b).abs().max().item():.1e}" for a, b in zip(saved["ours"], saved["sdpa"]))
                o, s = res["ours"], res["sdpa"]
                f = res.get("flex")  # no FlexAttention backward on CPU in torch: "n/a" for fwd+bwd
                fx = (f"{f['seconds']:.3f} | {f['seconds'] / o['seconds']:.1f}x" if f else "n/a | n/a")
                fmem = f"{f['peak_mb']:.0f}" if f else "n/a"
                rows.append(f"| {N} | {'fwd+bwd' if backward else 'forward'} | {o['seconds']:.3f} | {s['seconds']:.2f} | "
                            f"{s['seconds'] / o['seconds']:.0f}x | {fx} | {o['peak_mb']:.0f} | {s['peak_mb']:.0f} | "
                            f"{s['peak_mb'] / max(o['peak_mb'], 1e-9):.1f}x | {fmem} | {diff} | "
                            + (f"{(saved['ours'][0] - saved['flex'][0]).abs().max().item():.1e} |" if f else "n/a |"))
    load = os.getloadavg()
    print("\n".join(rows) + f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def bench_cuda(sizes, windows=((15, 0), (255, 255)), B=4, H=16, D=64, dtype=torch.bfloat16):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    flex = torch.compile(flex_attention, dynamic=False)
    print(f"CUDA {torch.cuda.get_device_name()}: B={B} H={H} D={D} {dtype}; TFLOP/s of useful band work, "
          "peak extra memory MiB (inputs and masks excluded)")
    print("| window | N | pass | ours TFLOP/s | Flex TFLOP/s | SDPA+mask TFLOP/s | ours MiB | Flex MiB | SDPA+mask MiB | mask MiB | max abs diff vs Flex |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for left, right in windows:
        for N in sizes:
            q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_()
            mask = dense_band(N, (left, right), "cuda")
            block = create_block_mask(lambda b, h, i, j: (j >= i - left) & (j <= i + right), None, None, N, N, device="cuda")
            providers = {"ours": lambda: sliding_window_attention(q, k, v, (left, right), backend="triton"),
                         "flex": lambda: flex(q, k, v, block_mask=block),
                         "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
            diff = (providers["ours"]() - providers["flex"]()).abs().max().item()
            for backward in (False, True):
                cells, mems = [], []
                for fn in providers.values():
                    run = (lambda fn=fn: fn().backward(do)) if backward else torch.no_grad()(fn)
                    try:
                        run()  # compile / autotune outside the timing
                        ms = do_bench(run, grad_to_none=[q, k, v])
                        q.grad = k.grad = v.grad = None
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        before = torch.cuda.memory_allocated()
                        run()
                        torch.cuda.synchronize()
                        mems.append(f"{(torch.cuda.max_memory_allocated() - before) / 2**20:.0f}")
                        cells.append(f"{flops(B, H, N, D, (left, right), backward) / (ms * 1e-3) / 1e12:.1f}")
                    except torch.OutOfMemoryError:  # a dense-mask path may fall back to materialising N x N
                        cells.append("OOM")
                        mems.append("OOM")
                    q.grad = k.grad = v.grad = None
                print(f"| ({left}, {right}) | {N} | {'fwd+bwd' if backward else 'forward'} | " + " | ".join(cells)
                      + " | " + " | ".join(mems) + f" | {mask.numel() / 2**20:.0f} | {diff:.1e} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", default=None, help="comma-separated N (default: 1k-16k on CUDA, 4096,16384 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--flex", default="true", choices=["true", "false"],
                   help="CPU: also time compiled FlexAttention (forward; ~1 min of compiling per N)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = p.parse_args(argv)
    if args.case:
        impl, n, backward, path, threads = args.case.split(",")
        return _cpu_case(impl, int(n), bool(int(backward)), path, int(threads))
    default = "1024,2048,4096,8192,16384" if args.device == "cuda" else "4096,16384"
    sizes = [int(s) for s in (args.sizes or default).split(",")]
    bench_cuda(sizes) if args.device == "cuda" else bench_cpu(sizes, args.threads, args.flex == "true")


if __name__ == "__main__":
    main()
