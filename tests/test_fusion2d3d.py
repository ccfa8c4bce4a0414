"""fusion2d3d.py: CLI, shapes per mode, alpha fixed vs learned, one step through main(), save -> resume, predict on a
written NIfTI, and a learning test. Tiny shapes: 8 slices of 32x32, a 32-d ViT with 8x8 patches."""
import functools
import json

import nibabel as nib
import numpy as np
import pytest
import torch

import data
import fusion2d3d as fz

SHAPE = (8, 32, 32)
SPACING = tuple(f / s for f, s in zip(data.FOV, SHAPE))  # the phantom's grid, so predict sees what training saw
TINY = ["--preset=cpu", "--device=cpu", f"--shape={','.join(map(str, SHAPE))}", "--n_slices=8", "--vit_size=32",
        "--patch=8", "--vit_dim=32", "--vit_depth=1", "--vit_slice_depth=1", "--vit_heads=2", "--vit_head_dim=16",
        "--n_train=8", "--n_val=4", "--n_test=4", "--batch_size=4", "--epochs=1",
        f"--spacing={','.join(map(str, SPACING))}"]


@pytest.fixture(autouse=True)
def cached_splits(monkeypatch):
    """Render each tiny synthetic split once per session: main() is run many times here."""
    monkeypatch.setattr(fz, "get_split", _cached_split)


@functools.lru_cache(maxsize=None)
def _split(key, split):
    return fz.__dict__["_real_get_split"](dict(key), split)


def _cached_split(cfg, split):
    key = tuple((k, cfg[k]) for k in ("data", "n_train", "n_val", "n_test", "shape", "n_slices", "spacing", "window",
                                      "norm", "seed", "strict"))
    return _split(key, split)


fz._real_get_split = fz.get_split


def parse(argv):
    return fz.parse_config(argv, fz.DEFAULTS, fz.PRESETS)


def cfg_of(*extra):
    return parse(TINY + list(extra))


def test_cli_types_and_errors(monkeypatch):
    cfg = parse(["--preset=cpu", "--mode", "vit", "--alpha=0.3", "--shape=8,32,32", "--compile=false",
                           "--learning_rate=1e-3"])
    assert cfg["mode"] == "vit" and cfg["alpha"] == "0.3" and cfg["shape"] == (8, 32, 32)
    assert cfg["compile"] is False and cfg["learning_rate"] == 1e-3
    assert cfg["n_slices"] == fz.PRESETS["cpu"]["n_slices"]  # the preset applies where no flag is given
    with pytest.raises((ValueError, SystemExit)):
        parse(["--no_such_key=1"])
    with pytest.raises((ValueError, SystemExit)):
        parse(["--batch_size=eight"])
    monkeypatch.setattr("sys.argv", ["fusion2d3d.py", "--mode", "resnet", "--preset=cpu"])  # as typed in a shell
    assert fz.parse_config(None, fz.DEFAULTS, fz.PRESETS)["mode"] == "resnet"
    with pytest.raises(ValueError, match="learned"):
        fz.main(TINY + ["--alpha=big"])


@pytest.mark.parametrize("mode,width", [("resnet", 512), ("vit", 32), ("fusion", 512)])
def test_shapes_per_mode(mode, width):
    torch.manual_seed(0)
    model = fz.build_model(cfg_of(f"--mode={mode}")).eval()
    x = torch.randn(2, 1, 8, 32, 32)
    logits, z, out = model(x, keep=True)
    assert logits.shape == (2, 18) and z.shape == (2, width)
    if mode != "vit":
        assert out["maps2d"].shape == (2 * 8, 512, 1, 1)
    if mode != "resnet":
        assert out["tokens3d"].shape == (2, 8, 4, 4, 32)  # (B, S, h, w, D): 32 / 8 = 4 patches a side
    if mode == "resnet":  # Table 2: per-slice logits averaged == the head on the mean-pooled feature
        feats, _ = model.resnet(x)
        assert torch.allclose(logits, model.head(feats).mean(1), atol=1e-6)
        assert torch.allclose(logits, model.head(feats.mean(1)), atol=1e-5)


def test_vit_input_is_resized_to_vit_size():
    model = fz.build_model(cfg_of("--mode=vit", "--vit_size=48")).eval()
    _, _, out = model(torch.randn(1, 1, 8, 32, 32), keep=True)
    assert out["tokens3d"].shape == (1, 8, 6, 6, 32)


def test_alpha_learned_is_a_parameter_with_gradient():
    model = fz.build_model(cfg_of("--mode=fusion", "--alpha=learned"))
    params = dict(model.named_parameters())
    assert "alpha" in params and params["alpha"].shape == () and params["alpha"].item() == 1.0
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(torch.randn(2, 1, 8, 32, 32)),
                                                                torch.ones(2, 18))
    loss.backward()
    assert params["alpha"].grad is not None and params["alpha"].grad.abs() > 0
    assert params["vit.pos_slice"].grad.abs().sum() > 0  # the 3D residual is trained through alpha


def test_alpha_fixed_is_not_trained_and_zero_gives_the_resnet_path():
    torch.manual_seed(0)
    fusion = fz.build_model(cfg_of("--mode=fusion", "--alpha=0.3")).eval()
    assert "alpha" not in dict(fusion.named_parameters()) and fusion.alpha.item() == pytest.approx(0.3)
    x = torch.randn(2, 1, 8, 32, 32)
    logits, z, _ = fusion(x, keep=True)
    feats, _ = fusion.resnet(x)
    res3d = fusion.proj(fusion.vit(x)[1])
    assert torch.allclose(z, feats.mean(1) + 0.3 * res3d, atol=1e-5)  # Algorithm 1 with alpha
    fusion.alpha.fill_(0.0)
    resnet = fz.build_model(cfg_of("--mode=resnet")).eval()
    missing, unexpected = resnet.load_state_dict(fusion.state_dict(), strict=False)
    assert not missing and all(k.startswith(("vit.", "proj.")) for k in unexpected)
    assert torch.allclose(fusion(x), resnet(x), atol=1e-5)  # alpha = 0: Table 3's first row is the ResNet row
    assert not torch.allclose(fz.build_model(cfg_of("--mode=fusion", "--alpha=1.0")).eval()(x), resnet(x))


def test_one_step_end_to_end(tmp_path):
    res = fz.main(TINY + ["--mode=fusion", "--max_iters=1", f"--out_dir={tmp_path}"])
    assert set(res["at_0.5"]) >= {"auroc", "accuracy", "precision", "recall", "f1", "weighted_f1"}
    assert 0.0 <= res["at_val_f1_thresholds"]["accuracy"] <= 1.0 and len(res["thresholds"]) == 18
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["mode"] == "fusion" and saved["alpha"] == pytest.approx(res["alpha"])
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["iter"] == 1 and np.isfinite(log[0]["val_loss"])
    assert abs(log[0]["alpha"] - 1.0) > 0  # one AdamW step moved the learned alpha
    for png in ("attention.png", "embedding.png"):
        assert (tmp_path / png).stat().st_size > 1000
    ckpt = data.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["iter_num"] == 1 and len(ckpt["thresholds"]) == 18


def test_save_resume_continues_identically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = TINY + ["--mode=fusion", "--eval_interval=1", "--epochs=2"]  # 2 steps per epoch: crosses an epoch
    fz.main(common + ["--max_iters=3", f"--out_dir={a}"])
    fz.main(common + ["--max_iters=1", f"--out_dir={b}"])
    with open(b / "log.jsonl", "a") as f:  # a kill during the step-2 save: its log line written, the ckpt a partial .tmp
        f.write(json.dumps({"iter": 2, "val_loss": -1.0}) + "\n")
    (b / "ckpt.pt.tmp").write_bytes(b"partial")
    fz.main(common + ["--max_iters=3", f"--out_dir={b}", "--init_from=resume"])
    assert not (b / "ckpt.pt.tmp").exists()
    sa, sb = data.load_checkpoint(a / "ckpt.pt"), data.load_checkpoint(b / "ckpt.pt")
    assert sa["iter_num"] == sb["iter_num"] == 3
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    la = [json.loads(l) for l in (a / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (b / "log.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in la] == [r["val_loss"] for r in lb] and [r["iter"] for r in lb] == [1, 2, 3]


def test_predict_on_a_written_nifti(tmp_path, capsys):
    fz.main(TINY + ["--mode=resnet", "--max_iters=1", f"--out_dir={tmp_path}"])
    hu = data.SyntheticCT("test", 1, shape=SHAPE, seed=cfg_of()["seed"], window=None, norm="hu")[0]["volume"][0]
    ras = hu.flip(0, 1, 2).permute(2, 1, 0).contiguous().numpy()  # (I, P, L) -> (R, A, S), as scanners store it
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(ras, np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])), path)
    probs = fz.main(TINY + ["--init_from=resume", f"--predict={path}", f"--out_dir={tmp_path}"])
    text = capsys.readouterr().out
    assert probs.shape == (18,) and all(name in text for name in data.LABELS)
    ckpt = data.load_checkpoint(tmp_path / "ckpt.pt")
    cfg = {**cfg_of(), **ckpt["config"]}
    model = fz.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    vol = fz.get_split(cfg, "test")[0]["volume"][None]  # the same patient through the dataset path
    with torch.no_grad():
        ref = torch.sigmoid(model.eval()(fz.centre_slices(vol, 8)))[0]
    assert torch.allclose(probs, ref, atol=1e-4)  # load_nifti + preprocess == the training pipeline
    assert (tmp_path / "scan_gradcam.png").stat().st_size > 1000


def test_learning_fusion_fits_a_tiny_training_set():
    cfg = cfg_of("--mode=fusion")
    torch.manual_seed(0)
    model = fz.build_model(cfg)
    batch = fz.collate_centre(fz.get_split(cfg, "train"), 8)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch["volume"]), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(batch["volume"]))
    assert losses[-1] < 0.5 * losses[0]
    assert data.classification_metrics(batch["labels"], probs, np.full(18, 0.5))["accuracy"] > 0.9


def test_ddp_two_ranks_under_torchrun(tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU): each rank takes half of every global batch, rank 0 writes."""
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", fz.__file__,
           *TINY, "--max_iters=2", f"--out_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [2]  # one writer, not two
    assert json.loads((tmp_path / "metrics.json").read_text())["mode"] == "fusion"
