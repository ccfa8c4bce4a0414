"""The GPU check .ci/gpu, from a machine without a GPU: it parses, every command, script and flag it runs exists,
its stage timeouts add up to its 9-minute budget; and the helpers it calls, run here on CPU: the kernel checks
(Triton under the interpreter, fp16), the memory estimates of hilt.py, samf.py and boundary_vqa.py on the meta
device, and data.py's run plumbing (peak FLOP/s, the step timer, the on-disk synthetic cache, check_fits).

Also importable on the GPU machine: `kernel_checks("cuda", ...)` and `hilt_memory_estimate()` are what .ci/gpu runs.
`python tests/test_ci_gpu.py` prints the memory tables of the README.
"""
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GPU = ROOT / ".ci" / "gpu"
BUDGET_S = 9 * 60


# ---- the kernel checks .ci/gpu runs on CUDA (bf16 and fp16); here under the interpreter in fp16 -------------------

def kernel_cases():
    """The windows and lengths of tests/test_kernels.py, read from its own parametrize marks (so the two never drift),
    plus two lengths a real model uses. Yields (kind, B, H, Nq, Nk, D, window or (padded, splits))."""
    import tests.test_kernels as tk

    def marks(fn):
        return {m.args[0]: m.args[1] for m in fn.pytestmark if m.name == "parametrize"}
    for window in marks(tk.test_sliding_window_windows)["window"]:
        yield "band", 2, 2, 37, 37, 16, window
    for N, D, window in marks(tk.test_sliding_window_shapes)["N,D,window"]:
        yield "band", 2, 3, N, N, D, window
    for B, H, Nq, Nk, D, padded, splits in marks(tk.test_cross_attention)["B,H,Nq,Nk,D,padded,splits"]:
        yield "cross", B, H, Nq, Nk, D, (padded, splits)


# what the scripts run: CT-Scroll's band over slices, a long band, HILT-like few queries over 4096 keys
MODEL_CASES = [("band", 2, 4, 2048, 2048, 64, (15, 0)), ("band", 2, 4, 2048, 2048, 64, (255, 255)),
               ("cross", 2, 1, 64, 4096, 64, (True, None))]


def _check_one(fn, q, k, v, mask, dtype):
    """Max abs error of fn's output and dQ, dK, dV against float64, and the same for the dense reference computed in
    `dtype` (what rounding to that dtype costs anyway). The check: ours <= 2 x that + 4 ulp of the output's scale."""
    from kernels.sliding_window import attention_reference
    g = torch.Generator(device=q.device).manual_seed(1)
    out = fn(q, k, v)
    grad = torch.randn(out.shape, generator=g, device=q.device, dtype=torch.float32).to(dtype)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, mask)
    want = (ref, *torch.autograd.grad(ref, leaves, grad.double()))
    low = [t.detach().requires_grad_() for t in (q, k, v)]
    base = attention_reference(*low, mask)
    base = (base, *torch.autograd.grad(base, low, grad))
    eps = torch.finfo(dtype).eps
    rows = []
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, base):
        err, err_base = (a.double() - b).abs().max().item(), (c.double() - b).abs().max().item()
        rows.append((name, err, err_base, err <= 2 * err_base + 4 * eps * max(1.0, b.abs().max().item())))
    return rows


def kernel_checks(device="cuda", dtypes=("bfloat16", "float16"), cases=None, verbose=True) -> list:
    """Triton forward and every gradient vs the float64 reference for every case and dtype; returns the failures
    (an empty list = all passed) and prints one line per case."""
    from kernels import cross_attention, sliding_window_attention
    from kernels.sliding_window import band_mask
    failures = []
    for kind, B, H, Nq, Nk, D, extra in (cases if cases is not None else kernel_cases()):
        for dt in dtypes:
            dtype = getattr(torch, dt)
            g = torch.Generator().manual_seed(Nq + Nk + D)
            q = torch.randn(B, H, Nq, D, generator=g).to(device, dtype).requires_grad_()
            k, v = (torch.randn(B, H, Nk, D, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
            if kind == "band":
                mask = band_mask(Nq, Nk, extra, device)
                fn = lambda q, k, v, w=extra: sliding_window_attention(q, k, v, w, backend="triton")  # noqa: E731
            else:  # the padding of test_cross_attention: ~30% of keys off, the last batch element with none
                padded, splits = extra
                m = torch.ones(B, Nk, dtype=torch.bool)
                if padded:
                    m = torch.rand(B, Nk, generator=torch.Generator().manual_seed(2)) > 0.3
                    m[:, 0] = True
                    if B > 1:
                        m[-1] = False
                m = m.to(device)
                mask = m[:, None, None, :]
                fn = lambda q, k, v, m=m if padded else None, s=splits: cross_attention(  # noqa: E731
                    q, k, v, key_padding_mask=m, backend="triton", splits=s)
            rows = _check_one(fn, q, k, v, mask, dtype)
            ok = all(r[3] for r in rows)
            line = (f"{'ok  ' if ok else 'FAIL'} {kind:<5} B={B} H={H} Nq={Nq} Nk={Nk} D={D} {extra} {dt}: "
                    + ", ".join(f"{n} {e:.1e} (ref in {dt} {b:.1e})" for n, e, b, _ in rows))
            if verbose:
                print(line, flush=True)
            if not ok:
                failures.append(line)
    return failures


def kernel_checks_or_exit(device="cuda"):
    """.ci/gpu's kernel stage. Each autotuned kernel is pinned to one config: the test-file cases in bf16 and fp16 run
    with the first (64 x 32 blocks), MODEL_CASES in bf16 with the last (128 x 64). Autotuning all 8 configs x 3
    kernels for each of ~40 shape/dtype keys would not fit the stage's time; every one of the 72 (dtype, head dim,
    mask, block) variants compiles for sm_90 here (checked with triton.compile on CPU)."""
    import kernels.sliding_window as sw
    tuners = [sw._fwd_kernel, sw._bwd_dkdv_kernel, sw._bwd_dq_kernel]
    full = [t.configs for t in tuners]
    failures = []
    try:
        for pick, dtypes, cases in ((0, ("bfloat16", "float16"), None), (-1, ("bfloat16",), MODEL_CASES)):
            for t, c in zip(tuners, full):
                t.configs = [c[pick]]
            print(f"kernels pinned to {full[0][pick]}", flush=True)
            failures += kernel_checks(device, dtypes, cases)
    finally:
        for t, c in zip(tuners, full):
            t.configs = c
    print(f"{len(failures)} failing case(s)" if failures else "all kernel checks passed")
    if failures:
        raise SystemExit("\n".join(failures))


# ---- the other stages of .ci/gpu ---------------------------------------------------------------------------------

def versions():
    """What .ci/gpu ran with; fails without CUDA (every later stage would fail anyway)."""
    import platform
    import numpy
    import nibabel
    import data
    print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, numpy {numpy.__version__}, "
          f"nibabel {nibabel.__version__} ({Path(nibabel.__file__).parent.parent})")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    if not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    p = torch.cuda.get_device_properties(0)
    peak, src = data.peak_flops("cuda")
    print(f"GPU {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs; MFU is reported against {peak / 1e12:.0f} TFLOP/s ({src})")


def render_speed(device="cuda", shapes=((240, 480, 480), (256, 512, 512)), n=3):
    """Seconds per phantom volume rendered on `device` (after one warm-up), beside one render on the CPU."""
    import time
    import data
    sync = torch.cuda.synchronize if "cuda" in device else (lambda: None)
    for shape in shapes:
        data.render_phantom(data.sample_patient(0, "train", 0), shape, device)
        sync()
        t = time.perf_counter()
        for i in range(1, n + 1):
            data.render_phantom(data.sample_patient(0, "train", i), shape, device)
        sync()
        dev_s = (time.perf_counter() - t) / n
        t = time.perf_counter()
        data.render_phantom(data.sample_patient(0, "train", 0), shape, "cpu")
        print(f"phantom {'x'.join(map(str, shape))}: {dev_s:.3f} s/volume on {device}, {time.perf_counter() - t:.2f} s "
              f"on the CPU ({torch.get_num_threads()} threads)", flush=True)


RUNS = {"ct_scroll": "ct_scroll.py --preset=paper (compile=true)", "fusion2d3d": "fusion2d3d.py --preset=paper",
        "hilt": "hilt.py --hr 512,512,256 (as typed: paper preset)"}


def report(work_dir):
    """report.md in work_dir: one row per script run (the last log window of its log.jsonl) and the issue's targets.
    Exits non-zero when a run left no log window, a number is missing, or a loss is not finite (a wrong result);
    a missed speed or memory target is written down, not an error."""
    import json
    work = Path(work_dir)
    rows = ["| run | step ms | data ms (share) | compute ms | volumes/s | TFLOP/s | MFU (of peak TFLOP/s) | peak GB |",
            "|---|---|---|---|---|---|---|---|"]
    notes, errors = [], []
    for name, what in RUNS.items():
        log = work / name / "log.jsonl"
        recs = [json.loads(l) for l in log.read_text().splitlines()] if log.is_file() else []
        if not recs:
            errors.append(f"{name}: no log window in {log}")
            rows.append(f"| {what} | - | - | - | - | - | - | - |")
            continue
        r = recs[-1]
        missing = [k for k in ("step_ms", "data_ms", "data_frac", "compute_ms", "samples_per_s", "tflops", "mfu",
                               "peak_tflops", "peak_mem_gb") if k not in r]
        if missing or not math.isfinite(r.get("train_loss", float("nan"))):
            errors.append(f"{name}: missing {missing} or non-finite train_loss in {r}")
            continue
        rows.append(f"| {what} | {r['step_ms']:.0f} | {r['data_ms']:.0f} ({r['data_frac']:.0%}) | {r['compute_ms']:.0f} | "
                    f"{r['samples_per_s']:.2f} | {r['tflops']:.1f} | {r['mfu']:.1%} (of {r['peak_tflops']:.0f}) | "
                    f"{r['peak_mem_gb']:.1f} |")
        notes.append(f"- {name}: data wait {r['data_frac']:.0%} of the step: target < 10% "
                     + ("MET" if r["data_frac"] < 0.10 else "NOT MET"))
        if name == "hilt":
            notes.append(f"- hilt --hr 512,512,256: peak {r['peak_mem_gb']:.1f} GB allocated: target <= 24 GB "
                         + ("MET" if r["peak_mem_gb"] <= 24 else "NOT MET"))
    bench = work / "bench.log"
    for line in bench.read_text().splitlines() if bench.is_file() else []:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 4 and cells[2] == "fwd+bwd" and cells[1].isdigit() and int(cells[1]) >= 4096:
            try:
                ours, flex = float(cells[3]), float(cells[4])
                notes.append(f"- band {cells[0]} N={cells[1]} fwd+bwd: Triton {ours} vs FlexAttention {flex} TFLOP/s: "
                             "target Triton >= Flex " + ("MET" if ours >= flex else "NOT MET"))
            except ValueError:
                notes.append(f"- band {cells[0]} N={cells[1]} fwd+bwd: {cells[3]} vs {cells[4]}")
    text = "\n".join(["## Paper presets (last log window: means per step)", "", *rows, "", "## Targets", "",
                       *notes, *[f"- ERROR {e}" for e in errors]]) + "\n"
    (work / "report.md").write_text(text)
    print(text)
    if errors:
        raise SystemExit(1)


# ---- HILT's memory at the headline, estimated on the meta device --------------------------------------------------

LLAMA_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True)  # Llama-3.1-8B's params.json


def _step_estimate(name, micro, model, fn, verbose) -> dict:
    """weights (fp32 trained, bf16 frozen) + AdamW + the peak of one micro-batch's forward + backward (fn), in GB."""
    from data import meta_memory
    params = list(model.parameters())
    n_tr = sum(p.numel() for p in params if p.requires_grad)
    weights, adam = n_tr * 4 + sum(p.numel() for p in params if not p.requires_grad) * 2, n_tr * 8
    model.to(torch.bfloat16).train()
    step = meta_memory(fn)
    res = {"model": name, "micro_batch": micro, "params_m": sum(p.numel() for p in params) / 1e6, "trained_m": n_tr / 1e6,
           "weights_gb": weights / 1e9, "adam_gb": adam / 1e9, "step_peak_gb": step / 1e9,
           "total_gb": (weights + adam + step) / 1e9}
    if verbose:
        print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()), flush=True)
    return res


def hilt_memory_estimate(hr=(512, 512, 256), llm_args=None, text_len=512, micro=None, verbose=True) -> dict:
    """GB of one training step of hilt.py's paper preset at `hr` on one GPU, with nothing allocated (meta device):
    weights fp32 (a frozen Llama in bf16, as Meta ships it), AdamW's two fp32 moments of the trained parameters,
    and the peak of everything a micro-batch's forward + backward creates (activations kept for backward with the
    ViT's checkpointing, recomputation, gradients), counted by data.meta_memory with the model in bf16 (what
    autocast computes in). llm_args: a Llama shape (LLAMA_8B) built with LoRA in place of the from-scratch decoder;
    micro: volumes per micro-batch (default: the preset's batch_size / grad_accum); text_len: report tokens."""
    import hilt
    cfg = hilt.parse_config([f"--preset=paper", "--hr=" + ",".join(map(str, hr)), "--device=cuda"],
                            hilt.DEFAULTS, hilt.PRESETS)
    micro = micro or cfg["batch_size"] // cfg["grad_accum"]
    _, _, n_visual = hilt.token_grids(cfg)
    with torch.device("meta"):
        if llm_args:
            decoder = hilt.Decoder(hilt.ModelArgs(**llm_args, max_seq_len=n_visual + cfg["max_text_len"]))
            decoder.requires_grad_(False)
            hilt.add_lora(decoder, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"])
            model = hilt.HILT(cfg, decoder)
        else:
            model = hilt.build_model(cfg)
        x = torch.empty(micro, 1, *hilt.zyx(cfg["hr"]), dtype=torch.bfloat16)
        ids = torch.zeros(micro, text_len, dtype=torch.long)
        labels = torch.zeros(micro, len(hilt.LABELS), dtype=torch.bfloat16)
    name = "Llama-3.1-8B shape + LoRA" if llm_args else "from scratch"
    res = _step_estimate(name, micro, model, lambda: model(x, ids, ids, labels).backward(), verbose=False)
    res = {"decoder": name, "hr": hr, "micro_batch": micro, "text_tokens": text_len,
           **{k: v for k, v in res.items() if k not in ("model", "micro_batch")}}
    if verbose:
        print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()), flush=True)
    return res


LLAMA_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                ffn_dim_multiplier=1.5, rope_theta=500000.0, use_scaled_rope=True)  # Llama-3.2-1B's params.json
LLAMA_3B = dict(LLAMA_1B, dim=3072, n_layers=28, n_heads=24, ffn_dim_multiplier=1.0)  # Llama-3.2-3B's


def samf_memory_estimate(llm_args=None, text_len=512, argv=("--preset=paper",), verbose=True) -> dict:
    """samf.py's fine-tuning step (a report of text_len tokens and a 40-token multiple choice per volume, the
    preset's micro-batch) on the meta device: the from-scratch decoder, or a Llama shape frozen with LoRA."""
    import samf
    cfg = samf.parse_config([*argv, "--device=cuda"], samf.DEFAULTS, samf.PRESETS)
    B = cfg["batch_size"] // cfg["grad_accum"]
    with torch.device("meta"):
        if llm_args:
            dec = samf.Decoder(samf.ModelArgs(**llm_args, max_seq_len=2 + cfg["n_slices"] + cfg["max_text_len"]))
            samf.add_lora(dec.requires_grad_(False), r=cfg["lora_r"], alpha=cfg["lora_alpha"],
                          dropout=cfg["lora_dropout"])
            model = samf.SAMFModel(cfg, dec)
        else:
            model = samf.build_model(cfg)
        x, labels = torch.empty(B, 1, *cfg["shape"], dtype=torch.bfloat16), torch.zeros(B, len(samf.LABELS))
        q, q_mask = torch.zeros(B, 16, dtype=torch.long), torch.ones(B, 16, dtype=torch.bool)
        report, mcq = torch.zeros(B, text_len, dtype=torch.long), torch.zeros(B, 40, dtype=torch.long)
    name = f"samf {'Llama ' + str(llm_args['dim']) + ' x ' + str(llm_args['n_layers']) if llm_args else 'scratch'}"
    return _step_estimate(name, B, model, lambda: model(x, labels, q, q_mask, report, report, q, q_mask, mcq, mcq)
                          .backward(), verbose)


def bvqa_memory_estimate(decoder="m", llm_args=None, argv=("--preset=paper",), verbose=True) -> dict:
    """boundary_vqa.py's VQA step (the frozen tower's features cached, max_text_len tokens, the preset's batch) on
    the meta device: a from-scratch decoder of size `decoder`, or a Llama shape frozen with LoRA."""
    import boundary_vqa as bv
    cfg = bv.parse_config([*argv, "--device=cuda", f"--decoder={decoder}"], bv.DEFAULTS, bv.PRESETS)
    B, T = cfg["batch_size"] // cfg["grad_accum"], cfg["max_text_len"]
    with torch.device("meta"):
        if llm_args:
            tower = bv.VisionTower(cfg)
            dec = bv.Decoder(bv.ModelArgs(**llm_args, max_seq_len=1 + tower.n_visual + T))
            bv.add_lora(dec.requires_grad_(False), r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"])
            model = bv.BoundaryVQA(cfg, tower, dec, 0)
        else:
            model = bv.build_model(cfg)
        feats = torch.empty(B, model.tower.n_visual, cfg["proj_dim"], dtype=torch.bfloat16)
        ids, tmask, last = torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool), torch.zeros(B).long()

    def step():
        logits, yes_no = model(feats, ids, tmask, last)
        (logits.float().sum() + yes_no.float().sum()).backward()
    name = f"boundary_vqa {'Llama ' + str(llm_args['dim']) + ' x ' + str(llm_args['n_layers']) if llm_args else decoder}"
    return _step_estimate(name, B, model, step, verbose)


def bvqa_siglip_memory_estimate(argv=("--preset=paper",), dtype=torch.bfloat16, verbose=True) -> dict:
    """boundary_vqa.py's SigLIP step on the meta device: the preset's siglip_batch 2-channel volumes (built in fp32,
    counted; cast to dtype as autocast's first convolution does) and two 32-token sentences per volume, forward +
    backward. The model in dtype: bf16 approximates --dtype=bfloat16's autocast (which keeps the norms in fp32, so
    this is a lower bound), fp32 is the stage without autocast. Weights and AdamW (5.5M parameters) are left out."""
    import boundary_vqa as bv
    from data import meta_memory
    cfg = bv.parse_config([*argv, "--device=cuda"], bv.DEFAULTS, bv.PRESETS)
    B = cfg["siglip_batch"]
    with torch.device("meta"):
        model = bv.SigLIP(bv.VisionTower(cfg), bv.TextEncoder(cfg["vocab_size"], cfg["text_dim"], cfg["text_layers"],
                                                               cfg["proj_dim"])).to(dtype).train()
        ids, pad, z = torch.zeros(2 * B, 32, dtype=torch.long), torch.zeros(2 * B, 32, dtype=torch.bool), -torch.ones(
            B, 2 * B)

    def step():
        x = torch.empty(B, 2, *cfg["shape"], device="meta")
        model(x.to(dtype), ids, pad, z).backward()
    res = {"model": f"boundary_vqa SigLIP {str(dtype).removeprefix('torch.')}", "batch": B,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "step_peak_gb": meta_memory(step) / 1e9}
    if verbose:
        print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()), flush=True)
    return res


# ---- tests -------------------------------------------------------------------------------------------------------

def _gpu_commands():
    """(kind, target, flags) of every command .ci/gpu runs through the python it is given ("$PY")."""
    text = GPU.read_text()
    text = re.sub(r"\\\n\s*", " ", text)  # join continued lines
    cmds = []
    for line in text.splitlines():
        if '"$PY"' not in line or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line[line.index('"$PY"'):].split("|")[0].split(">")[0].split("2>&1")[0], posix=True)
        words = words[1:]
        if words[0] == "-m":  # (module and its subcommand, e.g. "pip install", flags)
            sub = [w for w in words[2:3] if not w.startswith("-")]
            cmds.append(("module", " ".join(words[1:2] + sub), [w for w in words[2:] if w.startswith("--")]))
        elif words[0] == "-c":
            cmds.append(("code", words[1], []))
        elif words[0].endswith(".py"):
            cmds.append(("script", words[0], words[1:]))
        else:
            cmds.append(("other", words[0], []))
    return cmds


def test_ci_gpu_parses():
    assert GPU.is_file() and os.access(GPU, os.X_OK), ".ci/gpu must be an executable file"
    r = subprocess.run(["bash", "-n", str(GPU)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_ci_gpu_runs_only_the_stages_it_is_given(tmp_path):
    """GPU_STAGES="estimate" (a rerun of one stage) runs that stage beside the versions and nothing else; an unknown
    name stops it before any stage, naming the name. Runs here without a GPU: the versions stage fails (no CUDA)."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_STAGES": "estimate"}
    r = subprocess.run([str(GPU), str(tmp_path / "s.md")], capture_output=True, text=True, cwd=ROOT, env=env)
    rows = re.findall(r"^\| (\w+) \| ([^|]+) \|", (tmp_path / "s.md").read_text(), re.M)
    assert [name for name, _ in rows if name != "stage"] == ["nibabel", "versions", "estimate"], rows
    assert dict(rows)["estimate"].strip() == "ok" and "total_gb" in r.stdout
    bad = subprocess.run([str(GPU)], capture_output=True, text=True, cwd=ROOT, env={**env, "GPU_STAGES": "hilt nope"})
    assert bad.returncode == 2 and "no stage 'nope'" in bad.stderr and "===" not in bad.stdout


def test_ci_gpu_commands_exist():
    """Every script .ci/gpu runs exists and accepts each --key it is given; the module's flags are in its --help;
    python -c snippets compile and name functions that exist; the shell tools it needs are here too."""
    import importlib
    cmds = _gpu_commands()
    kinds = {k for k, _, _ in cmds}
    assert {"script", "module", "code"} <= kinds and "other" not in kinds, cmds
    scripts = {t for k, t, _ in cmds if k == "script"}
    assert {"ct_scroll.py", "fusion2d3d.py", "hilt.py", "samf.py", "boundary_vqa.py"} <= scripts, scripts
    for kind, target, flags in cmds:
        if kind == "script":  # the script's own parser takes the whole command line (unknown keys, value types)
            assert (ROOT / target).is_file(), target
            mod = importlib.import_module(target[:-3])
            argv = [w.replace("$W", "/tmp/ci_gpu") for w in flags]
            cfg = mod.parse_config(argv, mod.DEFAULTS, mod.PRESETS)
            as_typed = not any(w.startswith("--preset") for w in argv)  # the default preset: paper on CUDA
            assert (as_typed or cfg["preset"] == "paper") and cfg["max_iters"] <= 6, (target, cfg["max_iters"])
        elif kind == "module":
            help_text = subprocess.run([sys.executable, "-m", *target.split(), "--help"], capture_output=True,
                                       text=True, cwd=ROOT, check=True).stdout
            for f in flags:
                assert f.split("=")[0] in help_text, f"{target}: no flag {f}"
        else:
            compile(target, "<.ci/gpu -c>", "exec")
            for mod, alias in re.findall(r"import ([\w.]+) as (\w+)", target):
                names = re.findall(rf"\b{alias}\.(\w+)\(", target)
                assert names and all(hasattr(importlib.import_module(mod), n) for n in names), (mod, names)
    for tool in ("timeout", "bash", "date"):
        assert shutil.which(tool), tool


def test_ci_gpu_budget():
    """Every stage runs under `timeout`; in each group (GPU_STAGES=core, the default, and vlm) the timeouts of the
    stages it runs (those before the groups, then its own) add up to the total the script states, at most 9 minutes."""
    text = GPU.read_text()
    limits, group = {"core": [], "vlm": [], None: []}, None
    for line in text.splitlines():
        if m := re.match(r'if \[ "\$GROUP" = (\w+) \]', line):
            group = m.group(1)
        elif line.strip() == "fi":
            group = None
        elif m := re.match(r"\s*stage\s+\S+\s+(\d+)\s", line):
            limits[group].append(int(m.group(1)))
    stated = dict(re.findall(r"# budget \((\w+)\): .*= (\d+) s", text))
    assert set(stated) == {"core", "vlm"} and limits["core"] and limits["vlm"], (stated, limits)
    for g in ("core", "vlm"):
        assert sum(limits[None] + limits[g]) == int(stated[g]) <= BUDGET_S, (g, limits, stated)
    assert "timeout" in text and 'timeout "$limit"' in text


def test_kernel_checks_pass_and_catch_a_wrong_kernel():
    """The check .ci/gpu runs on CUDA, here under the interpreter in fp16 on a few of the cases; a kernel with an
    off-by-one window must fail it."""
    import kernels.sliding_window as sw
    if not sw.INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"  # conftest sets it first; a direct run of this file needs it too
    cases = [c for c in kernel_cases() if c[3] <= 70][:3] + [c for c in kernel_cases() if c[0] == "cross"][:2]
    assert kernel_checks("cpu", ("float16",), cases, verbose=False) == []
    wrong = [("band", 1, 2, 37, 37, 16, (2, 0))]
    real = sw._SlidingWindowAttention.apply
    try:
        sw._SlidingWindowAttention.apply = lambda q, k, v, left, right: real(q, k, v, left + 1, right)
        assert len(kernel_checks("cpu", ("float16",), wrong, verbose=False)) == 1
    finally:
        sw._SlidingWindowAttention.apply = real


def test_kernel_stage_pins_one_config_and_restores_them(monkeypatch):
    """.ci/gpu's kernel stage: the test-file cases in both dtypes, then MODEL_CASES in bf16, each with every autotuned
    kernel pinned to one config; the autotuners get all their configs back; a failing case exits non-zero."""
    import kernels.sliding_window as sw
    tuners = [sw._fwd_kernel, sw._bwd_dkdv_kernel, sw._bwd_dq_kernel]
    before = [t.configs for t in tuners]
    calls = []
    fake = lambda device, dtypes, cases=None: calls.append((dtypes, cases, [len(t.configs) for t in tuners])) or []  # noqa: E731
    monkeypatch.setattr(sys.modules[__name__], "kernel_checks", fake)
    kernel_checks_or_exit("cpu")
    assert calls == [(("bfloat16", "float16"), None, [1, 1, 1]), (("bfloat16",), MODEL_CASES, [1, 1, 1])]
    assert all(t.configs is c for t, c in zip(tuners, before))
    monkeypatch.setattr(sys.modules[__name__], "kernel_checks", lambda *a, **k: ["FAIL band ..."])
    with pytest.raises(SystemExit):
        kernel_checks_or_exit("cpu")


def test_hilt_memory_estimate_fits_24gb():
    """Issue 14 item 4: hilt's paper preset at 512 x 512 x 256 (ViT-B with checkpointing, from-scratch decoder)
    fits one 24 GB GPU by the meta-device count; the parameter count is the model's."""
    import hilt
    r = hilt_memory_estimate(verbose=False)
    with torch.device("meta"):
        n = sum(p.numel() for p in hilt.build_model(hilt.parse_config(["--preset=paper"], hilt.DEFAULTS,
                                                                       hilt.PRESETS)).parameters())
    assert math.isclose(r["params_m"], n / 1e6) and r["weights_gb"] == r["trained_m"] * 4e6 / 1e9
    assert 1.0 < r["step_peak_gb"] and r["total_gb"] < 24, r


def test_samf_and_bvqa_memory_estimates_count_their_models():
    """The estimates README's table prints, at the cpu presets (fast): every parameter of build_model counted, fp32
    for the trained ones, a step peak above zero; with a Llama shape only LoRA and the rest train."""
    import boundary_vqa as bv
    import samf
    tiny = dict(LLAMA_1B, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300)
    for est, mod, argv in ((samf_memory_estimate, samf, ["--preset=cpu"]),
                           (bvqa_memory_estimate, bv, ["--preset=cpu", "--decoder=m"])):
        r = est(argv=argv[:1], verbose=False)
        with torch.device("meta"):
            model = mod.build_model(mod.parse_config(argv, mod.DEFAULTS, mod.PRESETS))
        assert math.isclose(r["params_m"], sum(p.numel() for p in model.parameters()) / 1e6), r
        assert math.isclose(r["adam_gb"], r["trained_m"] * 8e6 / 1e9) and r["step_peak_gb"] > 0, r
        lora = est(llm_args=tiny, argv=argv[:1], verbose=False)
        assert lora["trained_m"] < lora["params_m"] and lora["weights_gb"] < lora["params_m"] * 4e6 / 1e9, lora
    fp32, bf16 = (bvqa_siglip_memory_estimate(["--preset=cpu"], dtype, verbose=False)
                  for dtype in (torch.float32, torch.bfloat16))
    x_gb = 32 * 2 * 48 * 64 * 64 * 4 / 1e9  # the cpu preset's SigLIP batch in fp32, alive the whole step
    assert fp32["step_peak_gb"] > x_gb and x_gb < bf16["step_peak_gb"] < fp32["step_peak_gb"], (fp32, bf16)


def test_meta_memory_counts_live_tensors():
    """Two layers without grad: the peak is the first output and the GELU output alive together (2 x 256 x 4000
    fp32 = 8.192 MB); views (the weight's transpose) and the parameters are not counted."""
    from data import meta_memory
    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(1000, 4000), torch.nn.GELU(), torch.nn.Linear(4000, 1000))
        x = torch.empty(256, 1000)

    def forward():
        with torch.no_grad():
            for _ in range(3):
                m(x)
    assert meta_memory(forward) == 2 * 256 * 4000 * 4


def test_check_fits_stops_a_run_that_cannot_fit(monkeypatch, tmp_path):
    """data.check_fits: 16 B per trained parameter (fp32 weights, gradient, AdamW's two moments) and 2 B per frozen
    one against the GPU's memory; nothing is checked on CPU. samf's paper preset (its 3.8B decoder from scratch) and
    boundary_vqa's --decoder=l stop on a 24 GB GPU before any stage, naming the flag; --decoder=m goes on."""
    from types import SimpleNamespace
    import boundary_vqa as bv
    import data
    import samf

    def build():
        m = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10))
        m[1].requires_grad_(False)
        return m

    def gpu(nbytes):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=nbytes))
    gpu(110 * 16 + 110 * 2)
    data.check_fits(build, "cuda", "--x", "hint")  # exactly enough
    gpu(110 * 16 + 110 * 2 - 1)
    with pytest.raises(data.BadConfig, match="^--x: training needs at least .* of 0M parameters.*; hint$"):
        data.check_fits(build, "cuda:0", "--x", "hint")
    data.check_fits(build, "cpu", "--x", "hint")
    gpu(24e9)
    for mod in (samf, bv):
        monkeypatch.setattr(mod, "setup_ddp", lambda device: (False, 0, 1, "cuda", True))
    with pytest.raises(data.BadConfig, match=r"^--stage=finetune: training needs at least 60\.3 GB .* 3768M parameters.*--llm="):
        samf.main(["--preset=paper", f"--out_dir={tmp_path / 'samf'}"])
    assert not (tmp_path / "samf").exists()  # stopped before stage 1
    with pytest.raises(data.BadConfig, match=r"^--decoder=l: training needs at least 2\d\.\d GB .* smaller --decoder"):
        bv.main(["--preset=paper", "--decoder=l", f"--out_dir={tmp_path / 'bv'}"])

    class Reached(Exception):
        pass

    def get_items(*args):
        raise Reached
    monkeypatch.setattr(bv, "get_items", get_items)
    with pytest.raises(Reached):  # 0.7B parameters: 11.4 GB before activations
        bv.main(["--preset=paper", "--decoder=m", f"--out_dir={tmp_path / 'bv'}"])


def test_peak_flops_by_name_and_step_timer(monkeypatch):
    import data
    data.peak_flops.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert data.peak_flops("cuda:0") == (989e12, "NVIDIA H200 bf16 dense spec")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert data.peak_flops("cuda:1")[0] == 756e12
    data.peak_flops.cache_clear()
    flops, src = data.peak_flops("cpu", torch.float32)  # the call StepTimer makes on CPU (cached)
    assert flops > 1e8 and "CPU" in src
    clock = iter([0.0, 1.0, 1.5, 4.0, 4.2, 10.0])  # reset, data 1.0-1.5, data 4.0-4.2, stats at 10
    monkeypatch.setattr(data.time, "perf_counter", lambda: next(clock))
    t = data.StepTimer("cpu", flops_per_sample=flops)  # one sample per second at this peak = MFU 100%
    for _ in range(2):
        with t.data():
            pass
        t.step(5)
    r = t.stats()
    assert math.isclose(r["data_ms"], 350) and math.isclose(r["step_ms"], 5000) and math.isclose(r["data_frac"], 0.07)
    assert math.isclose(r["samples_per_s"], 1.0) and math.isclose(r["mfu"], 1.0) and "peak_mem_gb" not in r
    data.peak_flops.cache_clear()


def test_synthetic_disk_cache_renders_each_volume_once(tmp_path, monkeypatch):
    """Item i is SyntheticCT's item i (to the int16 rounding), rendered at its first access only; the file grows
    (sparse) when a larger n asks for it; a volume whose write never finished (byte unset) is rendered again."""
    import data
    shape = (16, 32, 32)
    ref = data.SyntheticCT("val", 2, shape=shape, seed=3)[1]
    calls = []
    real = data.render_phantom
    monkeypatch.setattr(data, "render_phantom", lambda *a, **k: calls.append(1) or real(*a, **k))
    ds = data.get_dataset("synthetic", "val", n=2, shape=shape, seed=3, disk_cache=tmp_path)
    a, b = ds[1], ds[1]
    assert len(calls) == 1 and torch.equal(a["volume"], b["volume"])
    assert (a["volume"] - ref["volume"]).abs().max() <= 0.5 / 1200 + 1e-6  # unit norm over [-1000, 200]
    assert a["report"] == ref["report"] and torch.equal(a["labels"], ref["labels"]) and ds.reports[1] == a["report"]
    big = data.get_dataset("synthetic", "val", n=5, shape=shape, seed=3, disk_cache=tmp_path)
    assert big.path == ds.path and big.path.stat().st_size == 5 * math.prod(shape) * 2
    big[1]
    assert len(calls) == 1  # still cached after growing
    big.done[1] = 0
    big[1]
    assert len(calls) == 2


def test_report_reads_the_runs_and_fails_on_a_wrong_result(tmp_path):
    """report() turns each run's last log window into a row, checks the targets (data < 10%, hilt <= 24 GB, Triton
    >= Flex), and exits non-zero when a run's loss is not finite or a run left no log."""
    import json
    rec = dict(train_loss=2.0, step_ms=800.0, data_ms=40.0, data_frac=0.05, compute_ms=760.0, samples_per_s=5.0,
               tflops=100.0, mfu=0.1, peak_tflops=989.0, peak_mem_gb=20.0)
    for name in RUNS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text(json.dumps({**rec, "step_ms": 1.0}) + "\n" + json.dumps(rec) + "\n")
    (tmp_path / "bench.log").write_text("| window | N | pass | ours | flex |\n| (15, 0) | 4096 | fwd+bwd | 80.5 | 90.1 |\n"
                                        "| (255, 255) | 16384 | fwd+bwd | 300.0 | 250.0 |\n| (15, 0) | 2048 | fwd+bwd | 1 | 2 |\n")
    report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| 800 | 40 (5%) | 760 | 5.00 | 100.0 | 10.0% (of 989) | 20.0 |" in text
    assert text.count("target < 10% MET") == 3 and "target <= 24 GB MET" in text
    assert "(15, 0) N=4096 fwd+bwd: Triton 80.5 vs FlexAttention 90.1 TFLOP/s: target Triton >= Flex NOT MET" in text
    assert "N=16384 fwd+bwd: Triton 300.0 vs FlexAttention 250.0 TFLOP/s: target Triton >= Flex MET" in text
    assert "N=2048" not in text
    (tmp_path / "hilt" / "log.jsonl").write_text(json.dumps({**rec, "train_loss": float("nan")}) + "\n")
    with pytest.raises(SystemExit):
        report(tmp_path)
    (tmp_path / "hilt" / "log.jsonl").unlink()
    with pytest.raises(SystemExit):
        report(tmp_path)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("hilt.py paper preset, one training step per GPU (meta-device estimate):")
    hilt_memory_estimate()
    hilt_memory_estimate(llm_args=LLAMA_8B)
    hilt_memory_estimate(llm_args=LLAMA_8B, micro=1)
    hilt_memory_estimate(llm_args=LLAMA_8B, micro=1, text_len=256)
    print("samf.py paper preset, one fine-tuning step per GPU (meta-device estimate):")
    samf_memory_estimate()
    samf_memory_estimate(llm_args=LLAMA_1B)
    samf_memory_estimate(llm_args=LLAMA_1B, argv=("--preset=paper", "--grad_accum=4"))
    samf_memory_estimate(llm_args=LLAMA_3B)
    print("boundary_vqa.py paper preset, one VQA step per GPU (meta-device estimate):")
    for size in "sml":
        bvqa_memory_estimate(size)
    bvqa_memory_estimate(llm_args=LLAMA_1B)
    print("boundary_vqa.py paper preset, one SigLIP step (batch 64 at 128 x 256 x 256; meta-device estimate):")
    bvqa_siglip_memory_estimate(dtype=torch.float32)
    bvqa_siglip_memory_estimate()
