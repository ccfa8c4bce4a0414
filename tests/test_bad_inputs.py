"""Issue 13: every bad input ends in a one-line named error, a counted skip, or the right answer. Table-driven over
the issue's cases; the bad files are built in tmp dirs. Scans (--predict's loader), CT-RATE CSVs and folders, flags,
and the one-line `error: ...` / exit codes of the scripts."""
import csv
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import boundary_vqa as BV
import ct_scroll as C
import data
import fusion2d3d as FZ
import hilt as H
import samf as S
from data import BadConfig, BadVolume, CTRATE, load_ct
from test_volumes import IPL_AFFINE, SHAPE, SPACING, save, truth_hu, write_layout

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset=cpu", "--shape=12,32,32", "--spacing=30,11.25,11.25", "--n_train=6", "--n_val=4", "--n_test=4",
        "--batch_size=2", "--eval_interval=100", "--log_interval=1", "--window=2", "--warmup_iters=1",
        "--num_workers=0"]


# ---- scans: data.load_ct, the one loader behind every script's --predict --------------------------------------

def _pixdim0(path):
    save(path, truth_hu(0))
    raw = bytearray(path.read_bytes())  # uncompressed .nii: pixdim is 8 floats at byte 76
    pix = list(struct.unpack("<8f", raw[76:108]))
    pix[1] = 0.0
    raw[76:108] = struct.pack("<8f", *pix)
    path.write_bytes(raw)


def _truncated(path):
    save(path, truth_hu(0))
    path.write_bytes(path.read_bytes()[:300])


def _nan(path):
    a = truth_hu(0).astype(np.float32)
    a[3, 4, 5] = np.nan
    save(path, a)


SCANS = {  # name: (how to write it, rescale, the words of the one-line error)
    "truncated": (_truncated, "auto", "truncated"),
    "constant": (lambda p: save(p, np.full(SHAPE, -1000, np.int16)), "header", "constant volume"),
    "one slice 64x64x1": (lambda p: save(p, truth_hu(0)[:1]), "auto", "at least 8 voxels"),
    "pixdim 0": (_pixdim0, "auto", "pixdim"),
    "z spacing 1e4": (lambda p: save(p, truth_hu(0), np.where(IPL_AFFINE == -SPACING[0], -1e4, IPL_AFFINE)), "auto",
                      "spacing"),
    "slope 1e38": (lambda p: save(p, truth_hu(0), slope=1e38, inter=0), "header", "NaN/inf voxels after the header"),
    "NaN voxel": (_nan, "auto", "NaN/inf"),
    "4-D, two volumes": (lambda p: save(p, np.zeros((*SHAPE, 2), np.float32)), "auto", "3-D"),
    "no air (auto)": (lambda p: save(p, truth_hu(0) + 3000), "auto", "no air"),
    "missing file": (lambda p: None, "auto", "no such file"),
}


@pytest.mark.parametrize("case", list(SCANS))
def test_bad_scan_is_a_named_error(tmp_path, case):
    write, rescale, words = SCANS[case]
    path = tmp_path / ("scan.nii" if case == "pixdim 0" else "scan.nii.gz")
    write(path)
    with pytest.raises(BadVolume, match=words) as e:
        load_ct(path, rescale)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("stored,rescale,said", [("HU", "auto", "'header'"), ("HU + 1024", "auto", "'header - 1024'"),
                                                 ("HU", "header", None), ("HU", "none", None)])
def test_predict_rescale_gives_hu(tmp_path, capsys, stored, rescale, said):
    """CT-RATE's original release stores HU + 1024 with a header slope 1 / intercept 0: auto must see that from the
    air level (and say so); a file in HU must stay as it is."""
    truth = truth_hu(0)
    save(tmp_path / "s.nii.gz", (truth + 1024 if stored != "HU" else truth).astype(np.int16))
    hu, spacing = load_ct(tmp_path / "s.nii.gz", rescale)
    np.testing.assert_array_equal(hu, truth)
    assert spacing == SPACING
    out = capsys.readouterr().out
    assert (said in out) if said else "rescale=auto" not in out


def test_predict_rescale_asked_for_but_no_air_warns(tmp_path, capsys):
    save(tmp_path / "s.nii.gz", (truth_hu(0) + 1024).astype(np.int16))
    hu, _ = load_ct(tmp_path / "s.nii.gz", "header")  # the user's choice is kept, with a warning saying so
    assert hu.min() == 24 and "no voxel near air" in capsys.readouterr().err
    with pytest.raises(BadConfig, match="--rescale='hu'"):
        load_ct(tmp_path / "s.nii.gz", "hu")


# ---- CT-RATE: CSVs and folders ---------------------------------------------------------------------------------

def _rewrite(path, fn, encoding="utf-8", bom=False):
    rows = list(csv.reader(open(path, newline="", encoding="utf-8")))
    rows = fn(rows)
    with open(path, "w", newline="", encoding=encoding) as f:
        if bom:
            f.write("\ufeff")
        csv.writer(f).writerows(rows)


def _labels(d, folder="train"):
    return d / "multi_abnormality_labels" / f"{folder}_predicted_labels.csv"


def _reports(d):
    return d / "radiology_text_reports" / "train_reports.csv"


def _meta(d):
    return d / "metadata" / "train_metadata.csv"


def _latin1(d, names):
    _rewrite(_reports(d), lambda rows: [r if r[0] != names[1] else [*r[:3], "Opacit\xe9 in the left lobe.", r[4]]
                                        for r in rows], encoding="latin-1")
    return {"n": 4, "report": (names[1], "Opacit\xe9 in the left lobe."), "warn": [str(_reports(d)), "line 3", "latin-1"]}


def _bom(d, names):
    _rewrite(_labels(d), lambda rows: rows, bom=True)
    return {"n": 4}


def _zspacing(value):
    def make(d, names):
        _rewrite(_meta(d), lambda rows: [r if r[0] != names[0] else [*r[:5], value] for r in rows])
        return {"n": 4, "warn": [str(_meta(d)), "header's spacing"], "spacing": names[0]}
    return make


def _conflict(d, names):
    _rewrite(_labels(d), lambda rows: rows + [[names[2], *("1" if x == "0" else "0" for x in rows[3][1:])]])
    return {"n": 3, "bad": 1, "warn": [str(_labels(d)), names[2], "lines 4 and 6 disagree"]}


def _duplicate(d, names):
    _rewrite(_labels(d), lambda rows: rows + [rows[2]])
    return {"n": 4}


def _unlisted(d, names):
    _rewrite(_labels(d), lambda rows: [r for r in rows if r[0] != names[3]])
    return {"n": 3, "unlisted": 1, "warn": ["1 volume(s)", "no row", names[3]]}


def _leak(d, names):  # a train patient's scan listed (and stored) in the valid folder: a train/test leak
    src = d / "train" / "train_2" / "train_2_a" / names[1]
    dst = d / "valid" / "train_2" / "train_2_a" / names[1]
    dst.parent.mkdir(parents=True)
    dst.write_bytes(src.read_bytes())
    _rewrite(_labels(d, "valid"), lambda rows: rows + [[names[1], *rows[1][1:]]])
    _rewrite(d / "radiology_text_reports" / "validation_reports.csv", lambda rows: rows + [[names[1], *rows[1][1:]]])
    return {"split": "test", "n": 4, "bad": 1, "warn": ["patient train_2", "leak"]}


def _truncated_test_volume(d, names):  # the repro: a truncated volume in the test split
    p = d / "valid" / "valid_1" / "valid_1_a" / "valid_1_a_1.nii.gz"
    p.write_bytes(p.read_bytes()[:200])
    return {"split": "test", "n": 3, "bad": 1, "warn": [str(p), "truncated"], "said": "3 volumes, 1 left out"}


CSV_CASES = {"latin-1 byte in a report": _latin1, "UTF-8 BOM": _bom, "metadata ZSpacing 0": _zspacing("0"),
             "metadata ZSpacing 1e4": _zspacing("10000"), "duplicate rows, conflicting labels": _conflict,
             "duplicate rows, identical": _duplicate, "volume without a row": _unlisted,
             "patient in train and valid": _leak, "truncated volume in the test split": _truncated_test_volume}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_ctrate_bad_csvs_and_folders(tmp_path, capsys, case):
    names = write_layout(tmp_path, n_patients=4)["train"]
    capsys.readouterr()
    want = CSV_CASES[case](tmp_path / "dataset", names)
    split = want.get("split", "train")
    ds = CTRATE(tmp_path, split, shape=None, spacing=SPACING, window=None, norm="hu", val_fraction=0.0)
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning")]
    items = [ds[i] for i in range(len(ds))]
    assert len(ds) == want["n"] and ds.n_bad == want.get("bad", 0) and ds.n_unlisted == want.get("unlisted", 0)
    assert len({it["name"] for it in items}) == len(items)  # no volume twice, none standing in for another
    assert [it["name"] for it in items] == [r["name"] for r in ds.rows]  # what a report scorer reads as references
    if "warn" in want:
        assert len(warnings) == 1 and all(w in warnings[0] for w in want["warn"]), warnings
    else:
        assert not warnings, warnings
    if "said" in want:
        assert want["said"] in out
    if "report" in want:
        name, text = want["report"]
        assert next(it["report"] for it in items if it["name"] == name) == text
    if "spacing" in want:  # the header's spacing was used: the volume is exactly the stored one (no resampling)
        it = next(it for it in items if it["name"] == want["spacing"])
        np.testing.assert_array_equal(it["volume"][0].numpy(), truth_hu(0))


def test_eval_split_never_substitutes_a_volume_that_fails_late(tmp_path):
    """A file that passes the cheap check when the split is built (complete, readable header) but fails at read
    time (NaN voxels): the train split hands over to the next volume, an evaluation split raises, naming it."""
    write_layout(tmp_path, n_patients=3)
    p = tmp_path / "dataset" / "valid" / "valid_2" / "valid_2_a" / "valid_2_a_1.nii.gz"
    _nan(p)
    ds = CTRATE(tmp_path, "test", shape=None, spacing=None, window=None, norm="hu")
    assert len(ds) == 3 and ds[0]["name"] == "valid_1_a_1.nii.gz"
    with pytest.raises(BadVolume, match="cannot replace it") as e:
        ds[1]
    assert str(p) in str(e.value)


def test_ct_scroll_on_ctrate_with_a_truncated_test_volume(tmp_path, capsys):
    """The issue's repro end to end: `data.py synthetic --n 16 --shape 24,32,32`, valid_1_a_1 truncated to 20 kB,
    ct_scroll --data=L: the test split has the 4 readable volumes, not 5 with one scored twice."""
    root = data.write_ctrate_layout(tmp_path / "L", 16, (24, 32, 32))
    p = root / "valid" / "valid_1" / "valid_1_a" / "valid_1_a_1.nii.gz"
    p.write_bytes(p.read_bytes()[:20_000] if p.stat().st_size > 20_000 else p.read_bytes()[:200])
    out = str(tmp_path / "run")
    res = C.main(TINY[:1] + ["--shape=24,32,32", "--spacing=15,11.25,11.25", "--batch_size=2", "--max_iters=1",
                             "--window=2", "--num_workers=0", f"--data={tmp_path / 'L'}", f"--out_dir={out}"])
    text = capsys.readouterr().out
    assert res["n_test"] == 4 and "CTRATE test: 4 volumes, 1 left out as bad" in text


# ---- flags: checked before any work, the key named --------------------------------------------------------------

FLAGS = [  # (script, flags, words of the error)
    (C, ["--eval_interval=0"], "--eval_interval=0: must be at least 1"),
    (C, ["--max_iters=-5"], "--max_iters='-5'"),
    (C, ["--shape=24,64"], "--shape='24,64': expected 3"),
    (C, ["--shape=24,-64,64"], "--shape='24,-64,64': every value must be a positive"),
    (C, ["--n_train=-1"], "--n_train='-1'"),
    (C, ["--n_train=0"], "--n_train=0: must be at least 1"),
    (C, ["--learning_rate=nan"], "--learning_rate='nan': expected a finite number"),
    (C, ["--hu_window=200,-1000"], "--hu_window"),
    (C, ["--predict=scan.nii.gz"], "--predict needs a trained run"),
    (C, ["--data=/no/such/folder"], "--data=/no/such/folder"),
    (C, ["--rescale=hu"], "--rescale=hu: expected one of auto, header, none"),
    (FZ, ["--window=1000,-1000"], "--window"),
    (FZ, ["--batch_size=0"], "--batch_size=0: must be at least 1"),
    (FZ, ["--alpha=big"], "--alpha='big'"),
    (FZ, ["--patch=7"], "--patch=7: must divide"),
    (H, ["--eval_interval=0"], "--eval_interval=0: must be at least 1"),
    (H, ["--mode=bogus"], "--mode=bogus: expected one of hilt"),
    (H, ["--predict=scan.nii.gz"], "--predict needs a trained run"),
    (H, ["--dim=100", "--n_heads=3"], "--dim=100, --n_heads=3"),
    (S, ["--eval_interval=0"], "--eval_interval=0: must be at least 1"),
    (S, ["--n_train=0"], "--n_train=0: must be at least 1"),
    (S, ["--dim=100", "--n_heads=3"], "--dim=100: not a multiple of --n_heads=3"),
    (BV, ["--eval_interval=0"], "--eval_interval=0: must be at least 1"),
    (BV, ["--mixer_tokens=0"], "--mixer_tokens=0: must be at least 1"),
    (BV, ["--decoder=xl"], "--decoder='xl': expected one of"),
    (BV, ["--shape=8,8,8"], "--shape=8,8,8: too small for the encoder"),
    (BV, ["--enc_kernel=4"], "--enc_kernel=4: must be odd"),
    (BV, ["--cb_beta=1"], "--cb_beta=1.0: must be below 1"),
    (BV, ["--dims=64,130,192"], "--decoder=m: width 130"),
    (BV, ["--predict=scan.nii.gz"], "--predict needs a trained run"),
]


@pytest.mark.parametrize("script,flags,words", FLAGS, ids=[f"{s.__name__}{f}" for s, f, _ in FLAGS])
def test_bad_flag_named_before_any_work(tmp_path, script, flags, words):
    with pytest.raises((BadConfig, SystemExit)) as e:
        script.main(TINY[:1] + flags + [f"--out_dir={tmp_path / 'never'}"])
    assert words in str(e.value), str(e.value)
    assert not (tmp_path / "never").exists()  # nothing was written: it stopped before any work


def test_hilt_hr_with_four_values_is_refused():
    with pytest.raises(SystemExit, match="--hr='512,512,256,1': expected 3"):
        H.parse_config(["--hr=512,512,256,1"], H.DEFAULTS, H.PRESETS)


def test_unwritable_out_dir_is_refused_up_front(tmp_path):
    (tmp_path / "file").write_text("x")  # a file where a folder should be (root ignores chmod, so this stands in)
    for script in (C, FZ, H, S, BV):
        with pytest.raises(BadConfig, match="--out_dir=.*not writable"):
            script.main(TINY[:1] + [f"--out_dir={tmp_path / 'file' / 'run'}"])


@pytest.mark.parametrize("script", [C, FZ, H, S, BV], ids=lambda s: s.__name__)
def test_a_corrupt_checkpoint_is_a_named_error(tmp_path, script):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint" * 64)  # e.g. a file cut short by a full disk
    with pytest.raises(BadVolume, match="ckpt.pt: not a readable checkpoint"):
        script.main(TINY[:1] + ["--init_from=resume", f"--out_dir={tmp_path}"])


def test_fusion_resnet_weights_load(tmp_path):
    """--resnet_weights used to fail: 'a leaf Variable that requires grad is being used in an in-place operation'."""
    import torchvision
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, tmp_path / "resnet18.pth")
    cfg = FZ.parse_config(["--preset=cpu", f"--resnet_weights={tmp_path / 'resnet18.pth'}"], FZ.DEFAULTS, FZ.PRESETS)
    model = FZ.build_model(cfg)
    assert torch.equal(model.resnet.trunk[0].weight, sd["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.resnet.trunk[4][0].conv1.weight, sd["layer1.0.conv1.weight"])
    assert model.resnet.trunk[0].weight.requires_grad


# ---- one line, exit codes ----------------------------------------------------------------------------------------

def test_cli_error_is_one_line_with_exit_code_2():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "ct_scroll.py", "--eval_interval=0"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "error: --eval_interval=0: must be at least 1", r.stderr


@pytest.mark.parametrize("script,flags,words", [
    (C, ["--init_from=resume", "--out_dir={tmp}/run"], "error: {tmp}/run/ckpt.pt: no checkpoint"),
    (FZ, ["--bogus=1"], "error: unknown argument '--bogus=1'; valid keys:"),
    (FZ, ["--init_from=restart"], "error: --init_from=restart: expected one of scratch, resume"),
])
def test_run_main_prints_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys, script, flags, words):
    monkeypatch.setattr(sys, "argv", ["x.py", *(f.format(tmp=tmp_path) for f in flags)])
    with pytest.raises(SystemExit) as e:
        data.run(script.main)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(words.format(tmp=tmp_path)), err


def test_debug_true_adds_the_traceback(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ct_scroll.py", "--eval_interval=0", "--debug=true"])
    with pytest.raises(SystemExit) as e:
        data.run(C.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" in err and err.strip().endswith("error: --eval_interval=0: must be at least 1")


def test_an_error_from_a_dataloader_worker_is_its_own_last_line(monkeypatch, capsys):
    def main():  # what DataLoader re-raises for a BadVolume in a worker process
        raise BadVolume("Caught BadVolume in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        '  File "data.py", line 1, in load\ndata.BadVolume: /d/valid_1_a_1.nii.gz: 3 NaN/inf voxels')
    monkeypatch.setattr(sys, "argv", ["x.py"])
    with pytest.raises(SystemExit) as e:
        data.run(main)
    assert e.value.code == 2 and capsys.readouterr().err == "error: /d/valid_1_a_1.nii.gz: 3 NaN/inf voxels\n"


@pytest.mark.parametrize("flags,words", [([], "error: {tmp}/nope: no train/"),
                                         (["--shape", "0,10,10"], "error: --shape=(0, 10, 10)"),
                                         (["--spacing", "0,1,1"], "error: --shape=(240, 480, 480) --spacing=(0.0,")])
def test_data_py_prepare_errors_are_one_line(tmp_path, monkeypatch, capsys, flags, words):
    monkeypatch.setattr(sys, "argv", ["data.py", "prepare", "--root", str(tmp_path / "nope"), "--out", str(tmp_path),
                                      *flags])
    with pytest.raises(SystemExit) as e:
        data.run(data.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(words.format(tmp=tmp_path)) and err.count("\n") == 1, err


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ct_scroll.py"])
    monkeypatch.setattr(C, "check_config", lambda cfg: [][0])
    with pytest.raises(IndexError):
        data.run(C.main)


def _fake_run(tmp_path):
    """A checkpoint as training writes it (untrained weights): enough for --predict."""
    cfg = C.parse_config(TINY + [f"--out_dir={tmp_path}"], C.DEFAULTS, C.PRESETS)
    torch.manual_seed(0)
    data.save_checkpoint(tmp_path / "ckpt.pt", {"model": C.build_model(cfg).state_dict(), "config": cfg,
                                                "iter_num": 0})


@pytest.mark.parametrize("case", ["truncated", "pixdim 0", "slope 1e38", "no air (auto)"])
def test_predict_bad_scan_one_line_exit_2(tmp_path, monkeypatch, capsys, case):
    _fake_run(tmp_path)
    write, rescale, words = SCANS[case]
    path = tmp_path / ("scan.nii" if case == "pixdim 0" else "scan.nii.gz")
    write(path)
    monkeypatch.setattr(sys, "argv", ["ct_scroll.py", *TINY, f"--out_dir={tmp_path}", "--init_from=resume",
                                      f"--predict={path}", f"--rescale={rescale}"])
    with pytest.raises(SystemExit) as e:
        data.run(C.main)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {path}") and words in err[0], err


def test_predict_original_release_file_equals_the_hu_file(tmp_path, capsys):
    """The same scan stored in HU and as CT-RATE's original release (HU + 1024, header 1/0): with --rescale=auto
    ct_scroll's predictions are identical; read by the header alone they are not (the issue's 1024 HU shift)."""
    _fake_run(tmp_path)
    hu = truth_hu(0)
    save(tmp_path / "hu.nii.gz", hu)
    save(tmp_path / "plus1024.nii.gz", (hu + 1024).astype(np.int16))
    run = lambda name, rescale: C.main(TINY + [f"--out_dir={tmp_path}", "--init_from=resume",  # noqa: E731
                                               f"--predict={tmp_path / name}", f"--rescale={rescale}"])
    p_hu, p_auto, p_header = run("hu.nii.gz", "auto"), run("plus1024.nii.gz", "auto"), run("plus1024.nii.gz", "header")
    np.testing.assert_array_equal(p_hu, p_auto)
    assert np.abs(p_header - p_hu).max() > 1e-3
    assert "rescale=auto chose 'header - 1024'" in capsys.readouterr().out


def test_ctrl_c_saves_then_exits_130(tmp_path, monkeypatch, capsys):
    """SIGINT during step 2: the step finishes, the checkpoint is saved, run() exits 130 with one line."""
    get_lr = C.get_lr

    def lr_then_sigint(it, cfg):
        if it == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return get_lr(it, cfg)
    monkeypatch.setattr(C, "get_lr", lr_then_sigint)
    monkeypatch.setattr(sys, "argv", ["ct_scroll.py", *TINY, "--max_iters=50", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        data.run(C.main)
    assert e.value.code == 130
    assert data.load_checkpoint(tmp_path / "ckpt.pt")["iter_num"] == 2
    assert not (tmp_path / "metrics.json").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("stopped: checkpoint saved")


@pytest.mark.parametrize("script", [C, FZ, H, S, BV], ids=lambda s: s.__name__)
def test_help_gives_every_key_its_default_and_meaning(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.parse_config(["--help"], script.DEFAULTS, script.PRESETS)
    lines = capsys.readouterr().out.splitlines()[1:]
    assert e.value.code == 0 and len(lines) == len(script.DEFAULTS)
    for line, (key, value) in zip(lines, script.DEFAULTS.items()):
        head = f"  --{key}={value!r}"
        cpu = f" (cpu: {script.PRESETS['cpu'][key]!r})" if key in script.PRESETS["cpu"] else ""
        assert line.startswith(head + cpu + "  ") and len(line) > len(head + cpu) + 4, line  # a meaning follows
