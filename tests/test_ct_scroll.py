"""ct_scroll.py: CLI, shapes, Figure 3's masks, Table 2's sizes, resume, predict, learning, DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ct_scroll as C
import data
from data import LABELS, auroc

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset=cpu", "--shape=12,32,32", "--spacing=30,11.25,11.25", "--n_train=6", "--n_val=4", "--n_test=4",
        "--batch_size=2", "--eval_interval=100", "--log_interval=1", "--window=2", "--warmup_iters=1"]


def cfg_with(**kw):
    return {**C.DEFAULTS, **C.PRESETS["paper"], **kw}


# ---- CLI ---------------------------------------------------------------------

def test_cli_forms_types_and_errors():
    cfg = C.parse_config(["--preset=cpu", "--window", "8", "--shape=24,64,64", "--gradcam=true",
                          "--learning_rate", "2e-4", "--interactions=global"], C.DEFAULTS, C.PRESETS)
    assert cfg["window"] == 8 and cfg["shape"] == (24, 64, 64) and cfg["gradcam"] is True
    assert cfg["learning_rate"] == 2e-4 and cfg["interactions"] == "global"
    assert cfg["n_train"] == C.PRESETS["cpu"]["n_train"]  # the preset applies, explicit flags win over it
    with pytest.raises((ValueError, SystemExit)) as e:
        C.parse_config(["--windwo=8"], C.DEFAULTS, C.PRESETS)
    assert "interactions" in str(e.value) and "window" in str(e.value)  # the error lists the valid keys
    with pytest.raises((ValueError, SystemExit)):
        C.parse_config(["--window=eight"], C.DEFAULTS, C.PRESETS)


# ---- model -------------------------------------------------------------------

@pytest.mark.parametrize("reduction,interactions,shape", [("gap", "scrolling", (12, 64, 64)),
                                                          ("linear", "global_local", (12, 64, 64)),
                                                          ("conv3d", "none", (6, 192, 192))])
def test_shapes(reduction, interactions, shape):
    torch.manual_seed(0)
    model = C.build_model(cfg_with(shape=shape, reduction=reduction, interactions=interactions, window=2)).eval()
    x = torch.randn(2, 1, *shape)
    fmap = model.triplet_features(x)
    assert fmap.shape == (2 * shape[0] // 3, 512, C.feature_map_size(shape[1]), C.feature_map_size(shape[2]))
    logits = model(x)
    assert logits.shape == (2, len(LABELS)) and torch.isfinite(logits).all()
    # the batch is kept apart: volume 0's logits do not depend on volume 1
    assert torch.allclose(model(x[:1]), logits[:1], atol=1e-5)


def dependency(encoder, n):
    """(n, n) bool: does output token i depend on input token j? Read off the Jacobian of the whole encoder."""
    torch.manual_seed(0)
    x = torch.randn(1, n, 512, requires_grad=True)
    rows = []
    for i in range(n):
        (g,) = torch.autograd.grad(encoder(x)[0, i].sum(), x)
        rows.append(g[0].abs().sum(-1) > 0)
    return torch.stack(rows)


def test_figure3_masks_n5_q3():
    """Figure 3 with n = 5 triplets, q = 3, in the authors' anatomy. Their axis 0 runs from the feet up and their
    f_CAU->CRA (lower-triangular mask) sees the caudal side; here z = 0 is the most cranial triplet, so
    f_CAU->CRA sees itself and the q - 1 triplets below (larger index), f_CRA->CAU itself and the q - 1 above, and
    the causal ablation itself and everything below."""
    causal = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    cau_cra = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    cra_cau = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    block = C.CTScroll(shape=(15, 32, 32), interactions="scrolling", window=3).blocks[0].eval()
    f_G, f_cau_cra, f_cra_cau = block.encoders
    assert dependency(f_G, 5).all()
    assert torch.equal(dependency(f_cau_cra, 5), cau_cra.bool())
    assert torch.equal(dependency(f_cra_cau, 5), cra_cau.bool())
    causal_block = C.CTScroll(shape=(15, 32, 32), interactions="causal", window=3).blocks[0].eval()
    assert torch.equal(dependency(causal_block.encoders[0], 5), causal.bool())
    # window 0 = global (Table 3's last row): the scrolling block becomes three global layers
    assert C.interaction_windows("scrolling", 0) == C.interaction_windows("global", 16)


@torch.no_grad()
def test_scrolling_directions_on_a_volume():
    """A phantom volume (z = 0 at the top of the chest) with its bottom triplet (the most caudal slices) changed:
    f_CAU->CRA carries the change up to the q - 1 triplets above it and no further; the same change at the top
    reaches no other triplet through f_CAU->CRA, and the q - 1 triplets below it through f_CRA->CAU."""
    q, model = 3, C.CTScroll(shape=(24, 32, 32), interactions="scrolling", window=3).eval()
    x = data.SyntheticCT("train", 1, shape=(24, 32, 32), seed=0)[0]["volume"][None]  # (1, 1, 24, 32, 32)
    assert not torch.equal(x[..., :3, :, :], x[..., -3:, :, :])  # top and bottom differ
    f_G, f_cau_cra, f_cra_cau = model.blocks[0].encoders

    def tokens(v):  # (8, 512): the projected GAP tokens, one per triplet, top first
        return model.projection(model.triplet_features(v).mean((2, 3)))

    def changed(f, v):  # which output triplets of encoder f differ between x and v
        return (f(tokens(v)[None]) - f(tokens(x)[None])).abs().amax(-1)[0] > 1e-6

    bottom, top = x.clone(), x.clone()
    bottom[..., -3:, :, :] = x[..., :3, :, :]  # the last triplet replaced by the first: 8 triplets, index 7 changes
    top[..., :3, :, :] = x[..., -3:, :, :]
    n = 8
    assert changed(f_cau_cra, bottom).tolist() == [i >= n - q for i in range(n)]
    assert changed(f_cau_cra, top).tolist() == [i == 0 for i in range(n)]
    assert changed(f_cra_cau, top).tolist() == [i < q for i in range(n)]
    assert changed(f_cra_cau, bottom).tolist() == [i == n - 1 for i in range(n)]


def n_params(**kw):
    with torch.device("meta"):
        model = C.build_model(cfg_with(**kw))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_parameter_counts_table2():
    """Table 2 (millions): CT-Scroll 16, GAP without interactions 12, linear projection 70, CT-Net 15."""
    assert abs(n_params() - 16e6) < 1e6
    assert n_params() == 16_239_058  # 11.18M ResNet trunk + 0.26M projection + 3 x 1.58M encoders + head
    assert abs(n_params(interactions="none") - 12e6) < 1e6
    for inter in ("causal", "global", "global_local"):  # matching layer counts: same size as the Scrolling Block
        assert n_params(interactions=inter) == n_params()
    assert abs(n_params(reduction="linear", interactions="none") - 70e6) < 1e6
    assert abs(n_params(reduction="conv3d", interactions="none") - 15e6) < 1e6


def test_flops_per_sample_table2():
    """Table 2: 1.337 TFLOPs per 240x480x480 volume (2 FLOPs per multiply-accumulate), within 3%."""
    f = C.flops_per_sample(None, cfg_with())
    assert abs(f / 1.337e12 - 1) < 0.03, f
    assert abs(C.flops_per_sample(None, cfg_with(reduction="linear", interactions="none")) / 1.345e12 - 1) < 0.03
    assert abs(C.flops_per_sample(None, cfg_with(reduction="conv3d", interactions="none")) / 1.344e12 - 1) < 0.03


def test_learns_an_easy_problem():
    """Label 0 = a bright cube somewhere in the volume: the model must find it (AUROC on held-out volumes, in eval
    mode, so BatchNorm's running statistics must have caught up: 60 steps of the real warm-up + cosine schedule)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        x = torch.randn(n, 1, 6, 32, 32, generator=gen) * 0.1
        y = torch.zeros(n, len(LABELS))
        y[:, 0] = (torch.rand(n, generator=gen) < 0.5).float()
        for b in torch.nonzero(y[:, 0]).flatten().tolist():
            z, r, c = (int(torch.randint(0, s - 3, (1,), generator=gen)) for s in (6, 32, 32))
            x[b, 0, z:z + 3, r:r + 8, c:c + 8] += 1.0
        return x, y

    model = C.build_model(cfg_with(shape=(6, 32, 32), window=2))
    opt = torch.optim.AdamW(model.parameters())
    sched = {"learning_rate": 3e-4, "min_lr": 0.0, "warmup_iters": 3, "max_iters": 60}
    losses = []
    for it in range(60):
        for g in opt.param_groups:
            g["lr"] = C.get_lr(it, sched)
        x, y = batch(6)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, :1], y[:, :1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    x, y = batch(32)
    with torch.no_grad():
        p = torch.sigmoid(model(x)[:, 0])
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses
    assert auroc(y[:, 0], p) > 0.9


# ---- runs --------------------------------------------------------------------

def test_resume_continues_exactly(tmp_path, monkeypatch):
    """Straight 4 steps vs 2 + resume 2, with an eval at every 2 steps, so at the resume point (the normal case
    after a kill). Run b is killed during the save at step 4 (its log line is written, the checkpoint only as a
    partial .tmp), so it resumes from step 2: no duplicate log line, no stale .tmp, and bit-identical weights."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    every2 = TINY + ["--max_iters=4", "--eval_interval=2"]
    C.main(every2 + [f"--out_dir={a}"])
    save = C.save_checkpoint

    def killed_at_step_4(path, state):
        if state["iter_num"] == 4:
            Path(str(path) + ".tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        save(path, state)
    monkeypatch.setattr(C, "save_checkpoint", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        C.main(every2 + [f"--out_dir={b}"])
    monkeypatch.setattr(C, "save_checkpoint", save)
    assert (Path(b) / "ckpt.pt.tmp").exists() and torch.load(Path(b) / "ckpt.pt", weights_only=True)["iter_num"] == 2
    C.main(every2 + [f"--out_dir={b}", "--init_from=resume"])
    assert not (Path(b) / "ckpt.pt.tmp").exists()
    sa, sb = (torch.load(Path(d) / "ckpt.pt", weights_only=True) for d in (a, b))
    assert sa["iter_num"] == sb["iter_num"] == 4
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    la, lb = ([json.loads(line) for line in (Path(d) / "log.jsonl").read_text().splitlines()] for d in (a, b))
    assert [r["iter"] for r in la] == [r["iter"] for r in lb] == [2, 4]
    assert [(r["train_loss"], r["val_loss"]) for r in la] == [(r["train_loss"], r["val_loss"]) for r in lb]
    m = json.loads((Path(a) / "metrics.json").read_text())
    assert set(m["test"]) == {"auroc", "accuracy", "f1", "weighted_f1", "precision", "recall"}
    assert len(m["test_auroc_95ci"]) == 2
    assert len(sa["thresholds"]) == len(LABELS)


def test_predict_on_a_nifti(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    out = str(tmp_path / "run")
    C.main(TINY + ["--max_iters=1", f"--out_dir={out}"])
    vol = np.full((40, 40, 16), -1000, np.int16)  # (x, y, z) in RAS-ish storage, HU
    vol[8:32, 8:32, 2:14] = 40
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([-9.0, -9.0, 22.5, 1.0])), path)
    capsys.readouterr()
    probs = C.main(TINY + [f"--out_dir={out}", "--init_from=resume", f"--predict={path}", "--gradcam=true"])
    text = capsys.readouterr().out
    assert probs.shape == (len(LABELS),) and ((probs >= 0) & (probs <= 1)).all()
    for name in LABELS:
        assert name in text
    th = torch.load(Path(out) / "ckpt.pt", weights_only=True)["thresholds"]
    n_pos = int((probs >= np.asarray(th)).sum())
    assert len(list(Path(out).glob("gradcam_scan_*.png"))) == n_pos


def test_ddp_two_ranks(tmp_path):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        "ct_scroll.py", *TINY, "--max_iters=2", f"--out_dir={out}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ck = torch.load(Path(out) / "ckpt.pt", weights_only=True)
    assert ck["iter_num"] == 2 and len(ck["rng"]) == 2
    assert (Path(out) / "metrics.json").is_file()
