"""data.py: everything the five paper scripts share that is not a kernel.

Sections, in reading order, with their public names:
  Volumes    LABELS (the 18 CT-RATE findings); the repo's errors InputError, BadVolume, BadConfig, Interrupted and
             run(main) (one line `error: ...`, exit 2); check_out_dir, resume_cleanup, resume_checkpoint;
             load_nifti, check_scan, load_ct (--predict's loader: rescale auto|header|none, plausibility checks);
             normalize, crop_or_pad, preprocess (resample, crop/pad, HU window, norm); NORMS, AIR, MIN_VOXELS,
             SPACING_MM
  CT-RATE    RESCALES, CTRATE: the real on-disk layout and CSVs (the Hugging Face dataset ibrahimhamamci/CT-RATE)
  RadGenome  RADGENOME_QA, RADGENOME_REGIONS, radgenome_questions, RadGenomeCT: region masks and grounded QA
  Cache      prepare (CT-RATE -> int16 memmaps + an index), PreparedCT; SYNTHETIC_CACHE, SyntheticDiskCache;
             get_dataset (--data -> a Dataset), collate
  Text       LLAMA3_PAT, SPECIAL_TOKENS, train_bpe, save_bpe, load_bpe (byte-level BPE on tiktoken),
             load_llama3_tokenizer
  Metrics    auroc, best_f1_thresholds, classification_metrics, bootstrap_auroc, bootstrap_diff; metric_tokens, bleu,
             meteor, rouge_n, rouge_l, cider_d, report_metrics; vqa_closed_accuracy, choice_correct; report_labels,
             clinical_metrics, ce_baselines (clinical efficacy: findings read back out of generated reports)
  Runs       save_checkpoint, load_checkpoint, rng_state, set_rng_state, setup_ddp, append_jsonl, StopOnSigint,
             PEAK_BF16, peak_flops, StepTimer, Stream, make_loader, to_device, autocast_ctx, wrap_model,
             optimizer_step, gather_rng, restore_rng, log_eval, forward_flops, meta_memory
Appendix (a reader of the scripts can stop before it):
  Synthetic  the procedural chest CT, the default dataset: FOV, REGIONS, PREVALENCE, LOBES, sample_patient,
             render_phantom (the anatomy, then one painter per structure or finding), SyntheticCT,
             write_ctrate_layout, write_radgenome_layout (the phantom on disk in CT-RATE's / RadGenome's layout)
  Templates  the phantom's reports and questions: REGION_IDS, finding_region, make_report, make_questions
  CLI        render_montage, bench, main: python data.py synthetic|prepare|montage|bench

Axes everywhere are (z, y, x) = (I, P, L): slice 0 is the top, row 0 anterior, column 0 the patient's right.
"""
import base64
import collections
import contextlib
import csv
import functools
import hashlib
import heapq
import io
import json
import math
import os
import re
import signal
import sys
import textwrap
import time
import traceback
import unicodedata
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from tqdm import tqdm


# =============================================================================
# Volumes
# =============================================================================

# The 18 CT-RATE abnormality labels, in the column order of multi_abnormality_labels/*_predicted_labels.csv.
LABELS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]

NORMS = ("hu", "unit", "symmetric", "ctscroll")
AIR = -1000.0  # HU; the pad value


MIN_VOXELS = 8  # per axis: fewer slices (or rows, columns) than this is not a chest CT (a localizer, one slice)
SPACING_MM = (0.05, 100.0)  # a voxel side outside this range is a broken header (pixdim 0, metres, 1e4)


# ---- errors: the repo's own error types, and `run`, which turns them into one line for the user --------------------

class InputError(ValueError):
    """Input the user can fix (a file, a CSV row, a flag): `run` prints it as one line `error: <message>`, exit 2."""


class BadVolume(InputError):
    """A volume file or CSV row that must not be used; the message starts with the file it is about."""


class BadConfig(InputError):
    """A flag that parses but cannot work; the message starts with --key=value."""


class Interrupted(Exception):
    """Raised by a script's main after Ctrl-C stopped training and the checkpoint was saved: `run` exits with 130."""


def _message(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return e.code
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's own last line
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def run(main):
    """`if __name__ == "__main__": run(main)`. The repo's own errors (InputError, a parser's SystemExit message, a
    missing or unwritable file) print as one line `error: ...` and exit 2; Ctrl-C exits 130 (after the script
    saved); anything else is a bug and keeps its traceback. `--debug=true` adds the traceback to every error."""
    argv = sys.argv[1:]
    debug = "--debug=true" in argv or any(a == "--debug" and b == "true" for a, b in zip(argv, argv[1:]))
    try:
        main()
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"stopped: {e}" if str(e) else "stopped", file=sys.stderr)
        sys.exit(130)
    except (InputError, OSError, SystemExit) as e:
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {_message(e)}", file=sys.stderr)
        sys.exit(2)


def check_out_dir(path):
    """Fail before any work when out_dir cannot be written (read-only disk, no permission, a file in the way)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BadConfig(f"--out_dir={path}: not writable ({e.strerror or e})") from None


def resume_cleanup(out_dir, iter_num: int, ckpt: str = "ckpt.pt", log: str = "log.jsonl"):
    """Before a resumed run writes: remove a ckpt.pt.tmp (the checkpoint `ckpt`'s) left by a kill during the save, and
    drop log.jsonl (`log`) lines past the checkpoint's step (a kill after the log line but before the checkpoint's
    rename would repeat them)."""
    out = Path(out_dir)
    (out / f"{ckpt}.tmp").unlink(missing_ok=True)
    log = out / log
    if not log.is_file():
        return
    lines = log.read_text().splitlines()

    def step(line):
        try:
            return json.loads(line).get("iter", 0)
        except (ValueError, AttributeError):  # a line cut by the kill
            return math.inf
    keep = [line for line in lines if step(line) <= iter_num]
    if len(keep) != len(lines):
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, log)
        print(f"resume: dropped {len(lines) - len(keep)} {log.name} line(s) written after step {iter_num}")


def resume_checkpoint(cfg: dict, model_keys, master: bool, name: str = "ckpt.pt", log: str = "log.jsonl",
                      defaults=None):
    """--init_from=resume: out_dir/ckpt.pt (None when training from scratch). The model's keys come from the
    checkpoint (a line names any the command line asked differently); before training on, rank 0 removes a stale
    ckpt.pt.tmp and log lines past the checkpoint (resume_cleanup). The same few lines in every script's main();
    name and log: a stage's own checkpoint and log (boundary_vqa's siglip.pt, log_siglip.jsonl); defaults: the
    values of the keys that a checkpoint saved before they existed lacks (what the code did then)."""
    if cfg["init_from"] != "resume":
        return None
    ckpt = load_checkpoint(Path(cfg["out_dir"]) / name)
    saved = {k: ckpt["config"][k] if k in ckpt["config"] or defaults is None else defaults[k] for k in model_keys}
    changed = {k: (cfg[k], saved[k]) for k in model_keys if cfg[k] != saved[k]}
    if changed and master:
        print(f"resume: the model keys come from the checkpoint; ignoring the given {changed}")
    cfg.update(saved)
    if master and not cfg.get("predict"):
        resume_cleanup(cfg["out_dir"], ckpt["iter_num"], name, log)
    return ckpt


def _read_nifti(path):
    """-> (stored values float32 (z, y, x) in (I, P, L), spacing (z, y, x) mm, (header slope, header intercept))."""
    path = Path(path)
    if not path.is_file():
        raise BadVolume(f"{path}: no such file")
    try:
        nib.imageglobals.logger.disabled = True  # nibabel logs its own header fixes (pixdim 0 -> 1 mm): we raise
        try:
            img = nib.load(path)
        finally:
            nib.imageglobals.logger.disabled = False
        with nib.openers.ImageOpener(path) as f:  # the header as stored: nibabel's checked copy turns pixdim 0 into 1
            pixdim = type(img.header).from_fileobj(f, check=False)["pixdim"][1:4]
        raw = np.asarray(img.dataobj.get_unscaled())
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        raise BadVolume(f"{path}: unreadable or truncated NIfTI ({type(e).__name__}: {e})") from e
    if not (np.isfinite(pixdim) & (pixdim != 0)).all():
        raise BadVolume(f"{path}: voxel size (pixdim) {pixdim.tolist()} in the header (0 or not finite; nibabel would "
                        f"silently assume 1 mm): fix the header")
    found = raw.shape
    while raw.ndim > 3 and raw.shape[-1] == 1:  # a 4-D file holding a single volume
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise BadVolume(f"{path}: expected a 3-D volume, found shape {found}")
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise BadVolume(f"{path}: {(~np.isfinite(raw)).sum()} NaN/inf voxels")
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                           nib.orientations.axcodes2ornt(("I", "P", "L")))
    raw = np.ascontiguousarray(nib.orientations.apply_orientation(raw, ornt), dtype=np.float32)
    spacing = [0.0] * 3
    for (axis, _), zoom in zip(ornt, img.header.get_zooms()[:3]):  # row i: where input axis i goes
        spacing[int(axis)] = float(zoom)
    return raw, tuple(spacing), (slope, inter)


def _scaled(path, raw, slope, inter) -> np.ndarray:
    if (slope, inter) == (1.0, 0.0):
        return raw
    with np.errstate(over="ignore", invalid="ignore"):
        v = raw * np.float32(slope) + np.float32(inter)
    if not np.isfinite(v).all():
        raise BadVolume(f"{path}: {(~np.isfinite(v)).sum()} NaN/inf voxels after the header's scaling (slope {slope:g}, "
                        f"intercept {inter:g})")
    return v


def load_nifti(path):
    """NIfTI -> (float32 array (z, y, x) in the header's scaled units, spacing (z, y, x) in mm); axes (I, P, L)."""
    raw, spacing, (slope, inter) = _read_nifti(path)
    return _scaled(path, raw, slope, inter), spacing


def check_scan(path, hu, spacing):
    """The plausibility checks every reader applies once a volume is in HU: finite, at least MIN_VOXELS along each
    axis, every voxel side within SPACING_MM, not constant. BadVolume naming the file otherwise."""
    if not np.isfinite(hu).all():
        raise BadVolume(f"{path}: {(~np.isfinite(hu)).sum()} NaN/inf voxels after rescaling")
    if min(hu.shape) < MIN_VOXELS:
        raise BadVolume(f"{path}: shape (z, y, x) {tuple(hu.shape)}: a chest CT has at least {MIN_VOXELS} voxels along "
                        f"each axis (one slice or a localizer?)")
    lo, hi = SPACING_MM
    if not all(lo <= s <= hi for s in spacing):
        raise BadVolume(f"{path}: voxel spacing (z, y, x) {tuple(round(float(s), 4) for s in spacing)} mm is outside "
                        f"[{lo}, {hi}] mm (a broken header or metadata row?)")
    if hu.min() == hu.max():
        raise BadVolume(f"{path}: constant volume (every voxel is {hu.min():g})")


def load_ct(path, rescale="auto"):
    """One CT scan for a script's --predict -> (HU float32 (z, y, x) in (I, P, L), spacing (z, y, x) mm).
    rescale: header (the NIfTI header's slope/intercept), none (stored values), or auto: the header's scaling, or
    that minus 1024 (CT-RATE's original release stores HU + 1024 with a header slope 1 / intercept 0), whichever
    puts more voxels near air (-1000 HU); it says what it chose. Then check_scan. A chosen mode whose volume has
    no air is a warning (the user asked for it); auto finding no air either way is an error."""
    if rescale not in ("auto", "header", "none"):
        raise BadConfig(f"--rescale={rescale!r}: expected auto, header or none")
    raw, spacing, (slope, inter) = _read_nifti(path)
    hu = raw if rescale == "none" else _scaled(path, raw, slope, inter)
    if rescale == "auto":
        air = {"header": _air(hu[::2, ::2, ::2]), "header - 1024": _air(hu[::2, ::2, ::2] - 1024)}
        choice = max(air, key=air.get)  # the header wins a tie
        if air[choice] < 0.01:
            raise BadVolume(f"{path}: rescale=auto found no air near -1000 HU with the header's scaling (slope "
                            f"{slope:g}, intercept {inter:g}) or with it minus 1024; values span [{hu.min():g}, "
                            f"{hu.max():g}]: not a CT in HU? (--rescale=header|none to use it anyway)")
        hu = hu - np.float32(1024) if choice == "header - 1024" else hu
    check_scan(path, hu, spacing)
    if rescale == "auto":
        print(f"{path}: rescale=auto chose '{choice}' ({air[choice]:.0%} of voxels near air at -1000 HU; header slope "
              f"{slope:g}, intercept {inter:g})")
    if rescale != "auto" and _air(hu[::2, ::2, ::2]) < 0.01:
        print(f"warning: {path}: rescale={rescale} leaves no voxel near air (-1000 HU); values span [{hu.min():g}, "
              f"{hu.max():g}]: predictions assume HU", file=sys.stderr)
    return hu, spacing


def normalize(hu, window=(-1000, 200), norm="unit"):
    """Clip HU to window (None: no clip), then hu: as is; unit: -> [0, 1]; symmetric: -> [-1, 1];
    ctscroll: unit - 0.449 (the CT-Scroll authors' code: (x + 1000) / 1200 - 0.449)."""
    if norm not in NORMS or (window is None and norm != "hu"):
        raise ValueError(f"norm={norm!r} with window={window}: norm must be one of {NORMS}, and only 'hu' has no window")
    if window is None:
        return torch.as_tensor(hu, dtype=torch.float32)
    lo, hi = window
    x = torch.as_tensor(hu).to(torch.float32, copy=True).clamp_(lo, hi)  # one copy, then in place (3x faster)
    if norm == "hu":
        return x
    x = x.sub_(lo).div_(hi - lo)
    if norm == "symmetric":
        return x.mul_(2).sub_(1)
    return x.sub_(0.449) if norm == "ctscroll" else x


def crop_or_pad(v: torch.Tensor, shape, value=AIR) -> torch.Tensor:
    """Centre crop each axis longer than shape, centre pad (with air) each shorter one."""
    for d, n in enumerate(shape):
        if v.shape[d] > n:
            v = v.narrow(d, (v.shape[d] - n) // 2, n)
    pad = []
    for d in reversed(range(len(shape))):  # F.pad lists the last axis first
        extra = max(0, shape[d] - v.shape[d])
        pad += [extra // 2, extra - extra // 2]
    return F.pad(v, pad, value=value) if any(pad) else v


def preprocess(volume, spacing, *, target_spacing=None, shape=None, window=(-1000, 200), norm="unit", device=None):
    """HU volume (z, y, x) -> float32 tensor: trilinear resample to target_spacing, centre crop/pad to shape
    (padding with air before the window), then normalize(window, norm). CPU or CUDA (device)."""
    v = torch.as_tensor(volume, dtype=torch.float32, device=device)
    if target_spacing is not None and tuple(spacing) != tuple(target_spacing):
        size = [max(1, round(n * s / t)) for n, s, t in zip(v.shape, spacing, target_spacing)]
        v = F.interpolate(v[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    if shape is not None:
        v = crop_or_pad(v, shape)
    return normalize(v, window, norm)


# =============================================================================
# CT-RATE
# =============================================================================

RESCALES = ("auto", "metadata", "header", "none")


def _read_csv(path, columns) -> dict:
    """CSV -> {VolumeName: row}, row["_line"] its first line. A missing file or column is an error naming it. A
    UTF-8 byte-order mark is accepted; bytes that are not UTF-8 are read as latin-1 with a warning naming the file
    and line. A name listed twice with different values in `columns` gets row["_conflict"] (the reader skips that
    volume); listed twice with the same values, it is read once."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected the CT-RATE layout (README: Data preparation for CT-RATE)")
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    odd = [m.start() for m in re.finditer("[\udc80-\udcff]", text)]  # surrogateescape keeps each bad byte
    if odd:
        print(f"warning: {path}: line {text.count(chr(10), 0, odd[0]) + 1}: {len(odd)} byte(s) that are not UTF-8, "
              f"read as latin-1", file=sys.stderr)
        text = re.sub("[\udc80-\udcff]", lambda m: chr(ord(m.group()) - 0xdc00), text)  # byte b -> latin-1 chr(b)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise BadVolume(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
    rows, end = {}, reader.line_num
    for row in reader:
        row["_line"], end = end + 1, reader.line_num
        old = rows.setdefault(row["VolumeName"], row)
        if old is not row and any((old[c] or "").strip() != (row[c] or "").strip() for c in columns):
            old["_conflict"] = f"{path}: {row['VolumeName']}: rows at lines {old['_line']} and {row['_line']} disagree"
    return rows


def _in_val(patient: str, val_fraction: float) -> bool:  # the same patient -> the same split, on any machine
    return int(hashlib.sha256(patient.encode()).hexdigest()[:8], 16) / 16 ** 8 < val_fraction


def _air(v) -> float:  # fraction of voxels within 100 HU of air
    return float(((v > AIR - 100) & (v < AIR + 100)).mean())


def _probe(path):
    """A volume file checked without reading its voxels: the header parses, and the file is complete (a .nii.gz's
    gzip trailer holds the uncompressed size mod 2^32: a truncated download fails here). A file failing the size
    test is read in full before it is called bad (a multi-member gzip has another trailer)."""
    try:
        img = nib.load(path)
        need = int(img.dataobj.offset) + math.prod(img.shape) * img.get_data_dtype().itemsize
        with open(path, "rb") as f:
            if str(path).endswith(".gz"):
                f.seek(-4, os.SEEK_END)
                complete = int.from_bytes(f.read(4), "little") == need % 2 ** 32
            else:
                complete = f.seek(0, os.SEEK_END) >= need
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        raise BadVolume(f"{path}: unreadable or truncated NIfTI ({type(e).__name__}: {e})") from e
    if not complete:
        _read_nifti(path)


class CTRATE(torch.utils.data.Dataset):
    """CT-RATE from its on-disk layout: volumes under dataset/{train,valid}[_fixed]/,
    labels, Findings_EN reports and metadata CSVs joined by VolumeName. Splits: train/val = the train folder split
    by patient (a hash of the patient id, val_fraction of patients to val), test = the valid folder.

    rescale: how stored values become HU. metadata: HU = RescaleSlope * stored + RescaleIntercept from the metadata
    CSV (the original release); header: the NIfTI header's scaling (v2 `*_fixed` volumes, already HU); none: stored
    values as they are; auto: per volume, whichever of header/metadata puts more voxels near air (-1000 HU), said
    once per choice. Spacing comes from the metadata CSV (the DICOM's) when it has the volume and it is plausible
    (SPACING_MM), else the header. Every volume then passes check_scan.

    Bad rows and files are skipped with one warning line each and counted in n_bad (strict=True raises instead):
    labels outside {0, 1}, no report, rows that disagree with another row of the same name, a test patient also
    listed in train (a leak), a file missing or unreadable. The evaluation splits (val, test) check every file when
    built (_probe: header + completeness, no voxels read) and never hand a bad file over to another volume: a file
    that still fails at read time there is an error. In train, a file failing at read time hands over to the next.
    Volumes on disk without a labels row are counted in n_unlisted and said once."""

    def __init__(self, root, split, *, shape=(240, 480, 480), spacing=(1.5, 0.75, 0.75), window=(-1000, 200),
                 norm="unit", rescale="auto", strict=False, val_fraction=0.1):
        if split not in ("train", "val", "test") or rescale not in RESCALES:
            raise BadConfig(f"split={split!r} rescale={rescale!r}: expected train|val|test and one of {RESCALES}")
        root = Path(root)
        root = root / "dataset" if (root / "dataset").is_dir() else root
        folder, csv_split = ("valid", "validation") if split == "test" else ("train", "train")
        self.dir = next((root / d for d in (folder + "_fixed", folder) if (root / d).is_dir()), None)
        if self.dir is None:
            raise FileNotFoundError(f"{root}: no {folder}/ or {folder}_fixed/ folder of volumes (CT-RATE layout)")
        self.labels_csv = root / "multi_abnormality_labels" / f"{folder}_predicted_labels.csv"
        self.meta_csv = root / "metadata" / f"{csv_split}_metadata.csv"
        reports_csv = root / "radiology_text_reports" / f"{csv_split}_reports.csv"
        labels = _read_csv(self.labels_csv, ["VolumeName", *LABELS])
        reports = _read_csv(reports_csv, ["VolumeName", "Findings_EN"])
        meta_cols = ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"]
        meta = _read_csv(self.meta_csv, meta_cols) if rescale == "metadata" or self.meta_csv.is_file() else {}
        train_csv = root / "multi_abnormality_labels" / "train_predicted_labels.csv"
        train_patients = ({"_".join(n.split("_")[:2]) for n in _read_csv(train_csv, ["VolumeName"])}
                          if split == "test" and train_csv.is_file() else set())
        self.split, self.shape, self.spacing, self.window, self.norm = split, shape, spacing, window, norm
        self.rescale, self.strict, self.n_bad, self._bad_rows, self._said = rescale, strict, 0, set(), set()
        self.rows, missing, odd_spacing = [], [], []
        in_split = lambda patient: split == "test" or _in_val(patient, val_fraction) == (split == "val")  # noqa: E731
        for name, row in labels.items():
            parts = name.split("_")  # split_patient_scan_recon.nii.gz
            patient = "_".join(parts[:2])
            if not in_split(patient):
                continue
            path = self.dir / patient / "_".join(parts[:3]) / name
            try:
                for r in (row, reports.get(name), meta.get(name)):
                    if r is not None and "_conflict" in r:
                        raise BadVolume(r["_conflict"])
                if patient in train_patients:
                    raise BadVolume(f"{self.labels_csv}: {name}: patient {patient} is also in {train_csv} (a "
                                    f"train/test leak): left out of the test split")
                y = [(row[c] or "").strip() for c in LABELS]
                if any(v not in ("0", "1", "0.0", "1.0") for v in y):
                    raise BadVolume(f"{self.labels_csv}: {name}: labels must be 0 or 1, found {y}")
                report = (reports.get(name, {}).get("Findings_EN") or "").strip()
                if report in ("", "Not given."):
                    raise BadVolume(f"{reports_csv}: {name}: no Findings_EN report ({report!r})")
                m = self._parse_meta(name, meta.get(name), odd_spacing)
            except BadVolume as e:
                self._bad(e)
                continue
            if not path.is_file():
                missing.append(path)
                continue
            self.rows.append({"name": name, "path": path, "report": report, "meta": m,
                              "labels": torch.tensor([float(v) for v in y])})
        if missing:
            self._bad(BadVolume(f"{missing[0]}: listed in {self.labels_csv} but not on disk"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")), len(missing))
        if odd_spacing:
            print(f"warning: {self.meta_csv}: {len(odd_spacing)} row(s) with a voxel spacing outside {SPACING_MM} mm "
                  f"(first: {odd_spacing[0]}): using the NIfTI header's spacing for them", file=sys.stderr)
        unlisted = [p for p in sorted(self.dir.rglob("*.nii*"))
                    if p.name not in labels and in_split("_".join(p.name.split("_")[:2]))]
        self.n_unlisted = len(unlisted)
        if unlisted:
            print(f"warning: {len(unlisted)} volume(s) under {self.dir} have no row in {self.labels_csv} (first: "
                  f"{unlisted[0].name}): not used", file=sys.stderr)
        if split != "train":  # evaluation: a bad file is dropped now, as it could only be replaced later
            keep = []
            for r in self.rows:
                try:
                    _probe(r["path"])
                    keep.append(r)
                except BadVolume as e:
                    self._bad(e)
            self.rows = keep
        if self.n_bad:
            print(f"CTRATE {split}: {len(self.rows)} volumes, {self.n_bad} left out as bad (warnings above)")

    def _parse_meta(self, name, m, odd_spacing):
        """A metadata row -> ((slope, intercept), spacing or None when implausible), or None without a row."""
        if m is None:
            return None
        try:
            rescale = float(m["RescaleSlope"]), float(m["RescaleIntercept"])
            xy = [float(s) for s in m["XYSpacing"].strip("[]() ").split(",")]
            spacing = (float(m["ZSpacing"]), xy[0], xy[-1])
        except (ValueError, IndexError, AttributeError) as e:
            raise BadVolume(f"{self.meta_csv}: {name}: unparseable rescale/spacing ({e})") from e
        if not np.isfinite(rescale).all() or rescale[0] == 0:
            raise BadVolume(f"{self.meta_csv}: {name}: RescaleSlope/RescaleIntercept {rescale}")
        if not all(SPACING_MM[0] <= s <= SPACING_MM[1] for s in spacing):
            odd_spacing.append(f"{name} {spacing}")
            spacing = None
        return rescale, spacing

    def _bad(self, e: BadVolume, count=1):
        if self.strict:
            raise e
        self.n_bad += count
        print(f"warning: skipped {e}", file=sys.stderr)

    def __len__(self):
        return len(self.rows)

    def load(self, i) -> dict:
        """Item i, or BadVolume naming the file."""
        r = self.rows[i]
        raw, spacing, header = _read_nifti(r["path"])
        meta, meta_spacing = r["meta"] or (None, None)
        spacing = meta_spacing or spacing
        mode = self.rescale
        if mode == "metadata" and meta is None:
            raise BadVolume(f"{self.meta_csv}: no row for {r['name']} (needed by rescale=metadata)")
        if mode == "auto":
            options = {"header": header, "metadata": meta} if meta else {"header": header}
            air = {k: _air(raw[::4, ::4, ::4] * s + b) for k, (s, b) in options.items()}
            mode = max(air, key=air.get)
            if air[mode] < 0.01:
                raise BadVolume(f"{r['path']}: rescale=auto found no air near -1000 HU with the header or the metadata "
                                f"rescale ({air}); check the file or pass rescale=header|metadata|none")
            if mode not in self._said:
                self._said.add(mode)
                print(f"CTRATE {self.split}: rescale=auto chose '{mode}' ({r['name']}: {air[mode]:.0%} of voxels "
                      f"near air; {'' if mode == 'metadata' else 'not '}applying the metadata CSV's slope/intercept)")
        slope, inter = {"none": (1.0, 0.0), "header": header, "metadata": meta}[mode]
        hu = _scaled(r["path"], raw, slope, inter)
        check_scan(r["path"], hu, spacing)
        v = preprocess(hu, spacing, target_spacing=self.spacing, shape=self.shape, window=self.window, norm=self.norm)
        return {"volume": v[None], "labels": r["labels"], "report": r["report"], "name": r["name"]}

    def __iter__(self):  # each volume once: the train split's __getitem__ wraps past the end (a bad file hands over)
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i):
        if self.split != "train":  # an evaluation split scores exactly its own volumes
            try:
                return self.load(i)
            except BadVolume as e:
                raise BadVolume(f"{e}; the {self.split} split cannot replace it by another volume: remove the file, "
                                f"or prepare the data (python data.py prepare), which leaves it out") from e
        for j in [k % len(self) for k in range(i, i + len(self))]:  # a bad file hands over to the next one
            if j in self._bad_rows:
                continue
            try:
                return self.load(j)
            except BadVolume as e:
                self._bad_rows.add(j)
                self._bad(e)
        raise BadVolume(f"{self.dir}: no readable volume in split {self.split}")


# =============================================================================
# RadGenome-ChestCT (for boundary_vqa.py)
# =============================================================================

# The layout read here (RadGenome-ChestCT reuses CT-RATE's volumes; its region masks and grounded QA come as):
#   volumes/{train,valid}/<Volumename>                   HU volumes (header scaling applied)
#   masks/seg_<volume>/<region>.nii.gz                   one binary mask per region, on the volume's grid
#   radgenome_files/{train,validation}_region_vqa.csv    Volumename, Anatomy, Presence (Yes/No), Abnormality, Size (mm)
# Questions come from templates per row: presence (kind "region", yes/no), "what abnormality" and "what size" (open).
RADGENOME_QA = ("Volumename", "Anatomy", "Presence", "Abnormality", "Size")
RADGENOME_REGIONS = ("right lung", "left lung", "heart", "aorta", "mediastinum", "pleura", "esophagus")


def radgenome_questions(row: dict) -> list:
    a, ab, size = row["Anatomy"].strip(), row["Abnormality"].strip(), row["Size"].strip()
    present = row["Presence"].strip().capitalize()
    if present not in ("Yes", "No"):
        raise BadVolume(f"{row['Volumename']}: Presence must be Yes or No, found {row['Presence']!r}")
    q = [dict(question=f"Is there an abnormality in the {a}?", answer=present, kind="region", region=a, grounded=True)]
    if present == "Yes" and ab:
        q.append(dict(question=f"What abnormality is seen in the {a}?", answer=ab.capitalize(), kind="open", region=a,
                      grounded=True))
        if size:
            q.append(dict(question=f"What is the size of the {ab.lower()} in the {a}?", answer=f"{size} mm",
                          kind="open", region=a, grounded=True))
    return q


class RadGenomeCT(torch.utils.data.Dataset):
    """RadGenome-ChestCT's region-grounded QA: item = {volume (1, Z, Y, X), name, report (the region findings joined:
    a stand-in for its grounded reports), questions, region_masks {region: bool (Z, Y, X)}}. Splits by patient as
    CTRATE: train/val from the train rows (hash of the patient id), test = the validation rows. A row whose mask file
    is missing or whose mask grid differs from the volume is skipped with a warning (strict=True: fatal)."""

    def __init__(self, root, split, *, shape=(128, 256, 256), spacing=(1.5, 0.75, 0.75), window=(-1000, 200),
                 norm="unit", strict=False, val_fraction=0.1):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r}: expected train|val|test")
        self.root, self.shape, self.spacing, self.window, self.norm = Path(root), shape, spacing, window, norm
        self.strict, self.n_bad = strict, 0
        self.folder = "valid" if split == "test" else "train"
        path = self.root / "radgenome_files" / f"{'validation' if split == 'test' else 'train'}_region_vqa.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; expected the RadGenome-ChestCT layout (data.RadGenomeCT)")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in RADGENOME_QA if c not in (reader.fieldnames or [])]
            if missing:
                raise BadVolume(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
            rows = list(reader)
        self.vols = {}
        for row in rows:
            name = row["Volumename"]
            patient = "_".join(name.split("_")[:2])
            if split != "test" and _in_val(patient, val_fraction) != (split == "val"):
                continue
            try:
                qs = radgenome_questions(row)
                mask = self.root / "masks" / f"seg_{name.removesuffix('.nii.gz')}" / f"{row['Anatomy'].strip()}.nii.gz"
                if not mask.is_file():
                    raise BadVolume(f"{path}: {name}: region {row['Anatomy']!r} has no mask file {mask}")
            except BadVolume as e:
                self._bad(e)
                continue
            v = self.vols.setdefault(name, {"questions": [], "masks": {}})
            v["questions"] += qs
            v["masks"][row["Anatomy"].strip()] = mask
        self.names = sorted(self.vols)

    def _bad(self, e):
        if self.strict:
            raise e
        self.n_bad += 1
        print(f"warning: skipped {e}", file=sys.stderr)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        name = self.names[i]
        hu, sp = load_nifti(self.root / "volumes" / self.folder / name)
        masks = {}
        for region, path in self.vols[name]["masks"].items():
            m, _ = load_nifti(path)
            if m.shape != hu.shape:
                raise BadVolume(f"{path}: mask shape {m.shape} differs from the volume's {hu.shape}")
            size = [max(1, round(n * s / t)) for n, s, t in zip(m.shape, sp, self.spacing)]
            m = F.interpolate(torch.as_tensor(m > 0.5).float()[None, None], size=size, mode="nearest")[0, 0]
            masks[region] = crop_or_pad(m, self.shape, value=0.0) > 0.5
        qs = self.vols[name]["questions"]
        report = " ".join(f"{q['region'].capitalize()}: {q['answer'] if q['kind'] == 'open' else 'no abnormality'}."
                          for q in qs if q["kind"] == "open" or q["answer"] == "No")
        vol = preprocess(hu, sp, target_spacing=self.spacing, shape=self.shape, window=self.window, norm=self.norm)
        return {"volume": vol[None], "name": name, "report": report, "questions": qs, "region_masks": masks}


# =============================================================================
# Cache: preprocess CT-RATE once, then read int16 memmaps; picking a dataset
# =============================================================================

class _Loads(torch.utils.data.Dataset):  # CTRATE items as int16 HU, or the error text, for prepare's DataLoader
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return self.ds.load(i)["volume"][0].round().clamp(-32768, 32767).to(torch.int16)
        except BadVolume as e:
            return str(e)


def prepare(root, out, shape, spacing, *, splits=("train", "val", "test"), rescale="auto", strict=False,
            val_fraction=0.1, workers=0):
    """CT-RATE folder -> out/{split}.int16 (raw memmap, N x Z x Y x X, HU after rescale, resample and crop/pad, no
    window: any window/norm applies at read time) + out/index.json (shape, spacing, names, labels, reports)."""
    if len(shape) != 3 or min(shape) < 1 or len(spacing) != 3 or not all(SPACING_MM[0] <= s <= SPACING_MM[1]
                                                                          for s in spacing):
        raise BadConfig(f"--shape={shape} --spacing={spacing}: expected 3 positive sizes and 3 spacings within "
                        f"{SPACING_MM} mm")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json.tmp").unlink(missing_ok=True)  # left by a kill during the last write
    index = {"shape": list(shape), "spacing": list(spacing), "root": str(root), "rescale": rescale, "splits": {}}
    for split in splits:
        ds = CTRATE(root, split, shape=shape, spacing=spacing, window=None, norm="hu", rescale=rescale,
                    strict=strict, val_fraction=val_fraction)
        path = out / f"{split}.int16"
        print(f"prepare {split}: {len(ds)} volumes -> {path} ({len(ds) * math.prod(shape) * 2 / 1e9:.2f} GB)")
        mm = np.memmap(path, np.int16, "w+", shape=(max(1, len(ds)), *shape))
        keep = []
        loader = torch.utils.data.DataLoader(_Loads(ds), batch_size=None, num_workers=workers)
        for i, v in enumerate(tqdm(loader, total=len(ds), desc=f"prepare {split}")):
            if isinstance(v, str):
                ds._bad(BadVolume(v))
                continue
            mm[len(keep)] = v.numpy()
            keep.append(ds.rows[i])
        mm.flush()
        del mm
        os.truncate(path, len(keep) * math.prod(shape) * 2)
        index["splits"][split] = {"file": path.name, "n_bad": ds.n_bad, "names": [r["name"] for r in keep],
                                  "labels": [r["labels"].int().tolist() for r in keep],
                                  "reports": [r["report"] for r in keep]}
        tmp = out / "index.json.tmp"
        tmp.write_text(json.dumps(index))
        os.replace(tmp, out / "index.json")
    return index


class PreparedCT(torch.utils.data.Dataset):
    """A folder written by prepare(): items like CTRATE's, read from the int16 memmap and normalised on the fly."""

    def __init__(self, cache_dir, split, *, window=(-1000, 200), norm="unit"):
        index_path = Path(cache_dir) / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: missing; run python data.py prepare --root CTRATE --out {cache_dir}")
        index = json.loads(index_path.read_text())
        if split not in index["splits"]:
            raise ValueError(f"{index_path}: no split {split!r} (has {list(index['splits'])}); prepare it")
        s = index["splits"][split]
        self.shape, self.spacing = tuple(index["shape"]), tuple(index["spacing"])
        self.names, self.reports, self.n_bad = s["names"], s["reports"], s["n_bad"]
        self.labels = torch.tensor(s["labels"], dtype=torch.float32).view(-1, len(LABELS))
        self.volumes = (np.memmap(Path(cache_dir) / s["file"], np.int16, "r", shape=(len(self.names), *self.shape))
                        if self.names else np.zeros((0, *self.shape), np.int16))
        self.window, self.norm = window, norm

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        hu = torch.from_numpy(np.array(self.volumes[i]))  # int16; normalize makes the one float32 copy
        return {"volume": normalize(hu, self.window, self.norm)[None], "labels": self.labels[i],
                "report": self.reports[i], "name": self.names[i]}


SYNTHETIC_CACHE = "data_cache/synthetic"  # where a synthetic split too large for RAM is rendered once (delete freely)


class SyntheticDiskCache(torch.utils.data.Dataset):
    """A SyntheticCT split rendered once into an on-disk memmap, beside prepare()'s format: `{name}.int16` holds
    N x Z x Y x X HU rounded to int16 (window and norm apply at read time, as in PreparedCT), `{name}.done` one
    byte per volume. Filled lazily: the first access of volume i renders it, writes it, then sets its byte, so a
    run killed mid-write re-renders that one volume next time; DataLoader workers and DDP ranks may fill it
    concurrently (same bytes for the same index). The file is sparse: disk use grows with the volumes touched, up
    to n * Z * Y * X * 2 bytes. Items are SyntheticCT's without the masks (labels, report, questions come from
    sample_patient, which renders no voxel)."""

    def __init__(self, ds: "SyntheticCT", cache_dir=SYNTHETIC_CACHE):
        self.ds, self.shape = ds, ds.shape
        name = f"{ds.split}_seed{ds.seed}_d{ds.difficulty:g}_{'x'.join(map(str, ds.shape))}"
        folder = Path(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path, done = folder / f"{name}.int16", folder / f"{name}.done"
        need = ds.n * math.prod(ds.shape) * 2
        for path, size in ((self.path, need), (done, ds.n)):  # create or grow (sparse), never shrink
            with open(path, "ab") as f:
                if f.tell() < size:
                    f.truncate(size)
        self.volumes = np.memmap(self.path, np.int16, "r+", shape=(ds.n, *ds.shape))
        self.done = np.memmap(done, np.uint8, "r+", shape=(ds.n,))

    def __len__(self):
        return len(self.ds)

    def patient(self, i) -> dict:
        return self.ds.patient(i)

    def labels(self) -> torch.Tensor:
        return self.ds.labels()

    @property
    def reports(self) -> list:  # every report without rendering
        return [make_report(self.ds.patient(i)) for i in range(len(self))]

    def hu(self, i) -> torch.Tensor:
        """Volume i in HU (int16, CPU), rendered and stored at its first access."""
        if not self.done[i]:
            hu, _ = render_phantom(self.ds.patient(i), self.shape, self.ds.device)
            self.volumes[i] = hu.round().to(torch.int16).cpu().numpy()  # shared mapping: a killed process keeps it
            self.done[i] = 1
        return torch.from_numpy(np.array(self.volumes[i]))

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} synthetic volumes")
        p, ds = self.ds.patient(i), self.ds
        return dict(volume=normalize(self.hu(i), ds.window, ds.norm)[None],
                    labels=torch.tensor(p["labels"], dtype=torch.float32), report=make_report(p),
                    name=f"{ds.split}_{i + 1}_a_1", questions=make_questions(p))


def reports_of(ds) -> list:
    """Every report of a split without reading volumes where the dataset allows it (cached list, PreparedCT, CTRATE)."""
    if isinstance(ds, list):
        return [it["report"] for it in ds]
    if isinstance(ds, SyntheticCT):
        return [make_report(ds.patient(i)) for i in range(len(ds))]
    return list(ds.reports) if hasattr(ds, "reports") else [r["report"] for r in ds.rows]


def questions_in(ds) -> list:
    """Every question dict of a split's items without rendering (synthetic: made from its patients); real data has
    none."""
    if isinstance(ds, list):
        return [q for it in ds for q in it.get("questions", [])]
    if isinstance(ds, SyntheticCT):
        return [q for i in range(len(ds)) for q in make_questions(ds.patient(i))]
    return []


def labels_of(ds) -> torch.Tensor:
    """(n, 18) labels of a split, without reading volumes where the dataset allows it."""
    if isinstance(ds, list):
        return torch.stack([it["labels"] for it in ds])
    labels = getattr(ds, "labels", None)  # SyntheticCT, SyntheticDiskCache: labels(); PreparedCT: a tensor
    if labels is not None:
        return labels() if callable(labels) else labels
    return torch.stack([r["labels"] for r in ds.rows])  # CTRATE


def get_dataset(data, split, *, n=None, shape=(64, 128, 128), spacing=(1.5, 0.75, 0.75), window=(-1000, 200),
                norm="unit", seed=0, strict=False, difficulty=0.5, device=None, disk_cache=None):
    """data = "synthetic" (n volumes generated at shape), a prepare()d cache folder (has index.json), or a CT-RATE
    root. n, difficulty, device and disk_cache apply to the synthetic set only; real data yields every volume of
    the split. device: where phantoms are rendered (the training GPU keeps the CPU out of the loop; items then
    live there). disk_cache: a folder, or True for SYNTHETIC_CACHE -> SyntheticDiskCache, every volume rendered
    once into an int16 memmap there, for a split too large to keep in RAM."""
    if data == "synthetic":
        ds = SyntheticCT(split, n, shape=shape, seed=seed, window=window, norm=norm, difficulty=difficulty,
                         device=device)
        return SyntheticDiskCache(ds, SYNTHETIC_CACHE if disk_cache is True else disk_cache) if disk_cache else ds
    if (Path(data) / "index.json").is_file():
        ds = PreparedCT(data, split, window=window, norm=norm)
        if ds.shape != tuple(shape):
            raise ValueError(f"{data} was prepared at shape {ds.shape}, asked for {tuple(shape)}: pass --shape "
                             f"{','.join(map(str, ds.shape))} or prepare again")
        return ds
    if not Path(data).is_dir():
        raise FileNotFoundError(f"{data}: not 'synthetic', a prepared cache or a CT-RATE folder")
    return CTRATE(data, split, shape=shape, spacing=spacing, window=window, norm=norm, strict=strict)


def collate(items: list) -> dict:
    """Tensors stacked on a new batch dim, everything else (names, reports, questions) as lists."""
    return {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k]) else [it[k] for it in items]
            for k in items[0]}


# =============================================================================
# Text
# =============================================================================

# ---- byte-level BPE, the Llama-3 tokenizer ---------------------------------------------------------------------------

# Llama-3's pre-tokenisation pattern (cl100k's): contractions, letter runs with one leading non-letter, 1-3 digit
# groups, punctuation runs, newlines, and whitespace that leaves its last space to the following word.
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The decoders' special tokens; their ids follow the BPE ranks (begin = n_ranks, end = n_ranks + 1, ...).
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|image|>"]


@functools.lru_cache(maxsize=1)
def _pretokenizer() -> re.Pattern:
    """LLAMA3_PAT for Python's `re`, which has no \\p{..}: the classes are spelled out from unicodedata.

    tiktoken splits with the same pattern in Rust at encode time but exposes no "split only" call, and the `regex`
    module is not a dependency of this repo, so training splits with this translation. \\s is Unicode White_Space
    (what Rust's regex uses; Python's own \\s would also match \\x1c-\\x1f). Code points assigned after Python's
    Unicode version (14.0 in Python 3.11) count as unassigned here; that moves only training statistics, as
    encoding is tiktoken's own. tests/test_text.py holds this splitter to the `regex` module (tiktoken's own
    dependency) on every assigned code point, and to tiktoken by comparing whole encodings.
    """
    def spans(pred):  # "[a-zA-Z...]"-style ranges of every code point with pred(category)
        out, start = [], None
        for cp in range(0x110001):
            inside = cp < 0x110000 and pred(unicodedata.category(chr(cp)))
            if inside and start is None:
                start = cp
            elif not inside and start is not None:
                out.append(re.escape(chr(start)) + ("-" + re.escape(chr(cp - 1)) if cp - 1 > start else ""))
                start = None
        return "".join(out)
    L, N = spans(lambda c: c[0] == "L"), spans(lambda c: c[0] == "N")
    S = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
    return re.compile(rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]{{1,3}}| ?[^{S}{L}{N}]+[\r\n]*"
                      rf"|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")


def _bpe_encoding(ranks: dict, name: str) -> tiktoken.Encoding:
    n = len(ranks)
    return tiktoken.Encoding(name, pat_str=LLAMA3_PAT, mergeable_ranks=ranks,
                             special_tokens={tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)})


def train_bpe(texts, vocab_size: int) -> tiktoken.Encoding:
    """Byte-level BPE (GPT-2/minbpe style) on Llama-3's pre-tokenisation; returns a tiktoken.Encoding.

    vocab_size counts everything: 256 bytes + merges + len(SPECIAL_TOKENS) (= enc.n_vocab, or fewer if the
    corpus runs out of pairs). Training is incremental: the text is split once into chunks, each unique chunk is
    kept with its frequency, pair counts are updated only for the chunks a merge touches, and the most frequent pair
    comes off a heap with lazy deletion (ties -> smallest token ids). Example: the chunk "aaab" has pairs
    {(a, a): 2, (a, b): 1} -> merge "aa" (rank 256); then [aa, a, b] ties (aa, a) with (a, b) -> "ab" (257, the
    smaller ids); then [aa, ab] -> "aaab" (258).
    A merge whose bytes already are a token (a + bc when ab + c made abc) reuses that token, as tiktoken merges by
    the rank of the concatenated bytes; so ranks stay unique and the encoder applies the merges in training order.
    """
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    assert n_merges >= 0, f"vocab_size={vocab_size} must be at least 256 bytes + {len(SPECIAL_TOKENS)} specials"
    split = _pretokenizer().findall
    chunks = collections.Counter(c for t in texts for c in split(t))
    words = [list(c.encode("utf-8")) for c in chunks]
    freq = list(chunks.values())
    vocab = [bytes([b]) for b in range(256)]  # id -> bytes
    ranks = {b: i for i, b in enumerate(vocab)}  # bytes -> id (= rank)
    pairs, where = collections.Counter(), collections.defaultdict(set)
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += freq[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    merges = 0
    while merges < n_merges and heap:
        c, p = heapq.heappop(heap)
        if -c != pairs.get(p, 0) or c == 0:  # stale heap entry
            continue
        merged = vocab[p[0]] + vocab[p[1]]
        if merged not in ranks:
            ranks[merged] = len(vocab)
            vocab.append(merged)
            merges += 1
        new = ranks[merged]
        changed = set()
        for i in where.pop(p):
            w, out, j = words[i], [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == p:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            if len(out) == len(w):  # p left this word in an earlier merge
                continue
            for q in zip(w, w[1:]):
                pairs[q] -= freq[i]
                changed.add(q)
            for q in zip(out, out[1:]):
                pairs[q] += freq[i]
                where[q].add(i)
                changed.add(q)
            words[i] = out
        pairs.pop(p, None)
        for q in changed - {p}:
            if pairs[q] > 0:
                heapq.heappush(heap, (-pairs[q], q))
    return _bpe_encoding(ranks, f"bpe{len(ranks) + len(SPECIAL_TOKENS)}")


def save_bpe(enc: tiktoken.Encoding, path):
    """tiktoken's (and Meta's tokenizer.model) format: one "base64(token bytes) rank" line per rank."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (f"{base64.b64encode(tok).decode()} {r}\n" for tok, r in sorted(enc._mergeable_ranks.items(),
                                                                             key=lambda kv: kv[1]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)


def _read_ranks(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer file here (expected 'base64 rank' lines, tiktoken format)")
    ranks = {}
    for k, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{k}: expected 'base64token rank', found {line[:60]!r}") from e
    return ranks


def load_bpe(path) -> tiktoken.Encoding:
    return _bpe_encoding(_read_ranks(path), Path(path).stem)


def load_llama3_tokenizer(path) -> tiktoken.Encoding:
    """Meta's Llama-3 `tokenizer.model` (tiktoken format) with tiktoken alone, as meta-llama/llama-models does.

    Special ids are offsets from the number of ranks (num_base_tokens); the real file has 128000 ranks, so
    <|begin_of_text|> = 128000, <|end_of_text|> = 128001, <|finetune_right_pad_id|> = 128004, <|start_header_id|> =
    128006, <|end_header_id|> = 128007, <|eom_id|> = 128008, <|eot_id|> = 128009, <|python_tag|> = 128010, and
    256 specials in all (n_vocab 128256). Names follow Llama 3.1 (128005 and 128011.. are reserved tokens; Llama
    3.2's code calls 128005 <|step_id|> and 128011 <|image|>, with the same ids for every named control token).
    """
    ranks = _read_ranks(path)
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    names += [f"<|reserved_special_token_{3 + i}|>" for i in range(256 - len(names))]
    n = len(ranks)
    return tiktoken.Encoding(Path(path).name, pat_str=LLAMA3_PAT, mergeable_ranks=ranks,
                             special_tokens={tok: n + i for i, tok in enumerate(names)})


# =============================================================================
# Metrics
# =============================================================================

def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def auroc(y_true, y_score) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic with average ranks for ties (sklearn's value):
    AUC = (sum of positive ranks - P(P+1)/2) / (P N). nan when the labels hold one class."""
    y, s = _np(y_true).ravel().astype(bool), _np(y_score).ravel().astype(np.float64)
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        return float("nan")
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based mean rank of each distinct score
    return float((avg_rank[inv][y].sum() - P * (P + 1) / 2) / (P * N))


def best_f1_thresholds(y_true, y_score) -> np.ndarray:
    """Per label column, the score t maximising F1 of (score >= t) on these (validation) rows; ties -> higher t.
    A column without positives gets a t above its top score (predict all negative)."""
    y, s = _np(y_true).astype(bool), _np(y_score).astype(np.float64)
    th = np.empty(y.shape[1])
    for l in range(y.shape[1]):
        order = np.argsort(-s[:, l], kind="stable")
        sl, yl = s[order, l], y[order, l]
        P = yl.sum()
        if P == 0:
            th[l] = np.nextafter(sl[0], np.inf)
            continue
        cut = np.r_[sl[1:] != sl[:-1], True]  # last row of each distinct score: every t = a score
        tp = np.cumsum(yl)[cut]
        n_pos_pred = np.flatnonzero(cut) + 1
        th[l] = sl[cut][np.argmax(2 * tp / (n_pos_pred + P))]  # F1 = 2TP / (predicted + actual positives)
    return th


def classification_metrics(y_true, y_score, thresholds, labels=None) -> dict:
    """Multi-label metrics as in CT-Scroll Table 1 / the fusion paper's Table 2: per label auroc, accuracy,
    precision, recall, f1 at `thresholds` (score >= t), their means over labels, and weighted_f1 (by support).

    Per label, undefined is nan: auroc with one class in the split, precision with no predicted positives, recall
    and f1 with no actual positives; `undefined` lists those labels. The headline means are the published ones,
    sklearn's average="macro" / "weighted" with zero_division=0: an undefined precision, recall or f1 counts as 0
    (a label with no positives here still weighs 1/L in the macro mean; in weighted_f1 its support 0 weighs
    nothing). auroc has no zero_division: its mean leaves out the labels with one class.
    """
    y, s = _np(y_true).astype(bool), _np(y_score).astype(np.float64)
    pred = s >= np.asarray(thresholds, dtype=np.float64)[None, :]
    names = list(labels) if labels is not None else (LABELS if y.shape[1] == len(LABELS)
                                                      else [str(i) for i in range(y.shape[1])])
    tp, fp, fn = (pred & y).sum(0), (pred & ~y).sum(0), (~pred & y).sum(0)
    support = y.sum(0)
    div = lambda a, b: np.where(b > 0, a / np.maximum(b, 1), np.nan)
    per = {"auroc": np.array([auroc(y[:, l], s[:, l]) for l in range(y.shape[1])]),
           "accuracy": (pred == y).mean(0), "precision": div(tp, tp + fp), "recall": div(tp, tp + fn),
           "f1": np.where(support > 0, div(2 * tp, 2 * tp + fp + fn), np.nan)}
    out = {"auroc": float(np.nanmean(per["auroc"])) if np.isfinite(per["auroc"]).any() else float("nan"),
           **{k: float(np.nan_to_num(per[k], nan=0.0).mean()) for k in ("accuracy", "precision", "recall", "f1")}}
    f1 = np.nan_to_num(per["f1"], nan=0.0)
    out["weighted_f1"] = float((f1 * support).sum() / support.sum()) if support.sum() > 0 else 0.0
    out["per_label"] = {n: {**{k: float(v[l]) for k, v in per.items()}, "support": int(support[l])}
                        for l, n in enumerate(names)}
    out["undefined"] = {k: [n for n, x in zip(names, v) if not np.isfinite(x)] for k, v in per.items()}
    return out


def bootstrap_auroc(y_true, y_score, n=1000, seed=0) -> tuple:
    """95% bootstrap interval of the macro AUROC (labels whose resample holds one class left out, as in
    classification_metrics): the 2.5th and 97.5th percentiles over n test sets of the same size resampled with
    replacement, i.e. how far the number could move on another test set (small synthetic test sets move it a lot)."""
    y, p = _np(y_true), _np(y_score)
    g, stats = np.random.default_rng(seed), []
    for _ in range(n):
        idx = g.integers(0, len(y), len(y))
        aucs = [auroc(y[idx, k], p[idx, k]) for k in range(y.shape[1])]
        stats.append(np.nanmean(aucs) if not np.isnan(aucs).all() else np.nan)
    lo, hi = np.nanpercentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_diff(correct_a, correct_b, n=1000, seed=0) -> tuple:
    """95% paired bootstrap interval of mean(a) - mean(b), two models' per-question 0/1 correctness on the SAME
    questions: the questions are resampled with replacement, both models keep their answers to each one."""
    a, b = _np(correct_a).astype(float), _np(correct_b).astype(float)
    assert a.shape == b.shape and len(a) > 0, "paired bootstrap needs both models' scores on the same questions"
    idx = np.random.default_rng(seed).integers(0, len(a), (n, len(a)))
    lo, hi = np.percentile((a[idx] - b[idx]).mean(1), [2.5, 97.5])
    return float(lo), float(hi)


# ---- report metrics. One tokenisation for all of them: lowercase, words and decimal numbers kept whole, every
# punctuation mark its own token ("3.5 mm nodule." -> 3.5 mm nodule .). Then each metric as its reference code.

def metric_tokens(text: str) -> list:
    return re.findall(r"\d+(?:\.\d+)?|\w+|[^\w\s]", text.lower())


def _ngrams(w, n) -> collections.Counter:
    return collections.Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))


def bleu(hyps, refs, n=4) -> list:
    """Corpus BLEU-1..n as pycocoevalcap's BleuScorer(option='closest'): clipped n-gram counts summed over the
    corpus, reference length = the reference closest in length to each hypothesis (ties -> shorter), brevity
    penalty exp(1 - r/c) when c < r, and its smoothing (correct + 1e-15) / (guess + 1e-9)."""
    tiny, small = 1e-15, 1e-9
    correct, guess, c_len, r_len = [0] * n, [0] * n, 0, 0
    for h, rs in zip(hyps, refs):
        c_len += len(h)
        r_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for k in range(1, n + 1):
            clip = functools.reduce(lambda a, b: a | b, (_ngrams(r, k) for r in rs))  # max count over refs
            correct[k - 1] += sum(min(c, clip[g]) for g, c in _ngrams(h, k).items())
            guess[k - 1] += max(0, len(h) - k + 1)
    ratio = (c_len + tiny) / (r_len + small)
    bp = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    out, prod = [], 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        out.append(bp * prod ** (1 / (k + 1)))
    return out


def meteor(h, rs, alpha=0.9, beta=3.0, gamma=0.5) -> float:
    """nltk's meteor_score with exact matching only (max over references). nltk aligns greedily: hypothesis words
    from the last, each to the last unmatched equal reference word. Fmean = PR / (alpha P + (1 - alpha) R),
    penalty = gamma (chunks / matches)^beta, where a chunk is a run of matches adjacent in both sentences.
    nltk's Porter-stem and WordNet-synonym stages (and Java METEOR's paraphrases) need nltk + WordNet, which are
    not dependencies here, so scores are <= nltk's whenever stems or synonyms would have matched."""
    best = 0.0
    for r in rs:
        hyp, ref, m = list(enumerate(h)), list(enumerate(r)), []
        for i in reversed(range(len(hyp))):
            for j in reversed(range(len(ref))):
                if hyp[i][1] == ref[j][1]:
                    m.append((hyp.pop(i)[0], ref.pop(j)[0]))
                    break
        if not m:
            continue
        m.sort()
        P, R = len(m) / len(h), len(m) / len(r)
        chunks = 1 + sum(not (b[0] == a[0] + 1 and b[1] == a[1] + 1) for a, b in zip(m, m[1:]))
        best = max(best, (1 - gamma * (chunks / len(m)) ** beta) * P * R / (alpha * P + (1 - alpha) * R))
    return best


def rouge_n(h, rs, n) -> float:
    """Google rouge-score's ROUGE-N F-measure (clipped n-gram overlap; max F over references)."""
    best, hc = 0.0, _ngrams(h, n)
    for r in rs:
        rc = _ngrams(r, n)
        overlap = sum((hc & rc).values())
        p, rec = overlap / max(sum(hc.values()), 1), overlap / max(sum(rc.values()), 1)
        best = max(best, 2 * p * rec / (p + rec) if p + rec > 0 else 0.0)
    return best


def _lcs(a, b) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyro 2004): one big-int row of the DP table per
    token of a; bit j of v is 0 where the row steps up, so LCS = zeros in v. tests/test_metrics.py: same as the DP."""
    match = {}
    for j, y in enumerate(b):
        match[y] = match.get(y, 0) | 1 << j
    v = full = (1 << len(b)) - 1
    for x in a:
        u = v & match.get(x, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - bin(v).count("1")


def rouge_l(h, rs, beta=1.2) -> float:
    """pycocoevalcap's Rouge: LCS precision and recall, each maximised over references, F with beta = 1.2."""
    if not h:
        return 0.0
    lcs = [_lcs(r, h) for r in rs]
    p = max(l / len(h) for l in lcs)
    r = max(l / len(ref) if ref else 0.0 for l, ref in zip(lcs, rs))
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p > 0 and r > 0 else 0.0


def cider_d(hyps, refs, n=4, sigma=6.0) -> list:
    """Per-hypothesis CIDEr-D as pycocoevalcap's CiderScorer: tf-idf n-gram vectors (idf = log(#images) -
    log(max(1, df)), df = images whose references contain the n-gram), for each n the cosine with clipping
    sum min(h, r) r / (|h| |r|) (0 when a norm is 0), times exp(-delta^2 / (2 sigma^2)), averaged over n = 1..4,
    over references, and x10. Like pycocoevalcap, delta counts bigrams (len - 1), not words."""
    grams_of = lambda w: sum((_ngrams(w, k) for k in range(1, n + 1)), collections.Counter())
    ref_grams = [[grams_of(r) for r in rs] for rs in refs]
    df = collections.Counter(g for grams in ref_grams for g in set().union(*grams))
    log_n = math.log(len(refs))

    def vec(grams):
        v = [{} for _ in range(n)]
        for g, tf in grams.items():
            v[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(x * x for x in vk.values())) for vk in v]
        return v, norms, sum(tf for g, tf in grams.items() if len(g) == 2)

    scores = []
    for h, grams in zip(hyps, ref_grams):
        vh, nh, lh = vec(grams_of(h))
        total = 0.0
        for g in grams:
            vr, nr, lr = vec(g)
            pen = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            total += sum(sum(min(x, vr[k].get(t, 0.0)) * vr[k].get(t, 0.0) for t, x in vh[k].items())
                         / (nh[k] * nr[k]) * pen if nh[k] and nr[k] else 0.0 for k in range(n)) / n
        scores.append(10.0 * total / len(grams))
    return scores


def report_metrics(predictions, references) -> dict:
    """The nine report-generation metrics of HILT Sec. 4.2 and their mean (HILT's "averaged metric").
    predictions: list of strings; references: one list of reference strings per prediction (a bare string is
    taken as a single reference). Every metric is a corpus mean of [0, 1] scores except CIDEr-D (x10 scale)."""
    assert len(predictions) == len(references) > 0, "one list of references per prediction"
    hyps = [metric_tokens(p) for p in predictions]
    refs = [[metric_tokens(r) for r in ([rs] if isinstance(rs, str) else rs)] for rs in references]
    out = dict(zip(["bleu1", "bleu2", "bleu3", "bleu4"], bleu(hyps, refs)))
    out["meteor"] = float(np.mean([meteor(h, rs) for h, rs in zip(hyps, refs)]))
    out["rouge1"] = float(np.mean([rouge_n(h, rs, 1) for h, rs in zip(hyps, refs)]))
    out["rouge2"] = float(np.mean([rouge_n(h, rs, 2) for h, rs in zip(hyps, refs)]))
    out["rougeL"] = float(np.mean([rouge_l(h, rs) for h, rs in zip(hyps, refs)]))
    out["cider"] = float(np.mean(cider_d(hyps, refs)))
    out["mean"] = float(np.mean(list(out.values())))
    return out


def _vqa_norm(s: str) -> str:
    s = re.sub(r"[^\w\s]", " ", s.lower())
    return " ".join(w for w in s.split() if w not in ("a", "an", "the"))


def vqa_closed_accuracy(preds, answers) -> float:
    """Exact match after normalisation (lowercase, punctuation and the articles a/an/the removed), for closed
    (yes/no) questions; open answers are scored with report_metrics."""
    assert len(preds) == len(answers) > 0
    return float(np.mean([_vqa_norm(p) == _vqa_norm(a) for p, a in zip(preds, answers)]))


def choice_correct(pred: str, answer: str) -> bool:
    """M3D's multiple-choice rule: correct when the answer's letter followed by "." appears in the generated text.
    `answer` is the letter ("B") or the full option ("B. Left lower lobe")."""
    return f"{answer.strip()[0].upper()}." in pred


# ---- clinical efficacy (CE): the 18 findings read back out of a report, scored against the scan's labels, the way
# CT2Rep / CT-CHAT / RadFM report it (CT-RATE's labels come from a trained text classifier run over the reports).

_NEG_BEFORE = re.compile(r"\b(?:no|not|without|neither|nor|free of|negative for|absence of|rule out|ruled out)\b")
_NEG_AFTER = re.compile(r"^[^.]{0,40}?\b(?:(?:is|are|was|were) (?:not|absent)|not (?:seen|detected|observed|present|"
                        r"identified)|absent|ruled out)\b")
_NEG_STOP = re.compile(r"\b(?:but|however|although|though|except|whereas|while)\b")
_CALCIFIC = r"(?:calcif\w*|atheroscleros\w*|atherosclerotic|atherom\w*|plaques?)"
# Per label: the phrase that mentions the finding, and (optionally) a phrase the same sentence must also hold.
_TRIGGERS = {
    "Medical material": (r"catheter|sternotom\w*|pacemaker|medical (?:device|material)|stent|prosthe\w*|"
                         r"(?:chest|endotracheal|nasogastric|tracheostomy) tube|surgical clips?", None),
    "Arterial wall calcification": (_CALCIFIC, r"aort"),
    "Cardiomegaly": (r"cardiomegal\w*|heart (?:size )?(?:is )?(?:enlarged|increased)|enlarged heart|"
                     r"increased (?:heart|cardiac) size|cardiac enlargement", None),
    "Pericardial effusion": (r"pericardial (?:effusion|fluid)", None),
    "Coronary artery wall calcification": (_CALCIFIC, r"coronar"),
    "Hiatal hernia": (r"hiat(?:al|us) hernia", None),
    "Lymphadenopathy": (r"lymphadenopath\w*|enlarged (?:\w+ )?lymph nodes?|lymph nodes? (?:are |is )?enlarged|"
                        r"pathologic(?:al)?(?:ly)? (?:enlarged |sized? )?lymph nodes?", None),
    "Emphysema": (r"emphysem\w*", None),
    "Atelectasis": (r"atelecta\w*", None),
    "Lung nodule": (r"\w*nodul\w*", None),
    "Lung opacity": (r"ground[- ]glass|opacit\w*|opacification", None),
    "Pulmonary fibrotic sequela": (r"fibro(?:tic|sis|us)|sequela\w*", None),
    "Pleural effusion": (r"pleural (?:effusion|fluid)|hydrothorax", None),
    "Mosaic attenuation pattern": (r"mosaic", None),
    "Peribronchial thickening": (r"peribronchial (?:wall )?thicken\w*|bronchial walls? (?:are |is )?thicken\w*|"
                                 r"bronchial wall thickening", None),
    "Consolidation": (r"consolidat\w*", None),
    "Bronchiectasis": (r"bronchiectas\w*|dilated bronchi|bronchial dilat\w*", None),
    "Interlobular septal thickening": (r"interlobular sept\w*|septal thicken\w*", None),
}
_TRIGGER_RE = [(re.compile(r"\b(?:" + t + r")\b"), re.compile(c) if c else None)
               for t, c in (_TRIGGERS[name] for name in LABELS)]


def _negated(sentence: str, start: int, end: int) -> bool:
    """NegEx-style: a negation cue at most 6 words before the mention (no 'but'/'however'... between them), or a
    post-negation ('... is not seen', '... absent') right after it, in the same sentence."""
    before = sentence[:start]
    cut = max((m.end() for m in _NEG_STOP.finditer(before)), default=0)
    window = " ".join(before[cut:].split()[-6:])
    return bool(_NEG_BEFORE.search(window) or _NEG_AFTER.match(sentence[end:]))


def report_labels(texts: list) -> np.ndarray:
    """The 18 findings (data.LABELS order) read out of each report: (n, 18) int, 1 = called present.

    A keyword + negation labeler: per sentence, each finding's trigger phrases (e.g. "pleural effusion", "hiatal
    hernia", calcification + "coronary"), negated by a cue up to 6 words before the phrase ("no", "without", "free
    of", ... not across "but"/"however") or right after it ("is not seen", "absent"). Rules:
      - a finding is 1 if ANY sentence mentions it affirmatively; a finding both affirmed and negated (e.g. "no
        effusion on the left. A small effusion on the right.") is therefore 1 (present somewhere);
      - a finding never mentioned, or only negated, is 0; the empty string and text holding none of the English
        trigger phrases (e.g. CT-RATE's Turkish originals) give all zeros: it reads English only;
      - hedged mentions ("possible", "suspicious for") count as present.
    Exact on the synthetic phantom's reports (make_report: every paraphrase and negation; tests/test_clinical.py
    checks >= 500 patients across splits). On real CT-RATE text it is approximate: CT-RATE's own labels come from a
    trained text classifier (a fine-tuned RadBERT), and this rule-based reader has only been measured on the
    synthetic reports, as no real report is available here."""
    if isinstance(texts, str):
        raise TypeError("report_labels takes a list of reports, got a single string")
    out = np.zeros((len(texts), len(LABELS)), dtype=np.int64)
    for i, text in enumerate(texts):
        for sentence in re.split(r"(?<=[.!?;])\s+|\n+", text.lower()):
            for k, (trigger, context) in enumerate(_TRIGGER_RE):
                if out[i, k] or (context is not None and not context.search(sentence)):
                    continue
                if any(not _negated(sentence, m.start(), m.end()) for m in trigger.finditer(sentence)):
                    out[i, k] = 1
    return out


def clinical_metrics(generated, reference_labels) -> dict:
    """CE metrics of generated reports against the scans' labels: per finding precision, recall, F1 (of the
    finding being called present), their macro means over the 18 findings, and micro_f1 over all (report,
    finding) pairs. generated: a list of report texts (read with report_labels) or an (n, 18) 0/1 array (for
    baselines); reference_labels: (n, 18) 0/1. Definitions as sklearn's precision_recall_fscore_support with
    average="macro" (every finding counts, also one absent from the test split) and zero_division=0 (a ratio with
    a zero denominator is 0), which is what CT2Rep / CT-CHAT tables use; micro_f1 = 2 TP / (2 TP + FP + FN)."""
    pred = report_labels(generated) if isinstance(generated, (list, tuple)) else _np(generated)
    y = _np(reference_labels)
    if len(pred) != len(y):
        raise ValueError(f"clinical_metrics: {len(pred)} generated reports but {len(y)} reference label rows")
    pred, y = pred.astype(bool).reshape(len(y), -1), y.astype(bool).reshape(len(y), -1)
    if pred.shape != y.shape:
        raise ValueError(f"clinical_metrics: generated labels {pred.shape} vs reference labels {y.shape}")
    tp, fp, fn = (pred & y).sum(0), (pred & ~y).sum(0), (~pred & y).sum(0)
    div = lambda a, b: np.where(b > 0, a / np.maximum(b, 1), 0.0)
    p, r, f = div(tp, tp + fp), div(tp, tp + fn), div(2 * tp, 2 * tp + fp + fn)
    names = LABELS if y.shape[1] == len(LABELS) else [str(i) for i in range(y.shape[1])]
    T, FP, FN = int(tp.sum()), int(fp.sum()), int(fn.sum())
    return {"precision": float(p.mean()), "recall": float(r.mean()), "f1": float(f.mean()),
            "micro_f1": 2 * T / (2 * T + FP + FN) if T + FP + FN else 0.0,
            "per_label": [{"label": n, "precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]),
                           "support": int(y[:, k].sum())} for k, n in enumerate(names)]}


def ce_baselines(train_labels, test_labels, seed=0) -> dict:
    """clinical_metrics of three image-blind callers on the test labels: "all_normal" (nothing called: the most
    frequent report), "prevalence_random" (each finding called with its training-set prevalence, numpy rng `seed`)
    and "all_positive" (everything called: per finding F1 = 2p / (1 + p) with p its test prevalence, the best F1
    any image-blind caller reaches on that finding). A model reads the image where it beats these per finding."""
    y_train, y = _np(train_labels).astype(np.float64), _np(test_labels)
    random = np.random.default_rng(seed).random(y.shape) < y_train.mean(0)[None, :]
    return {"all_normal": clinical_metrics(np.zeros(y.shape, dtype=np.int64), y),
            "prevalence_random": clinical_metrics(random.astype(np.int64), y),
            "all_positive": clinical_metrics(np.ones(y.shape, dtype=np.int64), y)}


# =============================================================================
# Runs: checkpoints, DDP, logs — the plumbing every training loop shares
# =============================================================================

def save_checkpoint(path, state: dict):
    """Write to a temp file, then rename: a kill mid-save never corrupts the last good checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu", mmap=False) -> dict:
    """A checkpoint is data, not code: weights_only=True. mmap: tensors are read from disk only when touched (to read
    a step count without loading the weights)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here; train first or point --out_dir at the run to resume")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, not a checkpoint, or a pickle that needs code (refused by weights_only)
        raise BadVolume(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def setup_ddp(device: str):
    """Detect torchrun from the RANK variable, as nanoGPT does. Returns (ddp, rank, world_size, device, master)."""
    if int(os.environ.get("RANK", -1)) < 0:
        return False, 0, 1, device, True
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True, rank, world, device, rank == 0


def append_jsonl(path, record: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class StopOnSigint:
    """The first Ctrl-C sets `.stop` so the loop can save and exit cleanly; a second one kills as usual."""

    def __init__(self):
        self.stop = False

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, *_):
        if self.stop:
            raise KeyboardInterrupt
        print("\nSIGINT: saving a checkpoint, then stopping (Ctrl-C again to abort)")
        self.stop = True

    def __exit__(self, *_):
        signal.signal(signal.SIGINT, self._old)


# Dense (no sparsity) bf16 tensor-core peak FLOP/s from the vendors' spec sheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("L4", 121e12), ("RTX 6000 Ada", 364e12), ("A6000", 155e12), ("4090", 165e12), ("A10", 125e12)]


def _matmul_flops(device, dtype, n: int, reps: int = 5) -> float:  # best of `reps` n^3 matmuls, FLOP/s
    g = torch.Generator(device).manual_seed(0)  # a private generator: measuring must not move the run's RNG
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


@functools.lru_cache(maxsize=None)
def peak_flops(device="cpu", dtype=torch.bfloat16) -> tuple:
    """(FLOP/s, where the number comes from): what MFU is reported against on this device, never another's.
    CUDA in bf16/fp16: the spec sheet's dense peak for the device's name (PEAK_BF16); a GPU not in the table or
    another dtype: a 4096^3 matmul measured now. CPU: a 1024^3 fp32 matmul measured once (at the first call, with
    the threads torch has then), so CPU MFU reads as "share of what this machine's matmul reaches"."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        if dtype in (torch.bfloat16, torch.float16):
            for key, peak in PEAK_BF16:
                if key in name:
                    return peak, f"{name} bf16 dense spec"
        return _matmul_flops(dev, dtype, 4096), f"{name} {str(dtype)[6:]} matmul measured"
    return _matmul_flops(dev, torch.float32, 1024), f"CPU fp32 matmul measured, {torch.get_num_threads()} threads"


class StepTimer:
    """Training time split into data wait (inside `with timer.data():`: rendering, reading, collate, the copy to
    the device) and compute (the rest of the step: forward, backward, optimizer), turned into the log line's
    numbers. On CUDA it synchronises at both edges of the data section, so queued compute kernels are not billed
    to data and a phantom rendered on the GPU is. flops_per_sample: model FLOPs of one training sample (forward
    x 3, recomputation by activation checkpointing not counted), 0 = no TFLOP/s and MFU."""

    def __init__(self, device, flops_per_sample: float = 0.0, dtype=torch.bfloat16):
        self.device, self.cuda = str(device), "cuda" in str(device)
        self.flops, self.dtype = flops_per_sample, dtype
        self.reset()

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset(self):
        self._sync()
        self.t0, self.data_s, self.steps, self.samples = time.perf_counter(), 0.0, 0, 0

    def data(self):  # `with timer.data(): batch = ...`
        return self

    def __enter__(self):
        self._sync()
        self._t = time.perf_counter()

    def __exit__(self, *_):
        self._sync()
        self.data_s += time.perf_counter() - self._t

    def step(self, samples: int):
        self.steps, self.samples = self.steps + 1, self.samples + samples

    def stats(self) -> dict:
        """Means since the last reset(): step, data and compute ms per step, data share, samples/s, TFLOP/s, MFU,
        and on CUDA the peak torch.cuda.max_memory_allocated (GB) of the run so far."""
        self._sync()
        dt, n = time.perf_counter() - self.t0, max(1, self.steps)
        rec = {"step_ms": 1000 * dt / n, "data_ms": 1000 * self.data_s / n, "compute_ms": 1000 * (dt - self.data_s) / n,
               "data_frac": self.data_s / dt, "samples_per_s": self.samples / dt}
        if self.flops:
            peak, _ = peak_flops(self.device if self.cuda else "cpu", self.dtype if self.cuda else torch.float32)
            rec["tflops"] = self.flops * self.samples / dt / 1e12
            rec["mfu"], rec["peak_tflops"] = rec["tflops"] * 1e12 / peak, peak / 1e12
        if self.cuda:
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return rec

    @staticmethod
    def line(rec: dict) -> str:
        """stats() in a few words: 'step 812 ms (data 5%) 4.93 vol/s 120 TFLOP/s MFU 12.1% of 989 peak 20.1 GB'."""
        s = f"step {rec['step_ms']:.0f} ms (data {rec['data_frac']:.0%}) {rec['samples_per_s']:.3g} vol/s"
        if "mfu" in rec:
            s += f" {rec['tflops']:.3g} TFLOP/s MFU {rec['mfu']:.1%} of {rec['peak_tflops']:.4g}"
        return s + (f" peak {rec['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in rec else "")


# ---- the training loop's shared parts: every script's train() is nanoGPT's loop built from these -------------------

class Stream(torch.utils.data.Sampler):
    """The training batches, as a DataLoader batch_sampler. Micro-batch k (k = step * grad_accum + micro_step) of
    rank r holds positions (k * world + r) * micro ... + micro of an endless stream of shuffled epochs, epoch e being
    randperm(n) under the seed seed * 1000 + e. A function of (seed, position) alone: a run resumed at step s draws
    exactly the batches the uninterrupted run would have drawn, and no two ranks share a position. `batch_size` in
    every script is per optimizer step: micro = batch_size // world // grad_accum items per micro-batch."""

    def __init__(self, n: int, micro: int, seed: int, start_step: int, max_steps: int, grad_accum: int = 1,
                 rank: int = 0, world: int = 1):
        self.n, self.micro, self.seed, self.ga, self.rank, self.world = n, micro, seed, grad_accum, rank, world
        self.first, self.last = start_step * grad_accum, max_steps * grad_accum  # micro-batch indices

    def __len__(self):
        return max(0, self.last - self.first)

    def __iter__(self):
        perm, epoch = None, -1
        for k in range(self.first, self.last):
            batch = []
            for pos in range((k * self.world + self.rank) * self.micro, (k * self.world + self.rank + 1) * self.micro):
                if pos // self.n != epoch:
                    epoch = pos // self.n
                    perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
                batch.append(int(perm[pos % self.n]))
            yield batch


def make_loader(ds, batch_sampler, collate_fn, num_workers: int, seed: int, pin_memory: bool = False,
                spawn: bool | None = None):
    """A DataLoader over ds. A list (volumes kept in RAM) is read in this process; a dataset object by num_workers
    processes. Its own generator: starting an iterator draws a worker seed, which must not come from the global RNG
    that dropout uses (an eval would shift the training run's dropout, and a resumed run would differ). A dataset that
    renders on the GPU gets spawned workers (spawn=None: whenever ds.device is CUDA; CUDA cannot start in a forked
    one): each renders whole batches on the GPU and hands them back on the CPU while the model trains (hilt on an
    H200: 1.23 instead of 1.63 s per step, for a CUDA context per worker; num_workers=0 renders in this process)."""
    on_gpu = "cuda" in str(getattr(ds, "device", None))
    spawn = on_gpu if spawn is None else spawn
    workers = 0 if isinstance(ds, list) else num_workers
    return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=workers,
                                       pin_memory=pin_memory and not (on_gpu and workers == 0),
                                       multiprocessing_context="spawn" if spawn and workers else None,
                                       generator=torch.Generator().manual_seed(seed))


def to_device(batch: dict, dev) -> dict:
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast_ctx(dtype: str, dev):
    """bf16/fp16 autocast on CUDA as --dtype says; fp32 on CPU (bf16 matmul is slow there)."""
    if "cuda" not in str(dev) or dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])


def wrap_model(raw, dev, ddp: bool, compile: bool = False, find_unused: bool = False):
    """torch.compile (optional), then DistributedDataParallel under torchrun. The loop trains the wrapped model and
    saves and evaluates the raw one."""
    model = torch.compile(raw) if compile else raw
    if ddp:
        ids = [torch.device(dev).index] if "cuda" in str(dev) else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
    return model


def optimizer_step(opt, params, grad_clip: float, bad_steps: int, step: int) -> int:
    """Clip the gradient norm to grad_clip (0: measure it only) and step, unless the norm is non-finite: then skip
    the step (a warning) and count it; 5 in a row stop the run. The gradients are already all-reduced, so every DDP
    rank takes the same decision. Returns the new count of consecutive bad steps."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if torch.isfinite(norm):
        opt.step()
        bad_steps = 0
    else:
        bad_steps += 1
        tqdm.write(f"warning: step {step}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
        if bad_steps >= 5:
            raise RuntimeError("5 non-finite steps in a row: stopping (lower --learning_rate?)")
    opt.zero_grad(set_to_none=True)
    return bad_steps


def gather_rng(ddp: bool, world: int) -> list:
    """Every rank's RNG state (a collective under DDP: all ranks call it), for the checkpoint."""
    states = [None] * world
    if ddp:
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return states


def restore_rng(states: list, rank: int):
    """This rank's RNG state from a checkpoint (a run resumed on another world size: rank r takes state r mod n)."""
    set_rng_state(states[rank % len(states)])


def log_eval(path, rec: dict):
    """One eval line: printed as key=value above the progress bar and appended to log.jsonl."""
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                        if v is not None))
    append_jsonl(path, rec)


def forward_flops(model, *args) -> float:
    """FLOPs of one forward model(*args), counted by torch.utils.flop_counter (2 per multiply-add; Triton kernels
    are not seen), in eval mode, without gradients and without advancing the RNG streams (exact resume holds)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    devices = [a.device for a in args if torch.is_tensor(a) and a.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices), torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()
        model(*args)
    model.train(was_training)
    return fc.get_total_flops()


def meta_memory(fn) -> int:
    """Peak bytes of tensors alive at once while fn() runs, for a model and inputs on the meta device (nothing is
    allocated): every storage an op creates counts with its size until no tensor holds it (checked before each op).
    Tensors that exist before fn() (parameters) are not counted, gradients created inside fn() are: add the
    parameters and the optimizer state."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    live, peak = {}, [0]  # storage id -> (weak reference, bytes)

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for key in [k for k, (ref, _) in live.items() if ref.expired()]:
                del live[key]
            out = func(*args, **(kwargs or {}))
            inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_flatten((args, kwargs))[0]
                      if torch.is_tensor(t)}
            for t in tree_flatten(out)[0]:
                if torch.is_tensor(t):  # a view or an in-place result shares an input's storage: not new memory
                    ref = StorageWeakRef(t.untyped_storage())
                    if ref.cdata not in inputs:
                        live.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes()))
            peak[0] = max(peak[0], sum(nb for _, nb in live.values()))
            return out

    with Track():
        fn()
    return peak[0]


def check_fits(build, dev, what: str, hint: str):
    """On CUDA, before a run starts: stop when even the memory a training step holds before its first activation
    (fp32 weights, gradients and AdamW's two moments of every trained parameter: 16 B; 2 B of every frozen one, the
    bf16 a Meta checkpoint ships in) exceeds the GPU's, rather than an out-of-memory error stages later. build() makes
    the model; it runs on the meta device, so nothing is allocated."""
    if torch.device(dev).type != "cuda":
        return
    with torch.device("meta"):
        params = list(build().parameters())
    need = sum(p.numel() * (16 if p.requires_grad else 2) for p in params)
    have = torch.cuda.get_device_properties(torch.device(dev)).total_memory
    if need > have:
        raise BadConfig(f"{what}: training needs at least {need / 1e9:.1f} GB (fp32 weights, gradients and AdamW "
                        f"states of {sum(p.numel() for p in params) / 1e6:.0f}M parameters) and this GPU has "
                        f"{have / 1e9:.1f} GB; {hint}")


# ======== Appendix: the phantom, its templates, the CLI. A reader of the scripts can stop here. ========


# =============================================================================
# Synthetic chest CT
# =============================================================================

# A procedural chest CT in continuous millimetre coordinates. Every structure is a signed distance (mm, < 0 inside)
# evaluated only inside its own bounding box and painted with a one-voxel partial-volume ramp, so one patient
# sampled at 64x128x128 or 256x512x512 is the same body. sample_patient() draws latent factors, anatomy, labels
# and attributes without touching voxels (cheap label statistics); render_phantom() turns them into HU + masks.

FOV = (360.0, 360.0, 360.0)  # mm, (z, y, x): z=0 most cranial, y=0 anterior, x=0 patient's right
REGIONS = {0: "other", 1: "right lung", 2: "left lung", 3: "heart", 4: "aorta", 5: "trachea and bronchi",
           6: "esophagus", 7: "bone", 8: "mediastinum", 9: "abdomen", 10: "pleura"}
# CT-RATE prevalences: the counts of Table 1 of Maestri's report (fusion2d3d.py's paper) over its 3,028 volumes.
PREVALENCE = [c / 3028 for c in (425, 909, 358, 269, 793, 425, 831, 586, 842, 1393, 1141, 783, 481, 268, 324,
                                 569, 307, 273)]
# Weights of the latent factors (age z-score, heart failure, infection) on each label's logit -> co-occurrence.
_LATENT_W = [(0.3, 0.8, 0.3), (1.5, 0.3, 0), (0.4, 2.5, 0), (0.2, 2.0, 0.3), (1.5, 0.5, 0), (0.6, 0, 0),
             (0.3, 0.5, 1.0), (0.9, 0, 0), (0.4, 1.0, 1.5), (0.5, 0, 0), (0.2, 0.8, 2.0), (0.7, 0, 0.5),
             (0.4, 2.5, 0.8), (0, 0.5, 0.5), (0, 0, 1.5), (0.2, 0.3, 2.5), (0.4, 0, 0.8), (0.2, 2.5, 0)]
_P_INFECTION = 0.3
_p_hf = lambda age: 1 / (1 + math.exp(2.0 - 0.7 * age))  # heart failure grows with age
_SPLIT_ID = {"train": 0, "val": 1, "test": 2}
LOBES = {"right": ("upper", "middle", "lower"), "left": ("upper", "lower")}


def _generator(*key) -> torch.Generator:
    """A CPU torch.Generator seeded from a stable hash of `key` (Python's hash() is salted per process)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _latent_bias() -> list:
    """Per-label logit offsets that make each marginal prevalence exact under the latent distribution."""
    a = torch.linspace(-3, 3, 121, dtype=torch.float64)
    pa = torch.exp(-a ** 2 / 2); pa /= pa.sum()
    phf = 1 / (1 + torch.exp(2.0 - 0.7 * a))
    bias = []
    for target, (wa, wh, wi) in zip(PREVALENCE, _LATENT_W):
        lo, hi = -15.0, 15.0
        for _ in range(50):  # bisection: the marginal grows monotonically with the offset
            b = (lo + hi) / 2
            p = sum(pa * ph * pi * torch.sigmoid(b + wa * a + wh * h + wi * i)
                    for h, ph in ((0, 1 - phf), (1, phf)) for i, pi in ((0, 1 - _P_INFECTION), (1, _P_INFECTION)))
            lo, hi = (b, hi) if p.sum() < target else (lo, b)
        bias.append(b)
    return bias


_BIAS = []


def sample_patient(seed: int, split: str, index: int, difficulty: float = 0.5, force=None) -> dict:
    """Latent factors, anatomy, the 18 labels and their attributes of one patient; no voxels, ~1 ms.
    force: {label: 0 or 1} overrides drawn labels (the same anatomy with a finding on or off, for tests)."""
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be one of {list(_SPLIT_ID)}, got {split!r}")
    if not _BIAS:
        _BIAS.extend(_latent_bias())
    g = _generator("patient", seed, _SPLIT_ID[split], index)
    u = lambda lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()
    pick = lambda seq: seq[int(u() * len(seq))]
    age = min(max(torch.randn((), generator=g, dtype=torch.float64).item(), -3.0), 3.0)
    hf, inf = u() < _p_hf(age), u() < _P_INFECTION
    labels = [int(u() < 1 / (1 + math.exp(-(b + wa * age + wh * hf + wi * inf))))
              for b, (wa, wh, wi) in zip(_BIAS, _LATENT_W)]
    for name, value in (force or {}).items():
        labels[LABELS.index(name)] = int(value)
    strength = 1.25 - 0.5 * difficulty  # how far a finding departs from normal anatomy (difficulty in [0, 1])
    p = dict(seed=seed, split=split, index=index, age=round(55 + 15 * age), heart_failure=hf, infection=inf,
             labels=labels, difficulty=difficulty, strength=strength,
             # anatomy in mm: body half-axes and centre, fat and muscle layers, lung apex, right diaphragm dome
             rx=u(138, 168), ry=u(98, 120), cy=u(178, 190), fat=u(6, 26), muscle=u(9, 14), apex=u(28, 46),
             diaph=u(245, 272), heart=u(0.9, 1.05), aorta=u(11, 14), carina=u(95, 110), tree=int(u() * 1e9))
    A = {}
    for k, name in enumerate(LABELS):
        if labels[k]:
            s = pick(("right", "left", "bilateral"))
            A[name] = dict(side=s, lobe=pick(LOBES["left" if s == "left" else "right"]),
                           severity=pick(("mild", "moderate", "severe")), u=[u() for _ in range(8)])
    sev = lambda name: {"mild": 0.6, "moderate": 0.8, "severe": 1.0}[A[name]["severity"]] * strength
    if "Medical material" in A:
        A["Medical material"]["kind"] = pick(("central venous catheter", "sternotomy wires", "pacemaker lead"))
    if "Cardiomegaly" in A:  # normal hearts span 0.90-1.05, enlarged ones 1.12-1.35
        p["heart"] = 1.05 + 0.3 * sev("Cardiomegaly") * u(0.7, 1)
    if "Lung nodule" in A:  # about half of the patients with nodules have only small (2-4 mm) ones
        small = u() < 0.5
        nod = []
        for i in range(1 + int(u() * 4)):
            s = pick(("right", "left"))
            nod.append(dict(size=round(u(2, 4.49) if small or i else u(5, 15)), side=s, lobe=pick(LOBES[s]),
                            u=[u() for _ in range(3)]))
        nod.sort(key=lambda n: -n["size"])
        A["Lung nodule"].update(nodules=nod, size=nod[0]["size"], side=nod[0]["side"], lobe=nod[0]["lobe"],
                                count=len(nod))
    for name in ("Atelectasis", "Bronchiectasis", "Interlobular septal thickening"):  # basal predominance
        if name in A:
            A[name]["lobe"] = "lower"
    if "Emphysema" in A:
        A["Emphysema"]["lobe"] = "upper"
    if "Mosaic attenuation pattern" in A:  # diffuse
        A["Mosaic attenuation pattern"]["side"] = "bilateral"
    for name in ("Lung opacity", "Consolidation"):
        if name in A:
            A[name]["size"] = round(20 + 40 * sev(name) * A[name]["u"][7])
    if "Lymphadenopathy" in A:  # short axis in mm, count
        A["Lymphadenopathy"].update(size=round(12 + 14 * sev("Lymphadenopathy") * A["Lymphadenopathy"]["u"][5]),
                                    count=1 + int(3 * A["Lymphadenopathy"]["u"][0]))
    p["attributes"] = A
    return p


# ---- rendering ------------------------------------------------------------------------------------------------

class _Canvas:
    """HU and mask volumes over the FOV, and painting of signed-distance shapes inside bounding boxes."""

    def __init__(self, shape, device=None, roi=None):
        """The grid `shape` over FOV, or only its block roi = ((z0, y0, x0), (z1, y1, x1)) (voxel indices)."""
        self.vox = [f / n for f, n in zip(FOV, shape)]
        self.start, stop = roi or ((0, 0, 0), shape)
        self.shape, self.device = tuple(b - a for a, b in zip(self.start, stop)), device
        self.ramp = math.prod(self.vox) ** (1 / 3)  # partial-volume edge width: one (geometric mean) voxel
        self.c = [(torch.arange(a, b, device=device, dtype=torch.float32) + 0.5) * v
                  for a, b, v in zip(self.start, stop, self.vox)]
        self.hu = torch.full(self.shape, -1000.0, device=device)
        self.mask = torch.zeros(self.shape, dtype=torch.uint8, device=device)

    def box(self, lo, hi):
        """Slices of the voxels whose centres lie in [lo, hi] mm per axis, and their broadcastable coordinates."""
        sl = []
        for l, h, n, v, s in zip(lo, hi, self.shape, self.vox, self.start):
            i0, i1 = max(0, math.ceil(l / v - 0.5) - s), min(n, math.floor(h / v - 0.5) + 1 - s)
            sl.append(slice(i0, max(i0, i1)))
        z, y, x = (c[s] for c, s in zip(self.c, sl))
        return tuple(sl), (z.view(-1, 1, 1), y.view(1, -1, 1), x.view(1, 1, -1))

    def paint(self, lo, hi, sdf, value, rid=None, only=None, ramp=None, weight=None):
        """hu <- lerp(hu, value, w) with w = 1 inside the shape, 0 outside, a linear ramp over `ramp` mm between;
        `only` restricts to voxels whose mask id is in it (e.g. lesions stay inside the lungs)."""
        sl, (z, y, x) = self.box(lo, hi)
        if any(s.stop <= s.start for s in sl):
            return
        w = sdf(z, y, x) if weight is None else weight(z, y, x)
        if weight is None:
            w = w.mul(-1 / (ramp or self.ramp)).add_(0.5).clamp_(0, 1)
        if only is not None:
            w = w * torch.isin(self.mask[sl], torch.tensor(only, dtype=torch.uint8, device=self.device))
        if callable(value):  # a value field from the signed distance (e.g. bright cortex, dark marrow)
            value = value(sdf(z, y, x))
        elif not torch.is_tensor(value):
            value = torch.tensor(float(value), device=self.device)
        self.hu[sl].lerp_(value, w)
        if rid is not None:
            self.mask[sl].masked_fill_(w > 0.5, rid)

    def blob(self, c, r, value, rid=None, pad=3.0, **kw):
        """An ellipsoid with centre c and half-axes r (mm)."""
        self.paint(*_ebox(c, r, pad), _ellipsoid(c, r), value, rid, **kw)

    def tube(self, pts, r, value, rid=None, only=None):
        """A polyline of capsules of radius r (vessels, airways, catheters)."""
        for a, b in zip(pts[:-1], pts[1:]):
            self.paint(*_cbox(a, b, r), _capsule(a, b, r), value, rid, only)


def _ellipsoid(c, r):
    def sdf(z, y, x):
        q = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2
        return (q + ((x - c[2]) / r[2]) ** 2).sqrt_().sub_(1).mul_(min(r))
    return sdf


def _ebox(c, r, pad=3.0):
    return [ci - ri - pad for ci, ri in zip(c, r)], [ci + ri + pad for ci, ri in zip(c, r)]


def _capsule(a, b, r):
    ab = [bi - ai for ai, bi in zip(a, b)]
    n2 = max(sum(v * v for v in ab), 1e-6)

    def sdf(z, y, x):
        p = (z - a[0], y - a[1], x - a[2])
        t = (p[0] * ab[0] + p[1] * ab[1] + p[2] * ab[2]).div_(n2).clamp_(0, 1)
        return sum((pi - t * abi) ** 2 for pi, abi in zip(p, ab)).sqrt_().sub_(r)
    return sdf


def _cbox(a, b, r, pad=3.0):
    return [min(ai, bi) - r - pad for ai, bi in zip(a, b)], [max(ai, bi) + r + pad for ai, bi in zip(a, b)]


def _field(g, lo, hi, spacing):
    """A smooth random field (about unit variance) over the box lo..hi mm: Gaussian bumps on knots about `spacing`
    mm apart, evaluated separably with matmuls; -> f(z, y, x) on broadcastable coordinates, shaped (Z, Y, X).
    The knot weights depend only on g, so every sampling of the FOV (any shape, any roi) sees the same field."""
    knots = tuple(max(2, int((h - l) / spacing) + 1) for l, h in zip(lo, hi))
    C = torch.randn(knots, generator=g)
    step = [(h - l) / (k - 1) for l, h, k in zip(lo, hi, knots)]

    def f(z, y, x):
        W = [torch.exp(-0.5 * ((c.reshape(-1, 1) - (l + s * torch.arange(k, device=c.device))) / (0.7 * s)) ** 2)
             for c, l, s, k in zip((z.flatten(), y.flatten(), x.flatten()), lo, step, knots)]  # [voxels, knots]
        out = torch.einsum("abc,xc->abx", C.to(z.device), W[2])
        out = torch.einsum("abx,yb->ayx", out, W[1])
        return (W[0] @ out.reshape(knots[0], -1)).view(len(W[0]), len(W[1]), len(W[2])).div_(1.55)
    return f


def _lung_point(an, g, side, lobe, margin):
    """A point (mm) inside `side` lung's `lobe`, at least `margin` mm from the lung surface and mediastinum."""
    s = -1 if side == "right" else 1
    for _ in range(50):
        u = torch.rand(3, generator=g).tolist()
        zr = {"upper": (an.apex + 20, an.carina + 25), "middle": (an.carina + 35, an.dia[side] - 40),
              "lower": (an.carina + 30, an.dia[side] - 10)}[lobe]
        yr = {"upper": (-0.6, 0.6), "middle": (-0.8, -0.1), "lower": (0.0, 0.8)}[lobe]
        pt = (zr[0] + (zr[1] - zr[0]) * u[0], an.cy + an.rcy * (yr[0] + (yr[1] - yr[0]) * u[1]),
              an.cx + s * (35 + (an.rcx - 35) * u[2]))
        if _in_lung(an, pt, margin):
            return pt
    return pt


def _in_lung(an, pt, margin):
    t = [torch.tensor([[[float(v)]]]) for v in pt]
    return an.lung(*t).item() < -margin and min(f(*t).item() for f in an.carvers) > margin


def _branches(g, start, direction, length, r, depth):
    """A random binary airway tree: [(a, b, radius, depth)] segments."""
    n = math.sqrt(sum(v * v for v in direction))
    d = [v / n for v in direction]
    end = [s + length * v for s, v in zip(start, d)]
    out = [(tuple(start), tuple(end), r, depth)]
    if depth < 5:
        for _ in range(2):
            j = torch.randn(3, generator=g).tolist()
            out += _branches(g, end, [di + 0.6 * ji for di, ji in zip(d, j)], length * 0.82, r * 0.72, depth + 1)
    return out


def _airway_tree(g, carina, y_tr, cx):
    """Main and lobar bronchi, then five generations of random binary branching: [(a, b, r, depth, side, lobe)]."""
    R, L = (carina + 20, y_tr + 6, cx - 28), (carina + 32, y_tr + 10, cx + 40)
    out = [((carina, y_tr, cx), R, 6.5, 0, "right", "upper"), ((carina, y_tr, cx), L, 6.0, 0, "left", "upper")]
    for sd, lobe, start, d, length, r in (
            ("right", "upper", R, (-0.8, 0.1, -0.6), 30, 4.5), ("right", "middle", R, (0.5, -0.7, -0.5), 30, 4.0),
            ("right", "lower", R, (0.8, 0.35, -0.35), 34, 5.0), ("left", "upper", L, (-0.75, -0.1, 0.6), 30, 4.5),
            ("left", "upper", L, (0.4, -0.75, 0.5), 30, 3.8), ("left", "lower", L, (0.8, 0.35, 0.35), 34, 5.0)):
        out += [seg + (sd, lobe) for seg in _branches(g, start, d, length, r, 1)]
    return out


_LUNGS = [1, 2]  # the lungs' mask ids: lung findings paint only there (`only=`)


class _Anatomy:
    """Patient p's body before any voxel: sizes and positions (mm), signed distances (mm, < 0 inside) of the
    body, thoracic cavity, lungs and heart, the airway tree, and the finding helpers every painter reads."""

    def __init__(self, p: dict):
        self.p, self.A, self.apex = p, p["attributes"], p["apex"]
        self.cy, self.cx, self.rx, self.ry = p["cy"], FOV[2] / 2, p["rx"], p["ry"]
        self.wall = p["fat"] + p["muscle"] + 10  # skin to pleura: fat, muscle, ribs and intercostal muscle
        self.rcx, self.rcy = self.rx - self.wall, self.ry - self.wall  # thoracic cavity half-axes
        self.y_sp = self.cy + self.ry - p["fat"] - p["muscle"] - 42  # vertebral body centre
        self.y_es, self.y_tr = self.y_sp - 28, self.y_sp - 50  # esophagus, trachea
        self.ys = self.cy - self.ry + p["fat"] + p["muscle"] + 4  # sternum
        self.carina = p["apex"] + p["carina"] - 30
        lift = lambda side: 10 * self.sev("Atelectasis") if self.has("Atelectasis", side) else 0  # volume loss
        self.dia = {"right": p["diaph"] - lift("right"), "left": p["diaph"] + 12 - lift("left")}
        self.z_bases = max(self.dia.values()) + 90  # below the deepest diaphragm recess: where basal boxes end
        self.body = self.ellipse2d(self.rx, self.ry, n=2.5)  # a chest is boxier than an ellipse
        h, cy, cx = p["heart"], self.cy, self.cx
        self.hc, self.hr = (self.dia["right"] - 42 * h, cy - 22, cx + 16 + 18 * (h - 1)), (46 * h, 40 * h, 58 * h)
        self.eff = 4 + (12 * self.sev("Pericardial effusion") if "Pericardial effusion" in self.A else 0)
        self.ra, arch, y_sp = p["aorta"], self.carina - 22, self.y_sp
        self.aorta = [(self.hc[0] - 0.5 * self.hr[0], cy - 20, cx - 6), (arch + 8, cy - 24, cx - 8),  # ascending,
                      (arch - 6, (cy + y_sp) / 2 - 30, cx + 6), (arch + 10, y_sp - 24, cx + 24),  # arch,
                      (FOV[0], y_sp - 20, cx + 10)]                                              # descending
        # what _lung_point keeps lesions away from: the heart and the descending aorta
        self.carvers = ([lambda z, y, x: self.heart(z, y, x) - self.eff - 5]
                        + [_capsule(a, b, self.ra + 6) for a, b in zip(self.aorta[2:], self.aorta[3:])])
        self.tree = _airway_tree(_generator("tree", p["tree"]), self.carina, self.y_tr, cx)

    def ellipse2d(self, r_x, r_y, yc=None, n=2.0):
        """Signed distance (mm, approximate) to an in-plane superellipse centred on (yc, cx), any z."""
        yc, cx = self.cy if yc is None else yc, self.cx
        return lambda z, y, x: ((((x - cx).abs() / r_x) ** n + ((y - yc).abs() / r_y) ** n).pow_(1 / n)
                                .sub_(1).mul_(min(r_x, r_y)))

    def cavity(self, z, y, x):
        return self.body(z, y, x) + self.wall

    def cavity_box(self, z0, z1):  # the thoracic cavity's bounding box from z0 down to z1 (mm)
        return [z0, self.cy - self.rcy, self.cx - self.rcx], [z1, self.cy + self.rcy, self.cx + self.rcx]

    def z_dia(self, y, x):
        """The diaphragm surface: two domes, deeper at the periphery and posteriorly (recesses)."""
        cy, cx = self.cy, self.cx
        right = self.dia["right"] + 0.006 * ((x - cx + 70) ** 2 + (y - cy) ** 2)
        left = self.dia["left"] + 0.006 * ((x - cx - 70) ** 2 + (y - cy) ** 2)
        return torch.where(x < cx, right, left) + 0.25 * (y - cy).clamp(min=0)

    def lung(self, z, y, x):
        """Both lungs: inside the cavity, below the apical domes, above the diaphragm, off the midline."""
        cy, cx = self.cy, self.cx
        cav = self.cavity(z, y, x) + 2
        top = self.apex + 0.016 * ((x - cx).abs() - 0.55 * self.rcx) ** 2 + 0.006 * (y - cy) ** 2 - z
        mid = 24 + 16 * ((y - cy) / self.rcy).clamp(0, 1) - (x - cx).abs()  # mediastinal column, wider at the spine
        return torch.maximum(torch.maximum(cav, mid), torch.maximum(top, z - self.z_dia(y, x)))

    def heart(self, z, y, x):
        return torch.maximum(_ellipsoid(self.hc, self.hr)(z, y, x), self.cavity(z, y, x) + 1)

    def sev(self, f) -> float:  # finding f's severity, scaled by the patient's strength (difficulty)
        return {"mild": 0.6, "moderate": 0.8, "severe": 1.0}[self.A[f]["severity"]] * self.p["strength"]

    def has(self, f, side) -> bool:  # finding f on that side
        return f in self.A and self.A[f]["side"] in (side, "bilateral")

    def sides(self, f) -> list:
        return [sd for sd in ("right", "left") if self.has(f, sd)]

    def on_side(self, f, x):  # 1 on the sides finding f is on, else 0
        return 1.0 if self.A[f]["side"] == "bilateral" else ((x < self.cx) == (self.A[f]["side"] == "right")).float()

    def gen(self, name) -> torch.Generator:
        """Each finding draws from its own generator: switching one on or off leaves everything else in place."""
        return _generator("render", name, self.p["seed"], self.p["split"], self.p["index"])


def render_phantom(p: dict, shape=(64, 128, 128), device=None, roi=None):
    """HU volume (float32, (Z, Y, X)) and region masks (uint8) of patient `p` sampled at `shape` over FOV;
    roi = ((z0, y0, x0), (z1, y1, x1)) renders only that block of the grid (a high-resolution crop).
    Painters run in this order (a later one paints over an earlier one): anatomy, then the findings (before the
    airway tree, so that its lumens cut air bronchograms through consolidation), the bronchovascular tree, nodules
    (after the vessels, so that none paints over a nodule), then texture and noise."""
    cv, an = _Canvas(shape, device, roi), _Anatomy(p)
    for paint in (_paint_body, _paint_lungs, _paint_mediastinum, _paint_bones,
                  _paint_medical_material, _paint_arterial_calcification, _paint_coronary_calcification,
                  _paint_hiatal_hernia, _paint_lymph_nodes, _paint_pleural_effusion, _paint_atelectasis,
                  _paint_emphysema, _paint_mosaic_attenuation, _paint_septal_thickening, _paint_fibrotic_sequela,
                  _paint_opacity_and_consolidation, _paint_bronchovascular_tree, _paint_lung_nodules):
        paint(cv, an)
    _add_texture_and_noise(cv, an, shape, roi)
    return cv.hu.clamp_(-1024, 3071), cv.mask


# ---- anatomy painters --------------------------------------------------------------------------------------------

def _paint_body(cv, an):
    """Skin/fat, muscle, thoracic cavity (mediastinal fat), paraspinal muscles; the neck above the lung apices; the
    upper abdomen below the diaphragm: liver (right), stomach with an anterior air cap (left)."""
    p, cy, cx, cavity = an.p, an.cy, an.cx, an.cavity
    # the body is z-invariant: painted on the first slice and copied to all others (a quarter of the render time)
    first = ([float(cv.c[0][0]), 0, 0], [float(cv.c[0][0]), FOV[1], FOV[2]])
    cv.paint(*first, an.body, -100, 0)
    cv.paint(*first, lambda z, y, x: an.body(z, y, x) + p["fat"], 40, 0)
    cv.paint(*first, cavity, -90, 8)
    cv.paint(*first, an.ellipse2d(50, 24, an.y_sp + 40), 45, 0)
    cv.hu[1:], cv.mask[1:] = cv.hu[:1], cv.mask[:1]
    cv.paint([0, cy - an.rcy, cx - an.rcx], [p["apex"] + 20, cy + an.rcy, cx + an.rcx],  # neck: soft tissue
             lambda z, y, x: torch.maximum(cavity(z, y, x), z - p["apex"] - 10), 35, 0, only=[8])
    cv.paint([min(an.dia.values()) - 5, 0, 0], FOV,
             lambda z, y, x: torch.maximum(cavity(z, y, x), an.z_dia(y, x) - z), 55, 9)
    st_c, st_r = (an.dia["left"] + 40, cy - 15, cx + 70), (40, 38, 42)
    cv.blob(st_c, st_r, 25, 9, only=[9])
    cv.paint(*_ebox(st_c, st_r), lambda z, y, x: torch.maximum(_ellipsoid(st_c, st_r)(z, y, x) + 3, y - (cy - 30)),
             -1000, 9, only=[9])


def _paint_lungs(cv, an):
    """Both lungs inside a 3 mm pleural rim, from one signed distance."""
    sl, (z, y, x) = cv.box(*an.cavity_box(an.apex - 5, max(an.dia.values()) + 0.006 * 150 ** 2))
    d = an.lung(z, y, x).mul_(-1 / cv.ramp).add_(0.5)  # = the partial-volume weight before clamping
    hu, mk = cv.hu[sl], cv.mask[sl]
    hu.lerp_(torch.tensor(-90.0, device=cv.device), (d + 3 / cv.ramp).clamp_(0, 1))
    mk.masked_fill_(d > 0.5 - 3 / cv.ramp, 10)
    hu.lerp_(torch.tensor(-850.0, device=cv.device), d.clamp_(0, 1))
    inside = d > 0.5
    mk.masked_fill_(inside, 1)
    mk.masked_fill_(inside & (x > an.cx), 2)


def _paint_mediastinum(cv, an):
    """The heart in its pericardial fat (a fluid rim with pericardial effusion), aorta, pulmonary arteries, superior
    vena cava, esophagus, trachea."""
    cy, cx, hc, hr, eff, y_es, y_tr, carina = an.cy, an.cx, an.hc, an.hr, an.eff, an.y_es, an.y_tr, an.carina
    cv.paint(*_ebox(hc, hr, eff + 4), lambda z, y, x: an.heart(z, y, x) - eff - 3, -90, 8)
    cv.paint(*_ebox(hc, hr, eff + 4), lambda z, y, x: an.heart(z, y, x) - eff + 4, 12 if eff > 4 else 40, 3)
    cv.paint(*_ebox(hc, hr), an.heart, 40, 3)
    cv.tube(an.aorta, an.ra + 3, -90, 8)
    cv.tube(an.aorta, an.ra, 40, 4)
    pa = (carina + 12, cy - 10, cx + 22)
    cv.tube([(hc[0] - 0.6 * hr[0], cy - 30, cx + 25), pa], 13, 40, 8)
    cv.tube([pa, (carina + 18, y_tr + 8, cx - 48)], 9.5, 40, 8)
    cv.tube([pa, (carina + 8, y_tr + 16, cx + 52)], 9.5, 40, 8)
    cv.tube([(0, cy - 26, cx - 30), (hc[0] - hr[0] * 0.6, cy - 24, cx - 26)], 9, 40, 8)  # superior vena cava
    dia_l = an.dia["left"]
    cv.tube([(0, y_es, cx + 4), (dia_l + 5, y_es + 2, cx + 14), (dia_l + 25, cy - 5, cx + 50)], 8, 40, 6)
    cv.tube([(0, y_es, cx + 4), (dia_l, y_es + 2, cx + 14)], 2, -1000, 6)
    cv.tube([(0, y_tr, cx), (carina, y_tr, cx)], 10.5, 40, 5)
    cv.tube([(0, y_tr, cx), (carina, y_tr, cx)], 8.5, -1000, 5)


def _paint_bones(cv, an):
    """Vertebral bodies (discs every 28 mm), posterior arches, sternum, ribs; cortex brighter than marrow."""
    cx, y_sp, ys, Z, e2 = an.cx, an.y_sp, an.ys, FOV[0], an.ellipse2d
    cortex = lambda d: 400 + 500 * (1 + d / 2).clamp(0, 1)
    disc = lambda z: ((z - an.apex) % 28 - 14).abs_() - 11.5
    col = ([0, y_sp - 20, cx - 20], [Z, y_sp + 65, cx + 20])
    cv.paint(*col, lambda z, y, x: torch.maximum(e2(19, 16, y_sp)(z, y, x), disc(z)), cortex, 7)
    cv.paint(*col, lambda z, y, x: torch.maximum(e2(14, 13, y_sp + 27)(z, y, x).abs() - 4, disc(z)), cortex, 7)
    cv.paint(*col, lambda z, y, x: torch.maximum(e2(5, 14, y_sp + 48)(z, y, x), disc(z)), cortex, 7)
    cv.paint([an.apex + 15, ys - 8, cx - 17], [an.dia["right"] - 25, ys + 8, cx + 17], e2(15, 6, ys), cortex, 7)
    cv.paint(*_ebox((0, y_sp + 27, cx), (Z, 8, 8)), e2(8, 8, y_sp + 27), 20, 0)  # spinal canal
    _ribs(cv, an)


def _ribs(cv, an):
    """Ribs: cross-sections around the thoracic cage every 26 mm, sloping down anteriorly. Evaluated only on the
    in-plane ring where ribs can be (a few % of the voxels), through flat indices."""
    cx, cy, ry, depth = an.cx, an.cy, an.ry, an.p["fat"] + an.p["muscle"] + 5
    y, x = cv.c[1].view(-1, 1), cv.c[2].view(1, -1)
    e = an.body(None, y, x) + depth  # 0 on the rib line
    ring = ((e.abs() < 8) & ((x - cx).abs() > 22)).flatten().nonzero().squeeze(1)
    e, shift = e.flatten()[ring], (40 * (cy - y) / ry + 0 * x).flatten()[ring]  # anterior ends lower
    sl, (z, _, _) = cv.box([an.apex - 20, 0, 0], [max(an.dia.values()) + 60, FOV[1], FOV[2]])
    dz = ((z.view(-1, 1) - shift - an.apex) % 26 - 13)
    d = ((e / 4) ** 2 + (dz / 5.5) ** 2).sqrt_().sub_(1).mul_(4)
    w = d.mul(-1 / cv.ramp).add_(0.5).clamp_(0, 1)
    hu = cv.hu[sl].reshape(len(z), -1)
    hu[:, ring] = hu[:, ring].lerp(400 + 500 * (1 + d / 1.5).clamp(0, 1), w)
    mk = cv.mask[sl].reshape(len(z), -1)
    mk[:, ring] = torch.where(w > 0.5, 7, mk[:, ring]).to(torch.uint8)


# ---- finding painters: each paints nothing unless its finding is in p["attributes"] -----------------------------

def _paint_medical_material(cv, an, f="Medical material"):
    """Sternotomy wires, or a line down the superior vena cava: a central venous catheter or a pacemaker's lead."""
    if f not in an.A:
        return
    p, cy, cx, hc, hr = an.p, an.cy, an.cx, an.hc, an.hr
    if an.A[f]["kind"] == "sternotomy wires":
        for k in range(4):
            zk = p["apex"] + 35 + k * (an.dia["right"] - p["apex"] - 80) / 3
            cv.tube([(zk, an.ys + 2, cx - 14), (zk, an.ys - 7, cx), (zk, an.ys + 2, cx + 14)], 1.2, 3000, 0)
        return
    top, end = (p["apex"] - 10, cy - 40, cx - 55), (hc[0] - 0.85 * hr[0], cy - 24, cx - 26)
    if an.A[f]["kind"] == "pacemaker lead":  # from the generator in the left chest wall into the heart
        top = (p["apex"] + 10, cy - an.ry + 0.6 * p["fat"], cx + 70)
        end = (hc[0] - 0.3 * hr[0], hc[1] - 0.3 * hr[1], hc[2] - 0.5 * hr[2])
        cv.blob(top, (18, 5, 22), 3000, 0)
    cv.tube([top, (p["apex"] + 5, cy - 30, cx - 32), (an.carina, cy - 26, cx - 30), end], 1.3, 2500, 8)


def _paint_arterial_calcification(cv, an, f="Arterial wall calcification"):
    """Plaques on the wall of the arch and descending aorta."""
    if f not in an.A:
        return
    g, aorta, ra = an.gen(f), an.aorta, an.ra
    for k in range(int(3 + 12 * an.sev(f))):
        u = torch.rand(4, generator=g).tolist()
        i = 1 + int(u[0] * 3)  # one of the three segments from the arch down
        c, ang = [ai + u[1] * (bi - ai) for ai, bi in zip(aorta[i], aorta[i + 1])], 2 * math.pi * u[2]
        c = (c[0], c[1] + ra * math.sin(ang), c[2] + ra * math.cos(ang))
        cv.blob(c, (1.2 + 1.5 * u[3],) * 3, 700 + 300 * u[3], 4)


def _paint_coronary_calcification(cv, an, f="Coronary artery wall calcification"):
    """Spots along the atrioventricular groove on the heart surface."""
    if f not in an.A:
        return
    g, hc, hr = an.gen(f), an.hc, an.hr
    for k in range(int(2 + 8 * an.sev(f))):
        u = torch.rand(3, generator=g).tolist()
        ang = math.pi * (1.0 + 1.0 * u[0])  # anterior half
        c = (hc[0] - 0.35 * hr[0] + 10 * u[1], hc[1] + 0.9 * hr[1] * math.sin(ang),
             hc[2] + 0.9 * hr[2] * math.cos(ang))
        cv.blob(c, (1.0 + 1.5 * u[2],) * 3, 650 + 350 * u[2], 3)


def _paint_hiatal_hernia(cv, an, f="Hiatal hernia"):
    """A wall-lined pouch behind the heart above the diaphragm; air rises anteriorly over fluid."""
    if f not in an.A:
        return
    sev = an.sev(f)
    c, r = (an.dia["left"] - 12, an.y_es + 4, an.cx + 14), (14 + 14 * sev, 16 + 10 * sev, 16 + 14 * sev)
    cv.blob(c, r, 40, 6)
    inner = lambda z, y, x: _ellipsoid(c, r)(z, y, x) + 3
    cv.paint(*_ebox(c, r), inner, 15, 6)
    cv.paint(*_ebox(c, r), lambda z, y, x: torch.maximum(inner(z, y, x), y - c[1] + 0.3 * r[1]), -1000, 6)


def _paint_lymph_nodes(cv, an, f="Lymphadenopathy"):
    """Two normal-sized nodes everybody has; with lymphadenopathy, enlarged (short axis > 10 mm) round nodes at the
    paratracheal, subcarinal, AP-window and hilar stations."""
    carina, y_tr, cx = an.carina, an.y_tr, an.cx
    nodes = [(carina - 22, y_tr - 2, cx - 20), (carina + 18, y_tr + 14, cx + 2), (carina - 8, y_tr - 14, cx + 24),
             (carina + 22, y_tr + 8, cx - 40), (carina + 14, y_tr + 12, cx + 44)]
    g = an.gen("nodes")
    for k in range(2):
        c = nodes[int(torch.rand(1, generator=g).item() * 5)]
        cv.paint(*_ebox(c, (4, 4, 4)), _ellipsoid(c, (3.5, 3.0, 4.0)), 40, 8)
    if f in an.A:
        for k in range(an.A[f]["count"]):
            cv.blob(nodes[int(an.A[f]["u"][1 + k] * 5)], (an.A[f]["size"] / 2,) * 3, 40, 8)


def _paint_pleural_effusion(cv, an, f="Pleural effusion"):
    """Dependent fluid crescent, thickest posteriorly; a larger effusion rises higher."""
    if f not in an.A:
        return
    cy, cx, rcy, T = an.cy, an.cx, an.rcy, 10 + 45 * an.sev(f)
    for sd in an.sides(f):
        def crescent(z, y, x, sd=sd):
            depth = -an.cavity(z, y, x)
            t = T * ((y - cy + 0.3 * rcy) / (1.3 * rcy)).clamp(0, 1)
            half = (cx - x) if sd == "left" else (x - cx)
            top = an.dia[sd] - 40 - 100 * an.sev(f)
            return torch.maximum(torch.maximum(depth - t, half), torch.maximum(top - z, z - an.z_dia(y, x)))
        cv.paint([an.carina, cy - rcy, 0], [an.z_bases, cy + rcy, FOV[2]], crescent, 12, 10, only=_LUNGS + [10])


def _paint_atelectasis(cv, an, f="Atelectasis"):
    """A dense plate along the posterior base (its volume loss raised the diaphragm: _Anatomy.dia)."""
    if f not in an.A:
        return
    sev = an.sev(f)
    for sd in an.sides(f):
        s = -1 if sd == "right" else 1
        c = (an.dia[sd] - 5, an.cy + 0.7 * an.rcy, an.cx + s * 0.5 * an.rcx)
        cv.blob(c, (18 + 14 * sev, 14 + 10 * sev, 30 + 10 * sev), 25, only=_LUNGS)


def _paint_emphysema(cv, an, f="Emphysema"):
    """Clusters of -985 HU in the upper lungs, thresholded from a smooth random field."""
    if f not in an.A:
        return
    box, thr = an.cavity_box(an.apex, an.carina + 40), 1.5 - 1.0 * an.sev(f)
    fld = _field(an.gen(f), *box, 7.0)
    cv.paint(*box, None, -985, None, only=_LUNGS,
             weight=lambda z, y, x: ((fld(z, y, x) - thr) * 2).clamp_(0, 1) * an.on_side(f, x))


def _paint_mosaic_attenuation(cv, an, f="Mosaic attenuation pattern"):
    """Lobular patchwork: air-trapping lobules darker, the others denser."""
    if f not in an.A:
        return
    box, sev = an.cavity_box(an.apex, an.z_bases), an.sev(f)
    fld = _field(an.gen(f), *box, 16.0)
    cv.paint(*box, None, -960, None, only=_LUNGS, weight=lambda z, y, x: (fld(z, y, x) * 3).clamp_(0, 1) * sev)
    cv.paint(*box, None, -700, None, only=_LUNGS, weight=lambda z, y, x: (fld(z, y, x) * -3).clamp_(0, 1) * sev)


def _paint_septal_thickening(cv, an, f="Interlobular septal thickening"):
    """Fine polygonal lines: the zero set of a smooth field is a sheet, a line in any slice."""
    if f not in an.A:
        return
    box, width, k = an.cavity_box(an.carina, an.z_bases), 0.12 * cv.ramp ** 0.5, 0.6 * an.sev(f) + 0.4
    fld = _field(an.gen(f), *box, 8.0)
    cv.paint(*box, None, -150, None, only=_LUNGS,
             weight=lambda z, y, x: (1 - fld(z, y, x).abs_() / width).clamp_(0, 1) * k * an.on_side(f, x))


def _paint_fibrotic_sequela(cv, an, f="Pulmonary fibrotic sequela"):
    """Reticular bands tangent to the pleura, in the periphery."""
    if f not in an.A:
        return
    g, cy, cx, rcy, rcx = an.gen(f), an.cy, an.cx, an.rcy, an.rcx
    for sd in an.sides(f):
        for k in range(int(3 + 6 * an.sev(f))):
            c = _lung_point(an, g, sd, an.A[f]["lobe"] if k % 2 == 0 else "lower", 3)
            ang = math.atan2((c[1] - cy) / rcy, (c[2] - cx) / rcx)
            c = (c[0], cy + (rcy - 6) * math.sin(ang), cx + (rcx - 6) * math.cos(ang))
            t, dy, dx = (torch.rand(1, generator=g).item() - 0.5) * 40, 12 * math.cos(ang), 12 * math.sin(ang)
            a, b = (c[0] - t, c[1] - dy, c[2] + dx), (c[0] + t, c[1] + dy, c[2] - dx)
            cv.paint(*_cbox(a, b, 2), _capsule(a, b, 1.2 + 0.8 * an.sev(f)), -60, None, only=_LUNGS)


def _paint_opacity_and_consolidation(cv, an):
    """Ground glass: a soft-edged patch; consolidation: dense, around an airway (air bronchograms, cut by the tree
    painted after it). Each at the end of a bronchus (generation >= 2) well inside its lobe, if there is one."""
    for f, value in (("Lung opacity", -520), ("Consolidation", 30)):
        if f not in an.A:
            continue
        g, lobe, r = an.gen(f), an.A[f]["lobe"], an.A[f]["size"] / 2
        for sd in an.sides(f):
            ends = [sg[1] for sg in an.tree if sg[4] == sd and sg[5] == lobe and sg[3] >= 2 and _in_lung(an, sg[1], 8)]
            c = ends[int(torch.rand(1, generator=g).item() * len(ends))] if ends else _lung_point(an, g, sd, lobe, 5)
            cv.blob(c, (r * 0.8, r, r * 1.1), value, pad=8, only=_LUNGS, ramp=6.0)


def _paint_bronchovascular_tree(cv, an):
    """The airway tree with the artery beside each bronchus (walls thickened by peribronchial thickening, lower-lobe
    bronchi wider than their artery with bronchiectasis: the signet ring), then the pulmonary veins."""
    thick, wide = "Peribronchial thickening", "Bronchiectasis"
    for a, b, r, depth, sd, lobe in an.tree:
        bw = 0.12 * r + 0.45  # bronchial wall
        rv = 1.1 * (r + bw)  # the artery beside each bronchus is about as wide as the bronchus
        if an.has(thick, sd) and depth >= 1:
            bw *= 1 + 2.5 * an.sev(thick)
        if an.has(wide, sd) and lobe == "lower" and depth >= 2:
            r, bw = r * (1.4 + 1.2 * an.sev(wide)), bw * 1.5
        d = [bi - ai for ai, bi in zip(a, b)]
        n = [d[1], -d[0], 0.0] if abs(d[2]) > 0.5 * math.sqrt(sum(v * v for v in d)) else [0.0, d[2], -d[1]]
        k = (r + bw + rv + 0.5) / math.sqrt(sum(v * v for v in n) + 1e-9)
        va, vb = [ai + k * ni for ai, ni in zip(a, n)], [bi + k * ni for bi, ni in zip(b, n)]
        if depth >= 1:
            cv.tube([va, vb], rv, 40, None, only=_LUNGS)
        if depth < 5:  # the last generation is vessels only: such airways are invisible on CT
            only = None if depth <= 1 else _LUNGS + [5]
            cv.tube([a, b], r + bw, 40, 5 if r > 1.5 else None, only=only)
            cv.tube([a, b], r, -1000, 5 if r > 1.5 else None, only=only)
    gv, cx = _generator("veins", an.p["tree"]), an.cx
    for s in (-1, 1):  # superior and inferior pulmonary veins of each lung, branching out from the left atrium
        for dz in (-0.4, 0.7):
            for a, b, r, _ in _branches(gv, (an.carina + 50, an.y_tr + 4, cx + 30 * s), (dz, 0.3, s), 32, 5.0, 1):
                cv.tube([a, b], r, 40, None, only=_LUNGS)


def _paint_lung_nodules(cv, an, f="Lung nodule"):
    """Solid nodules; small ones (r < 2.5 mm) as a volume-preserving blob, the sphere averaged over a voxel (partial
    volume), so that their integrated contrast is right at any resolution."""
    if f not in an.A:
        return
    g = an.gen(f)
    for nd in an.A[f]["nodules"]:
        c, r = _lung_point(an, g, nd["side"], nd["lobe"], nd["size"] / 2 + 4), nd["size"] / 2
        if r >= 2.5:
            cv.blob(c, (r, r, r), 30, only=_LUNGS)
            continue
        sig = [math.sqrt(r * r / 5 + v * v / 12) for v in cv.vox]
        amp = min(1.0, 4 / 3 * math.pi * r ** 3 / ((2 * math.pi) ** 1.5 * math.prod(sig)))
        gauss = lambda z, y, x: amp * torch.exp(-0.5 * (((z - c[0]) / sig[0]) ** 2 + ((y - c[1]) / sig[1]) ** 2
                                                     + ((x - c[2]) / sig[2]) ** 2))
        cv.paint(*_ebox(c, [3 * s_ for s_ in sig], 1), None, 30, None, only=_LUNGS, weight=gauss)


def _add_texture_and_noise(cv, an, shape, roi):
    """CT noise grain is about 1 mm: below that, noise (and the +-8 HU low-frequency texture) is drawn on a 2x2
    coarser in-plane grid and added through a broadcast view, which also halves the cost at 0.75 mm."""
    p, (Zs, Ys, Xs) = an.p, cv.shape
    f = 2 if cv.vox[1] < 1.0 and Ys % 2 == 0 and Xs % 2 == 0 else 1
    coarse = [cv.c[0], cv.c[1].view(-1, f).mean(1), cv.c[2].view(-1, f).mean(1)]
    gn = _generator("noise", p["seed"], p["split"], p["index"], tuple(shape), roi)
    noise = torch.randn(Zs, Ys // f, Xs // f, generator=gn).to(cv.device).mul_(10 + 20 * p["difficulty"])
    noise += _field(an.gen("texture"), (0, 0, 0), FOV, 45.0)(*coarse).mul_(8)  # 9 knots per axis
    cv.hu.view(Zs, Ys // f, f, Xs // f, f).add_(noise[:, :, None, :, None])


class SyntheticCT(torch.utils.data.Dataset):
    """The procedural chest CT: item i of a split is one patient, rendered on the fly at
    `shape` over the fixed FOV, the same patient for the same (seed, split, i, shape) on any machine: labels, masks,
    report and questions bit for bit, voxel values to a few thousandths of a HU (CPU kernels and thread counts round
    differently). Splits never share a patient (the split is part of every seed). `difficulty` in [0, 1] weakens
    findings and raises noise."""

    def __init__(self, split, n, shape=(64, 128, 128), seed=0, *, window=(-1000, 200), norm="unit",
                 difficulty=0.5, device=None):
        if split not in _SPLIT_ID:
            raise ValueError(f"split must be one of {list(_SPLIT_ID)}, got {split!r}")
        self.split, self.n, self.shape, self.seed = split, n, tuple(shape), seed
        self.window, self.norm, self.difficulty, self.device = window, norm, difficulty, device
        self.spacing = tuple(f / s for f, s in zip(FOV, self.shape))

    def __len__(self):
        return self.n

    def patient(self, i) -> dict:
        return sample_patient(self.seed, self.split, i, self.difficulty)

    def labels(self) -> torch.Tensor:
        """All labels (n, 18) without rendering a voxel."""
        return torch.tensor([self.patient(i)["labels"] for i in range(self.n)], dtype=torch.float32)

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} synthetic volumes")
        p = self.patient(i)
        hu, masks = render_phantom(p, self.shape, self.device)
        if self.device is not None and torch.utils.data.get_worker_info() is not None:
            hu, masks = hu.cpu(), masks.cpu()  # rendered on the GPU in a loader worker: handed back on the CPU
        return dict(volume=normalize(hu, self.window, self.norm)[None],
                    labels=torch.tensor(p["labels"], dtype=torch.float32), report=make_report(p),
                    name=f"{self.split}_{i + 1}_a_1", masks=masks, questions=make_questions(p))


def write_ctrate_layout(out_dir, n, shape=(64, 128, 128), seed=0, *, v2=False, n_valid=None):
    """The phantom on disk exactly like CT-RATE: n 'train' patients in dataset/train/,
    n_valid 'test' patients in dataset/valid/ (every 4th patient with a second reconstruction _a_2), the labels,
    reports and metadata CSVs. Volumes are int16 stored = HU + 1024 with header slope 1 / intercept 0 and the
    rescale in the metadata CSV, like the original release; v2=True writes *_fixed folders already in HU (the
    metadata CSV still says -1024: the trap the reader's rescale=auto must avoid). Arrays are stored in RAS order
    with their affine, so a reader has to reorient to (I, P, L) to get them back."""
    root = Path(out_dir) / "dataset"
    spacing = [f / s for f, s in zip(FOV, shape)]
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    affine[:3, 3] = [-FOV[2] / 2, -FOV[1] / 2, -FOV[0] / 2]
    n_valid = max(1, n // 4) if n_valid is None else n_valid
    for folder, split, count, csv_split in (("train", "train", n, "train"), ("valid", "test", n_valid, "validation")):
        labels, reports, meta = [], [], []
        for i in range(count):
            p = sample_patient(seed, split, i)
            hu, _ = render_phantom(p, shape)
            stored = (hu if v2 else hu + 1024).round().to(torch.int16)
            ras = stored.flip(0, 1, 2).permute(2, 1, 0).contiguous().numpy()  # (z,y,x)=(I,P,L) -> (x,y,z)=(R,A,S)
            impression = "; ".join(l for l, y in zip(LABELS, p["labels"]) if y) or "No acute abnormality"
            for recon in (1, 2) if i % 4 == 1 else (1,):
                name = f"{folder}_{i + 1}_a_{recon}.nii.gz"
                path = root / (folder + ("_fixed" if v2 else "")) / f"{folder}_{i + 1}" / f"{folder}_{i + 1}_a" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                img = nib.Nifti1Image(ras, affine)
                img.header.set_slope_inter(1, 0)
                nib.save(img, path)
                labels.append([name, *p["labels"]])
                reports.append([name, "Not given." if i % 3 else "Dyspnea.", "Non-contrast axial CT of the thorax.",
                                make_report(p), impression + "."])
                meta.append([name, "SYNTHETIC", "M" if i % 2 else "F", f"{p['age']:03d}Y", shape[1], shape[2],
                             spacing[0], f"[{spacing[1]}, {spacing[2]}]", spacing[0], -1024, 1, 120])
        for sub, header, rows in (
                (f"multi_abnormality_labels/{folder}_predicted_labels.csv", ["VolumeName", *LABELS], labels),
                (f"radiology_text_reports/{csv_split}_reports.csv", ["VolumeName", "ClinicalInformation_EN",
                 "Technique_EN", "Findings_EN", "Impressions_EN"], reports),
                (f"metadata/{csv_split}_metadata.csv", ["VolumeName", "Manufacturer", "PatientSex", "PatientAge",
                 "Rows", "Columns", "SliceThickness", "XYSpacing", "ZSpacing", "RescaleIntercept", "RescaleSlope",
                 "KVP"], meta)):
            (root / sub).parent.mkdir(parents=True, exist_ok=True)
            with open(root / sub, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([header, *rows])
    return root


def write_radgenome_layout(out_dir, n, shape=(32, 64, 64), seed=0, *, n_valid=None):
    """The phantom in RadGenomeCT's layout: n train and n_valid (default n // 4, at least 1) test patients, a mask per
    RADGENOME_REGIONS name, one QA row per region (presence as the phantom's region questions decide it; the first
    finding there and its size). Stored like write_ctrate_layout: RAS int16 HU with the affine."""
    root = Path(out_dir)
    spacing = [f / s for f, s in zip(FOV, shape)]
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    ras = lambda t: t.flip(0, 1, 2).permute(2, 1, 0).contiguous().numpy()  # (z,y,x)=(I,P,L) -> (x,y,z)=(R,A,S)
    for folder, split, count, csv_split in (("train", "train", n, "train"),
                                            ("valid", "test", max(1, n // 4) if n_valid is None else n_valid, "validation")):
        rows = []
        for i in range(count):
            p = sample_patient(seed, split, i)
            hu, masks = render_phantom(p, shape)
            name = f"{folder}_{i + 1}_a_1.nii.gz"
            (root / "volumes" / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(ras(hu.round().to(torch.int16)), affine), root / "volumes" / folder / name)
            seg = root / "masks" / f"seg_{name.removesuffix('.nii.gz')}"
            seg.mkdir(parents=True, exist_ok=True)
            pos = [l for l, y in zip(LABELS, p["labels"]) if y]
            for region in RADGENOME_REGIONS:
                m = torch.isin(masks, torch.tensor(REGION_IDS[region], dtype=masks.dtype)).to(torch.uint8)
                nib.save(nib.Nifti1Image(ras(m), affine), seg / f"{region}.nii.gz")
                hits = [l for l in pos if finding_region(p, l) in (region, "lungs" if "lung" in region else None)]
                size = p["attributes"][hits[0]].get("size", "") if hits else ""
                rows.append([name, region, "Yes" if hits else "No", hits[0] if hits else "", size])
        path = root / "radgenome_files" / f"{csv_split}_region_vqa.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([list(RADGENOME_QA), *rows])
    return root


# =============================================================================
# Templates: the phantom's reports and questions
# =============================================================================

# Per label, in report order: (normal sentences, abnormal sentences); several paraphrases each.
# Placeholders: {sev} severity, {Sev} capitalised, {where} lobe and side, {side} side phrase, {size} mm, {kind}.
_SENTENCES = {
    "Cardiomegaly": (["Heart size is within normal limits.", "The heart is of normal size."],
                     ["The heart is enlarged ({sev} cardiomegaly).", "{Sev} cardiomegaly is present."]),
    "Pericardial effusion": (["No pericardial effusion was detected.", "There is no pericardial effusion."],
                             ["A {sev} pericardial effusion is seen.", "There is {sev} pericardial effusion."]),
    "Arterial wall calcification": (["The thoracic aorta is of normal calibre without wall calcification.",
                                     "No calcification is seen in the aortic wall."],
                                    ["{Sev} atherosclerotic calcification is seen in the wall of the thoracic aorta.",
                                     "There are {sev} calcified plaques in the aortic wall."]),
    "Coronary artery wall calcification": (["No calcification is seen in the coronary arteries."],
                                           ["{Sev} calcific plaques are present in the coronary arteries.",
                                            "There is {sev} coronary artery wall calcification."]),
    "Lymphadenopathy": (["No pathologically enlarged lymph nodes are seen in the mediastinum or hila.",
                         "There is no mediastinal or hilar lymphadenopathy."],
                        ["Enlarged lymph nodes up to {size} mm in short axis are seen in the mediastinum.",
                         "Mediastinal lymphadenopathy is present, the largest node measuring {size} mm."]),
    "Hiatal hernia": (["The esophagus is of normal calibre and there is no hiatal hernia."],
                      ["A {sev} hiatal hernia is seen.", "There is a {sev} sliding hiatal hernia."]),
    "Emphysema": (["No emphysema is seen.", "There are no emphysematous changes in the lungs."],
                  ["{Sev} centrilobular emphysema is seen in the upper lobes of {side}.",
                   "There are {sev} emphysematous changes in the upper lobes of {side}."]),
    "Mosaic attenuation pattern": (["Lung parenchymal density is homogeneous."],
                                   ["A mosaic attenuation pattern is seen in {side}.",
                                    "There is mosaic attenuation in {side}."]),
    "Lung opacity": (["No ground-glass opacity is seen.", "There are no ground-glass opacities in the lungs."],
                     ["A ground-glass opacity of {size} mm is seen in {where}.",
                      "There is a {size} mm area of ground-glass density in {where}."]),
    "Consolidation": (["No consolidation is seen.", "There is no consolidation in the lungs."],
                      ["Consolidation of {size} mm with air bronchograms is seen in {where}.",
                       "There is a {size} mm consolidation containing air bronchograms in {where}."]),
    "Interlobular septal thickening": (["No interlobular septal thickening is seen."],
                                       ["{Sev} interlobular septal thickening is seen in the lower zones of {side}.",
                                        "There is {sev} thickening of the interlobular septa in the lower zones of {side}."]),
    "Pulmonary fibrotic sequela": (["No fibrotic changes are seen.", "There are no fibrotic sequelae in the lungs."],
                                   ["{Sev} fibrotic bands are seen in the periphery of {where}.",
                                    "There are {sev} peripheral fibrotic sequelae in {where}."]),
    "Atelectasis": (["No atelectasis is seen.", "There is no atelectasis."],
                    ["{Sev} atelectasis is seen in the posterior basal part of {where}.",
                     "There is {sev} atelectasis with volume loss in {where}."]),
    "Lung nodule": (["No nodule or mass is seen in either lung.", "There are no pulmonary nodules."],
                    ["A {size} mm nodule is seen in {where}.", "There is a {size} mm solid nodule in {where}."]),
    "Peribronchial thickening": (["The bronchial walls are of normal thickness."],
                                 ["{Sev} peribronchial thickening is seen in {side}.",
                                  "The bronchial walls are thickened in {side}."]),
    "Bronchiectasis": (["There is no bronchiectasis."],
                       ["Bronchiectasis is seen in {where}.", "Dilated bronchi with thick walls are seen in {where}."]),
    "Pleural effusion": (["No pleural effusion or thickening is seen.", "There is no pleural effusion."],
                         ["A {sev} pleural effusion is seen in {side_cavity}.",
                          "There is {sev} pleural effusion in {side_cavity}."]),
    "Medical material": (["No medical device is seen."], ["A {kind} is seen.", "There is a {kind} in place."]),
}
_FIXED = {0: ["Trachea and both main bronchi are open.", "The trachea and main bronchi are patent."],
          "bones": ["No lytic or destructive lesion is seen in the bones.", "The bones are unremarkable."],
          "abdomen": ["The visualised upper abdominal organs are unremarkable.",
                      "No abnormality is seen in the upper abdomen within the field of view."]}
# What each label's questions refer to ("lung" is replaced by the finding's side).
_REGION = {"Medical material": "mediastinum", "Arterial wall calcification": "aorta", "Cardiomegaly": "heart",
           "Pericardial effusion": "heart", "Coronary artery wall calcification": "heart",
           "Hiatal hernia": "esophagus", "Lymphadenopathy": "mediastinum", "Pleural effusion": "pleura"}
# Region name -> mask ids; "lungs" is both lungs (bilateral findings).
REGION_IDS = {**{name: [i] for i, name in REGIONS.items()}, "lungs": [1, 2]}


def _phrases(a: dict) -> dict:
    side = {"right": "the right lung", "left": "the left lung", "bilateral": "both lungs"}[a.get("side", "bilateral")]
    lobe = a.get("lobe", "lower")
    where = f"the {lobe} lobe of {side}" if a.get("side") != "bilateral" else f"the {lobe} lobes of both lungs"
    cav = {"right": "the right hemithorax", "left": "the left hemithorax", "bilateral": "both hemithoraces"}[a.get("side", "bilateral")]
    sev = a.get("severity", "mild")
    return dict(sev=sev, Sev=sev.capitalize(), side=side, where=where, side_cavity=cav, size=a.get("size", ""),
                kind=a.get("kind", ""))


def finding_region(p: dict, label: str) -> str:
    if label in _REGION:
        return _REGION[label]
    return {"right": "right lung", "left": "left lung", "bilateral": "lungs"}[p["attributes"].get(label, {}).get("side", "bilateral")]


def make_report(p: dict) -> str:
    """The findings report: CT-RATE's section order, a normal sentence for each absent finding."""
    g = _generator("report", p["seed"], p["split"], p["index"])
    pick = lambda seq: seq[int(torch.randint(len(seq), (), generator=g))]
    out = [pick(_FIXED[0])]
    for label, (normal, abnormal) in _SENTENCES.items():
        a = p["attributes"].get(label)
        out.append(pick(abnormal).format(**_phrases(a)) if a else pick(normal))
        if label == "Lung nodule" and a and a["count"] > 1:
            out.append(f"{a['count'] - 1} additional smaller nodule{'s' if a['count'] > 2 else ''} up to "
                       f"{a['nodules'][1]['size']} mm {'are' if a['count'] > 2 else 'is'} seen.")
    out[-1:-1] = [pick(_FIXED["bones"]), pick(_FIXED["abdomen"])]
    return " ".join(s for s in out if s)


def _finding_name(label: str) -> str:
    return {"Medical material": "a medical device", "Hiatal hernia": "a hiatal hernia", "Lung nodule": "a lung nodule",
            "Pleural effusion": "a pleural effusion", "Pericardial effusion": "a pericardial effusion",
            "Mosaic attenuation pattern": "a mosaic attenuation pattern"}.get(label, label.lower())


def make_questions(p: dict) -> list:
    """Closed, multiple-choice (M3D form), open and region-grounded questions about patient p."""
    g = _generator("questions", p["seed"], p["split"], p["index"])
    perm = lambda seq: [seq[i] for i in torch.randperm(len(seq), generator=g).tolist()]
    pos = [l for l, y in zip(LABELS, p["labels"]) if y]
    neg = [l for l, y in zip(LABELS, p["labels"]) if not y]
    q = []
    for label in (perm(pos)[:1] + perm(neg)[:2]):
        q.append(dict(question=f"Is there {_finding_name(label)} in this scan?", answer="Yes" if label in pos else "No",
                      kind="closed", region=finding_region(p, label)))
    options = perm(neg)[:3] + (perm(pos)[:1] or ["None of these"])
    options = perm(options)
    right = next(i for i, o in enumerate(options) if o in pos or o == "None of these")
    q.append(dict(question="Which of the following findings is present in this scan? Choices: "
                  + " ".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)),
                  answer=f"{'ABCD'[right]}. {options[right]}", kind="choice",
                  region=finding_region(p, options[right]) if options[right] in pos else "lungs"))
    for label in perm(pos)[:2]:
        a, ph = p["attributes"][label], _phrases(p["attributes"][label])
        if label in ("Lung nodule", "Lymphadenopathy", "Lung opacity", "Consolidation"):
            q.append(dict(question=f"What is the size of the largest {label.lower()}?" if label != "Lymphadenopathy"
                          else "What is the short axis of the largest enlarged lymph node?",
                          answer=f"{a['size']} mm", kind="open", region=finding_region(p, label)))
        if label == "Medical material":
            q.append(dict(question="What kind of medical device is seen?", answer=a["kind"].capitalize(), kind="open",
                          region="mediastinum"))
        elif "lung" in finding_region(p, label) and label != "Emphysema":
            q.append(dict(question=f"Where is the {label.lower()}?", answer=ph["where"][0].upper() + ph["where"][1:],
                          kind="open", region=finding_region(p, label)))
        else:
            q.append(dict(question=f"How severe is the {label.lower()}?", answer=ph["Sev"], kind="open",
                          region=finding_region(p, label)))
    for region in perm(["right lung", "left lung", "heart", "aorta", "mediastinum", "pleura", "esophagus"])[:2]:
        hit = any(finding_region(p, l) in (region, "lungs" if "lung" in region else None) for l in pos)
        q.append(dict(question=f"Is there an abnormality in the {region}?", answer="Yes" if hit else "No",
                      kind="region", region=region))
    return q


# =============================================================================
# CLI: python data.py synthetic|prepare|montage|bench
# =============================================================================

_PALETTE = [(0, 0, 0), (80, 160, 255), (40, 220, 220), (255, 60, 60), (255, 150, 0), (120, 255, 120),
            (220, 120, 255), (255, 255, 120), (255, 120, 200), (160, 110, 60), (120, 120, 255)]


def render_montage(item, path, slices=None, px=360):
    """PNG: axial, coronal and sagittal slices (default: the middle ones, or slices=(z, y, x)) of item["volume"],
    region masks outlined in colour when the item has them, the positive labels and the report written below."""
    from PIL import Image, ImageDraw
    v = item["volume"].detach().float().cpu()[0]
    z, y, x = slices or [n // 2 for n in v.shape]
    v = (v - v.min()) / (v.max() - v.min() + 1e-6)
    m = item.get("masks")
    panels = []
    for sl in (np.s_[z], np.s_[:, y], np.s_[:, :, x]):  # axial, coronal, sagittal
        gray = Image.fromarray((v[sl].numpy() * 255).astype(np.uint8)).resize((px, px), Image.BILINEAR)
        rgb = np.stack([np.asarray(gray)] * 3, -1)
        if m is not None:  # outline = a pixel whose region id differs from its right or lower neighbour
            ids = np.asarray(Image.fromarray(m[sl].cpu().numpy()).resize((px, px), Image.NEAREST)).astype(int)
            down = np.pad(ids[1:], ((0, 1), (0, 0)), mode="edge")
            right = np.pad(ids[:, 1:], ((0, 0), (0, 1)), mode="edge")
            edge = (ids != down) | (ids != right)  # coloured by the higher id, so outlines against air show too
            rgb[edge] = np.array(_PALETTE)[np.maximum(ids, np.maximum(down, right))[edge] % len(_PALETTE)]
        panels.append(rgb)
    positives = [l for l, t in zip(LABELS, item["labels"].tolist()) if t > 0.5]
    lines = [item.get("name", ""), "Findings: " + (", ".join(positives) or "none")]
    report = " ".join(item.get("report", "").split())  # wrapped to the montage width, at spaces only
    lines += textwrap.wrap(report, 3 * px // 6, break_long_words=False, break_on_hyphens=False) or [""]
    canvas = Image.new("RGB", (3 * px, px + 14 * len(lines) + 26), (0, 0, 0))
    canvas.paste(Image.fromarray(np.concatenate(panels, 1)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, t in enumerate(lines):
        draw.text((4, px + 4 + 14 * k), t, fill=(255, 255, 255))
    for i in range(1, len(REGIONS)) if m is not None else ():  # legend of the outline colours
        draw.text((4 + (i - 1) * 3 * px // 10, px + 8 + 14 * len(lines)), REGIONS[i], fill=_PALETTE[i])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _rate(fn, n: int) -> float:  # calls per second of fn(0), ..., fn(n - 1)
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t)


def bench(n=8, shape=(120, 240, 240), sizes=((64, 128, 128), (240, 480, 480), (256, 512, 512)), reps=2):
    """Phantom generation seconds/volume on one core; then n phantom volumes at shape written as CT-RATE and read
    back three ways: load_nifti alone, CTRATE items (decompress + rescale + normalise), PreparedCT items."""
    import tempfile
    torch.set_num_threads(1)
    for s in sizes:
        ds = SyntheticCT("train", reps, shape=s)
        print(f"phantom {'x'.join(map(str, s))}: {1 / _rate(lambda i: ds[i], reps):.2f} s/volume (1 thread)")
    with tempfile.TemporaryDirectory() as tmp:
        write_ctrate_layout(Path(tmp) / "ct", n, shape)
        ct = CTRATE(Path(tmp) / "ct", "train", shape=shape, spacing=None, val_fraction=0)
        spacing = load_nifti(ct.rows[0]["path"])[1]
        prepare(Path(tmp) / "ct", Path(tmp) / "cache", shape, spacing, splits=("train",), val_fraction=0, workers=0)
        cache = PreparedCT(Path(tmp) / "cache", "train")
        k = len(ct)
        gz, item, mm = (_rate(f, k) for f in (lambda i: load_nifti(ct.rows[i]["path"]), lambda i: ct[i],
                                              lambda i: cache[i]))
        print(f"{k} volumes at {'x'.join(map(str, shape))}, volumes/s: load_nifti(.nii.gz) {gz:.2f} | CTRATE item "
              f"{item:.2f} | PreparedCT item {mm:.1f} (page cache warm) | cache / CTRATE = {mm / item:.0f}x")


def main(argv=None):
    import argparse
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    floats = lambda s: tuple(float(v) for v in s.split(","))  # noqa: E731
    ap = argparse.ArgumentParser(prog="data.py", description="Synthetic CT-RATE, the CT-RATE cache, montages, bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("synthetic", help="write the phantom in CT-RATE's layout (.nii.gz + CSVs)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--shape", type=ints, default=(64, 128, 128))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--v2", action="store_true", help="v2 layout: *_fixed folders, volumes already in HU")
    p = sub.add_parser("prepare", help="CT-RATE -> int16 memmaps + index.json")
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", type=ints, default=(240, 480, 480))
    p.add_argument("--spacing", type=floats, default=(1.5, 0.75, 0.75))
    p.add_argument("--rescale", choices=RESCALES, default="auto")
    p.add_argument("--splits", type=lambda s: tuple(s.split(",")), default=("train", "val", "test"))
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--strict", action="store_true", help="stop at the first bad file instead of skipping it")
    p = sub.add_parser("montage", help="PNG of axial/coronal/sagittal slices of one item")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--split", default="train")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--shape", type=ints, default=(64, 128, 128))
    p.add_argument("--spacing", type=floats, default=(1.5, 0.75, 0.75))
    p.add_argument("--out", default="montage.png")
    p = sub.add_parser("bench", help="phantom speed; .nii.gz vs cache read speed")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--shape", type=ints, default=(120, 240, 240))
    p.add_argument("--sizes", type=lambda s: [ints(v) for v in s.split(";")],
                   default=[(64, 128, 128), (240, 480, 480), (256, 512, 512)], help="phantom shapes, ';' between")
    a = ap.parse_args(argv)
    if a.cmd == "synthetic":
        root = write_ctrate_layout(a.out, a.n, a.shape, seed=a.seed, v2=a.v2)
        print(f"wrote {sum(1 for _ in root.rglob('*.nii.gz'))} volumes and 6 CSVs in CT-RATE's layout to {root}")
    elif a.cmd == "prepare":
        prepare(a.root, a.out, a.shape, a.spacing, splits=a.splits, rescale=a.rescale, strict=a.strict,
                val_fraction=a.val_fraction, workers=a.workers)
    elif a.cmd == "montage":
        ds = get_dataset(a.data, a.split, n=a.index + 1, shape=a.shape, spacing=a.spacing)
        render_montage(ds[a.index], a.out)
        print(f"wrote {a.out}")
    else:
        bench(a.n, a.shape, a.sizes)


if __name__ == "__main__":
    run(main)
