"""boundary_vqa.py: Eq. 1 contour, question rewriting, DCFormer, MSSA, losses, frozen tower, main() end to end,
resume, predict, bad input, and the RadGenome-ChestCT layout round trip."""
import json
import math
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import StopAfter, write_meta_checkpoint
import torch
import torch.nn.functional as F

import boundary_vqa as bv
import data

TINY = ["--preset=cpu", "--device=cpu", "--shape=8,16,16", "--enc_stem=2,2,2", "--enc_dims=8,8,16",
        "--enc_depths=1,1,1", "--enc_kernel=3", "--mixer_tokens=2", "--proj_dim=16", "--text_dim=16",
        "--text_layers=1", "--dims=16,24,32", "--layers=1,1,2", "--heads=2,2,2", "--kv_heads=1,1,1",
        "--vocab_size=300", "--n_train=4", "--n_val=2", "--n_test=2", "--siglip_iters=2", "--siglip_batch=4",
        "--max_iters=2", "--batch_size=4", "--eval_interval=1", "--num_workers=0", "--max_new_tokens=4",
        "--warmup_iters=1", "--baselines=false"]


def cfg_of(argv):
    return bv.parse_config(argv, bv.DEFAULTS, bv.PRESETS)


def run_dirs(tmp_path):
    return [f"--out_dir={tmp_path / 'run'}", f"--cache_dir={tmp_path / 'cache'}"]


# ----------------------------------------------------------------------------- Eq. 1 and the rewriting

def disc(r, n=64, c=(32, 32)):
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r * r


def slow_outline(m):
    """Eq. 1 by loops on one slice: pixels of the region with an 8-neighbour outside it, then a 3 x 3 dilation."""
    Y, X = m.shape
    edge = torch.zeros(Y, X, dtype=torch.bool)
    for y in range(Y):
        for x in range(X):
            nb = [m[min(max(y + dy, 0), Y - 1), min(max(x + dx, 0), X - 1)] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            edge[y, x] = bool(m[y, x]) and sum(abs(int(v) - int(m[y, x])) for v in nb) > 0
    out = torch.zeros(Y, X)
    for y, x in edge.nonzero().tolist():
        out[max(y - 1, 0): y + 2, max(x - 1, 0): x + 2] = 1
    return out


def test_contour_of_a_disc_is_a_ring_of_its_radius_3px_wide():
    m = disc(12)[None].repeat(3, 1, 1)
    m[1] = False  # a slice the region misses gets no outline
    b = bv.boundary_prompt(m)
    assert b[1].sum() == 0 and torch.equal(b[0], b[2])
    torch.testing.assert_close(b[0], slow_outline(m[0]))  # Eq. (1) + dilation, vectorised == by loops (no holes)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    d = ((yy - 32.0) ** 2 + (xx - 32.0) ** 2).sqrt()
    ring = b[0] > 0
    assert d[ring].min() >= 12 - 3 and d[ring].max() <= 12 + 1.5  # 3 px around the edge (radius 12; a bit more
    # on the diagonals, where the 8-neighbour boundary is a staircase), no further
    assert ring[(d >= 12 - 1.5) & (d <= 12 + 0.5)].all()  # a closed band, not a dotted line
    assert not ring[d < 9].any()  # the interior is suppressed
    row = b[0, 32].nonzero()[:, 0].tolist()  # through the centre: two runs of 3-4 px (diagonal neighbours count)
    assert row[0] in (19, 20) and 3 <= len([x for x in row if x < 32]) <= 4


def test_holes_get_no_outline_only_the_outer_contour():
    m = disc(12)[None].clone()
    m[0, 30:34, 30:34] = False  # a vessel inside the lung: a hole of its mask
    torch.testing.assert_close(bv.boundary_prompt(m), bv.boundary_prompt(disc(12)[None]))
    assert torch.equal(bv.fill_holes(m), disc(12)[None])


def test_only_the_largest_component_is_outlined():
    m = (disc(10, c=(20, 20)) | disc(5, c=(50, 50)))[None]
    b = bv.boundary_prompt(m)
    assert b[0, 40:, 40:].sum() == 0 and b[0, :35, :35].sum() > 0
    lc = bv.largest_component(m)
    assert torch.equal(lc[0], disc(10, c=(20, 20)))


def slow_largest_component(m):
    """Per slice, 8-connected components by a flood fill; the largest kept (ties: the one whose largest flat index is
    smaller, as the vectorised labels)."""
    Z, Y, X = m.shape
    out = torch.zeros_like(m)
    for z in range(Z):
        seen, best = set(), None
        for start in map(tuple, m[z].nonzero().tolist()):
            if start in seen:
                continue
            comp, todo = [], [start]
            seen.add(start)
            while todo:
                y, x = todo.pop()
                comp.append((y, x))
                for q in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                    if 0 <= q[0] < Y and 0 <= q[1] < X and m[z, q[0], q[1]] and q not in seen:
                        seen.add(q)
                        todo.append(q)
            key = (len(comp), -max(y * X + x for y, x in comp))
            if best is None or key > best[0]:
                best = (key, comp)
        for y, x in (best[1] if best else []):
            out[z, y, x] = True
    return out


def test_largest_component_equals_a_flood_fill():
    """The label propagation (each slice stopping at its own fixed point) against a flood fill, on random masks of
    every density: many components, ties, and slices without any."""
    g = torch.Generator().manual_seed(0)
    for density in (0.0, 0.2, 0.45, 0.6, 0.9):
        m = torch.rand(4, 23, 31, generator=g) < density
        assert torch.equal(bv.largest_component(m), slow_largest_component(m)), density


def test_rewriting_and_prompt_none():
    q = "Is there an abnormality in the left lung?"
    assert bv.rewrite(q, "none") == q
    r = bv.rewrite(q, "contour")
    assert r.startswith(bv.SYSTEM) and r.endswith("Within the blue-outlined area of the CT volume, is there an "
                                                  "abnormality in the left lung?")
    assert bv.rewrite("Where is the lung nodule?", "contour").endswith("Inside the blue boundary, where is the lung nodule?")
    x = bv.model_input(torch.rand(1, 4, 8, 8), None)
    assert x.shape == (2, 4, 8, 8) and x[1].abs().sum() == 0


def test_outline_region_comes_from_the_question_never_from_the_answer():
    for i in range(40):
        p = data.sample_patient(0, "train", i)
        for q in data.make_questions(p):
            r = bv.question_region(q)
            if q["kind"] == "region":
                assert r == q["region"]
            else:  # a side would give away where (or whether) the finding is
                assert r in ("lungs", "heart", "aorta", "mediastinum", "pleura", "esophagus"), (q, r)
    with pytest.raises(ValueError, match="no_such_region"):
        bv.region_mask({"masks": torch.zeros(2, 2, 2, dtype=torch.uint8), "name": "x"}, "no_such_region")


# ----------------------------------------------------------------------------- model blocks

def test_decomposed_conv_equals_dense_conv_with_summed_kernel():
    torch.manual_seed(0)
    dc = bv.DecomposedConv3d(3, 5)
    x = torch.randn(2, 3, 6, 7, 8)
    k, c = 5, 2  # the equivalent dense depthwise kernel: the three 1-D kernels summed into a cross
    w = torch.zeros(3, 1, k, k, k)
    w[:, :, :, c, c] += dc.convs[0].weight[:, :, :, 0, 0]
    w[:, :, c, :, c] += dc.convs[1].weight[:, :, 0, :, 0]
    w[:, :, c, c, :] += dc.convs[2].weight[:, :, 0, 0, :]
    b = sum(conv.bias for conv in dc.convs).detach()
    torch.testing.assert_close(dc(x), F.conv3d(x, w, b, padding=2, groups=3), atol=1e-5, rtol=1e-5)


def test_mssa_bias_is_shared_by_slice_offset_and_masks_the_answer():
    torch.manual_seed(0)
    mssa = bv.MSSA(16, 4, 3)
    with torch.no_grad():
        mssa.R.normal_()
    pos = torch.tensor([0, 0, 1, 2, 3, 3])
    offsets, vis_at = pos[:, None] - pos[None, :], torch.arange(1, 7)
    bias = mssa.bias(offsets, vis_at, 10)  # (h, L, L)
    for i in range(6):
        for j in range(6):
            torch.testing.assert_close(bias[:, 1 + i, 1 + j], mssa.R[:, offsets[i, j] + 3])
    assert bias[:, 0].abs().sum() == 0 and bias[:, 7:].abs().sum() == 0  # text and BOS: no slice bias
    x = torch.randn(1, 10, 16)
    zmask = torch.tensor([[False] + [True] * 8 + [False]])  # BOS and the last (answer) position outside Z
    y = mssa(x, zmask, offsets, vis_at)
    assert y[0, 0].abs().sum() == 0 and y[0, 9].abs().sum() == 0
    x2 = x.clone()
    x2[0, 9] += 5  # the answer token cannot change what the prompt positions receive
    torch.testing.assert_close(mssa(x2, zmask, offsets, vis_at), y)


def test_focal_loss_gamma0_is_cross_entropy_and_alpha_balances():
    logits, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
    torch.testing.assert_close(bv.focal_loss(logits, y, 0.0), F.cross_entropy(logits, y))
    assert bv.focal_loss(logits, y, 2.0) < F.cross_entropy(logits, y)
    a = bv.class_balanced_alpha([200, 100], 0.999)
    assert a[1] > a[0] and math.isclose(float(a.mean()), 1.0, rel_tol=1e-6)


def tiny_model(extra=()):
    cfg = cfg_of(TINY + list(extra))
    torch.manual_seed(0)
    return cfg, bv.build_model(cfg)


def test_frozen_tower_gets_no_gradient_and_the_decoder_does():
    cfg, model = tiny_model()
    x = torch.rand(2, 2, 8, 16, 16, requires_grad=False)
    feats = model.tower(x)  # even with grad enabled, the tower's parameters are frozen
    inputs, tmask = torch.randint(0, 290, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    logits, yn = model(feats, inputs, tmask, torch.tensor([4, 4]))
    (logits.logsumexp(-1).mean() + yn.sum()).backward()
    assert all(p.grad is None for p in model.tower.parameters())
    assert all(not p.requires_grad for p in model.tower.parameters())
    assert model.adapter.weight.grad is not None and model.decoder.output.weight.grad is not None
    fused = model.decoder.layers[0]
    assert isinstance(fused, bv.SliceBlock) and fused.mssa.R.grad is not None and fused.ssa_gate.grad is not None


def test_blind_twin_sees_zeros_and_kv_generation_matches_full_forward():
    cfg, model = tiny_model(["--blind=true"])
    feats = torch.randn(2, model.tower.n_visual, 16)
    assert model.prefix(feats)[:, 1:].abs().sum() == 0
    cfg, model = tiny_model()
    model.eval()
    with torch.no_grad():
        model.decoder.layers[0].ssa_gate.fill_(0.5)
        model.decoder.layers[0].mssa.R.normal_()
    prompt = torch.randint(0, 290, (2, 6))
    model.set_ctx(torch.ones_like(prompt, dtype=torch.bool))
    new = bv.generate(model.decoder, prompt, model.prefix(feats), max_new_tokens=4, eos_id=299)
    model.set_ctx(None)
    # the training forward (question marked, answer not) predicts the same tokens greedily
    inputs = torch.cat([prompt, new[:, :-1]], 1)
    tmask = torch.zeros_like(inputs, dtype=torch.bool)
    tmask[:, :6] = True
    with torch.no_grad():
        logits, _ = model(feats, inputs, tmask, torch.tensor([5, 5]))
    pred = logits[:, 5:].argmax(-1)
    for b in range(2):
        k = (new[b] == 299).nonzero()[:, 0].tolist()
        n = k[0] + 1 if k else new.shape[1]
        assert torch.equal(pred[b, :n], new[b, :n])


def test_paper_decoder_sizes_grow():
    cfg = cfg_of(["--preset=paper", "--device=cpu"])
    n = []
    for size in "sml":
        with torch.device("meta"):
            m = bv.build_model({**cfg, "decoder": size, "vocab_size": 151936})
        n.append(sum(p.numel() for p in m.decoder.parameters()))
    assert 0.3e9 < n[0] < n[1] < n[2] < 4e9, n


def test_bootstrap_diff_hand_examples():
    a = np.array([1, 0, 1, 1, 0, 1, 0, 1])
    assert data.bootstrap_diff(a, a) == (0.0, 0.0)
    assert data.bootstrap_diff(np.ones(10), np.zeros(10)) == (1.0, 1.0)
    lo, hi = data.bootstrap_diff(np.r_[np.ones(60), np.zeros(40)], np.r_[np.ones(50), np.zeros(50)])
    assert lo < 0.1 < hi and lo > -0.1


# ----------------------------------------------------------------------------- learning, main, resume, predict

def test_vqa_head_learns_an_answer_that_is_in_the_features():
    """Yes iff the first visual feature is positive: the decoder + head learn it; the blind twin cannot."""
    torch.manual_seed(0)
    accs = {}
    for blind in ("false", "true"):
        cfg, model = tiny_model([f"--blind={blind}"])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        g = torch.Generator().manual_seed(1)
        feats = torch.randn(256, model.tower.n_visual, 16, generator=g)
        y = (feats[:, :, 0].mean(1) > 0).long()
        inputs, tmask, last = torch.full((256, 3), 7), torch.ones(256, 3, dtype=torch.bool), torch.full((256,), 2)
        for step in range(60):
            i = torch.randint(0, 192, (32,), generator=g)
            _, yn = model(feats[i], inputs[i], tmask[i], last[i])
            loss = bv.focal_loss(yn, y[i], 2.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            _, yn = model(feats[192:], inputs[192:], tmask[192:], last[192:])
        accs[blind] = (yn.argmax(-1) == y[192:]).float().mean().item()
    assert accs["false"] > 0.8 and accs["true"] < 0.7, accs


def cli(argv, monkeypatch, capsys):
    """The script as a user runs it (`run(main)`): -> exit code, stderr."""
    monkeypatch.setattr(sys, "argv", ["boundary_vqa.py", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        data.run(bv.main)
    return e.value.code, capsys.readouterr().err


def test_main_end_to_end_resume_and_predict(tmp_path, capsys, monkeypatch):
    res = bv.main(TINY + run_dirs(tmp_path) + ["--max_iters=4"])
    out = tmp_path / "run"
    for f in ("siglip.pt", "ckpt.pt", "metrics.json", "vqa_metrics.json", "log.jsonl", "log_siglip.jsonl",
              "answers.txt", "bpe.tiktoken"):
        assert (out / f).is_file(), f
    for f in ("log.jsonl", "log_siglip.jsonl"):  # data.StepTimer's numbers in every log line
        recs = [json.loads(line) for line in (out / f).read_text().splitlines()]
        assert recs and all(r["samples_per_s"] > 0 and 0 <= r["data_frac"] <= 1 and r["mfu"] > 0 for r in recs), f
    for blind in ("majority answer", "answer-rate prior"):
        assert set(res["rows"][blind]) >= {"closed", "region"}, blind
    assert "closed: --prompt=contour --decoder=m minus the answer-rate prior" in res["paired"]
    reads = res["reads"]["--prompt=contour --decoder=m"].values()  # AUROC per yes/no question asked with both answers
    assert all(0 <= r["auroc"] <= 1 and 0 < r["yes"] < r["n"] for r in reads)
    own, other = res["test_loss own / another scan"]["--prompt=contour --decoder=m"]  # scan 0 <-> scan 1 swapped
    assert own != other and set(res["rows"]["--prompt=contour --decoder=m, another scan"]) >= {"closed", "region"}
    assert "closed: --prompt=contour --decoder=m minus the same model asked about another scan" in res["paired"]
    siglip = torch.load(out / "siglip.pt", weights_only=True)["model"]
    ref = torch.load(out / "ckpt.pt", weights_only=True)
    for k, v in siglip.items():  # the VQA stage left the encoder and Mixer exactly as SigLIP made them
        if k.startswith("tower."):
            torch.testing.assert_close(ref["model"][k], v)
    # interrupted after 2 of 4 steps (Ctrl-C saves), then resumed: the same weights as 4 steps straight
    cut = [f"--out_dir={tmp_path / 'cut'}", f"--cache_dir={tmp_path / 'cache'}", f"--siglip_from={out / 'siglip.pt'}",
           "--stage=vqa", "--max_iters=4"]
    with monkeypatch.context() as mp:
        mp.setattr(bv, "StopOnSigint", StopAfter)
        with pytest.raises(data.Interrupted, match="checkpoint saved"):  # run(main) turns it into exit code 130
            bv.main(TINY + cut)
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["iter_num"] == 2
    # a kill between the log line and the checkpoint's rename: a stale .tmp and a log line past the checkpoint
    (tmp_path / "cut" / "ckpt.pt.tmp").write_bytes(b"partial")
    data.append_jsonl(tmp_path / "cut" / "log.jsonl", {"stage": "vqa", "iter": 3, "stale": True})
    bv.main(TINY + cut + ["--init_from=resume"])
    assert not (tmp_path / "cut" / "ckpt.pt.tmp").exists()
    iters = [json.loads(line)["iter"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 3, 4] and "stale" not in (tmp_path / "cut" / "log.jsonl").read_text()
    resumed = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    assert resumed["iter_num"] == ref["iter_num"] == 4
    for k in ref["model"]:
        torch.testing.assert_close(resumed["model"][k], ref["model"][k], msg=k)
    # predict on a written NIfTI with a region mask
    item = bv.get_items(cfg_of(TINY + run_dirs(tmp_path)), "test")[0]
    hu = (item["volume"][0].float() * 1200 - 1000).numpy()
    sp = [f / s for f, s in zip(data.FOV, (8, 16, 16))]
    aff = np.diag([sp[2], sp[1], sp[0], 1.0])
    ras = lambda a: np.ascontiguousarray(a[::-1, ::-1, ::-1].transpose(2, 1, 0))
    nib.save(nib.Nifti1Image(ras(hu).astype(np.float32), aff), tmp_path / "scan.nii.gz")
    m = bv.region_mask(item, "heart").numpy().astype(np.uint8)
    nib.save(nib.Nifti1Image(ras(m), aff), tmp_path / "heart.nii.gz")
    pred = TINY + run_dirs(tmp_path) + ["--init_from=resume", f"--predict={tmp_path / 'scan.nii.gz'}",
                                        f"--mask={tmp_path / 'heart.nii.gz'}"]
    ans = bv.main(pred + ["--question=Is there an abnormality in the heart?"])
    assert ans in ("Yes", "No")
    assert (out / "predict_scan.png").is_file()
    assert isinstance(bv.main(pred + ["--question=Where is the lung nodule?"]), str)
    # bad input: one line naming the file or flag, exit code 2
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), aff), tmp_path / "small.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros_like(ras(m)), aff), tmp_path / "empty.nii.gz")
    nib.save(nib.Nifti1Image(ras(m) * 3, aff), tmp_path / "labels.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    for argv, words in (([f"--mask={tmp_path / 'small.nii.gz'}", "--question=Is it?"], ["small.nii.gz", "shape"]),
                        ([f"--mask={tmp_path / 'empty.nii.gz'}", "--question=Is it?"], ["empty.nii.gz", "empty mask",
                                                                                         "text alone"]),
                        ([f"--mask={tmp_path / 'labels.nii.gz'}", "--question=Is it?"], ["labels.nii.gz", "not a binary"]),
                        ([f"--mask={tmp_path / 'junk.nii.gz'}", "--question=Is it?"], ["junk.nii.gz", "unreadable"]),
                        (["--question=Is it?", "--rescale=hu"], ["--rescale"]),
                        (["--question=Is it?", "--kind=riddle"], ["--kind", "unknown question kind"])):
        code, err = cli(pred[:-1] + argv if "--mask" in argv[0] else pred + argv, monkeypatch, capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err
    bad = [f"--out_dir={tmp_path / 'bad'}", f"--cache_dir={tmp_path / 'cache'}", f"--siglip_from={out / 'siglip.pt'}",
           "--stage=vqa", "--batch_size=1", "--grad_accum=2"]
    code, err = cli(TINY + bad, monkeypatch, capsys)
    assert code == 2 and err.splitlines()[-1].startswith("error: --batch_size=1: below") and err.count("error") == 1, err


def test_a_compiled_run_resumes_without_compile(tmp_path, monkeypatch):
    """--compile=true: the checkpoint's names are the plain model's (torch.compile's wrapper saved them under
    "decoder._orig_mod.", and --init_from=resume failed to load them). Dynamo's eager backend keeps the test fast."""
    compiled = []
    orig = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(1) or orig(self, backend="eager"))
    res = bv.main(TINY + run_dirs(tmp_path) + ["--compile=true"])
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    assert "decoder.tok_embeddings.weight" in state and not any("_orig_mod" in k for k in state)
    assert compiled
    again = bv.main(TINY + run_dirs(tmp_path) + ["--init_from=resume", "--stage=vqa"])
    assert again["rows"] == res["rows"]


def test_siglip_steps_and_validation_run_under_the_autocast_context(tmp_path, monkeypatch):
    """--dtype's autocast (bf16 on CUDA; a no-op on CPU) wraps every SigLIP loss, training and validation: in fp32
    the paper preset's SigLIP step needs ~22.6 GB (tests/test_ci_gpu.py), too much for a 24 GB GPU."""
    entered = []

    class Ctx:  # reusable, like torch.autocast and nullcontext
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(bv, "autocast_ctx", lambda dtype, dev: Ctx())
    bv.main(TINY + run_dirs(tmp_path) + ["--stage=siglip", "--siglip_iters=3"])
    assert len(entered) >= 3 + 3  # 3 steps + a validation every step (eval_interval = iters // 3)


def test_an_interrupted_siglip_stage_resumes_exactly_and_goes_on_to_vqa(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the SigLIP stage of a full run: siglip.pt holds 2 of 4 steps, the message names the command, and
    that command (--stage=all --init_from=resume) ends with the weights of 4 steps straight, then trains VQA."""
    sig4 = ["--siglip_iters=4", f"--cache_dir={tmp_path / 'cache'}"]
    bv.main(TINY + sig4 + [f"--out_dir={tmp_path / 'straight'}", "--stage=siglip"])
    cut = TINY + sig4 + [f"--out_dir={tmp_path / 'cut'}"]
    with monkeypatch.context() as mp:
        mp.setattr(bv, "StopOnSigint", StopAfter)
        with pytest.raises(data.Interrupted, match="continue with --stage=all --init_from=resume"):
            bv.main(cut)
    assert torch.load(tmp_path / "cut" / "siglip.pt", weights_only=True)["iter_num"] == 2
    assert not (tmp_path / "cut" / "ckpt.pt").exists()
    capsys.readouterr()
    bv.main(TINY + sig4 + [f"--out_dir={tmp_path / 'early'}", f"--siglip_from={tmp_path / 'cut' / 'siglip.pt'}",
                           "--stage=vqa"])  # the VQA stage on the cut-short tower: it runs, and says so
    assert "siglip.pt holds 2 of its 4 SigLIP steps" in capsys.readouterr().out
    (tmp_path / "cut" / "siglip.pt.tmp").write_bytes(b"partial")  # a kill during the save
    bv.main(cut + ["--init_from=resume"])
    assert not (tmp_path / "cut" / "siglip.pt.tmp").exists()
    iters = [json.loads(line)["iter"] for line in (tmp_path / "cut" / "log_siglip.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 3, 4], iters
    ref, got = (torch.load(tmp_path / d / "siglip.pt", weights_only=True) for d in ("straight", "cut"))
    assert got["iter_num"] == ref["iter_num"] == 4
    for k in ref["model"]:
        torch.testing.assert_close(got["model"][k], ref["model"][k], rtol=0, atol=0, msg=k)
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["iter_num"] == 2  # the VQA stage ran after


def test_prompt_none_feeds_no_contour_anywhere(tmp_path, monkeypatch):
    seen = []
    orig = bv.BoundaryVQA.features

    def spy(self, x):
        seen.append(x[:, 1].abs().sum().item())
        return orig(self, x)
    monkeypatch.setattr(bv.BoundaryVQA, "features", spy)
    bv.main(TINY + run_dirs(tmp_path) + ["--prompt=none", "--max_iters=1"])
    assert seen and all(s == 0 for s in seen)
    answers = (tmp_path / "run" / "answers.txt").read_text()
    assert "blue" not in answers  # nor in the text
    seen.clear()
    bv.main(TINY + run_dirs(tmp_path) + ["--prompt=contour", "--max_iters=1", "--stage=vqa"])
    assert seen and all(s > 0 for s in seen)


def test_feature_cache_equals_the_tower_on_each_volume_alone_with_its_outline_drawn_again(tmp_path):
    """The fast path (frozen features once per (scan, region), in chunks, outlines from the cache's voxel indices)
    against its slow twin: the tower on one volume at a time, the outline computed from the region's mask."""
    cfg = cfg_of(TINY + run_dirs(tmp_path))
    items = bv.get_items(cfg, "train")
    qs = bv.questions_of(items) + bv.extra_questions(items, "train", cfg["seed"])
    for prompt in ("contour", "none"):
        c = {**cfg, "prompt": prompt}
        torch.manual_seed(0)
        model = bv.build_model(c)
        cache = bv.feature_cache(model, items, qs, c, "cpu")
        want = {(i, q["outline"] if prompt == "contour" else None) for i, q in qs}
        assert set(cache) == want and (len(want) > len(items) if prompt == "contour" else len(want) == len(items))
        for (i, r), f in cache.items():
            vol = items[i]["volume"].float()
            ring = None if r is None else bv.boundary_prompt(bv.region_mask(items[i], r))
            assert ring is None or ring.sum() > 0
            slow = model.features(bv.model_input(vol, ring)[None])[0]
            assert torch.allclose(f, slow, atol=1e-5), (i, r)
    blind = bv.feature_cache(model, items, qs, {**cfg, "blind": True}, "cpu")
    assert set(blind) == {(i, q["outline"]) for i, q in qs}
    assert all(v.abs().sum() == 0 and v.shape == (model.tower.n_visual, cfg["proj_dim"]) for v in blind.values())


def test_unknown_question_kind_is_named():
    with pytest.raises(ValueError, match="unknown kind 'riddle'"):
        bv.questions_of([{"name": "v1", "questions": [{"question": "Why?", "answer": "x", "kind": "riddle"}]}])


# ----------------------------------------------------------------------------- RadGenome-ChestCT layout

def test_radgenome_layout_round_trip(tmp_path):
    root = data.write_radgenome_layout(tmp_path / "rg", 3, shape=(8, 16, 16), seed=0, n_valid=1)
    ds = data.RadGenomeCT(root, "test", shape=(8, 16, 16), spacing=tuple(f / s for f, s in zip(data.FOV, (8, 16, 16))))
    assert len(ds) == 1
    it = ds[0]
    assert it["volume"].shape == (1, 8, 16, 16) and set(it["region_masks"]) == set(data.RADGENOME_REGIONS)
    p = data.sample_patient(0, "test", 0)
    _, masks = data.render_phantom(p, (8, 16, 16))
    heart = torch.isin(masks, torch.tensor(data.REGION_IDS["heart"], dtype=masks.dtype))
    assert torch.equal(it["region_masks"]["heart"], heart)  # reoriented and read back voxel for voxel
    presence = [q for q in it["questions"] if q["kind"] == "region"]
    assert len(presence) == len(data.RADGENOME_REGIONS)
    pos = [l for l, y in zip(data.LABELS, p["labels"]) if y]
    for q in presence:
        hit = any(data.finding_region(p, l) in (q["region"], "lungs" if "lung" in q["region"] else None) for l in pos)
        assert q["answer"] == ("Yes" if hit else "No")
        assert bv.question_region(q) == q["region"]
    assert bv.outline_of(it, "heart").sum() > 0
    train = data.RadGenomeCT(root, "train", shape=(8, 16, 16)) , data.RadGenomeCT(root, "val", shape=(8, 16, 16))
    assert len(train[0]) + len(train[1]) == 3  # patients split between train and val, none lost
    (root / "masks" / "seg_valid_1_a_1" / "heart.nii.gz").unlink()
    with pytest.raises(data.BadVolume, match="heart"):
        data.RadGenomeCT(root, "test", strict=True)


def test_main_on_a_radgenome_layout_skips_a_bad_mask_and_asks_another_scan_that_has_the_region(tmp_path, capsys):
    """--data=<RadGenome root> end to end: its QA has no closed questions (the paired bootstrap over none crashed after
    training), a scan lacks one region's row (the another-scan check must pick a scan that has the region), and a
    mask of the wrong shape is skipped with a warning naming it instead of stopping the run."""
    import csv
    root = data.write_radgenome_layout(tmp_path / "rg", 8, shape=(8, 16, 16), seed=0, n_valid=3)
    path = root / "radgenome_files" / "validation_region_vqa.csv"
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r[:2] != ["valid_2_a_1.nii.gz", "heart"]]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    bad = root / "masks" / "seg_train_3_a_1" / "aorta.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), bad)
    capsys.readouterr()
    res = bv.main(TINY + run_dirs(tmp_path) + [f"--data={root}"])
    err = capsys.readouterr().err
    assert "warning: skipped" in err and str(bad) in err and "mask shape" in err
    own, other = res["test_loss own / another scan"]["--prompt=contour --decoder=m"]
    assert own != other and "region: --prompt=contour --decoder=m minus the same model asked about another scan" \
        in res["paired"] and not any(k.startswith("closed") for k in res["paired"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["rows"].keys() == res["rows"].keys()
    items = bv.get_items(cfg_of(TINY + run_dirs(tmp_path) + [f"--data={root}"]), "test")
    assert [sorted(it["outlines"]) == sorted(data.RADGENOME_REGIONS) for it in items] == [True, False, True]
    assert bv.another_scan(items, 0, "heart") == 2 and bv.another_scan(items, 0, "aorta") == 1
    assert bv.another_scan(items[:1], 0, "heart") is None
    n_read = {split: len(bv.get_items(cfg_of(TINY + run_dirs(tmp_path) + [f"--data={root}"]), split))
              for split in ("train", "val")}
    assert sum(n_read.values()) == 7  # of 8: the bad mask's scan left out, and its row left out of the cache file
    sizes = sorted(p.stat().st_size for p in (tmp_path / "cache").glob("radgenome_*_t*.f16"))
    assert sorted(2 * 8 * 16 * 16 * k for k in (n_read["train"], 3)) == sizes
    with pytest.raises(data.BadVolume, match="mask shape"):
        bv.get_items(cfg_of(TINY + [f"--data={root}", f"--cache_dir={tmp_path / 'strict'}", "--strict=true"]), "train")


def test_sentence_pairs_positive_for_every_volume_stating_the_finding():
    items = [{"report": "The heart is enlarged (mild cardiomegaly). No pleural effusion is seen."},
             {"report": "Mild cardiomegaly is present. A small pleural effusion is seen in the right hemithorax."},
             {"report": "Heart size is within normal limits. There are no pulmonary nodules."}]
    texts, z = bv.sentence_pairs(items, [0, 1, 2], torch.Generator().manual_seed(0), per_report=2)
    assert len(texts) == 3  # the abnormal sentences only (report 0: 1, report 1: 2, report 2: none)
    for j, t in enumerate(texts):
        has_card = "cardiomegaly" in t.lower()
        assert z[:, j].tolist() == ([1.0, 1.0, -1.0] if has_card else [-1.0, 1.0, -1.0]), (t, z[:, j])


def test_sentence_pairs_of_an_outlined_volume_are_about_its_region():
    """A volume drawn with the heart's outline gets only its heart sentences and is a positive only for sentences
    about the heart; with a lung's outline, for lung findings of either side; without an outline, as before."""
    items = [{"report": "Mild cardiomegaly is present. A small pleural effusion is seen in the right hemithorax. "
                        "There is a 6 mm solid nodule in the upper lobe of the left lung."}] * 3
    texts, z = bv.sentence_pairs(items, [0, 1, 2], torch.Generator().manual_seed(0), per_report=3,
                                 outlines=["heart", "right lung", None])
    assert texts[0] == "Mild cardiomegaly is present." and "nodule" in texts[1] and len(texts) == 5, texts
    kinds = ["heart" if "cardiomegaly" in t else "pleura" if "effusion" in t else "lungs" for t in texts]
    for j, k in enumerate(kinds):
        assert z[:, j].tolist() == [1.0 if k == "heart" else -1.0, 1.0 if k == "lungs" else -1.0, 1.0], (texts[j], z)


def test_torchrun_two_ranks_trains_all_three_variants(tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU), baselines on: the question-only twin's adapter gets no gradient,
    which DDP must be told about (it crashed there before); rank 0 alone writes the log."""
    import os
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", bv.__file__,
           *TINY, "--baselines=true", *run_dirs(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "question-only (visual tokens zeroed)" in res["rows"] and "--prompt=none --decoder=m" in res["rows"]
    for sub in ("run", "run/prompt_none", "run/question_only"):
        log = [json.loads(l) for l in (tmp_path / sub / "log.jsonl").read_text().splitlines()]
        assert [r["iter"] for r in log] == [1, 2]  # one writer, not two


def test_only_rank_zero_writes_the_phantom_cache_and_the_others_read_it(tmp_path):
    """Under torchrun two ranks renaming one cache .tmp file raced (rank 0 failed): rank 0 renders and writes, the
    others wait for the finished cache and read it; the voxels are memory maps of it, equal to a fresh render."""
    import threading
    cfg, cache = cfg_of(TINY + run_dirs(tmp_path)), tmp_path / "cache"
    other = []
    waiter = threading.Thread(target=lambda: other.extend(bv.get_items(cfg, "val", master=False)))
    waiter.start()
    waiter.join(3)
    assert waiter.is_alive() and not other and not cache.exists()  # waiting, writing nothing
    mine = bv.get_items(cfg, "val")
    waiter.join(30)
    stem = f"val_{cfg['n_val']}_8x16x16_{cfg['seed']}"
    assert sorted(p.name for p in cache.iterdir()) == [f"{stem}.f16", f"{stem}.meta.pt", f"{stem}.u8"]
    fresh = [bv._Rendered(data.SyntheticCT("val", cfg["n_val"], shape=(8, 16, 16), seed=cfg["seed"]))[i]
             for i in range(cfg["n_val"])]
    assert len(other) == len(mine) == len(fresh) == cfg["n_val"]
    for a, b, f in zip(other, mine, fresh):
        assert a.keys() == b.keys() == f.keys() and a["name"] == f["name"] and a["questions"] == f["questions"]
        for k in ("volume", "masks"):
            assert a[k].dtype == f[k].dtype and torch.equal(a[k], f[k]) and torch.equal(b[k], f[k]), k
        assert all(torch.equal(a["outlines"][r], f["outlines"][r]) for r in f["outlines"])
    voxels = cfg["n_val"] * 8 * 16 * 16
    assert (cache / f"{stem}.f16").stat().st_size == 2 * voxels and (cache / f"{stem}.u8").stat().st_size == voxels
    with open(cache / f"{stem}.u8", "r+b") as f:  # a cache cut short (disk full, a copy interrupted): named, not read
        f.truncate(voxels - 1)
    with pytest.raises(data.InputError, match=f"{stem}.u8: {voxels - 1} bytes, expected {voxels}"):
        bv.get_items(cfg, "val")
    full = __import__("collections").namedtuple("usage", "total used free")(10**9, 10**9 - 1000, 1000)
    with pytest.MonkeyPatch.context() as mp:  # a disk without room for the split: one line before any write
        mp.setattr(__import__("shutil"), "disk_usage", lambda path: full)
        with pytest.raises(data.InputError, match=r"--cache_dir=.*the test split's 2 volumes .* need 0.0 GB, 0.0 GB "):
            bv.get_items(cfg, "test")
    assert not list(cache.glob("test_*"))


def test_llm_trains_lora_with_the_base_frozen_and_a_finished_run_resumes_to_its_evaluation(tmp_path):
    """--llm: a Meta-format Llama (a small random one) frozen, LoRA on it, the tower frozen after SigLIP; the VQA
    checkpoint holds LoRA and the rest, not Meta's weights; the finished run resumed evaluates to the same rows."""
    write_meta_checkpoint(tmp_path / "llama", scaled=True)
    argv = TINY + run_dirs(tmp_path) + [f"--llm={tmp_path / 'llama'}"]
    res = bv.main(argv)
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    lora_b = [v for k, v in state.items() if k.endswith(".lora_B")]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at 0: it trained
    assert not any(k.startswith("decoder.") and ".lora_" not in k and k.endswith(("wq.weight", "w1.weight"))
                   for k in state) and not any("tok_embeddings" in k for k in state)
    again = bv.main(argv + ["--init_from=resume", "--stage=vqa"])
    assert again["rows"] == res["rows"]


def test_table_without_a_siglip_tower_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    code, err = cli(TINY + ["--table=true", f"--out_dir={tmp_path / 'none'}"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "--table" in err and "siglip.pt" in err, err
    for flag in ([], [f"--siglip_from={tmp_path / 'nope.pt'}"]):  # --stage=vqa: said before any phantom is rendered
        code, err = cli(TINY + run_dirs(tmp_path) + ["--stage=vqa", *flag], monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and "--stage=vqa" in err and "siglip" in err, err
        assert not (tmp_path / "cache").exists()


def test_table_cells_run_with_every_flag_the_table_was_given(tmp_path, monkeypatch, capsys):
    """Each cell is a fresh process: it must get the table's own --data, --cache_dir, --calibrate, tower shape, ...
    (not only a fixed list of them), with only the cell's decoder size, prompt and out_dir its own."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "siglip.pt").write_bytes(b"")  # table() only checks that the tower exists
    argv = TINY + run_dirs(tmp_path) + ["--table=true", "--data=/some/RadGenome", "--calibrate=true", "--lora_l2=0.002",
                                        "--system_prompt=true"]
    calls = []
    monkeypatch.setattr(bv.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        __import__("subprocess").CompletedProcess(cmd, 1, "", "not run in this test"))
    bv.main(argv)
    parent = cfg_of(argv)
    assert len(calls) == 6
    cells = {(c["decoder"], c["prompt"]) for c in (cfg_of(cmd[2:]) for cmd in calls)}
    assert cells == {(s, p) for s in "sml" for p in ("none", "contour")}
    for cmd in calls:
        cell = cfg_of(cmd[2:])
        assert cell["stage"] == "vqa" and not cell["baselines"] and not cell["table"]
        assert cell["siglip_from"] == str(tmp_path / "run" / "siglip.pt")
        assert cell["out_dir"] == str(tmp_path / "run" / f"table_{cell['decoder']}_{cell['prompt']}")
        own = ("stage", "baselines", "table", "siglip_from", "out_dir", "decoder", "prompt")
        assert {k: v for k, v in cell.items() if k not in own} == {k: v for k, v in parent.items() if k not in own}
    code, err = cli(argv + ["--llm=/a/llama"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "--table" in err and "--llm" in err, err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = cli(argv, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "--table under torchrun" in err and len(calls) == 6, err


def test_reads_is_the_auroc_of_the_heads_log_odds_per_question():
    q = lambda text, ans, kind="closed": (0, {"question": text, "answer": ans, "kind": kind})
    samples = [q("Is there A?", "Yes"), q("Is there A?", "No"), q("Is there A?", "No"),
               q("Is there B?", "Yes"), q("Is there B?", "No"), q("Is there C?", "No"),
               q("Where is A?", "Left", "open")]
    log_odds = {0: 2.0, 1: -1.0, 2: 0.5, 3: 0.3, 4: 0.3, 5: 1.0}  # A separated, B a constant (blind), C one answer
    r = bv.reads(samples, log_odds)
    assert set(r) == {"Is there A?", "Is there B?"}  # C has no "Yes"; open questions have no head
    assert r["Is there A?"] == dict(auroc=1.0, n=3, yes=1) and r["Is there B?"]["auroc"] == 0.5


def test_answer_rate_prior_answers_each_question_text_by_its_training_answers():
    q = lambda text, ans, kind="closed": (0, {"question": text, "answer": ans, "kind": kind})
    train = [q("Is there A?", "Yes"), q("Is there A?", "Yes"), q("Is there A?", "No"), q("Is there B?", "No"),
             q("Is there C?", "No"), q("Is there C?", "No"), q("Is there D?", "Yes"), q("In the heart?", "Yes", "region")]
    test = [q("Is there A?", "Yes"), q("Is there B?", "No"), q("Is there D?", "Yes"), q("Is there E?", "No"),
            q("In the heart?", "No", "region"), q("Where?", "Left", "open")]
    assert bv.blind_answers(train, test, "kind") == ["No", "No", "No", "No", "Yes", ""]  # the majority answer
    # per text: A and D are mostly "Yes"; E was never asked: its kind's majority; an unseen kind: nothing
    assert bv.blind_answers(train, test, "question") == ["Yes", "No", "Yes", "No", "Yes", ""]


def test_a_finished_run_resumed_evaluates_its_twins_without_training_them_again(tmp_path):
    argv = TINY[:-1] + ["--baselines=true"] + run_dirs(tmp_path)
    first = bv.main(argv)
    twins = [tmp_path / "run" / d / "ckpt.pt" for d in ("prompt_none", "question_only")]
    before = [p.read_bytes() for p in twins]
    again = bv.main(argv + ["--init_from=resume"])
    assert [p.read_bytes() for p in twins] == before  # nothing trained, nothing saved
    assert again["rows"] == first["rows"] and again["paired"] == first["paired"]
    from tools import pair_answers  # the two runs' answers.txt give the interval the script printed for the pair
    got = pair_answers.main([str(tmp_path / "run" / d / "answers.txt") for d in ("", "question_only")])
    for kind, r in got.items():
        want = first["paired"][f"{kind}: --prompt=contour --decoder=m minus question-only (visual tokens zeroed)"]
        assert (r["diff"], r["lo"], r["hi"], r["n"]) == pytest.approx((want["diff"], want["lo"], want["hi"], want["n"]))
    assert set(got) == {"closed", "region"}


# ----------------------------------------------------------------------------- --roi_hist (not the paper's)

def test_roi_histogram_counts_the_outlined_interior_or_the_whole_volume():
    """The histogram is of the CT inside the outline's filled contour (Eq. 1's ring sits on the region's side, dilated
    one pixel out), not of the ring alone; with no outline it is the whole volume's."""
    a = 10  # a square region of side a, CT 0.1 inside and 0.9 outside, on 3 slices
    m = torch.zeros(3, 32, 32, dtype=torch.bool)
    m[:, 11:11 + a, 11:11 + a] = True
    ct = torch.where(m, 0.1, 0.9)
    x = torch.stack([ct, bv.boundary_prompt(m)])[None]  # (1, 2, Z, Y, X)
    p = bv.roi_histogram(x).exp()[0] - 1e-3  # frequencies
    low, high = int(0.1 * (bv.ROI_BINS - 1e-3)), int(0.9 * (bv.ROI_BINS - 1e-3))
    torch.testing.assert_close(p[low], torch.tensor(a * a / (a + 2) ** 2), rtol=0, atol=1e-6)  # filled + 1 px
    torch.testing.assert_close(p[high], torch.tensor(1 - a * a / (a + 2) ** 2), rtol=0, atol=1e-6)
    x[:, 1] = 0  # --prompt=none
    whole = bv.roi_histogram(x).exp()[0] - 1e-3
    ref = torch.histc(ct.flatten(), bv.ROI_BINS, 0, 1) / ct.numel()
    torch.testing.assert_close(whole, ref, rtol=0, atol=1e-6)


def test_roi_hist_adds_one_token_and_the_paper_tower_has_none():
    off, on = (bv.VisionTower(cfg_of(TINY + [f"--roi_hist={v}"])) for v in ("false", "true"))
    assert off.roi is None and not any("roi" in k for k in off.state_dict())
    assert on.n_visual == off.n_visual + 1 == len(on.centres)
    x = torch.rand(2, 2, 8, 16, 16)
    assert on(x).shape == (2, on.n_visual, 16) and off(x).shape == (2, off.n_visual, 16)


def test_a_checkpoint_from_before_roi_hist_resumes_as_the_paper_tower(tmp_path, capsys):
    """A ckpt.pt saved before the key existed holds no roi_hist: resuming takes the code's behaviour then (False, the
    default), whatever the command line says, and says so; a --stage=vqa on a tower trained the other way is one
    line naming the flag."""
    bv.main(TINY + run_dirs(tmp_path))
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    del ck["config"]["roi_hist"]
    torch.save(ck, tmp_path / "run" / "ckpt.pt")
    cfg = cfg_of(TINY + run_dirs(tmp_path) + ["--init_from=resume", "--roi_hist=true"])
    data.resume_checkpoint(cfg, bv.MODEL_KEYS, True, defaults=bv.DEFAULTS)
    assert cfg["roi_hist"] is False and "'roi_hist': (True, False)" in capsys.readouterr().out
    with pytest.raises(data.BadConfig, match=r"--roi_hist=True: .*siglip.pt holds a tower trained with "
                                             r"--roi_hist=False"):
        bv.main(TINY + [f"--out_dir={tmp_path / 'other'}", f"--cache_dir={tmp_path / 'cache2'}", "--stage=vqa",
                        f"--siglip_from={tmp_path / 'run' / 'siglip.pt'}", "--roi_hist=true"])
    assert not (tmp_path / "cache2").exists()  # said before any phantom is rendered


def test_calibrated_threshold_is_the_validation_best_and_nearest_zero_of_equals():
    """--calibrate (not the paper's): per kind, the threshold with the most right answers on the given samples; of
    equal ones the nearest 0; answer() says Yes above it, and at 0 without one (the argmax)."""
    samples = [(0, {"kind": "closed", "answer": a}) for a in ("No", "No", "Yes", "Yes")] + \
              [(0, {"kind": "region", "answer": a}) for a in ("No", "Yes")]
    log_odds = {0: -1.0, 1: 0.3, 2: 0.6, 3: 2.0, 4: -0.2, 5: 0.4}
    thr = bv.val_thresholds(samples, log_odds)
    assert thr["closed"] == pytest.approx(0.3)  # (0.3, 0.6) separates all four; 0.3 is the nearest 0 of them
    assert thr["region"] == pytest.approx(0.0)  # -0.2 < t < 0.4 all separate: 0 itself
    enc = data.train_bpe(["Yes No"] * 4, 300)  # answer() needs one only for generated kinds (none here)
    ans = bv.answer(None, enc, None, samples, None, "cpu", None, log_odds=log_odds, thresholds=thr)
    assert ans == ["No", "No", "Yes", "Yes", "No", "Yes"]
    assert bv.answer(None, enc, None, samples, None, "cpu", None, log_odds=log_odds) == \
        ["No", "Yes", "Yes", "Yes", "No", "Yes"]


# ----------------------------------------------------------------------------- tools/probe_tower.py

def test_probe_finds_a_label_the_features_carry_and_not_one_they_do_not():
    from tools import probe_tower
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(200, generator=g) < 0.3).float()
    noise = torch.randn(200, 10, generator=g)
    carried = torch.cat([noise, y[:, None] + 0.3 * torch.randn(200, 1, generator=g)], 1)
    assert probe_tower.probe(carried, y) > 0.95
    assert 0.3 < probe_tower.probe(noise, y) < 0.7


def test_probe_tower_runs_on_a_trained_tower_and_names_a_missing_one(tmp_path, capsys):
    from tools import probe_tower
    bv.main(TINY + run_dirs(tmp_path) + ["--stage=siglip", "--n_train=12"])
    got = {}
    for kind in ("tower", "hist", "untrained", "random_conv"):
        got[kind] = probe_tower.main([str(tmp_path / "run"), f"--features={kind}"])
        assert got[kind] and set(got[kind]) <= set(data.LABELS) and all(0 <= a <= 1 for a in got[kind].values())
    assert got["random_conv"] != got["tower"] and got["untrained"] != got["tower"]
    assert "carried (AUROC >= 0.8)" in capsys.readouterr().out
    closed = probe_tower.main([str(tmp_path / "run"), "--closed", "--n_test=3"])["closed"]
    assert len(closed) == 4 and all(0 <= v <= 1 for v in closed.values())
    assert "closed questions of the 3 test phantoms" in capsys.readouterr().out
    with pytest.raises(data.BadConfig, match=f"{tmp_path / 'none' / 'siglip.pt'}: no SigLIP tower"):
        probe_tower.main([str(tmp_path / "none")])


def test_probe_closed_answers_use_the_probe_on_carried_findings_and_the_prior_elsewhere(monkeypatch):
    from tools import probe_tower
    a, b = "Cardiomegaly", "Atelectasis"  # organs: heart, lungs
    ask = lambda label, yes: {"question": f"Is there {data._finding_name(label)} in this scan?", "kind": "closed",
                              "answer": "Yes" if yes else "No", "region": "lungs"}

    def item(ya, yb, questions):
        labels = np.zeros(18, np.int64)
        labels[data.LABELS.index(a)], labels[data.LABELS.index(b)] = ya, yb
        return {"labels": labels, "questions": questions, "name": "x"}
    # training: the scans' own questions make "No" the prior answer for a and "Yes" for b (20 of 30)
    train = [item(i % 2, i % 3 == 0, [ask(a, False), ask(b, i < 20)]) for i in range(30)]
    test = [item(i % 2, i < 3, [ask(a, i % 2), ask(b, i < 3)]) for i in range(10)]  # b: Yes 3 of 10

    def fake_features(cfg, ckpt, items, kind):  # both organs' features carry their finding's label, plus noise
        g = torch.Generator().manual_seed(len(items))
        col = lambda label: torch.tensor([float(it["labels"][data.LABELS.index(label)]) for it in items])[:, None]
        return {"heart": torch.cat([col(a), 0.1 * torch.randn(len(items), 2, generator=g)], 1),
                "lungs": torch.cat([col(b), 0.1 * torch.randn(len(items), 2, generator=g)], 1)}
    monkeypatch.setattr(probe_tower, "features", fake_features)
    acc = probe_tower.closed_answers({}, None, "tower", train, fake_features({}, None, train, "tower"), test,
                                     carried={a})
    assert acc['"No"'] == pytest.approx((5 + 7) / 20)
    assert acc["answer-rate prior"] == pytest.approx((5 + 3) / 20)  # a: "No", b: "Yes"
    assert acc["probe"] == 1.0
    assert acc["probe on the carried findings, the prior elsewhere"] == pytest.approx((10 + 3) / 20)


# ----------------------------------------------------------------------------- tools/oracle_vqa.py

def test_oracle_writes_each_scans_labels_into_its_first_token_and_runs_the_vqa_stage(tmp_path, monkeypatch):
    from tools import oracle_vqa
    items = [{"labels": np.eye(18, dtype=np.int64)[k]} for k in (3, 7)]
    cache = {(0, "heart"): torch.randn(5, 24), (1, None): torch.randn(5, 24)}
    out = oracle_vqa.with_labels(cache, items)
    assert out.keys() == cache.keys()
    for (i, r), f in out.items():
        assert torch.equal(f[0, :18], 3.0 * torch.as_tensor(items[i]["labels"]).float())
        assert torch.equal(f[0, 18:], cache[(i, r)][0, 18:]) and torch.equal(f[1:], cache[(i, r)][1:])
    only = oracle_vqa.with_labels(cache, items, only=True)
    assert all(torch.equal(only[k][0, :18], out[k][0, :18]) and only[k].abs().sum() == out[k][0, :18].sum()
               for k in cache)  # the labels and nothing else
    one = oracle_vqa.with_labels(cache, items, findings=[data.LABELS[3]])  # scan 0 has it, scan 1 not
    assert one[(0, "heart")][0, 3] == 3.0 and one[(1, None)][0, 3] == 0.0
    for k in cache:  # every other channel is the tower's
        keep = torch.ones_like(cache[k], dtype=torch.bool)
        keep[0, 3] = False
        assert torch.equal(one[k][keep], cache[k][keep])
    with pytest.raises(data.BadConfig, match="--findings: 'Nodule' is not a finding"):
        oracle_vqa.main(TINY + run_dirs(tmp_path) + ["--findings=Atelectasis,Nodule"])
    with pytest.raises(data.BadConfig, match="--proj_dim=16"):
        oracle_vqa.main(TINY + run_dirs(tmp_path))
    with pytest.raises(data.BadConfig, match="--labels_only=yes: expected true or false"):
        oracle_vqa.main(TINY + run_dirs(tmp_path) + ["--labels_only=yes"])
    argv = TINY + run_dirs(tmp_path) + ["--proj_dim=24"]
    bv.main(argv + ["--stage=siglip"])
    fed, prefix = [], bv.BoundaryVQA.prefix

    def spy(self, feats):
        fed.append((self.blind, feats.detach().clone()))
        return prefix(self, feats)
    monkeypatch.setattr(bv.BoundaryVQA, "prefix", spy)
    res = oracle_vqa.main(argv + ["--baselines=true"])
    assert bv.feature_cache is oracle_vqa._feature_cache  # put back
    assert "question-only (visual tokens zeroed)" in res["rows"]
    seen = torch.cat([f[:, 0, :18] for blind, f in fed if not blind])
    assert ((seen == 0) | (seen == 3)).all() and (seen == 3).any()  # the labels, not the tower's features
    assert all(f.abs().sum() == 0 for blind, f in fed if blind)  # the question-only twin still sees nothing
    fed.clear()
    oracle_vqa.main(argv + ["--labels_only=true", f"--out_dir={tmp_path / 'only'}",
                            f"--siglip_from={tmp_path / 'run' / 'siglip.pt'}"])
    assert fed and all(f[:, :, 18:].abs().sum() == 0 and f[:, 1:].abs().sum() == 0 for _, f in fed)


# ----------------------------------------------------------------------------- tools/init_seed.py

def test_init_seed_changes_the_initial_weights_alone_and_equal_to_seed_is_the_plain_run(tmp_path):
    from tools import init_seed
    cfg = cfg_of(TINY)
    torch.manual_seed(0)
    a = init_seed.seeded(bv.build_model, 5)(cfg).state_dict()
    torch.manual_seed(1)  # another RNG state before the build: the same weights
    b = init_seed.seeded(bv.build_model, 5)(cfg).state_dict()
    c = init_seed.seeded(bv.build_model, 6)(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("decoder."))
    with pytest.raises(data.BadConfig, match="--init_seed=N is required"):
        init_seed.main(TINY + run_dirs(tmp_path))
    with pytest.raises(data.BadConfig, match="--init_seed=x: expected an integer"):
        init_seed.main(TINY + run_dirs(tmp_path) + ["--init_seed=x"])
    argv = TINY + run_dirs(tmp_path)
    bv.main(argv + ["--stage=siglip"])
    tower = f"--siglip_from={tmp_path / 'run' / 'siglip.pt'}"
    weights = lambda name: torch.load(tmp_path / name / "ckpt.pt", weights_only=False)["model"]
    bv.main(argv + ["--stage=vqa", tower, f"--out_dir={tmp_path / 'plain'}"])
    init_seed.main(argv + [tower, f"--init_seed={cfg['seed']}", f"--out_dir={tmp_path / 'same'}"])
    init_seed.main(argv + [tower, "--init_seed=7", f"--out_dir={tmp_path / 'other'}"])
    assert bv.build_model is init_seed._build_model  # put back
    plain, same, other = weights("plain"), weights("same"), weights("other")
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    assert all(torch.equal(plain[k], other[k]) for k in plain if k.startswith("tower."))  # the frozen tower is kept
    assert any(not torch.equal(plain[k], other[k]) for k in plain if k.startswith("decoder."))


# ----------------------------------------------------------------------------- tools/pair_answers.py

def test_pair_answers_pairs_two_runs_question_by_question_and_refuses_other_questions(tmp_path):
    from tools import pair_answers
    q = lambda k, kind, ans, ref: f"scan_{k} [{kind}, outline: heart] Is there {k}?\n  answer: {ans}  reference: {ref}"
    a = [q(0, "closed", "Yes", "Yes"), q(1, "closed", "No", "Yes"), q(2, "region", "yes.", "Yes"),
         q(3, "open", "12 mm", "12 mm")]
    b = [q(0, "closed", "No", "Yes"), q(1, "closed", "No", "Yes"), q(2, "region", "No", "Yes"),
         q(3, "open", "9 mm", "12 mm")]
    for name, lines in (("a", a), ("b", b), ("short", b[:3]), ("other", [q(9, "closed", "No", "No")] + b[1:]),
                        ("broken", [a[0].split("\n")[0]] + a[1:])):
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
    r = pair_answers.main([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    assert set(r) == {"closed", "region"}  # open answers have no right/wrong to pair here
    assert (r["closed"]["a"], r["closed"]["b"], r["closed"]["diff"], r["closed"]["n"]) == (0.5, 0.0, 0.5, 2)
    assert (r["region"]["diff"], r["region"]["lo"], r["region"]["hi"]) == (1.0, 1.0, 1.0)  # "yes." is "Yes"
    with pytest.raises(data.InputError, match="has 4 questions, .* 3"):
        pair_answers.main([str(tmp_path / "a.txt"), str(tmp_path / "short.txt")])
    with pytest.raises(data.InputError, match="part at question 1"):
        pair_answers.main([str(tmp_path / "a.txt"), str(tmp_path / "other.txt")])
    with pytest.raises(data.InputError, match="broken.txt:1: not a question line"):
        pair_answers.main([str(tmp_path / "broken.txt"), str(tmp_path / "b.txt")])


def test_answers_txt_keeps_a_generated_newline_on_its_answer_line(tmp_path, monkeypatch):
    from tools import pair_answers
    real = bv.answer
    monkeypatch.setattr(bv, "answer", lambda *a, **k: [p if p in bv.YES_NO else "left\nlung" for p in real(*a, **k)])
    bv.main(TINY + run_dirs(tmp_path))
    text = (tmp_path / "run" / "answers.txt").read_text()
    got = pair_answers.read_answers(tmp_path / "run" / "answers.txt")
    assert "answer: left lung  reference:" in text and len(got) == len(text.splitlines()) // 2


# ----------------------------------------------------------------------------- tools/train_reads.py

def test_train_reads_thresholds_are_chosen_on_the_given_answers_nearest_zero_of_equals():
    from tools import train_reads
    assert train_reads.best_threshold(np.array([1.0, 2.0]), np.array([True, True])) == 0.0  # any t < 1: nearest 0
    t = train_reads.best_threshold(np.array([-1.0, -0.5]), np.array([True, True]))
    assert -1.05 < t < -1.0
    t = train_reads.best_threshold(np.array([-2.0, -1.0, 0.5, 1.0]), np.array([False, True, True, True]))
    assert -2.0 < t < -1.0
    # a head that ignores the scan (one log-odds per question text): thresholds per question text answer each text's
    # training majority, the answer-rate prior
    ask = lambda text, ans: (0, {"question": text, "kind": "closed", "answer": ans})
    train = [ask("A", "Yes"), ask("A", "Yes"), ask("A", "No"), ask("B", "No"), ask("B", "No"), ask("B", "No"),
             ask("B", "Yes")]
    test = [ask("A", "Yes"), ask("A", "No"), ask("B", "No"), ask("B", "Yes"), ask("C", "No")]
    d = {"A": -0.3, "B": -0.2, "C": -0.25}  # all below 0: Yes above 0 would say No everywhere
    t = train_reads.thresholds(train, {j: d[q["question"]] for j, (_, q) in enumerate(train)})
    per_q = lambda q: t.get((q["kind"], q["question"]), t[(q["kind"],)])
    lo = {j: d[q["question"]] for j, (_, q) in enumerate(test)}
    got = ["Yes" if lo[j] > per_q(q) else "No" for j, (_, q) in enumerate(test)]
    assert got == bv.blind_answers(train, test, by="question") == ["Yes", "Yes", "No", "No", "No"]
    assert train_reads.right(test, lo, "closed", per_q).tolist() == [1, 0, 1, 0, 1]
    assert train_reads.right(test, lo, "closed").tolist() == [0, 1, 1, 0, 1]  # Yes above 0


def test_train_reads_runs_on_a_finished_run_and_its_twin(tmp_path, capsys, monkeypatch):
    from tools import train_reads
    with pytest.raises(data.BadConfig, match=f"{tmp_path / 'run' / 'ckpt.pt'}: no VQA checkpoint"):
        train_reads.main([str(tmp_path / "run")])
    bv.main(TINY + run_dirs(tmp_path) + ["--baselines=true", "--n_train=6", "--n_test=3"])
    res = train_reads.main([str(tmp_path / "run")])
    for name in ("model", "twin"):
        reads = res[name]["reads"]
        assert set(reads) == {"train", "test"} and reads["train"]
        assert all(0 <= r["auroc"] <= 1 and 0 < r["yes"] < r["n"] <= 6 for r in reads["train"].values())
        assert all(r["n"] <= 3 for r in reads["test"].values())
        assert all(0 <= v <= 1 for kind in ("closed", "region") for v in res[name][kind].values())
    assert all(r["auroc"] == 0.5 for r in res["twin"]["reads"]["train"].values())  # the twin reads no scan
    assert ("closed", "per question") in res["model minus twin"]
    out = capsys.readouterr().out
    assert "0.50 for every question on both splits" in out and "model minus twin, region" in out
    real = bv.get_items  # phantoms cached under this run's names whose labels are not its seed's
    monkeypatch.setattr(bv, "get_items", lambda *a, **k: [{**it, "labels": 1 - it["labels"]} for it in real(*a, **k)])
    with pytest.raises(data.BadConfig, match="not the ones --seed=1337 draws"):
        train_reads.main([str(tmp_path / "run")])
