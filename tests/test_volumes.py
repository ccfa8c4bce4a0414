"""Volumes, the CT-RATE reader and the cache (issue 2): orientation, bad inputs, preprocessing, rescale modes,
splits, skipping bad files, prepare -> PreparedCT."""
import csv
import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

import data
from data import LABELS, BadVolume, CTRATE, PreparedCT, load_nifti, normalize, preprocess

SHAPE = (12, 20, 20)  # (z, y, x) of the little volumes written here
SPACING = (2.0, 1.5, 1.5)
IPL_AFFINE = np.array([[0, 0, -SPACING[2], 0], [0, -SPACING[1], 0, 0], [-SPACING[0], 0, 0, 0], [0, 0, 0, 1.0]])


def truth_hu(k: int) -> np.ndarray:
    """A small (z, y, x) HU volume: air, a body box at +40, two lungs at -850, a marker that moves with k."""
    v = np.full(SHAPE, -1000, np.int16)
    v[:, 4:16, 2:18] = 40
    v[2:10, 6:14, 4:9] = -850
    v[2:10, 6:14, 11:16] = -850
    v[k % 12, 10, 10] = 700
    return v


def save(path, arr, affine=IPL_AFFINE, slope=None, inter=None):
    img = nib.Nifti1Image(arr, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_layout(root, n_patients=4, scans=("a",), v2=False):
    """A CT-RATE folder in the real layout. Original style: int16 stored = HU + 1024, header without scaling,
    metadata intercept -1024. v2 style: *_fixed folders, stored = HU, metadata still saying -1024 (the trap)."""
    d = root / "dataset"
    names = {}
    for folder, csv_split in (("train", "train"), ("valid", "validation")):
        rows = []
        for p in range(1, n_patients + 1):
            for s in scans:
                name = f"{folder}_{p}_{s}_1.nii.gz"
                k = len(rows)
                hu = truth_hu(k)
                sub = d / (folder + ("_fixed" if v2 else "")) / f"{folder}_{p}" / f"{folder}_{p}_{s}"
                save(sub / name, hu if v2 else (hu + 1024).astype(np.int16))
                rows.append((name, [(k + j) % 2 for j in range(18)], f"Findings of {name}."))
        write_csv(d / "multi_abnormality_labels" / f"{folder}_predicted_labels.csv", ["VolumeName", *LABELS],
                  [[n, *y] for n, y, _ in rows])
        write_csv(d / "radiology_text_reports" / f"{csv_split}_reports.csv",
                  ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"],
                  [[n, "Not given.", "Not given.", r, "Not given."] for n, _, r in rows])
        write_csv(d / "metadata" / f"{csv_split}_metadata.csv",
                  ["VolumeName", "Manufacturer", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"],
                  [[n, "X", 1, -1024, f"[{SPACING[1]}, {SPACING[2]}]", SPACING[0]] for n, _, _ in rows])
        names[folder] = [n for n, _, _ in rows]
    return names


def raw_ds(root, split="train", **kw):  # items in HU, untouched by resampling, cropping or windowing
    kw.setdefault("val_fraction", 0.0)
    return CTRATE(root, split, shape=None, spacing=None, window=None, norm="hu", **kw)


# ---------------------------------------------------------------------------- load_nifti

def test_load_nifti_orientation_lps_and_permuted(tmp_path):
    # stored axes (L, P, S): affine diag(-1, -2, 3); marker at stored (1, 2, 3)
    a = np.zeros((5, 6, 7), np.float32)
    a[1, 2, 3] = 1
    save(tmp_path / "lps.nii.gz", a, np.diag([-1.0, -2.0, 3.0, 1.0]))
    v, sp = load_nifti(tmp_path / "lps.nii.gz")
    assert v.shape == (7, 6, 5) and v.dtype == np.float32 and sp == (3.0, 2.0, 1.0)
    assert v[7 - 1 - 3, 2, 1] == 1 and v.sum() == 1  # S flipped to I; P and L kept
    # stored axes (S, R, A): axis 0 -> world z (3 mm), axis 1 -> world x (1 mm), axis 2 -> world y (2 mm)
    b = np.zeros((4, 5, 6), np.float32)
    b[0, 1, 4] = 1
    aff = np.array([[0, 1.0, 0, 0], [0, 0, 2.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    save(tmp_path / "sra.nii.gz", b, aff)
    v, sp = load_nifti(tmp_path / "sra.nii.gz")
    assert v.shape == (4, 6, 5) and sp == (3.0, 2.0, 1.0)
    assert v[4 - 1 - 0, 6 - 1 - 4, 5 - 1 - 1] == 1 and v.sum() == 1


def test_load_nifti_header_scaling_and_squeeze(tmp_path):
    save(tmp_path / "s.nii.gz", np.array([[[0, 1], [2, 3]]], np.int16)[..., None], IPL_AFFINE, slope=2, inter=-1024)
    v, sp = load_nifti(tmp_path / "s.nii.gz")  # 4-D with one volume -> 3-D
    assert v.shape == (1, 2, 2) and sp == SPACING
    np.testing.assert_array_equal(v[0], [[-1024, -1022], [-1020, -1018]])


def bad_files(tmp_path):
    """(path, words expected in the message) for each kind of bad NIfTI."""
    out = []
    p = tmp_path / "garbage.nii.gz"
    p.write_bytes(gzip.compress(b"not a nifti" * 100))
    out.append((p, "unreadable"))
    p = tmp_path / "truncated.nii.gz"
    save(p, np.random.default_rng(0).integers(-1000, 1000, (24, 32, 32)).astype(np.int16))
    b = p.read_bytes()
    p.write_bytes(b[: len(b) * 2 // 3])
    out.append((p, "truncated"))
    p = tmp_path / "four_d.nii.gz"
    save(p, np.zeros((4, 4, 4, 2), np.float32))
    out.append((p, "3-D"))
    for bad in ("nan", "inf"):
        a = np.zeros((4, 4, 4), np.float32)
        a[1, 2, 3] = float(bad)
        p = tmp_path / f"{bad}.nii.gz"
        save(p, a)
        out.append((p, "NaN/inf"))
    out.append((tmp_path / "missing.nii.gz", "no such file"))
    return out


def test_bad_nifti_named(tmp_path):
    for path, words in bad_files(tmp_path):
        with pytest.raises(BadVolume, match=words) as e:
            load_nifti(path)
        assert str(path) in str(e.value)


# ---------------------------------------------------------------------------- preprocess

def test_normalize_modes():
    hu = torch.tensor([-2000.0, -1000, -400, 200, 500])
    torch.testing.assert_close(normalize(hu, (-1000, 200), "hu"), torch.tensor([-1000.0, -1000, -400, 200, 200]))
    torch.testing.assert_close(normalize(hu, (-1000, 200), "unit"), torch.tensor([0.0, 0, 0.5, 1, 1]))
    torch.testing.assert_close(normalize(hu, (-1000, 200), "symmetric"), torch.tensor([-1.0, -1, 0, 1, 1]))
    torch.testing.assert_close(normalize(hu, (-1000, 200), "ctscroll"),
                               torch.tensor([-0.449, -0.449, 0.051, 0.551, 0.551]))
    torch.testing.assert_close(normalize(hu, (-1000, 1000), "symmetric"), torch.tensor([-1.0, -1, -0.4, 0.2, 0.5]))
    torch.testing.assert_close(normalize(hu, None, "hu"), hu)
    assert hu.tolist() == [-2000.0, -1000, -400, 200, 500]  # the input is never modified in place
    torch.testing.assert_close(normalize(hu.to(torch.int16), (-1000, 200), "unit"), torch.tensor([0.0, 0, 0.5, 1, 1]))
    with pytest.raises(ValueError):
        normalize(hu, (-1000, 200), "zscore")


def test_preprocess_resample():
    z = np.arange(10, dtype=np.float32)[:, None, None] * 10 + np.zeros((10, 20, 20), np.float32)  # ramp along z
    v = preprocess(z, (3.0, 1.5, 1.5), target_spacing=(1.5, 0.75, 0.75), window=None, norm="hu")
    assert v.shape == (20, 40, 40) and v.dtype == torch.float32
    # half-voxel-centred trilinear: output slice k sits at input coordinate (k + 0.5) / 2 - 0.5
    torch.testing.assert_close(v[5:15, 7, 9], 10 * ((torch.arange(5, 15) + 0.5) / 2 - 0.5))
    v = preprocess(z, (3.0, 1.5, 1.5), target_spacing=(6.0, 3.0, 1.5), window=None, norm="hu")
    assert v.shape == (5, 10, 20)


def test_preprocess_crop_pad_with_air():
    x = torch.arange(4.0)[:, None, None] + 100 + torch.zeros(4, 5, 6)
    v = preprocess(x, (1, 1, 1), shape=(2, 8, 4), window=None, norm="hu")
    assert v.shape == (2, 8, 4)
    torch.testing.assert_close(v[:, 3, 1], torch.tensor([101.0, 102]))  # centre z slices 1, 2
    assert (v[:, :1] == -1000).all() and (v[:, 6:] == -1000).all() and (v[:, 1:6] > 0).all()  # pad 1 before, 2 after
    u = preprocess(x, (1, 1, 1), shape=(2, 8, 4))  # air pads before the window: 0 in unit norm
    assert (u[:, 0] == 0).all() and torch.allclose(u[:, 3], (v[:, 3] + 1000) / 1200)


# ---------------------------------------------------------------------------- CT-RATE reader

@pytest.mark.parametrize("v2", [False, True])
def test_rescale_modes(tmp_path, capsys, v2):
    names = write_layout(tmp_path, n_patients=2, v2=v2)
    truth = [truth_hu(k).astype(np.float32) for k in range(2)]
    shift = {"auto": 0, "metadata": 0 if not v2 else -1024, "header": 1024 if not v2 else 0,
             "none": 1024 if not v2 else 0}
    for mode, s in shift.items():
        ds = raw_ds(tmp_path, rescale=mode)
        assert [ds[i]["name"] for i in range(2)] == names["train"] and ds.n_bad == 0
        for i in range(2):
            np.testing.assert_array_equal(ds[i]["volume"][0].numpy(), truth[i] + s, err_msg=f"rescale={mode}")
    said = [line for line in capsys.readouterr().out.splitlines() if "rescale=auto" in line]
    assert len(said) == 1 and ("'header'" if v2 else "'metadata'") in said[0]


def test_item_contract_and_preprocessing(tmp_path):
    names = write_layout(tmp_path, n_patients=2)
    ds = CTRATE(tmp_path / "dataset", "test", shape=(8, 24, 16), spacing=(2.0, 1.0, 1.0), norm="ctscroll")
    assert len(ds) == 2 and ds.dir.name == "valid"
    it = ds[1]
    assert set(it) == {"volume", "labels", "report", "name"} and it["name"] == names["valid"][1]
    assert it["volume"].shape == (1, 8, 24, 16) and it["volume"].dtype == torch.float32
    want = preprocess(truth_hu(1), SPACING, target_spacing=(2.0, 1.0, 1.0), shape=(8, 24, 16), norm="ctscroll")
    torch.testing.assert_close(it["volume"][0], want)
    assert it["labels"].tolist() == [float((1 + j) % 2) for j in range(18)] and it["report"].startswith("Findings")
    batch = data.collate([ds[0], ds[1]])
    assert batch["volume"].shape == (2, 1, 8, 24, 16) and batch["labels"].shape == (2, 18)
    assert batch["name"] == names["valid"]


def test_split_by_patient(tmp_path):
    names = write_layout(tmp_path, n_patients=30, scans=("a", "b"))
    tr = [r["name"] for r in CTRATE(tmp_path, "train", val_fraction=0.3).rows]
    va = [r["name"] for r in CTRATE(tmp_path, "val", val_fraction=0.3).rows]
    patient = lambda n: n.split("_")[1]  # noqa: E731
    assert sorted(tr + va) == sorted(names["train"]) and 5 <= len({patient(n) for n in va}) <= 15
    assert not {patient(n) for n in tr} & {patient(n) for n in va}
    assert [r["name"] for r in CTRATE(tmp_path, "test").rows] == names["valid"]


def rewrite_csv(path, fn):
    rows = list(csv.reader(open(path)))
    write_csv(path, rows[0], [])
    rows = fn(rows)
    write_csv(path, rows[0], rows[1:])


@pytest.mark.parametrize("case", ["column", "label", "report", "missing", "corrupt"])
def test_bad_inputs_named_skipped_or_fatal(tmp_path, capsys, case):
    names = write_layout(tmp_path, n_patients=4)
    d = tmp_path / "dataset"
    labels, reports = d / "multi_abnormality_labels/train_predicted_labels.csv", d / "radiology_text_reports/train_reports.csv"
    bad = names["train"][2]
    vol = d / "train" / "train_3" / "train_3_a" / bad
    if case == "column":  # the whole CSV is unusable: always fatal
        rewrite_csv(labels, lambda rows: [r[:5] + r[6:] for r in rows])
        with pytest.raises(BadVolume, match=LABELS[4]) as e:
            raw_ds(tmp_path)
        assert str(labels) in str(e.value)
        return
    if case == "label":
        rewrite_csv(labels, lambda rows: [r if r[0] != bad else [bad, "2", *r[2:]] for r in rows])
        where = labels
    elif case == "report":
        rewrite_csv(reports, lambda rows: [r if r[0] != bad else [bad, "x", "y", " ", "z"] for r in rows])
        where = reports
    elif case == "missing":
        vol.unlink()
        where = vol
    else:
        vol.write_bytes(vol.read_bytes()[:100])
        where = vol
    capsys.readouterr()
    ds = raw_ds(tmp_path)
    got = [ds[i]["name"] for i in range(len(ds))] + [ds[i]["name"] for i in range(len(ds))]  # two epochs
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(where) in warnings[0] and ds.n_bad == 1, warnings
    assert bad not in got and set(got) == set(names["train"]) - {bad}
    with pytest.raises(BadVolume) as e:
        ds = raw_ds(tmp_path, strict=True)
        [ds[i] for i in range(len(ds))]
    assert str(where) in str(e.value)


def test_auto_refuses_volume_without_air(tmp_path):
    write_layout(tmp_path, n_patients=1)
    path = tmp_path / "dataset/train/train_1/train_1_a/train_1_a_1.nii.gz"
    save(path, np.full(SHAPE, 5000, np.int16))
    with pytest.raises(BadVolume, match="no air") as e:
        raw_ds(tmp_path, strict=True)[0]
    assert str(path) in str(e.value)


# ---------------------------------------------------------------------------- cache

def test_prepare_then_prepared_equals_ctrate(tmp_path, capsys):
    names = write_layout(tmp_path / "ct", n_patients=5)
    (tmp_path / "ct/dataset/valid/valid_2/valid_2_a/valid_2_a_1.nii.gz").write_bytes(b"broken")
    shape, spacing = (8, 16, 24), (2.5, 1.25, 1.0)
    index = data.prepare(tmp_path / "ct", tmp_path / "cache", shape, spacing, val_fraction=0.4)
    assert index["splits"]["test"]["n_bad"] == 1
    assert sum(len(s["names"]) for s in index["splits"].values()) == 9
    for split in ("train", "val", "test"):
        ref = CTRATE(tmp_path / "ct", split, shape=shape, spacing=spacing, norm="symmetric", val_fraction=0.4)
        got = data.get_dataset(str(tmp_path / "cache"), split, shape=shape, norm="symmetric")
        assert isinstance(got, PreparedCT) and len(got) == len(ref) > 0  # CTRATE's test split also left it out
        assert ref.n_bad == (split == "test")
        for i in range(len(got)):
            a, b = got[i], ref[i]
            assert a["name"] == b["name"] and a["report"] == b["report"] and torch.equal(a["labels"], b["labels"])
            torch.testing.assert_close(a["volume"], b["volume"], atol=1.01 / 1200, rtol=0)  # int16: 0.5 HU
    assert "valid_2_a_1" not in " ".join(PreparedCT(tmp_path / "cache", "test").names)
    with pytest.raises(ValueError, match="prepared at shape"):
        data.get_dataset(str(tmp_path / "cache"), "train", shape=(8, 16, 16))
    assert isinstance(data.get_dataset(str(tmp_path / "ct"), "test", shape=shape), CTRATE)
    hard = data.get_dataset("synthetic", "train", n=2, shape=shape, difficulty=0.9)[0]["volume"]  # passed through
    assert torch.equal(hard, data.SyntheticCT("train", 2, shape, difficulty=0.9)[0]["volume"])
    assert not torch.equal(hard, data.get_dataset("synthetic", "train", n=2, shape=shape)[0]["volume"])


def test_cli_prepare(tmp_path, capsys):
    write_layout(tmp_path / "ct", n_patients=3)
    data.main(["prepare", "--root", str(tmp_path / "ct"), "--out", str(tmp_path / "cache"), "--shape", "6,10,10",
               "--spacing", "2,2,2", "--splits", "test", "--workers", "0", "--strict"])
    ds = PreparedCT(tmp_path / "cache", "test", norm="hu", window=None)
    assert len(ds) == 3 and ds.volumes.shape == (3, 6, 10, 10) and ds.spacing == (2.0, 2.0, 2.0)
    assert ds[0]["volume"].min() == -1000 and ds[0]["volume"].max() > 0
    assert "prepare test: 3 volumes" in capsys.readouterr().out


def test_without_metadata_csv(tmp_path):
    write_layout(tmp_path, n_patients=1, v2=True)
    (tmp_path / "dataset/metadata/train_metadata.csv").unlink()
    np.testing.assert_array_equal(raw_ds(tmp_path)[0]["volume"][0].numpy(), truth_hu(0))  # auto: header only
    with pytest.raises(FileNotFoundError, match="train_metadata.csv"):
        raw_ds(tmp_path, rescale="metadata")


@pytest.mark.parametrize("v2", [False, True])
def test_write_ctrate_layout_round_trip_every_rescale(tmp_path, capsys, v2):
    shape = (16, 32, 32)
    data.write_ctrate_layout(tmp_path, 3, shape, seed=1, v2=v2, n_valid=1)
    syn = data.SyntheticCT("train", 3, shape, seed=1, window=None, norm="hu")
    truth = [data.render_phantom(syn.patient(i), shape)[0].round() for i in range(3)]
    shift = {"auto": 0, "metadata": -1024 if v2 else 0, "header": 0 if v2 else 1024, "none": 0 if v2 else 1024}
    for mode, s in shift.items():
        ds = raw_ds(tmp_path, rescale=mode)
        assert ds.dir.name == ("train_fixed" if v2 else "train") and ds.n_bad == 0
        items = {it["name"]: it for it in (ds[i] for i in range(len(ds)))}
        assert sorted(items) == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_2_a_2.nii.gz", "train_3_a_1.nii.gz"]
        for i in range(3):
            it = items[f"train_{i + 1}_a_1.nii.gz"]
            torch.testing.assert_close(it["volume"][0], truth[i] + s, msg=f"rescale={mode}")
            assert it["labels"].tolist() == syn.patient(i)["labels"] and it["report"] == data.make_report(syn.patient(i))
    said = [line for line in capsys.readouterr().out.splitlines() if "rescale=auto" in line]
    assert len(said) == 1 and ("'header'" if v2 else "'metadata'") in said[0]
    ds = CTRATE(tmp_path, "test", shape=shape, spacing=syn.spacing, norm="unit")  # the phantom's own grid
    torch.testing.assert_close(ds[0]["volume"], data.SyntheticCT("test", 1, shape, seed=1)[0]["volume"], atol=1e-3,
                               rtol=0)


def test_iterating_a_ctrate_split_gives_each_volume_once(tmp_path):
    """The train split's __getitem__ wraps past the end (a bad file hands over to the next), so `for it in ds` needs
    its own __iter__: without it, iteration never ends (samf's tokenizer looped forever on a CT-RATE folder)."""
    import itertools
    data.write_ctrate_layout(tmp_path, 3, (16, 32, 32), seed=1, n_valid=1)
    for split in ("train", "test"):
        ds = CTRATE(tmp_path, split, shape=(16, 32, 32), spacing=None, norm="unit")
        names = [it["name"] for it in itertools.islice(iter(ds), len(ds) + 1)]  # one more than there is
        assert names == [ds[i]["name"] for i in range(len(ds))] and len(set(names)) == len(ds) > 0


def test_a_dataset_rendering_on_the_gpu_gets_spawned_workers():
    """CUDA cannot start in a forked DataLoader worker (hilt's paper preset renders on the GPU and failed so on an
    H200): such a dataset gets spawned workers, which hand their batches back on the CPU to be pinned; with
    --num_workers=0 it is rendered in this process, on the GPU, with nothing to pin. A CPU dataset keeps forked
    workers. Nothing is rendered here."""
    sampler = [[0, 1]]
    gpu = data.make_loader(data.SyntheticCT("train", 2, device="cuda"), sampler, list, 2, 0, pin_memory=True)
    inline = data.make_loader(data.SyntheticCT("train", 2, device="cuda"), sampler, list, 0, 0, pin_memory=True)
    cpu = data.make_loader(data.SyntheticCT("train", 2), sampler, list, 2, 0, pin_memory=True)
    assert (gpu.num_workers, gpu.pin_memory, gpu.multiprocessing_context.get_start_method()) == (2, True, "spawn")
    assert (inline.num_workers, inline.pin_memory) == (0, False)
    assert (cpu.num_workers, cpu.pin_memory, cpu.multiprocessing_context) == (2, True, None)


def test_spawned_workers_give_hilts_batches_exactly():
    """What a spawned worker needs crosses the process boundary (the dataset, hilt's collate with its tokenizer), and
    the batches equal the ones rendered in this process, in the same order (the same spawn path a GPU split takes,
    rendered on the CPU here)."""
    import hilt
    from functools import partial
    ds, sampler = data.SyntheticCT("train", 4, shape=(16, 32, 32), seed=3), [[2, 0], [1, 3], [3, 2]]
    enc = data.train_bpe(data.reports_of(ds), 300)
    collate = partial(hilt.collate_reports, enc=enc, max_text_len=64)
    spawned = list(data.make_loader(ds, sampler, collate, 2, 0, spawn=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker: on some CPUs the render rounds a voxel differently per count
    try:
        inline = list(data.make_loader(ds, sampler, collate, 0, 0))
    finally:
        torch.set_num_threads(threads)
    assert len(spawned) == len(inline) == 3
    for a, b in zip(spawned, inline):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
