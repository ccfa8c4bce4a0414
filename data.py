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

# (volume side: issue 2)

# =============================================================================
# Synthetic chest CT
# =============================================================================

# (phantom: issue 2)

# =============================================================================
# Text
# =============================================================================

# (text side: issue 3)

# =============================================================================
# Metrics
# =============================================================================

# (metrics: issue 3)

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
