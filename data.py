"""data.py: everything the five paper scripts share that is not a kernel.

Sections, in reading order:
  Volumes      load_nifti, preprocess (resample, crop/pad, HU window, normalisation)
  CT-RATE      the real on-disk layout and CSVs (../shared/ctrate_format.md), rescale modes
  Synthetic    a procedural chest CT phantom with 18 findings, masks, reports and questions (the default dataset)
  Cache        prepare() -> preprocessed int16 memmaps + an index, and the dataset that reads them
  Text         byte-level BPE on tiktoken, the Llama-3 tokenizer
  Metrics      AUROC, F1 thresholds, classification metrics, BLEU/METEOR/ROUGE/CIDEr, VQA accuracy
  Runs         checkpoints, DDP, logs
  CLI          python data.py synthetic|prepare|montage ...

Axes everywhere are (z, y, x) = (I, P, L): slice 0 is the top, row 0 anterior, column 0 the patient's right.
"""
import json
import os
import signal
from pathlib import Path

import torch

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

import csv
import hashlib
import math
import sys
import time
import zlib

import nibabel as nib
import numpy as np
import torch.nn.functional as F
from tqdm import tqdm

NORMS = ("hu", "unit", "symmetric", "ctscroll")
AIR = -1000.0  # HU; the pad value


class BadVolume(ValueError):
    """A volume file or CSV row that must not be used; the message starts with the file it is about."""


def _read_nifti(path):
    """-> (stored values float32 (z, y, x) in (I, P, L), spacing (z, y, x) mm, (header slope, header intercept))."""
    path = Path(path)
    if not path.is_file():
        raise BadVolume(f"{path}: no such file")
    try:
        img = nib.load(path)
        raw = np.asarray(img.dataobj.get_unscaled())
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        raise BadVolume(f"{path}: unreadable or truncated NIfTI ({type(e).__name__}: {e})") from e
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


def load_nifti(path):
    """NIfTI -> (float32 array (z, y, x) in the header's scaled units, spacing (z, y, x) in mm); axes (I, P, L)."""
    raw, spacing, (slope, inter) = _read_nifti(path)
    return (raw if (slope, inter) == (1.0, 0.0) else raw * np.float32(slope) + np.float32(inter)), spacing


def normalize(hu, window=(-1000, 200), norm="unit"):
    """Clip HU to window (None: no clip), then hu: as is; unit: -> [0, 1]; symmetric: -> [-1, 1];
    ctscroll: unit - 0.449 (the CT-Scroll authors' code: (x + 1000) / 1200 - 0.449)."""
    if norm not in NORMS or (window is None and norm != "hu"):
        raise ValueError(f"norm={norm!r} with window={window}: norm must be one of {NORMS}, and only 'hu' has no window")
    hu = torch.as_tensor(hu, dtype=torch.float32)
    if window is None:
        return hu
    lo, hi = window
    x = hu.clamp(lo, hi)
    if norm == "hu":
        return x
    x = (x - lo) / (hi - lo)
    return {"unit": x, "symmetric": 2 * x - 1, "ctscroll": x - 0.449}[norm]


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
    """CSV -> {VolumeName: row}; a missing file or column is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected the CT-RATE layout (README: Data preparation for CT-RATE)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise BadVolume(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        return {row["VolumeName"]: row for row in reader}


def _in_val(patient: str, val_fraction: float) -> bool:  # the same patient -> the same split, on any machine
    return int(hashlib.sha256(patient.encode()).hexdigest()[:8], 16) / 16 ** 8 < val_fraction


def _air(v) -> float:  # fraction of voxels within 100 HU of air
    return float(((v > AIR - 100) & (v < AIR + 100)).mean())


class CTRATE(torch.utils.data.Dataset):
    """CT-RATE from its on-disk layout (../shared/ctrate_format.md): volumes under dataset/{train,valid}[_fixed]/,
    labels, Findings_EN reports and metadata CSVs joined by VolumeName. Splits: train/val = the train folder split
    by patient (a hash of the patient id, val_fraction of patients to val), test = the valid folder.

    rescale: how stored values become HU. metadata: HU = RescaleSlope * stored + RescaleIntercept from the metadata
    CSV (the original release); header: the NIfTI header's scaling (v2 `*_fixed` volumes, already HU); none: stored
    values as they are; auto: per volume, whichever of header/metadata puts more voxels near air (-1000 HU), said
    once per choice. Spacing comes from the metadata CSV (the DICOM's) when it has the volume, else the header.
    Bad rows and files are skipped with one warning line each and counted in n_bad; strict=True raises instead.
    """

    def __init__(self, root, split, *, shape=(240, 480, 480), spacing=(1.5, 0.75, 0.75), window=(-1000, 200),
                 norm="unit", rescale="auto", strict=False, val_fraction=0.1):
        if split not in ("train", "val", "test") or rescale not in RESCALES:
            raise ValueError(f"split={split!r} rescale={rescale!r}: expected train|val|test and one of {RESCALES}")
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
        meta = _read_csv(self.meta_csv, ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"]
                         ) if rescale == "metadata" or self.meta_csv.is_file() else {}
        self.split, self.shape, self.spacing, self.window, self.norm = split, shape, spacing, window, norm
        self.rescale, self.strict, self.n_bad, self._bad_rows, self._said = rescale, strict, 0, set(), set()
        self.rows, missing = [], []
        for name, row in labels.items():
            parts = name.split("_")  # split_patient_scan_recon.nii.gz
            patient = "_".join(parts[:2])
            if split != "test" and _in_val(patient, val_fraction) != (split == "val"):
                continue
            path = self.dir / patient / "_".join(parts[:3]) / name
            try:
                y = [row[c].strip() for c in LABELS]
                if any(v not in ("0", "1", "0.0", "1.0") for v in y):
                    raise BadVolume(f"{self.labels_csv}: {name}: labels must be 0 or 1, found {y}")
                report = reports.get(name, {}).get("Findings_EN", "").strip()
                if report in ("", "Not given."):
                    raise BadVolume(f"{reports_csv}: {name}: no Findings_EN report ({report!r})")
            except BadVolume as e:
                self._bad(e)
                continue
            if not path.is_file():
                missing.append(path)
                continue
            self.rows.append({"name": name, "path": path, "report": report, "meta": meta.get(name),
                              "labels": torch.tensor([float(v) for v in y])})
        if missing:
            self._bad(BadVolume(f"{missing[0]}: listed in {self.labels_csv} but not on disk"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")), len(missing))

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
        meta = None
        if r["meta"] is not None:
            try:
                m = r["meta"]
                meta = float(m["RescaleSlope"]), float(m["RescaleIntercept"])
                xy = [float(s) for s in m["XYSpacing"].strip("[]() ").split(",")]
                spacing = (float(m["ZSpacing"]), xy[0], xy[-1])
            except (ValueError, IndexError) as e:
                raise BadVolume(f"{self.meta_csv}: {r['name']}: unparseable rescale/spacing ({e})") from e
        mode = self.rescale
        if mode == "metadata" and meta is None:
            raise BadVolume(f"{self.meta_csv}: no row for {r['name']} (needed by rescale=metadata)")
        if mode == "auto":
            air = {k: _air(raw[::4, ::4, ::4] * s + b) for k, (s, b) in (("header", header), ("metadata", meta)) if s is not None}
            mode = max(air, key=air.get)
            if air[mode] < 0.01:
                raise BadVolume(f"{r['path']}: rescale=auto found no air near -1000 HU with the header or the metadata "
                                f"rescale ({air}); check the file or pass rescale=header|metadata|none")
            if mode not in self._said:
                self._said.add(mode)
                print(f"CTRATE {self.split}: rescale=auto chose '{mode}' ({r['name']}: {air[mode]:.0%} of voxels "
                      f"near air; {'' if mode == 'metadata' else 'not '}applying the metadata CSV's slope/intercept)")
        slope, inter = {"none": (1.0, 0.0), "header": header, "metadata": meta}[mode]
        hu = raw if (slope, inter) == (1.0, 0.0) else raw * np.float32(slope) + np.float32(inter)
        v = preprocess(hu, spacing, target_spacing=self.spacing, shape=self.shape, window=self.window, norm=self.norm)
        return {"volume": v[None], "labels": r["labels"], "report": r["report"], "name": r["name"]}

    def __getitem__(self, i):
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
# Synthetic chest CT
# =============================================================================

# (phantom: issue 2)

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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
        hu = torch.from_numpy(self.volumes[i].astype(np.float32))
        return {"volume": normalize(hu, self.window, self.norm)[None], "labels": self.labels[i],
                "report": self.reports[i], "name": self.names[i]}


def get_dataset(data, split, *, n=None, shape=(64, 128, 128), spacing=(1.5, 0.75, 0.75), window=(-1000, 200),
                norm="unit", seed=0, strict=False):
    """data = "synthetic" (n volumes generated at shape), a prepare()d cache folder (has index.json), or a CT-RATE
    root. n sizes the synthetic set only; real data yields every volume of the split."""
    if data == "synthetic":
        return SyntheticCT(split, n, shape=shape, seed=seed, window=window, norm=norm)
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

import base64
import collections
import functools
import heapq
import math
import re
import unicodedata

import numpy as np
import tiktoken

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
    (what Rust's regex uses; Python's own \\s would also match \\x1c-\\x1f). If Python's Unicode tables ever differ
    from tiktoken's for some rare code point, only the training statistics move; encoding stays tiktoken's and
    exact. tests/test_text.py holds this splitter to tiktoken's by comparing whole encodings.
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


def get_bpe(texts, vocab_size: int, cache_path) -> tiktoken.Encoding:
    """Load cache_path if it exists, else train on texts and save there. The cache is keyed by its path alone:
    name the dataset and vocab size in it (e.g. out/bpe_synthetic_4096.tiktoken); delete it to retrain."""
    if Path(cache_path).is_file():
        return load_bpe(cache_path)
    enc = train_bpe(texts, vocab_size)
    save_bpe(enc, cache_path)
    return enc


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

    Undefined is nan, never a made-up number: auroc with one class in the split, precision with no predicted
    positives, recall and f1 with no actual positives. Means skip nans; `undefined` lists the labels skipped.
    """
    y, s = _np(y_true).astype(bool), _np(y_score).astype(np.float64)
    pred = s >= np.asarray(thresholds, dtype=np.float64)[None, :]
    names = labels or (LABELS if y.shape[1] == len(LABELS) else [str(i) for i in range(y.shape[1])])
    tp, fp, fn = (pred & y).sum(0), (pred & ~y).sum(0), (~pred & y).sum(0)
    support = y.sum(0)
    div = lambda a, b: np.where(b > 0, a / np.maximum(b, 1), np.nan)
    per = {"auroc": np.array([auroc(y[:, l], s[:, l]) for l in range(y.shape[1])]),
           "accuracy": (pred == y).mean(0), "precision": div(tp, tp + fp), "recall": div(tp, tp + fn),
           "f1": np.where(support > 0, div(2 * tp, 2 * tp + fp + fn), np.nan)}
    out = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in per.items()}
    ok = np.isfinite(per["f1"])
    out["weighted_f1"] = float((per["f1"][ok] * support[ok]).sum() / support[ok].sum()) if ok.any() else float("nan")
    out["per_label"] = {n: {**{k: float(v[l]) for k, v in per.items()}, "support": int(support[l])}
                        for l, n in enumerate(names)}
    out["undefined"] = {k: [n for n, x in zip(names, v) if not np.isfinite(x)] for k, v in per.items()}
    return out


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
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


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
    """Exact match after normalisation (lowercase, punctuation and the articles a/an/the removed)."""
    assert len(preds) == len(answers) > 0
    return float(np.mean([_vqa_norm(p) == _vqa_norm(a) for p, a in zip(preds, answers)]))


def choice_correct(pred: str, answer: str) -> bool:
    """M3D's multiple-choice rule: correct when the answer's letter followed by "." appears in the generated text.
    `answer` is the letter ("B") or the full option ("B. Left lower lobe")."""
    return f"{answer.strip()[0].upper()}." in pred

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


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint is data, not code: weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here; train first or point --out_dir at the run to resume")
    return torch.load(path, map_location=map_location, weights_only=True)


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
