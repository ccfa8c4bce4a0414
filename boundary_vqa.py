"""Boundary-guided 3D CT VQA: a contour of the asked-about anatomy on every axial slice, DCFormer + Mixer, slice
self-attention in a compact decoder, LoRA.

Paper: anonymous, "Boundary Guidance for Efficient 3D CT Vision-Language Reasoning", submission under review (no
arXiv id, no public code). Built on Med3DVLM (arXiv:2503.20047), DCFormer (arXiv:2502.05091), SigLIP (ICCV 2023),
LoRA (arXiv:2106.09685), focal loss (ICCV 2017), RadGenome-ChestCT (arXiv:2404.16754).

What this file implements (M the binary mask of the QUESTION's region, x one CT volume), and where:
    Eq. 1     boundary_prompt(): B = {(x, y) : sum_{(u,v) in N8(x,y)} |M_uv - M_xy| > 0} per axial slice, on M's
              largest component per slice with its holes filled (vessels, airways); its side inside M dilated to
              3 px, interior empty; drawn as the second input channel [CT, B] (the paper's blue outline).
    Sec. 3.3  rewrite(): a system instruction + "Within the blue-outlined area of the CT volume," ("Inside the blue
              boundary," before a wh-question). --prompt=none drops the channel (zeros) AND the text. The region
              is the one the question names (question_region(); closed: the finding's organ, "lungs" for lung
              findings), never the side where the finding is.
    Sec. 3.2  DecomposedConv3d, DCFormer, MixerStream, VisionTower: DC(x) = K_z * x + K_y * x + K_x * x (depthwise
              (k,1,1), (1,k,1), (1,1,k)) in MetaFormer blocks; the dual-stream MLP-Mixer over the last two stages
              (per slice: token- then channel-mixing MLP) -> V (N_s x d). --stage=siglip pre-trains both (SigLIP,
              train_siglip) with L = -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)); --stage=vqa freezes them.
    Eq. 2     SliceBlock.fuse: SSA(V, T) = (V T^T / sqrt(d)) T, added through a zero-initialised gate g:
              V <- V + g SSA.
    Eq. 3-4   MSSA: MSSA(Z) = concat_i softmax(Q_i K_i^T / sqrt(d_k) + R) V_i W_O over Z = [V; T], h = 4, R a
              learnable bias per head indexed by the slice offset of two visual tokens (0 for text). Both sit in
              the first k = ssa_layers decoder blocks, before the block's causal attention, and update only [V; T].
    Sec. 4    vqa_losses: L = FL_cb(head(h_last), y) + NLL(open answer tokens) + 1e-4 ||LoRA||^2,
              FL = -a_y (1 - p_y)^2 log p_y (focal_loss), a class-balanced (class_balanced_alpha: effective number,
              beta 0.999); AdamW (0.9, 0.98), weight decay 2e-2 on LoRA only (run_vqa).
The paper's parts sit in the three sections after the config (Boundary prompt, Vision, Slice self-attention: ~390
lines, with SigLIP's text side and the --roi_hist token); the copied decoder, data, training, evaluation, predict
and the command line follow, in that order.

Decoder (DESIGN §5): hilt.py's Llama-3 decoder, copied below; from-scratch sizes --decoder=s|m|l (the paper's
Qwen-2.5 0.5B/1.5B/3B shapes at --preset=paper), or --llm=path: a Meta-format Llama frozen with LoRA r 16 (the paper
used Qwen-2.5, which this repo cannot load without transformers).

Deviations, on purpose:
- --stage=siglip is ours (the paper reuses Med3DVLM's weights): report SENTENCES, each a positive for every volume
  whose report states its findings, b starting at -log(batch); --siglip_contour of its volumes carry a region's
  outline, and such a volume is paired only with sentences about that region (region-grounded, as the VQA questions).
- --system_prompt=false (the cpu preset) drops the constant ~100-token system instruction.
- --roi_hist=true (off by default, as in the paper) adds one visual token: the CT's intensity histogram inside the
  outline's filled contour (the whole volume without one), through a trained LayerNorm + Linear in the tower.
- The frozen features are standardised per (token, channel) with training-set statistics, then a trained Linear
  adapts the fixed Mixer width (--proj_dim) to each decoder.
- --extra_questions: training scans get extra yes/no questions from their own labels; test questions are
  data.make_questions' own. Open answers do NOT get the "Within the blue boundary," prefix (a constant string would
  lift one group's BLEU/ROUGE). Yes/no questions are answered by the classification head, the others by generation.

Commands:
    python boundary_vqa.py                          # cpu: render, SigLIP, VQA with the contour + its two twins
                                                    # (each non-blind model also asked about another scan; per
                                                    # yes/no question, the AUROC of P(Yes): what the model reads;
                                                    # blind: the majority answer, the answer-rate prior)
    python boundary_vqa.py --table=true             # Table 1: prompt x decoder size, peak memory per size
    python boundary_vqa.py --preset=paper --llm=/path/to/Llama-3.2-1B-Instruct/original   # GPU, LoRA r 16
    torchrun --standalone --nproc_per_node=2 boundary_vqa.py --stage=vqa
    python boundary_vqa.py --data=/path/to/RadGenome-ChestCT  # masks seg_<volume>/<region>.nii.gz + grounded QA CSVs
    python boundary_vqa.py --init_from=resume --predict=scan.nii.gz --mask=region.nii.gz \
        --question="Is there an abnormality in the left lung?"   # the answer + a PNG montage of the prompted slices
    python boundary_vqa.py --init_from=resume       # after Ctrl-C: either stage goes on exactly (siglip.pt / ckpt.pt)
"""
import functools
import hashlib
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import (FOV, LABELS, REGION_IDS, SPECIAL_TOKENS, BadConfig, BadVolume, InputError, Interrupted, RadGenomeCT,
                  StepTimer, StopOnSigint, Stream, SyntheticCT, _finding_name, auroc, autocast_ctx, bootstrap_diff,
                  check_fits, check_out_dir, choice_correct, crop_or_pad, finding_region, forward_flops, load_bpe,
                  load_checkpoint, load_ct, load_llama3_tokenizer, load_nifti, log_eval, optimizer_step, preprocess,
                  report_labels, report_metrics, resume_checkpoint, rng_state, run, sample_patient, save_bpe,
                  save_checkpoint, set_rng_state, setup_ddp, train_bpe, vqa_closed_accuracy, wrap_model)

# -----------------------------------------------------------------------------
preset = ""  # cpu | paper; empty: paper on CUDA, cpu otherwise
device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda, cuda:1, ...
dtype = "bfloat16"  # autocast dtype on CUDA (bfloat16 | float32); CPU always runs float32
compile = False  # torch.compile the decoder
seed = 1337  # model init, batch order and synthetic patients
data = "synthetic"  # synthetic | a RadGenome-ChestCT root (data.RadGenomeCT's layout)
out_dir = "out/boundary_vqa"  # ckpt.pt, siglip.pt, log.jsonl, metrics.json, the BPE tokenizer, PNGs
init_from = "scratch"  # scratch | resume: out_dir/ckpt.pt (VQA), or siglip.pt (--stage=siglip, or all before ckpt.pt)
stage = "all"  # all (siglip then vqa) | siglip | vqa (needs out_dir/siglip.pt)
prompt = "contour"  # contour | none: the outline channel AND the question rewriting (Table 1's two groups)
system_prompt = True  # Sec. 3.3's constant system instruction before every --prompt=contour question
blind = False  # zero the visual tokens: the question-only twin
extra_questions = True  # training scans only: a closed question per finding and a region question per region
baselines = True  # after the VQA run, train the other --prompt and the question-only twin on the same questions
table = False  # Table 1: prompt x decoder size, each cell in its own process (peak memory), then exit
siglip_from = ""  # SigLIP checkpoint the VQA stage starts from; empty: out_dir/siglip.pt
cache_dir = "out/phantoms"  # rendered synthetic splits (float16 volumes, uint8 masks), shared by runs
shape = (128, 256, 256)  # input (z, y, x) voxels (Med3DVLM's 128 x 256 x 256)
enc_stem = (4, 4, 4)  # DCFormer stem stride (z, y, x)
enc_dims = (32, 32, 64, 128, 256)  # DCFormer stage widths (the authors' nano)
enc_depths = (1, 1, 1, 1, 1)  # DCFormer blocks per stage (nano; small is 1,2,3,6,2 x 64,96,192,384,768)
enc_kernel = 7  # k of the decomposed (k,1,1), (1,k,1), (1,1,k) kernels
mixer_tokens = 8  # tokens per slice out of each Mixer stream's token-mixing MLP
proj_dim = 768  # Mixer output width (frozen), adapted to the decoder by a trained Linear
roi_hist = False  # not the paper's: one more visual token, the CT's intensity histogram inside the outline
text_dim = 256  # SigLIP text encoder width
text_layers = 2  # SigLIP text encoder layers
siglip_iters = 3000  # SigLIP steps (stage siglip)
siglip_lr = 1e-4  # SigLIP AdamW learning rate
siglip_batch = 64  # SigLIP batch (the sigmoid loss needs negatives)
siglip_contour = 0.5  # share of SigLIP volumes drawn with the outline of a random region
decoder = "m"  # s | m | l: the three decoder sizes below (Qwen-2.5 0.5B / 1.5B / 3B shapes)
dims = (896, 1536, 2048)  # decoder width of s, m, l
layers = (24, 28, 36)  # decoder layers of s, m, l
heads = (14, 12, 16)  # query heads of s, m, l
kv_heads = (2, 2, 2)  # key/value heads of s, m, l
llm = ""  # Meta-format Llama folder (params.json, consolidated.00.pth, tokenizer.model): frozen + LoRA
lora_r = 16  # LoRA rank (Sec. 3.2)
lora_alpha = 32  # LoRA alpha
lora_dropout = 0.05  # LoRA dropout
ssa_layers = 2  # k: SSA + MSSA in the first k decoder blocks (0 = off)
mssa_heads = 4  # h of Eq. (4)
vocab_size = 4096  # BPE vocabulary (from scratch)
max_text_len = 256  # system + question + answer tokens
max_iters = 100000  # VQA optimizer steps
eval_interval = 2000  # steps between validation loss + checkpoint
batch_size = 4  # questions per optimizer step (Sec. 4: 4)
grad_accum = 1  # micro-batches per optimizer step
learning_rate = 2e-5  # Sec. 4: 2e-5 (0.5B, 1.5B), 1e-5 (3B)
warmup_iters = 500  # Sec. 4: linear warm-up, then cosine
weight_decay = 2e-2  # AdamW, on the LoRA parameters only (Sec. 4)
lora_l2 = 1e-4  # lambda_reg of the L2 penalty on the LoRA parameters
focal_gamma = 2.0  # focal loss gamma (Sec. 4)
cb_beta = 0.999  # class-balanced weights (1 - beta) / (1 - beta^n_class)
calibrate = False  # not the paper's: Yes above a log-odds threshold per kind chosen on the validation questions, not 0
grad_clip = 1.0  # clip the global gradient norm; 0 = off
n_train = 14440  # synthetic training volumes (RadGenome's train split size)
n_val = 2032  # synthetic validation volumes
n_test = 4084  # synthetic test volumes
num_workers = 4  # processes rendering the phantoms
max_new_tokens = 24  # generation cap per open answer
predict = ""  # a .nii.gz to answer --question about (with --init_from=resume and --mask)
mask = ""  # the region's mask (.nii.gz, nonzero = region) on the --predict volume's grid
question = ""  # the question for --predict
kind = ""  # closed | open | choice | region for --predict; empty: closed when it is a yes/no question, else open
rescale = "auto"  # --predict: stored values -> HU by the header | none | auto (header, or header - 1024 by the air)
strict = False  # a bad volume in a dataset is fatal instead of skipped
debug = False  # tracebacks instead of one-line errors
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if k.islower() and not k.startswith("_") and type(v) in (bool, int, float, str, tuple)}

PRESETS = {
    "paper": {},  # the defaults above are the paper's settings
    "cpu": dict(shape=(48, 64, 64), enc_dims=(16, 32, 64), enc_depths=(1, 1, 1), enc_kernel=5, mixer_tokens=2,
                proj_dim=64, text_dim=64, text_layers=1, siglip_iters=150, siglip_lr=2e-3, siglip_batch=32,
                system_prompt=False, dims=(64, 128, 192), layers=(2, 2, 3), heads=(4, 4, 6), kv_heads=(2, 2, 2),
                vocab_size=1024, max_iters=1000, eval_interval=100, batch_size=32, learning_rate=1e-3,
                warmup_iters=30, n_train=400, n_val=40, n_test=100, num_workers=2),
}
TOWER_KEYS = ("shape", "enc_stem", "enc_dims", "enc_depths", "enc_kernel", "mixer_tokens", "proj_dim",
              "roi_hist")  # what builds the DCFormer + Mixer (+ the --roi_hist token)
MODEL_KEYS = TOWER_KEYS + ("text_dim", "text_layers", "decoder", "dims", "layers", "heads", "kv_heads", "llm", "lora_r",
                           "lora_alpha", "lora_dropout", "ssa_layers", "mssa_heads", "vocab_size", "max_text_len",
                           "prompt", "blind", "system_prompt")
KINDS = ("closed", "region", "choice", "open")  # closed + region: yes/no through the head; choice + open: generated
YES_NO = ("No", "Yes")
SYSTEM = ("You are a vision-language model that receives a 3-D CT volume and a blue, thin boundary that tightly "
          "encloses the region of interest. Always restrict your visual reasoning to voxels inside this blue outline; "
          "ignore other regions. When multiple structures appear inside the outline, describe only those explicitly "
          "requested. If no relevant finding exists in the blue area, answer No. Provide concise, radiologically "
          "precise answers.")  # Sec. 3.3's instruction, blue as in Sec. 4, "No" as this data's negative answer
WH = ("what", "where", "which", "how", "who", "when", "why")


# -----------------------------------------------------------------------------
# Boundary prompt (Sec. 3.1, Eq. 1) and question rewriting (Sec. 3.3)

def _max3(x: torch.Tensor) -> torch.Tensor:
    """3 x 3 max filter over the last two axes of (Z, Y, X), zero outside (separable: ~10x F.max_pool2d on CPU)."""
    p = F.pad(x, (1, 1, 1, 1))
    r = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    return torch.maximum(torch.maximum(r[:, :-2], r[:, 1:-1]), r[:, 2:])


def largest_component(m: torch.Tensor, max_iter: int = 10000) -> torch.Tensor:
    """Per axial slice, the largest 8-connected component of a bool mask (Z, Y, X). Label propagation: each pixel
    takes the max label of its 8-neighbourhood and of the pixel its label names (pointer jumping) until nothing
    changes, so a component ends up labelled by its largest index (ties: the component of the smaller one). Slices
    are independent: each stops at its own fixed point (a thin, winding one takes ~100 rounds, most a few)."""
    Z, Y, X = m.shape
    idx = torch.arange(1, Y * X + 1, dtype=torch.float32, device=m.device).view(1, Y, X).expand(Z, Y, X)
    lab = torch.where(m, idx, 0.0)
    active = torch.arange(Z, device=m.device)  # slices whose labels still change
    for _ in range(max_iter):
        if len(active) == 0:
            break
        cur = lab[active]  # (A, Y, X)
        new = torch.where(m[active], _max3(cur), 0.0).view(len(active), -1)  # (A, Y*X)
        hop = new.gather(1, (new.long() - 1).clamp(min=0))  # pointer jumping: the label of the pixel a label names
        new = torch.where(new > 0, torch.maximum(new, hop), 0.0).view(-1, Y, X)  # (same component: fewer rounds)
        lab[active] = new
        active = active[(new != cur).flatten(1).any(1)]
    lab = lab.long().view(Z, -1)  # (Z, Y*X)
    counts = torch.zeros(Z, Y * X + 1, dtype=torch.long, device=m.device).scatter_add_(1, lab, torch.ones_like(lab))
    counts[:, 0] = 0  # background
    keep = counts.argmax(1, keepdim=True)  # (Z, 1): label of the largest component per slice
    return ((lab == keep) & (keep > 0)).view(Z, Y, X)


def fill_holes(m: torch.Tensor, max_iter: int = 10000) -> torch.Tensor:
    """Per axial slice, the mask plus every background pixel not 4-connected to the slice border (vessels and
    airways inside a lung are holes of its mask: without this each would get its own outline)."""
    outside = torch.zeros_like(m)
    outside[:, [0, -1], :], outside[:, :, [0, -1]] = ~m[:, [0, -1], :], ~m[:, :, [0, -1]]
    for _ in range(max_iter):
        p = F.pad(outside, (1, 1, 1, 1))
        grown = (p[:, 1:-1, :-2] | p[:, 1:-1, 2:] | p[:, :-2, 1:-1] | p[:, 2:, 1:-1] | outside) & ~m
        if torch.equal(grown, outside):
            break
        outside = grown
    return ~outside


def boundary_prompt(region: torch.Tensor) -> torch.Tensor:
    """Eq. (1) on every axial slice of a binary region mask (Z, Y, X) -> the outline (Z, Y, X) float in {0, 1}:
    the largest component per slice, its holes filled; B = pixels with sum over N8 of |S_uv - S_xy| > 0 (Eq. 1),
    kept on the region's side (one pixel wide); dilated to 3 px; the interior stays empty (Sec. 3.1: "suppresses all
    interior voxels"). Slices the region misses stay empty."""
    m, out = region.bool(), torch.zeros(region.shape, device=region.device)
    if not m.any():
        return out
    # all on the region's bounding box, +1 px in-plane: its border is background, so the result is the whole image's
    (z0, y0, x0), (z1, y1, x1) = m.nonzero().amin(0).tolist(), (m.nonzero().amax(0) + 1).tolist()
    box = (slice(z0, z1), slice(max(y0 - 1, 0), y1 + 1), slice(max(x0 - 1, 0), x1 + 1))
    s = fill_holes(largest_component(m[box])).float()
    p = F.pad(s[None], (1, 1, 1, 1), mode="replicate")[0]  # the image border is not an edge
    Y, X = s.shape[1:]
    diff = sum((p[:, 1 + dy: 1 + dy + Y, 1 + dx: 1 + dx + X] - s).abs()
               for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)  # Eq. (1): sum over the 8-neighbourhood
    edge = ((diff > 0) & (s > 0)).float()  # the region's side of B: a one-pixel contour
    out[box] = _max3(edge)  # dilated to 3 px
    return out


def region_mask(item: dict, region: str) -> torch.Tensor:
    """Bool (Z, Y, X) mask of a region a question names: a RadGenome mask file, or synthetic ids (data.REGION_IDS)."""
    if "region_masks" in item:
        if region not in item["region_masks"]:
            raise InputError(f"{item['name']}: region {region!r} has no mask; found {sorted(item['region_masks'])}")
        return item["region_masks"][region].bool()
    if region not in REGION_IDS:
        raise InputError(f"region {region!r} does not exist; known regions: {sorted(REGION_IDS)}")
    return torch.isin(item["masks"], torch.tensor(REGION_IDS[region], dtype=item["masks"].dtype))


def rewrite(question: str, prompt: str, system: bool = True) -> str:
    """Sec. 3.3: the system instruction and the region clause for --prompt=contour; the question as is for none."""
    if prompt == "none":
        return question
    wh = question.split()[0].lower() in WH
    head = "Inside the blue boundary," if wh else "Within the blue-outlined area of the CT volume,"
    return f"{SYSTEM + ' ' if system else ''}{head} {question[0].lower() + question[1:]}"


# Which anatomy a closed question about a finding points at: its organ, and "lungs" (both) for lung findings: the
# side where a finding sits is the answer's business, not the question's (the phantom's `region` field has it).
ORGAN = {"Medical material": "mediastinum", "Arterial wall calcification": "aorta", "Cardiomegaly": "heart",
         "Pericardial effusion": "heart", "Coronary artery wall calcification": "heart", "Hiatal hernia": "esophagus",
         "Lymphadenopathy": "mediastinum", "Pleural effusion": "pleura"}
KEYWORDS = {"device": "mediastinum", "pericardial": "heart", "hiatal": "esophagus", "lymph": "mediastinum",
            "pleural": "pleura"}  # open questions that name a finding in other words (in ORGAN's order)


def question_region(q: dict) -> str:
    """The region whose outline a question gets: the named region, or the organ of the finding it asks about."""
    if q["kind"] == "region" or q.get("grounded"):
        return q["region"]
    text = q["question"].lower()
    for label in sorted(LABELS, key=len, reverse=True):
        if label.lower() in text and q["kind"] in ("closed", "open"):
            return ORGAN.get(label, "lungs")
    for word, organ in KEYWORDS.items():  # "medical device", "short axis of the largest enlarged lymph node", ...
        if word in text and q["kind"] != "choice":
            return organ
    return "lungs"


# -----------------------------------------------------------------------------
# Vision: DCFormer and the dual-stream Mixer (Sec. 3.2)

class DecomposedConv3d(nn.Module):
    """Depthwise (k,1,1) + (1,k,1) + (1,1,k) convolutions, summed: a k x k x k depthwise conv whose kernel is the
    sum of three 1-D kernels (a cross), at 3k instead of k^3 weights per channel."""
    def __init__(self, dim: int, k: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv3d(dim, dim, ks, padding=tuple(s // 2 for s in ks), groups=dim)
                                   for ks in ((k, 1, 1), (1, k, 1), (1, 1, k)))

    def forward(self, x):
        return sum(conv(x) for conv in self.convs)


class DCBlock(nn.Module):
    """MetaFormer block with the decomposed conv as token mixer: x + DC(n(x)), then x + MLP(n(x))."""
    def __init__(self, dim: int, k: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(1, dim), nn.GroupNorm(1, dim)
        self.dc = DecomposedConv3d(dim, k)
        self.mlp = nn.Sequential(nn.Conv3d(dim, 4 * dim, 1), nn.GELU(), nn.Conv3d(4 * dim, dim, 1))

    def forward(self, x):
        x = x + self.dc(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DCFormer(nn.Module):
    """(B, 2, Z, Y, X) [CT, outline] -> the feature map of every stage (stem stride, then /2 per stage)."""
    def __init__(self, *, in_ch: int, stem, dims, depths, k: int):
        super().__init__()
        self.stem = nn.Conv3d(in_ch, dims[0], stem, stride=stem)
        self.stages = nn.ModuleList()
        for i, (d, n) in enumerate(zip(dims, depths)):
            down = nn.Identity() if i == 0 else nn.Conv3d(dims[i - 1], d, 2, stride=2)
            self.stages.append(nn.Sequential(down, *[DCBlock(d, k) for _ in range(n)]))
        self.strides = [tuple(s * 2 ** i for s in stem) for i in range(len(dims))]

    def forward(self, x):
        out, x = [], self.stem(x)
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class MixerStream(nn.Module):
    """One stream of the projector: per slice, a token-mixing MLP over the in-plane positions (Y*X -> m tokens),
    then a channel-mixing MLP (C -> proj_dim). (B, C, Z, Y, X) -> (B, Z * m, proj_dim), slice-major."""
    def __init__(self, *, n_in: int, m: int, c_in: int, c_out: int):
        super().__init__()
        self.token_mlp = nn.Sequential(nn.Linear(n_in, 2 * n_in), nn.GELU(), nn.Linear(2 * n_in, m))
        self.norm = nn.LayerNorm(c_in)
        self.channel_mlp = nn.Sequential(nn.Linear(c_in, c_out), nn.GELU(), nn.Linear(c_out, c_out))

    def forward(self, f):
        B, C, Z, Y, X = f.shape
        t = self.token_mlp(f.reshape(B, C, Z, Y * X))  # (B, C, Z, m)
        t = t.permute(0, 2, 3, 1).reshape(B, -1, C)  # (B, Z * m, C)
        return self.channel_mlp(self.norm(t))


class VisionTower(nn.Module):
    """DCFormer + the dual-stream Mixer over its last two stages -> V (B, N_s, proj_dim) and each token's slice
    centre (in input slices), which MSSA's relative bias reads."""
    def __init__(self, cfg: dict):
        super().__init__()
        self.encoder = DCFormer(in_ch=2, stem=cfg["enc_stem"], dims=cfg["enc_dims"], depths=cfg["enc_depths"],
                                k=cfg["enc_kernel"])
        grids = [tuple(s // st for s, st in zip(cfg["shape"], stride)) for stride in self.encoder.strides[-2:]]
        assert all(g[0] >= 1 and g[1] >= 1 for g in grids), f"--shape {cfg['shape']} too small for the encoder"
        self.streams = nn.ModuleList(MixerStream(n_in=g[1] * g[2], m=cfg["mixer_tokens"], c_in=c, c_out=cfg["proj_dim"])
                                     for g, c in zip(grids, cfg["enc_dims"][-2:]))
        self.centres = [(z + 0.5) * st[0] for g, st in zip(grids, self.encoder.strides[-2:]) for z in range(g[0])
                        for _ in range(cfg["mixer_tokens"])]  # each token's slice centre, in input slices
        self.roi = (nn.Sequential(nn.LayerNorm(ROI_BINS), nn.Linear(ROI_BINS, cfg["proj_dim"])) if cfg["roi_hist"]
                    else None)
        if self.roi is not None:
            self.centres.append(cfg["shape"][0] / 2)
        self.n_visual = len(self.centres)

    def forward(self, x):
        feats = self.encoder(x)[-2:]
        tokens = [s(f) for s, f in zip(self.streams, feats)]
        if self.roi is not None:
            tokens.append(self.roi(roi_histogram(x))[:, None])
        return torch.cat(tokens, dim=1)  # (B, N_s, proj_dim)


ROI_BINS = 32


@torch.no_grad()
def roi_histogram(x) -> torch.Tensor:
    """--roi_hist (not the paper's): (B, 2, Z, Y, X) [CT in [0, 1], outline] -> (B, ROI_BINS) log-frequencies of the CT
    inside the outline (its slices' contours filled, as Eq. 1 drew them), of the whole volume when there is none. A
    learned 3-D encoder did not pick up diffuse density changes (emphysema, mosaic attenuation) from 400 volumes; a
    histogram over the outlined region carries them without learning (a region-of-interest pooling of the input)."""
    ct, ring = x[:, 0], x[:, 1] > 0.5
    B, Z, Y, X = ct.shape
    inside = fill_holes(ring.reshape(B * Z, Y, X)).view(B, -1)
    inside |= ~inside.any(1, keepdim=True)  # no outline (--prompt=none): the whole volume
    bins = (ct.clamp(0, 1) * (ROI_BINS - 1e-3)).long().view(B, -1)
    h = torch.zeros(B, ROI_BINS, device=x.device).scatter_add_(1, bins, inside.float())
    return torch.log(h / h.sum(1, keepdim=True) + 1e-3)


class TextEncoder(nn.Module):
    """SigLIP's text side: BPE tokens -> 2-layer transformer -> mean over real tokens -> proj_dim."""
    def __init__(self, vocab: int, dim: int, n_layers: int, out: int, max_len: int = 512):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.proj = nn.Linear(dim, out)

    def forward(self, ids, pad):  # ids, pad (B, T): pad True on padding
        h = self.layers(self.emb(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).float()[..., None]
        return self.proj((h * keep).sum(1) / keep.sum(1))


class SigLIP(nn.Module):
    """Sigmoid loss (Zhai et al. 2023): every (volume, report) pair of the batch is a binary problem, positive on the
    diagonal; t = exp(t') and b start at 10 and -10 as in the paper."""
    def __init__(self, tower: VisionTower, text: TextEncoder):
        super().__init__()
        self.tower, self.text = tower, text
        self.t_prime, self.b = nn.Parameter(torch.tensor(math.log(10.0))), nn.Parameter(torch.tensor(-10.0))

    def forward(self, x, ids, pad, z=None):
        """x (B, 2, Z, Y, X), texts (N, T); z (B, N) in {-1, 1}: which texts belong to which volume (default: the
        diagonal, N = B)."""
        v, t = self.tower(x).float().mean(1), self.text(ids, pad).float()  # (B, proj_dim), (N, proj_dim)
        with torch.autocast("cuda", enabled=False) if x.is_cuda else nullcontext():  # the loss in fp32 (--dtype)
            logits = F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T * self.t_prime.exp() + self.b  # (B, N)
            z = 2 * torch.eye(len(x), device=x.device) - 1 if z is None else z
            return -F.logsigmoid(z * logits).sum() / len(x)


# -----------------------------------------------------------------------------
# Slice self-attention inside the first k decoder blocks (Eq. 2-4)

class MSSA(nn.Module):
    """Eq. (3)-(4) over the prompt positions Z = [V; T]: h heads, a learnable bias R[head, slice offset] between two
    visual tokens (text pairs get 0); positions outside Z (BOS, the answer) are neither read nor written."""
    def __init__(self, dim: int, heads: int, n_offsets: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.wo = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.R = nn.Parameter(torch.zeros(heads, 2 * n_offsets + 1))  # offsets -n .. n

    def bias(self, offsets, vis_at, L: int):
        """(heads, L, L): R[:, offset] where both positions are visual (vis_at: their indices), else 0."""
        b = self.R.new_zeros(self.heads, L, L)
        n = (self.R.shape[1] - 1) // 2
        b[:, vis_at[:, None], vis_at[None, :]] = self.R[:, offsets + n]
        return b

    def forward(self, x, zmask, offsets, vis_at):  # x (B, L, dim), zmask (B, L) bool
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, L, d)
        allowed = (zmask[:, :, None] & zmask[:, None, :]) | torch.eye(L, dtype=torch.bool, device=x.device)
        mask = self.bias(offsets, vis_at, L)[None].masked_fill(~allowed[:, None], float("-inf"))  # (B, h, L, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))  # softmax(QK^T/sqrt(d) + R) V
        return self.wo(y.transpose(1, 2).reshape(B, L, C)) * zmask[..., None]  # (B, L, dim)


class SliceBlock(nn.Module):
    """A decoder block with Eq. (2) and Eq. (4) before it. `ctx` (set by BoundaryVQA for one forward) holds the prompt
    layout; a forward of another length (a KV-cache decode step: answer tokens) passes straight to the block."""
    def __init__(self, block: nn.Module, dim: int, heads: int, n_offsets: int, eps: float):
        super().__init__()
        self.block, self.ctx = block, None
        self.norm_v, self.norm_t, self.norm_z = RMSNorm(dim, eps), RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.ssa_gate = nn.Parameter(torch.zeros(()))  # g: SSA starts as the identity
        self.mssa = MSSA(dim, heads, n_offsets)

    @property
    def attention(self):  # Decoder.setup_cache / clear_cache reach the block's attention through here
        return self.block.attention

    def fuse(self, x, zmask, tmask, offsets, vis_at):
        v, t = self.norm_v(x[:, vis_at]), self.norm_t(x) * tmask[..., None]  # (B, N_s, d), (B, L, d) text only
        ssa = (v @ t.transpose(1, 2) / math.sqrt(x.shape[-1])) @ t  # Eq. (2): (V T^T / sqrt(d)) T, (B, N_s, d)
        x = x.clone()
        x[:, vis_at] = x[:, vis_at] + self.ssa_gate * ssa
        return x + self.mssa(self.norm_z(x), zmask, offsets, vis_at)  # Eq. (4)

    def forward(self, x, rope, mask=None, input_pos=None):
        prompt_pass = input_pos is None or int(input_pos[0]) == 0  # the whole prompt at once, not a decode step
        if self.ctx is not None and x.shape[1] == self.ctx[0].shape[1] and prompt_pass:
            x = self.fuse(x, *self.ctx)
        return self.block(x, rope, mask, input_pos)


class BoundaryVQA(nn.Module):
    """Frozen vision tower -> trained adapter -> decoder with SliceBlocks; the prefix is [BOS; V], the tokens are the
    (rewritten) question and the answer. A linear head on the last question position answers yes/no questions."""
    def __init__(self, cfg: dict, tower: VisionTower, decoder: nn.Module, bos: int):
        super().__init__()
        self.tower, self.decoder, self.blind, self.bos = tower, decoder, cfg["blind"], bos
        self.tower.requires_grad_(False)
        dim = decoder.args.dim
        self.adapter = nn.Linear(cfg["proj_dim"], dim)
        # per (token, channel) mean and std of the frozen features over the training volumes (set once by run_vqa):
        # all scans share most of their anatomy, so raw features are a large common offset plus a small signal
        self.register_buffer("feat_mu", torch.zeros(tower.n_visual, cfg["proj_dim"]))
        self.register_buffer("feat_sd", torch.ones(tower.n_visual, cfg["proj_dim"]))
        self.head = nn.Linear(dim, len(YES_NO))
        step = self.tower.encoder.strides[-2][0] / 2  # slice centres are odd multiples of this
        pos = [round(c / step) for c in self.tower.centres]
        self.register_buffer("offsets", torch.tensor([[a - b for b in pos] for a in pos]), False)  # (N_s, N_s)
        n_off = max(pos) - min(pos)
        for i in range(min(cfg["ssa_layers"], len(decoder.layers))):
            decoder.layers[i] = SliceBlock(decoder.layers[i], dim, cfg["mssa_heads"], n_off, decoder.args.norm_eps)
        self._h = None
        decoder.norm.register_forward_hook(lambda mod, inp, out: setattr(self, "_h", out))

    @torch.no_grad()
    def features(self, x):
        """The frozen tower: (B, 2, Z, Y, X) -> (B, N_s, proj_dim); cached once per (volume, region) in training."""
        self.tower.eval()
        return self.tower(x)

    def prefix(self, feats):
        vis = self.adapter((feats - self.feat_mu) / self.feat_sd)
        if self.blind:
            vis = torch.zeros_like(vis)  # the question-only twin: the decoder sees no scan
        bos = self.decoder.tok_embeddings(torch.full((len(feats), 1), self.bos, device=feats.device))
        return torch.cat([bos, vis.to(bos.dtype)], dim=1)  # (B, 1 + N_s, dim)

    def set_ctx(self, tmask):
        """tmask (B, T) marks the question tokens; the prompt Z is the N_s visual positions plus them. None: clear."""
        ctx = None
        if tmask is not None:
            B, n = tmask.shape[0], self.tower.n_visual
            full_t = torch.cat([tmask.new_zeros(B, 1 + n), tmask], dim=1)  # (B, L)
            zmask = full_t.clone()
            zmask[:, 1: 1 + n] = True
            ctx = (zmask, full_t, self.offsets, torch.arange(1, 1 + n, device=tmask.device))
        for layer in self.decoder.layers:
            if isinstance(layer, SliceBlock):
                layer.ctx = ctx

    def forward(self, feats, inputs, tmask, last):
        """-> LM logits of the text positions (B, T, vocab), yes/no logits (B, 2) read at position `last` (B,)."""
        self.set_ctx(tmask)
        try:
            logits = self.decoder(inputs, self.prefix(feats))
        finally:
            self.set_ctx(None)
        P = 1 + self.tower.n_visual
        h = self._h[torch.arange(len(last)), P + last]  # (B, dim), the final norm's output at the last question token
        return logits[:, P:], self.head(h.float())


def focal_loss(logits, target, gamma: float, alpha=None):
    """Class-balanced focal loss (Lin et al. 2017): -alpha_y (1 - p_y)^gamma log p_y, mean over the batch."""
    logp = F.log_softmax(logits.float(), -1).gather(1, target[:, None])[:, 0]
    w = (1 - logp.exp()) ** gamma
    if alpha is not None:
        w = w * alpha[target]
    return -(w * logp).mean()


def class_balanced_alpha(counts, beta: float) -> torch.Tensor:
    """Cui et al. 2019: weight (1 - beta) / (1 - beta^n_c), normalised to mean 1 over the classes."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    w = (1 - beta) / (1 - beta ** n)
    return (w / w.mean()).float()


# -----------------------------------------------------------------------------
# Decoder: copied from hilt.py (Llama 3 with RMSNorm, RoPE, SwiGLU, GQA, KV cache; LoRA; Meta-format loader)

# Copied from hilt.ModelArgs
@dataclass
class ModelArgs:
    """The fields of Meta's params.json (same names), plus the longest sequence the RoPE table and cache cover."""
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (no grouping)
    vocab_size: int = 1024
    multiple_of: int = 64  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1+: stretch the low frequencies (rope_scaling below)
    max_seq_len: int = 1024

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        assert self.dim % self.n_heads == 0 and self.n_heads % self.n_kv_heads == 0, "dim / n_heads / n_kv_heads"
        self.head_dim = self.dim // self.n_heads
        hidden = int(2 * 4 * self.dim / 3)  # Meta's rule: SwiGLU with the parameter count of a 4*dim MLP
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# Copied from hilt.rope_scaling
def rope_scaling(freqs: torch.Tensor, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, old_context=8192):
    """Llama 3.1's RoPE scaling: wavelengths longer than old_context / low_freq_factor are slowed by `factor`, shorter
    than old_context / high_freq_factor are kept, and the band between is blended linearly in old_context / wavelength."""
    wavelen = 2 * math.pi / freqs
    smooth = ((old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * freqs / factor + smooth * freqs  # smooth = 1: high frequency (kept), 0: low (divided)


# Copied from hilt.precompute_rope
def precompute_rope(head_dim: int, seq_len: int, theta: float, scaled: bool) -> torch.Tensor:
    """cos and sin of position * frequency: (seq_len, head_dim // 2, 2), the real form of Meta's complex freqs_cis."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
    if scaled:
        freqs = rope_scaling(freqs)
    angles = torch.outer(torch.arange(seq_len).float(), freqs)  # (S, D/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


# Copied from hilt.apply_rope
def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) by its angle, as Meta's complex multiply does. x (B, T, H, D), rope (T, D/2, 2)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    rope = rope.view(1, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * rope[..., 0] - xs[..., 1] * rope[..., 1],
                       xs[..., 0] * rope[..., 1] + xs[..., 1] * rope[..., 0]], dim=-1)
    return out.flatten(3).type_as(x)


# Copied from hilt.RMSNorm
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


# Copied from hilt.KVCache
class KVCache(nn.Module):
    """Keys and values of every position so far (non-persistent buffers: they never enter a state dict)."""
    def __init__(self, batch: int, n_kv_heads: int, seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):  # input_pos (T,), k/v (B, Hkv, T, D)
        self.k[:, :, input_pos] = k.to(self.k.dtype)
        self.v[:, :, input_pos] = v.to(self.v.dtype)
        return self.k, self.v


# Copied from hilt.Attention
class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache = None

    def forward(self, x, rope, mask=None, input_pos=None):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rope)  # (B, T, H, D)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), rope)  # (B, T, Hkv, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, D)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, Hkv, S, D), S = the cache length
        rep = self.n_heads // self.n_kv_heads  # query head h reads key/value head h // rep (Meta's repeat_kv)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


# Copied from hilt.FeedForward
class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# Copied from hilt.Block
class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, mask=None, input_pos=None):
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


# Copied from hilt.Decoder
class Decoder(nn.Module):
    """decoder(tokens) -> logits (B, T, vocab). `prefix` (B, P, dim) embeddings go before the tokens (visual tokens,
    LLaVA-style). With a cache (setup_cache), `input_pos` gives the absolute positions of the new inputs."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.reset_rope()

    def reset_rope(self):  # (S, D/2, 2), not in the state dict
        a = self.args
        self.register_buffer("rope", precompute_rope(a.head_dim, a.max_seq_len, a.rope_theta, a.use_scaled_rope), False)

    def setup_cache(self, batch: int, seq_len: int):
        w = self.output.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, self.args.n_kv_heads, seq_len, self.args.head_dim, w.dtype, w.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def forward(self, tokens=None, prefix=None, input_pos=None):
        h = None if tokens is None else self.tok_embeddings(tokens)  # (B, T, dim)
        if prefix is not None:
            h = prefix if h is None else torch.cat([prefix.to(h.dtype), h], dim=1)  # (B, P + T, dim)
        T = h.shape[1]
        assert (T if input_pos is None else int(input_pos[-1]) + 1) <= self.args.max_seq_len, "sequence > max_seq_len"
        if input_pos is None:  # the whole sequence at once, causal
            rope, mask = self.rope[:T], None
        else:  # new inputs at input_pos attend to every cached position up to their own
            S = self.layers[0].attention.kv_cache.k.shape[2]
            rope, mask = self.rope[input_pos], torch.arange(S, device=h.device)[None, :] <= input_pos[:, None]  # (T, S)
        for layer in self.layers:
            h = layer(h, rope, mask, input_pos)
        return self.output(self.norm(h)).float()


# Copied from hilt.LoRALinear
class LoRALinear(nn.Module):
    """y = x W^T + (alpha / r) * B A dropout(x): W frozen (the base layer's own tensor), A random, B zero, so training
    starts from the base model. State dict: `weight` (the base key, unchanged), `lora_A`, `lora_B`."""
    def __init__(self, base: nn.Linear, *, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.scale, self.merged = alpha / r, False
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as in the LoRA paper's code
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = F.linear(x, self.weight)
        return y if self.merged else y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)),
                                                               self.lora_B.to(x.dtype))

    @torch.no_grad()
    def merge(self):
        """Fold B A into W for inference: same outputs, no extra matmuls."""
        if not self.merged:
            self.weight += (self.scale * self.lora_B @ self.lora_A).to(self.weight.dtype)
            self.merged = True


# Copied from hilt.add_lora
def add_lora(model: nn.Module, *, r: int, alpha: float, dropout: float,
             targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3")) -> nn.Module:
    """Freeze every parameter, then wrap each targeted nn.Linear in a LoRALinear (only lora_A/lora_B train)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r=r, alpha=alpha, dropout=dropout))
    return model


# Copied from hilt.load_llama
def load_llama(path, max_seq_len: int = 8192):
    """A Meta-format Llama 3 folder -> (Decoder, tiktoken.Encoding), with torch and tiktoken only."""
    path = Path(path)
    for f in ("params.json", "consolidated.00.pth", "tokenizer.model"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f}: missing; --llm expects Meta's original/ folder "
                                    "(params.json, consolidated.00.pth, tokenizer.model)")
    params = json.loads((path / "params.json").read_text())
    known = {f.name for f in fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in params.items() if k in known}, max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = Decoder(args)
    sd = torch.load(path / "consolidated.00.pth", map_location="cpu", weights_only=True, mmap=True)
    if "output.weight" not in sd:  # tied embeddings (Llama 3.2 1B / 3B)
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    model.reset_rope()  # the RoPE table was built on the meta device
    return model, load_llama3_tokenizer(path / "tokenizer.model")


# Copied from hilt.sample
def sample(logits, temperature: float = 1.0, top_k: int = 0):
    """logits (B, V) -> ids (B,): argmax when top_k == 0, else a draw from the top_k most likely at `temperature`."""
    if top_k <= 0:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-5)
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
    probs = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
    return torch.multinomial(probs, 1)[:, 0]


# Copied from hilt.generate
@torch.no_grad()
def generate(decoder: Decoder, prompt, prefix=None, *, max_new_tokens: int, eos_id: int, temperature: float = 1.0,
             top_k: int = 0, use_cache: bool = True):
    """Continue prompt ids (B, T0) after an optional prefix (B, P, dim); returns the new ids (B, <= max_new_tokens),
    eos_id after a row's end. use_cache=False recomputes the whole sequence every step: the slow, obviously correct
    twin of the KV-cache path (tests hold them equal)."""
    B, T0 = prompt.shape[0], prompt.shape[1] + (0 if prefix is None else prefix.shape[1])
    out = prompt.new_empty(B, 0)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    if use_cache:
        decoder.setup_cache(B, T0 + max_new_tokens)
        logits = decoder(prompt, prefix, input_pos=torch.arange(T0, device=prompt.device))  # prefill
    else:
        logits = decoder(prompt, prefix)
    try:
        for i in range(max_new_tokens):
            nxt = torch.where(done, eos_id, sample(logits[:, -1], temperature, top_k))  # (B,)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if done.all() or i == max_new_tokens - 1:
                break
            if use_cache:
                logits = decoder(nxt[:, None], input_pos=torch.tensor([T0 + i], device=prompt.device))
            else:
                logits = decoder(torch.cat([prompt, out], dim=1), prefix)
    finally:
        decoder.clear_cache()
    return out


def build_model(cfg: dict) -> nn.Module:
    """BoundaryVQA: vision tower + a from-scratch decoder of size cfg['decoder'], or a frozen Meta Llama + LoRA."""
    tower = VisionTower(cfg)
    seq = 1 + tower.n_visual + cfg["max_text_len"]
    if cfg["llm"]:
        dec, enc = load_llama(cfg["llm"], max_seq_len=seq)
        if "cuda" not in str(cfg["device"]):
            dec.float()  # Meta ships bf16; bf16 matmul is very slow on CPU
        add_lora(dec, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"])
        bos = enc.encode_single_token("<|begin_of_text|>")
    else:  # check_config has refused any other --decoder than s, m, l
        i = "sml".index(cfg["decoder"])
        dec = Decoder(ModelArgs(dim=cfg["dims"][i], n_layers=cfg["layers"][i], n_heads=cfg["heads"][i],
                                n_kv_heads=cfg["kv_heads"][i], vocab_size=cfg["vocab_size"], max_seq_len=seq))
        bos = cfg["vocab_size"] - len(SPECIAL_TOKENS)  # data.py's BPE: the special tokens follow the ranks, BOS first
    return BoundaryVQA(cfg, tower, dec, bos)


# -----------------------------------------------------------------------------
# Data: rendered (or read) once per split, memory-mapped from cache_dir (float16 volumes, uint8 masks), questions

SIGLIP_REGIONS = ("right lung", "left lung", "lungs", "heart", "aorta", "mediastinum", "pleura", "esophagus")


class _Rendered(torch.utils.data.Dataset):
    """Item i as get_items keeps it: float16 volume, the outline of every region its questions name (a phantom: plus
    one for SigLIP; a RadGenome scan: every region it has a mask of) as flat voxel indices, Eq. (1) once per (volume,
    region) in the loader's workers, and a phantom's uint8 masks; a RadGenome file that fails to load: its error."""
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            it = self.ds[i]
        except BadVolume as e:
            return str(e)
        regions = set(it["region_masks"]) if "region_masks" in it else (
            {question_region(q) for q in it["questions"]} | {SIGLIP_REGIONS[i % len(SIGLIP_REGIONS)]})
        outlines = {r: torch.nonzero(boundary_prompt(region_mask(it, r)).flatten())[:, 0].int()
                    for r in sorted(regions)}
        out = dict(volume=it["volume"].half(), questions=it["questions"], report=it["report"], name=it["name"],
                   outlines=outlines)
        if "masks" in it:
            out.update(masks=it["masks"].to(torch.uint8), labels=it["labels"])
        return out


def another_scan(items: list, i: int, region: str):
    """For the another-scan check: the scan half the split away from scan i, or the next one after it that has the
    region (a RadGenome scan has masks only for the regions its QA rows name); None if no other scan has it."""
    n = len(items)
    for j in ((i + n // 2 + k) % n for k in range(n)):
        if j != i and (region in items[j]["outlines"] or ("masks" in items[j] and region in REGION_IDS)):
            return j
    return None


def outline_of(item: dict, region: str, dev=None) -> torch.Tensor:
    """The (Z, Y, X) outline of a region in an item, on dev: from the render cache, else computed (a phantom's
    region its questions do not name)."""
    if region in item.get("outlines", {}):
        out = torch.zeros(item["volume"][0].numel(), device=dev)
        out[item["outlines"][region].long().to(dev)] = 1.0
        return out.view(item["volume"].shape[1:])
    return boundary_prompt(region_mask(item, region)).to(dev)


def load_cache(stem: Path) -> list:
    """A split written by get_items: stem.meta.pt (all but the voxels), stem.f16 (volumes), for phantoms stem.u8
    (masks), read as memory maps: the OS pages the voxels in, so a split need not fit in RAM."""
    meta = torch.load(f"{stem}.meta.pt", weights_only=True)
    n, shape = len(meta["items"]), tuple(meta["shape"])
    for suffix, size in ((".f16", 2), (".u8", 1))[: 1 + meta["masks"]]:
        f, want = Path(f"{stem}{suffix}"), n * math.prod(shape) * size
        if not f.is_file() or f.stat().st_size != want:
            raise InputError(f"{f}: {f'{f.stat().st_size} bytes' if f.is_file() else 'missing'}, expected {want} for "
                             f"{n} items of {shape} listed in {stem}.meta.pt; delete {stem}.* to render the split "
                             "again")
    vols = np.memmap(f"{stem}.f16", np.float16, "c", shape=(n, 1, *shape))  # "c": writable views, file untouched
    masks = np.memmap(f"{stem}.u8", np.uint8, "c", shape=(n, *shape)) if meta["masks"] else None
    items = [{**m, "volume": torch.from_numpy(vols[i])} for i, m in enumerate(meta["items"])]
    for i, it in enumerate(items if masks is not None else []):
        it["masks"] = torch.from_numpy(masks[i])
    return items


def get_items(cfg, split: str, master: bool = True) -> list:
    """A split as a list of items, rendered (phantoms) or read (RadGenome; a file that fails to load is skipped with a
    warning) once by --num_workers processes, and cached in cache_dir by rank 0 alone while the other ranks wait for
    it (two ranks renaming one .tmp file raced); the voxels go to memory-mapped files row by row, never all in RAM."""
    shape, n = tuple(cfg["shape"]), {"train": cfg["n_train"], "val": cfg["n_val"], "test": cfg["n_test"]}[split]
    tag, with_masks = "x".join(map(str, shape)), cfg["data"] == "synthetic"
    if with_masks:
        ds, name = SyntheticCT(split, n, shape=shape, seed=cfg["seed"]), f"{split}_{n}_{tag}_{cfg['seed']}"
    else:  # named by the folder and its QA table's size and time: an edited table is read again
        ds = RadGenomeCT(cfg["data"], split, shape=shape, spacing=tuple(f / s for f, s in zip(FOV, shape)),
                         strict=cfg["strict"])
        qa = Path(cfg["data"]) / "radgenome_files" / f"{'validation' if split == 'test' else 'train'}_region_vqa.csv"
        key = f"{Path(cfg['data']).resolve()}|{qa.stat().st_size}|{qa.stat().st_mtime_ns}"
        name = f"radgenome_{hashlib.sha1(key.encode()).hexdigest()[:10]}_{split}_{tag}"
    stem = Path(cfg["cache_dir"]) / name
    while not master and not Path(f"{stem}.meta.pt").is_file():  # polled, not a collective: rendering takes hours
        time.sleep(2)                                                # at the paper's shape
    if Path(f"{stem}.meta.pt").is_file():
        return load_cache(stem)
    if not len(ds):
        raise InputError(f"{cfg['data']}: no volume in the {split} split")
    t0 = time.time()
    stem.parent.mkdir(parents=True, exist_ok=True)
    need, free = len(ds) * math.prod(shape) * (3 if with_masks else 2), shutil.disk_usage(stem.parent).free
    if need > free:  # said now, not as a SIGBUS when a write to the memory map finds the disk full
        raise InputError(f"--cache_dir={cfg['cache_dir']}: the {split} split's {len(ds)} volumes of {shape} need "
                         f"{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free; free space, point --cache_dir elsewhere, or "
                         f"lower --n_{split}" + ("" if with_masks else " (RadGenome: all of its volumes)"))
    out = {".f16": np.memmap(f"{stem}.f16.tmp", np.float16, "w+", shape=(len(ds), 1, *shape))}
    if with_masks:
        out[".u8"] = np.memmap(f"{stem}.u8.tmp", np.uint8, "w+", shape=(len(ds), *shape))
    meta = []
    loader = torch.utils.data.DataLoader(_Rendered(ds), batch_size=None, num_workers=cfg["num_workers"])
    for it in tqdm(loader, total=len(ds), desc=f"render {split} {shape}", leave=False):
        if isinstance(it, str):  # a RadGenome volume or mask that failed to load
            if cfg["strict"]:
                raise BadVolume(it)
            print(f"warning: skipped {it}", file=sys.stderr)
            continue
        out[".f16"][len(meta)] = it.pop("volume").numpy()
        if with_masks:
            out[".u8"][len(meta)] = it.pop("masks").numpy()
        meta.append(it)
    if not meta:
        raise InputError(f"{cfg['data']}: no readable volume in the {split} split")
    for suffix in list(out):
        arr = out.pop(suffix)
        arr.flush()
        row = arr[0].nbytes
        del arr  # unmapped before the file shrinks
        os.truncate(f"{stem}{suffix}.tmp", len(meta) * row)  # drops the rows of skipped files
        os.replace(f"{stem}{suffix}.tmp", f"{stem}{suffix}")
    save_checkpoint(f"{stem}.meta.pt", {"shape": shape, "masks": with_masks, "items": meta})  # last: the cache is whole
    print(f"{split}: {len(meta)} {'phantoms rendered' if with_masks else 'scans read'} (+ outlines) in "
          f"{time.time() - t0:.0f}s, cached in {stem}.*")
    return load_cache(stem)


def questions_of(items: list) -> list:
    """Every question of a split as (item index, question dict), the outline's region attached; unknown kinds fail."""
    out = []
    for i, it in enumerate(items):
        for q in it["questions"]:
            if q.get("kind") not in KINDS:
                raise InputError(f"{it['name']}: question {q.get('question')!r} has unknown kind {q.get('kind')!r}; "
                                 f"expected one of {KINDS}")
            out.append((i, {**q, "outline": question_region(q)}))
    return out


def extra_questions(items: list, split: str, seed: int) -> list:
    """Training scans only: the closed question of all 18 findings and the region question of all 7 regions, answered
    by data.make_questions' rules (~3 yes/no answers per scan left the decoder with the question prior)."""
    out = []
    for i, it in enumerate(items):
        p = sample_patient(seed, split, i)
        pos = [l for l, y in zip(LABELS, p["labels"]) if y]
        for label in LABELS:
            out.append((i, {"question": f"Is there {_finding_name(label)} in this scan?", "kind": "closed",
                            "answer": "Yes" if label in pos else "No", "region": finding_region(p, label)}))
        for region in ("right lung", "left lung", "heart", "aorta", "mediastinum", "pleura", "esophagus"):
            hit = any(finding_region(p, l) in (region, "lungs" if "lung" in region else None) for l in pos)
            out.append((i, {"question": f"Is there an abnormality in the {region}?", "answer": "Yes" if hit else "No",
                            "kind": "region", "region": region}))
    return [(i, {**q, "outline": question_region(q)}) for i, q in out]


def model_input(volume, outline) -> torch.Tensor:
    """(1, Z, Y, X) CT and a (Z, Y, X) outline (or None: --prompt=none) -> the 2-channel input (2, Z, Y, X)."""
    ch = torch.zeros_like(volume[0]) if outline is None else outline.to(volume.dtype)
    return torch.stack([volume[0], ch])


@torch.no_grad()
def feature_cache(model, items, qs, cfg, dev) -> dict:
    """The frozen tower's output per (item, outlined region) (per item alone with --prompt=none): the encoder is
    frozen and has no dropout or batch statistics, so caching it is exact and makes VQA training decoder-only."""
    keys = sorted({(i, q["outline"] if cfg["prompt"] == "contour" else None) for i, q in qs}, key=str)
    if cfg["blind"]:  # the question-only twin zeroes the visual tokens anyway
        return {k: torch.zeros(model.tower.n_visual, cfg["proj_dim"]) for k in keys}
    cache = {}
    for s in tqdm(range(0, len(keys), 16), desc="frozen features", leave=False):
        chunk = keys[s: s + 16]
        x = torch.stack([model_input(items[i]["volume"].to(dev).float(),  # built on dev: the CPU copies less
                                     None if r is None else outline_of(items[i], r, dev)) for i, r in chunk])
        for k, f in zip(chunk, model.features(x).float().cpu()):
            cache[k] = f
    return cache


def encode_q(enc, q: dict, cfg) -> tuple:
    """-> (question ids, answer ids + EOS or [] for yes/no kinds)."""
    ids = enc.encode(rewrite(q["question"], cfg["prompt"], cfg["system_prompt"]), disallowed_special=())
    ans = [] if q["kind"] in ("closed", "region") else enc.encode(" " + q["answer"], disallowed_special=()) + [
        enc.encode_single_token("<|end_of_text|>")]
    return ids[-(cfg["max_text_len"] - len(ans)):], ans


def vqa_batch(samples, cache, enc, cfg, dev):
    """-> feats (B, N_s, proj), inputs (B, T), targets (B, T) (-1 but on open answers), tmask (B, T) (question
    tokens), last (B,) (last question token), cls (B,) (0 No / 1 Yes, -1 for generated kinds)."""
    eos = enc.encode_single_token("<|end_of_text|>")
    seqs = [encode_q(enc, q, cfg) for _, q in samples]
    B, T = len(seqs), max(len(a) + len(b) - (1 if b else 0) for a, b in seqs)
    inputs, targets, tmask = torch.full((B, T), eos), torch.full((B, T), -1), torch.zeros(B, T, dtype=torch.bool)
    for j, (a, b) in enumerate(seqs):
        s = a + b
        inputs[j, : len(s) - (1 if b else 0)] = torch.tensor(s[: len(s) - (1 if b else 0)])
        if b:
            targets[j, len(a) - 1: len(s) - 1] = torch.tensor(b)
        tmask[j, : len(a)] = True
    last = torch.tensor([len(a) - 1 for a, _ in seqs])
    cls = torch.tensor([YES_NO.index(q["answer"]) if q["kind"] in ("closed", "region") else -1 for _, q in samples])
    feats = torch.stack([cache[(i, q["outline"] if cfg["prompt"] == "contour" else None)] for i, q in samples])
    return [t.to(dev) for t in (feats, inputs, targets, tmask, last, cls)]


# -----------------------------------------------------------------------------
# Train: one loop for both stages (hilt.train's skeleton)

def get_lr(it: int, lr: float, warmup: int, iters: int) -> float:
    """Sec. 4: linear warm-up, then cosine annealing to 0."""
    if it < warmup:
        return lr * (it + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, iters - warmup))))


def train_loop(cfg, tag, model, opt, n_items, batch_fn, loss_fn, val_fn, save, *, iters, lr, warmup, micro, start,
               dev, ddp, rank, world, master, model_args=lambda b: b):
    """AdamW steps with grad accumulation, clipping and the non-finite guard; val + checkpoint every eval_interval.
    batch_fn(item indices) -> batch (its first entry batched; model(*model_args(batch)) is a forward);
    loss_fn(module, batch) -> loss; val_fn() -> val loss; save(iter_num, best) writes the checkpoint. The batches
    are data.Stream's (a function of (seed, position) alone); the log line has data.StepTimer's numbers."""
    params = [p for g in opt.param_groups for p in g["params"]]
    fwd = wrap_model(model, dev, ddp, find_unused=cfg["blind"])  # the question-only twin's adapter gets no gradient
    with torch.random.fork_rng():  # FLOPs of one sample (forward x 3), without moving the RNG (exact resume)
        first = batch_fn(next(iter(Stream(n_items, micro, cfg["seed"], 0, 1))))
        timer = StepTimer(dev, 3 * forward_flops(model, *model_args(first)) / first[0].shape[0])
    timer.stats()  # the first call measures the device's peak FLOP/s, outside the first timed window
    batches = iter(Stream(n_items, micro, cfg["seed"], start, iters, cfg["grad_accum"], rank, world))
    iter_num, best, bad, loss_sum, n_sum = start, float("inf"), 0, 0.0, 0
    pbar = tqdm(total=iters, initial=iter_num, disable=not master, desc=tag)
    with StopOnSigint() as sig:
        while iter_num < iters and not sig.stop:
            for g in opt.param_groups:
                g["lr"] = get_lr(iter_num, lr, warmup, iters)
            losses = []
            for j in range(cfg["grad_accum"]):
                sync = nullcontext() if not ddp or j == cfg["grad_accum"] - 1 else fwd.no_sync()
                with timer.data():
                    batch = batch_fn(next(batches))
                with sync:
                    loss = loss_fn(fwd, batch)
                    (loss / cfg["grad_accum"]).backward()
                losses.append(loss.item())
            bad = optimizer_step(opt, params, cfg["grad_clip"], bad, iter_num)  # clip, step unless non-finite
            iter_num += 1
            timer.step(micro * cfg["grad_accum"])
            loss_sum, n_sum = loss_sum + sum(losses) / len(losses), n_sum + 1
            pbar.update(1)
            if master:
                pbar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
            if iter_num % cfg["eval_interval"] == 0 or iter_num == iters:
                perf = timer.stats()
                val = val_fn()
                best = min(best, val)
                if master:
                    log_eval(Path(cfg["out_dir"]) / ("log.jsonl" if tag == "vqa" else f"log_{tag}.jsonl"),
                             {"stage": tag, "iter": iter_num, "train_loss": loss_sum / n_sum, "val_loss": val,
                              "lr": opt.param_groups[0]["lr"], **perf})
                    save(iter_num, best)
                loss_sum, n_sum = 0.0, 0
                timer.reset()
    pbar.close()
    if sig.stop:  # saved, then out through run(main): exit code 130, and no later stage or twin starts
        if master:
            save(iter_num, best)
        raise Interrupted(f"{tag}: checkpoint saved in {cfg['out_dir']}; continue with "
                          f"--stage={cfg['stage'] if tag == 'siglip' else tag} --init_from=resume")


def text_batch(enc, texts, dev, max_len=512):
    """-> ids (N, T) padded with EOS, pad (N, T) True on padding."""
    eos = enc.encode_single_token("<|end_of_text|>")
    ids = [enc.encode(t, disallowed_special=())[:max_len] for t in texts]
    T = max(map(len, ids))
    out = torch.full((len(ids), T), eos)
    for j, s in enumerate(ids):
        out[j, : len(s)] = torch.tensor(s)
    return out.to(dev), (torch.arange(T)[None] >= torch.tensor([len(s) for s in ids])[:, None]).to(dev)


def sentence_regions(labels) -> set:
    """The regions a sentence's findings (a row of data.report_labels) sit in: their organs as question_region maps
    them, "lungs" for lung findings."""
    return {ORGAN.get(l, "lungs") for l, y in zip(LABELS, labels) if y}


def outline_covers(outline, regions) -> bool:
    """Whether a sentence about `regions` describes a volume drawn with `outline` (None: no outline): always without
    one; with one, when the outlined region is among them (either lung for a lung finding)."""
    return outline is None or outline in regions or ("lungs" in regions and "lung" in outline)


@functools.lru_cache(maxsize=None)
def report_sentences(report: str) -> tuple:
    """A report's sentences, their rows of data.report_labels (n, 18) and the whole report's row (18,), bool: read once
    per report (the keyword labeler was most of a SigLIP batch's CPU time). Shared: never modify them."""
    sents = re.split(r"(?<=[.!?])\s+", report)
    rows = report_labels(sents + [report]).astype(bool)
    return sents, rows[:-1], rows[-1]


def sentence_pairs(items, idx, g: torch.Generator, per_report: int = 2, outlines=None):
    """Sentence-level SigLIP pairs: up to `per_report` abnormal sentences of each report in the batch, and of a
    volume drawn with an outline (outlines: its region or None, per idx) only those about the outlined region; a
    sentence is a positive for every volume whose report states its findings, so two patients with the same finding
    are not pushed apart, and whose outline covers the sentence's region, so that the frozen tower learns what the
    outline channel means (the paper froze Med3DVLM's tower, never shown an outline). -> texts, z (B, N) in {-1, 1}."""
    outlines = outlines or [None] * len(idx)
    texts, labs = [], []
    for i, r in zip(idx, outlines):
        sents, rows, _ = report_sentences(items[i]["report"])
        keep = [(t, l) for t, l in zip(sents, rows) if l.any() and outline_covers(r, sentence_regions(l))]
        for k in torch.randperm(len(keep), generator=g)[:per_report].tolist():
            texts.append(keep[k][0])
            labs.append(keep[k][1])
    if not texts:  # a batch of normal scans: fall back to whole reports on the diagonal
        return [items[i]["report"] for i in idx], None
    labs = torch.as_tensor(np.stack(labs))  # (N, 18)
    rep = torch.as_tensor(np.stack([report_sentences(items[i]["report"])[2] for i in idx]))  # (B, 18)
    z = (labs[None] <= rep[:, None]).all(-1)  # (B, N): the report has every finding the sentence states
    where = torch.tensor([[outline_covers(r, sentence_regions(l)) for l in labs.tolist()] for r in outlines])
    return texts, (z & where).float() * 2 - 1


def train_siglip(cfg, items, val_items, enc, dev, ddp, rank, world, master, ckpt=None):
    """Stage 1: DCFormer + Mixer (+ a text encoder) on (volume, report sentence) pairs with the sigmoid loss; from
    scratch, or on from siglip.pt (ckpt: its weights, optimizer, RNG and step) with --init_from=resume."""
    torch.manual_seed(cfg["seed"])
    tower = VisionTower(cfg)  # built before the text encoder: the init order is the RNG's
    model = SigLIP(tower, TextEncoder(cfg["vocab_size"], cfg["text_dim"], cfg["text_layers"], cfg["proj_dim"])).to(dev)
    with torch.no_grad():  # b = -10 suits 32k-pair batches; at a few dozen it only collapses the first steps
        model.b.fill_(-math.log(cfg["siglip_batch"]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["siglip_lr"], betas=(0.9, 0.98), weight_decay=1e-4)
    ctx = autocast_ctx(cfg["dtype"], dev)  # bf16 on CUDA: the 3-D activations at 128 x 256 x 256 are most of memory
    if ckpt is not None:
        if "optimizer" not in ckpt:
            raise BadConfig(f"{Path(cfg['out_dir']) / 'siglip.pt'}: saved without its optimizer, so it cannot go on; "
                            "use it as it is (--stage=vqa) or train the stage again (--init_from=scratch)")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
    if master:
        print(f"SigLIP: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(items)} volumes "
              f"with their reports' sentences, {cfg['siglip_iters']} steps of {cfg['siglip_batch']}")

    def batch_on(its, idx, g):  # -> x (B, 2, Z, Y, X), ids (N, T), pad (N, T), z (B, N) or None
        xs, drawn = [], []
        for i in idx:  # the CT, with probability siglip_contour one of its regions' outline (so that channel learns)
            regions = sorted(its[i]["outlines"] if "outlines" in its[i] else its[i]["region_masks"])
            r = regions[int(torch.randint(len(regions), (), generator=g))]
            use = float(torch.rand((), generator=g)) < cfg["siglip_contour"]
            xs.append(model_input(its[i]["volume"].to(dev).float(), outline_of(its[i], r, dev) if use else None))
            drawn.append(r if use else None)
        texts, z = sentence_pairs(its, idx, g, outlines=drawn)
        return (torch.stack(xs), *text_batch(enc, texts, dev), None if z is None else z.to(dev))  # built on dev

    @torch.no_grad()
    def val_fn():
        idx = list(range(min(len(val_items), cfg["siglip_batch"])))
        with ctx:
            return model(*batch_on(val_items, idx, torch.Generator().manual_seed(0))).item()

    def loss_fn(fwd, batch):
        with ctx:
            return fwd(*batch)

    def save(it, best):
        save_checkpoint(Path(cfg["out_dir"]) / "siglip.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                              "iter_num": it, "config": cfg, "val_loss": best,
                                                              "rng": rng_state()})
    iters = cfg["siglip_iters"]
    train_loop({**cfg, "eval_interval": max(1, iters // 3), "grad_accum": 1}, "siglip", model, opt, len(items),
               lambda idx: batch_on(items, idx, torch.Generator().manual_seed(idx[0] * 7919 + len(idx))),
               loss_fn, val_fn, save, iters=iters, lr=cfg["siglip_lr"], warmup=max(1, iters // 10),
               micro=cfg["siglip_batch"] // world, start=0 if ckpt is None else ckpt["iter_num"], dev=dev, ddp=ddp,
               rank=rank, world=world, master=master)


def vqa_losses(fwd, batch, alpha, cfg, lora_params):
    """Sec. 4: class-balanced focal (yes/no head) + NLL (open answer tokens) + lambda_reg ||LoRA||^2."""
    feats, inputs, targets, tmask, last, cls = batch
    logits, yn = fwd(feats, inputs, tmask, last)
    loss = logits.sum() * 0.0 + yn.sum() * 0.0  # every parameter takes part (DDP), whatever the batch holds
    if (cls >= 0).any():
        loss = loss + focal_loss(yn[cls >= 0], cls[cls >= 0], cfg["focal_gamma"], alpha.to(yn.device))
    if (targets >= 0).any():
        loss = loss + F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    if lora_params:
        loss = loss + cfg["lora_l2"] * sum(p.pow(2).sum() for p in lora_params)
    return loss


def run_vqa(cfg, tower_state, items, val_items, test_items, enc, dev, ddp, rank, world, master, ckpt=None) -> dict:
    """Stage 2 for one variant (prompt, blind): frozen tower (features cached), adapter + SSA/MSSA + decoder (or
    LoRA) + head trained (or resumed from ckpt) -> ckpt.pt; then the test questions -> its scores and predictions,
    and (unless blind) the same questions about another scan: scores and test loss, own scan vs another."""
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg).to(dev)
    if ckpt is not None:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=not cfg["llm"])
        assert not unexpected, unexpected
    else:
        model.tower.load_state_dict(tower_state)
    Path(cfg["out_dir"]).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    qs, val_qs = questions_of(items), questions_of(val_items)
    if cfg["extra_questions"] and cfg["data"] == "synthetic":
        qs += extra_questions(items, "train", cfg["seed"])
    cache, val_cache = feature_cache(model, items, qs, cfg, dev), feature_cache(model, val_items, val_qs, cfg, dev)
    if ckpt is None and not cfg["blind"]:
        f = torch.stack(list(cache.values()))  # (N, N_s, proj_dim)
        model.feat_mu.copy_(f.mean(0))
        model.feat_sd.copy_(f.std(0) + 1e-5)
    counts = Counter(q["answer"] for _, q in qs if q["kind"] in ("closed", "region"))
    alpha = class_balanced_alpha([counts[a] for a in YES_NO], cfg["cb_beta"])
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    opt = torch.optim.AdamW([{"params": lora, "weight_decay": cfg["weight_decay"]},
                             {"params": other, "weight_decay": 0.0}],
                            lr=cfg["learning_rate"], betas=(0.9, 0.98), fused="cuda" in dev)
    micro = cfg["batch_size"] // world // cfg["grad_accum"]
    if micro < 1:
        raise BadConfig(f"--batch_size={cfg['batch_size']}: below the world size ({world}) x --grad_accum")
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
    ctx = autocast_ctx(cfg["dtype"], dev)
    if cfg["compile"]:  # in place: the state dict keeps its names (torch.compile's wrapper would add "_orig_mod.",
        model.decoder.compile()  # and its checkpoint would not load without --compile)
    if master:
        n_all, n_tr = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in lora + other)
        k = sum(isinstance(layer, SliceBlock) for layer in model.decoder.layers)
        print(f"VQA --prompt={cfg['prompt']}{' --blind' if cfg['blind'] else ''} "
              f"--decoder={cfg['llm'] or cfg['decoder']}: {n_all / 1e6:.2f}M parameters, {n_tr / 1e6:.2f}M trained "
              f"({100 * n_tr / n_all:.1f}%), "
              f"{model.tower.n_visual} visual tokens, SSA/MSSA {f'in blocks 0..{k - 1}' if k else 'off'}, "
              f"{len(qs)} train / {len(val_qs)} val questions, class weights No/Yes {alpha.tolist()}")

    def loss_fn(fwd, batch):
        with ctx:
            return vqa_losses(fwd, batch, alpha, cfg, lora)

    @torch.no_grad()
    def mean_loss(samples, cache):
        model.eval()
        tot = sum(vqa_losses(model, vqa_batch(samples[s: s + micro], cache, enc, cfg, dev), alpha, cfg, lora).item()
                  * len(samples[s: s + micro]) for s in range(0, len(samples), micro))
        model.train()
        return tot / len(samples)
    val_fn = lambda: mean_loss(val_qs, val_cache)

    def save(it, best):
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad and n.startswith("decoder.")}
        save_checkpoint(Path(cfg["out_dir"]) / "ckpt.pt", {
            "model": {k: v for k, v in model.state_dict().items() if k not in frozen or not cfg["llm"]},
            "optimizer": opt.state_dict(), "iter_num": it, "best_val_loss": best, "config": cfg, "rng": rng_state()})
    model.train()
    train_loop(cfg, "vqa", model, opt, len(qs), lambda idx: vqa_batch([qs[i] for i in idx], cache, enc, cfg, dev),
               loss_fn, val_fn, save, iters=cfg["max_iters"], lr=cfg["learning_rate"], warmup=cfg["warmup_iters"],
               micro=micro, start=0 if ckpt is None else ckpt["iter_num"], dev=dev, ddp=ddp, rank=rank, world=world,
               master=master, model_args=lambda b: (b[0], b[1], b[3], b[4]))
    if not master:
        return {}
    thr = val_thresholds(val_qs, yes_log_odds(model, enc, cfg, val_qs, val_cache, dev, ctx)) if cfg["calibrate"] else {}
    if thr:
        print(f"--calibrate: Yes above the log-odds {thr} (chosen on the {len(val_qs)} validation questions)")
    test_qs = questions_of(test_items)
    cache = feature_cache(model, test_items, test_qs, cfg, dev)
    log_odds = yes_log_odds(model, enc, cfg, test_qs, cache, dev, ctx)
    preds = answer(model, enc, cfg, test_qs, cache, dev, ctx, log_odds, thr)
    res = {"prompt": cfg["prompt"], "blind": cfg["blind"], "decoder": cfg["llm"] or cfg["decoder"], "thresholds": thr,
           "scores": score(test_qs, preds), "reads": reads(test_qs, log_odds), "train_s": time.time() - t0,
           "peak_mb": peak_memory_mb(dev), "n_params": sum(p.numel() for p in model.decoder.parameters())}
    other = [(another_scan(test_items, i, q["outline"]), q) for i, q in test_qs]
    if not cfg["blind"] and all(j is not None for j, _ in other):  # each question about another scan, its own outline
        o_cache = feature_cache(model, test_items, other, cfg, dev)
        res["another_preds"] = answer(model, enc, cfg, other, o_cache, dev, ctx, thresholds=thr)
        res.update(another_scan=score(test_qs, res["another_preds"]), loss_own=mean_loss(test_qs, cache),
                   loss_another=mean_loss(other, o_cache))
    elif not cfg["blind"]:
        print(f"another-scan check left out: {sum(j is None for j, _ in other)} test question(s) name a region no "
              "other test scan has")
    (Path(cfg["out_dir"]) / "vqa_metrics.json").write_text(  # this variant alone
        json.dumps({k: v for k, v in res.items() if k != "another_preds"}, indent=2))
    one = lambda s: " ".join(str(s).splitlines())  # a generated newline would break the file's two lines a question
    lines = [f"{test_items[i]['name']} [{q['kind']}, outline: {q['outline']}] {one(q['question'])}\n  answer: "
             f"{one(p)}  reference: {one(q['answer'])}" for (i, q), p in zip(test_qs, preds)]
    (Path(cfg["out_dir"]) / "answers.txt").write_text("\n".join(lines) + "\n")
    return {**res, "preds": preds}


# -----------------------------------------------------------------------------
# Eval: closed accuracy (head), open BLEU-4 / ROUGE-L / METEOR and choice accuracy (generation)

@torch.no_grad()
def yes_log_odds(model, enc, cfg, samples, cache, dev, ctx) -> dict:
    """{index: logit(Yes) - logit(No)} of the head for every yes/no sample (closed, region)."""
    model.eval()
    yn, out = [j for j, (_, q) in enumerate(samples) if q["kind"] in ("closed", "region")], {}
    for s in range(0, len(yn), 64):
        js = yn[s: s + 64]
        feats, inputs, _, tmask, last, _ = vqa_batch([samples[j] for j in js], cache, enc, cfg, dev)
        with ctx:
            _, logits = model(feats, inputs, tmask, last)
        out.update(zip(js, (logits[:, 1] - logits[:, 0]).float().tolist()))
    return out


@torch.no_grad()
def answer(model, enc, cfg, samples, cache, dev, ctx, log_odds=None, thresholds=None) -> list:
    """Answers (strings) to samples: yes/no kinds through the head (log_odds: yes_log_odds' output, if already
    computed; "Yes" above thresholds[kind], 0 by default: the argmax), the others by greedy generation with the KV
    cache (grouped by question length, so a batch needs no padding). The answers never enter the input."""
    out, eos = [None] * len(samples), enc.encode_single_token("<|end_of_text|>")
    if log_odds is None:
        log_odds = yes_log_odds(model, enc, cfg, samples, cache, dev, ctx)
    for j, d in log_odds.items():
        out[j] = YES_NO[int(d > (thresholds or {}).get(samples[j][1]["kind"], 0.0))]  # a tie is "No"
    groups = {}
    for j, (_, q) in enumerate(samples):
        if q["kind"] not in ("closed", "region"):
            ids = encode_q(enc, q, cfg)[0]
            groups.setdefault(len(ids), []).append((j, ids))
    for group in tqdm(groups.values(), desc="generate", leave=False):
        for s in range(0, len(group), 32):
            part = group[s: s + 32]
            feats = vqa_batch([samples[j] for j, _ in part], cache, enc, cfg, dev)[0]
            prompt_ids = torch.tensor([ids for _, ids in part], device=dev)
            model.set_ctx(torch.ones_like(prompt_ids, dtype=torch.bool))
            try:
                with ctx:
                    new = generate(model.decoder, prompt_ids, model.prefix(feats), max_new_tokens=cfg["max_new_tokens"],
                                   eos_id=eos)
            finally:
                model.set_ctx(None)
            for (j, _), row in zip(part, new.tolist()):
                out[j] = enc.decode(row[: row.index(eos)] if eos in row else row).strip()
    return out


def val_thresholds(samples, log_odds) -> dict:
    """--calibrate: per yes/no kind, the log-odds threshold (a grid step of 0.05 in [-4, 4]) with the most right
    answers on these (validation) samples; of equals, the one nearest 0. The focal loss leaves the head's log-odds
    bunched near 0, where a small shift moves many answers."""
    grid = sorted(np.linspace(-4, 4, 161).round(2), key=abs)
    out = {}
    for kind in ("closed", "region"):
        d = np.array([log_odds[j] for j in log_odds if samples[j][1]["kind"] == kind])
        y = np.array([samples[j][1]["answer"] == "Yes" for j in log_odds if samples[j][1]["kind"] == kind])
        if len(d):
            out[kind] = float(max(grid, key=lambda t: ((d > t) == y).sum()))  # max keeps the first (nearest 0)
    return out


def score(samples, preds) -> dict:
    """Per kind: accuracy (closed, region: exact yes/no; choice: M3D's letter rule); open: BLEU-4, ROUGE-L, METEOR."""
    res = {}
    for kind in KINDS:
        p = [preds[j] for j, (_, q) in enumerate(samples) if q["kind"] == kind]
        ref = [q["answer"] for _, q in samples if q["kind"] == kind]
        if p and kind == "open":
            m = report_metrics(p, [[r] for r in ref])
            res.update(bleu4=m["bleu4"], rougeL=m["rougeL"], meteor=m["meteor"])
        elif p and kind == "choice":
            res[kind] = float(np.mean([choice_correct(a, r) for a, r in zip(p, ref)]))
        elif p:
            res[kind] = vqa_closed_accuracy(p, ref)
    return res


def reads(samples, log_odds) -> dict:
    """Which findings (closed questions) and regions (region questions) the model reads from the scan: per question
    text asked with both answers among the samples, the AUROC of the head's log-odds against the reference answers."""
    by = {}
    for j, (_, q) in enumerate(samples):
        if j in log_odds:
            by.setdefault(q["question"], []).append((q["answer"] == "Yes", log_odds[j]))
    return {t: dict(auroc=auroc([y for y, _ in v], [d for _, d in v]), n=len(v), yes=sum(y for y, _ in v))
            for t, v in sorted(by.items()) if 0 < sum(y for y, _ in v) < len(v)}


def same_answer(a: str, b: str) -> bool:  # case and a final period aside
    return a.strip().lower().rstrip(".") == b.strip().lower().rstrip(".")


def correct(samples, preds, kind) -> np.ndarray:
    """1 per question of `kind` answered right (same_answer), else 0: the bootstrap's input."""
    return np.array([same_answer(p, q["answer"]) for (_, q), p in zip(samples, preds) if q["kind"] == kind], float)


def peak_memory_mb(dev: str) -> float:
    if "cuda" in dev:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def blind_answers(train_qs, test_qs, by: str) -> list:
    """Image-blind answers from the dataset's own training questions (not --extra_questions'): the most frequent answer
    of each test question's kind (by="kind": the majority answer), or of its own text (by="question": the answer-rate
    prior, which knows that the phantom asks about one present finding and two absent ones; a text never asked in
    training gets its kind's)."""
    top = {}
    for _, q in train_qs:
        for key in ((q["kind"],), (q["kind"], q["question"]))[: 1 + (by == "question")]:
            top.setdefault(key, Counter())[q["answer"]] += 1
    pick = lambda key: top[key].most_common(1)[0][0] if key in top else None
    return [pick((q["kind"], q["question"])) or pick((q["kind"],)) or "" for _, q in test_qs]


def print_results(res: dict):
    cols = ("closed", "region", "choice", "bleu4", "rougeL", "meteor")
    print(f"\n{'test questions':<44}" + "".join(f"{c:>9}" for c in cols))
    for name, s in res["rows"].items():
        print(f"{name:<44}" + "".join(f"{100 * s[c]:>9.1f}" if c in s else f"{'-':>9}" for c in cols))
    for name, (own, other) in res.get("test_loss own / another scan", {}).items():
        print(f"{name}: test loss {own:.4f} with each question's own scan, {other:.4f} with another scan's")
    for name, d in res.get("paired", {}).items():
        print(f"{name}: {100 * d['diff']:+.1f} points, 95% paired bootstrap interval "
              f"[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] over {d['n']} questions")
    for name, rd in res.get("reads", {}).items():  # 0.5: the answer does not depend on the scan
        print(f"\nwhat {name} reads: AUROC of its P(Yes) per yes/no test question asked with both answers")
        for t, r in sorted(rd.items(), key=lambda kv: -kv[1]["auroc"]):
            print(f"  {r['auroc']:.2f}  ({r['yes']:>3} Yes of {r['n']:>3})  {t}")


# -----------------------------------------------------------------------------
# Predict: one NIfTI, one region mask, one question; a PNG montage of the prompted slices

def montage(volume, outline, path, n: int = 12):
    """Up to n axial slices the outline crosses (evenly spaced), grey CT with the outline in blue, in one PNG."""
    from PIL import Image
    zs = torch.nonzero(outline.flatten(1).any(1))[:, 0].tolist() or list(range(volume.shape[0]))
    zs = [zs[round(i)] for i in np.linspace(0, len(zs) - 1, min(n, len(zs)))]
    tiles = []
    for z in zs:
        g = (volume[z].clamp(0, 1) * 255).byte().numpy()
        rgb = np.stack([g, g, g], -1)
        rgb[outline[z].numpy() > 0] = (40, 90, 255)
        tiles.append(np.asarray(Image.fromarray(rgb).resize((192, 192), Image.NEAREST)))
    cols = min(4, len(tiles))
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % cols)
    grid = np.concatenate([np.concatenate(tiles[r: r + cols], 1) for r in range(0, len(tiles), cols)], 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return zs


@torch.no_grad()
def predict_file(cfg, model, enc, dev) -> str:
    """--predict: the answer to --question about one NIfTI, with --mask's outline (--prompt=contour); --kind, when
    not given, is choice with "Choices:", closed for a yes/no question, else open."""
    if not cfg["question"].strip():
        raise BadConfig("--question: empty; pass the question to answer, e.g. --question=\"Is there an abnormality "
                        "in the left lung?\"")
    if cfg["kind"] and cfg["kind"] not in KINDS:
        raise BadConfig(f"--kind={cfg['kind']!r}: unknown question kind; expected one of {KINDS}")
    first = cfg["question"].split()[0].lower()
    yes_no = first in ("is", "are", "does", "do", "has", "have", "can", "was", "were")
    kind = cfg["kind"] or ("choice" if "Choices:" in cfg["question"] else "closed" if yes_no else "open")
    raw, sp = load_ct(cfg["predict"], cfg["rescale"])
    spacing = tuple(f / s for f, s in zip(FOV, cfg["shape"]))
    vol = preprocess(raw, sp, target_spacing=spacing, shape=tuple(cfg["shape"]), window=(-1000, 200), norm="unit")
    outline = None
    if cfg["prompt"] == "none" and cfg["mask"]:
        print(f"note: --mask={cfg['mask']} is not used: {cfg['out_dir']} holds a --prompt=none model (no outline)")
    if cfg["prompt"] == "contour":
        if not cfg["mask"]:
            raise BadConfig("--mask: missing; a --prompt=contour model needs the region's mask (.nii.gz)")
        m, _ = load_nifti(cfg["mask"])  # BadVolume naming the file if unreadable
        if m.shape != raw.shape:
            raise BadVolume(f"{cfg['mask']}: mask shape {tuple(m.shape)} differs from the volume's {tuple(raw.shape)} "
                            f"({cfg['predict']}); the mask must be on the scan's grid")
        if not np.isin(vals := np.unique(m), (0, 1)).all():
            raise BadVolume(f"{cfg['mask']}: not a binary mask (values {vals[:6].tolist()}"
                            f"{' ...' if len(vals) > 6 else ''}); expected 0 outside and 1 inside one region")
        size = [max(1, round(n * s / t)) for n, s, t in zip(m.shape, sp, spacing)]
        m = F.interpolate(torch.as_tensor(m > 0.5).float()[None, None], size=size, mode="nearest")[0, 0]
        region = crop_or_pad(m, tuple(cfg["shape"]), value=0.0) > 0.5
        if not region.any():
            raise BadVolume(f"{cfg['mask']}: empty mask: no axial slice intersects the region (after resampling to "
                            f"{tuple(cfg['shape'])}), so there is no outline to draw and the prompt would be the text "
                            f"alone; pass a mask with voxels, or use a --prompt=none model")
        outline = boundary_prompt(region)
    feats = model.features(model_input(vol[None], outline)[None].to(dev)).float().cpu()
    q = {"question": cfg["question"], "kind": kind, "answer": "No", "outline": "mask"}
    cache = {(0, "mask" if outline is not None else None): feats[0]}
    metrics = Path(cfg["out_dir"]) / "vqa_metrics.json"  # the thresholds its evaluation used (--calibrate), if any
    thr = json.loads(metrics.read_text()).get("thresholds", {}) if metrics.is_file() else {}
    ans = answer(model, enc, cfg, [(0, q)], cache, dev, nullcontext(), thresholds=thr)[0]
    png = Path(cfg["out_dir"]) / f"predict_{Path(cfg['predict']).name.split('.')[0]}.png"
    zs = montage(vol, outline if outline is not None else torch.zeros_like(vol), png)
    drawn = "outline on" if outline is not None else "no outline (a --prompt=none model);"
    print(f"{cfg['predict']}: (z, y, x) {tuple(raw.shape)} -> {tuple(vol.shape)}; {drawn} {len(zs)} shown slices "
          f"{zs} -> {png}\nQ ({kind}): {rewrite(cfg['question'], cfg['prompt'], cfg['system_prompt'])}\nA: {ans}")
    return ans


# -----------------------------------------------------------------------------
# Table 1: prompt x decoder size, each cell a fresh process (its own peak memory)

TABLE_OWN = ("preset", "table", "stage", "baselines", "decoder", "prompt", "out_dir", "siglip_from", "init_from")


def table(cfg):
    """Each cell is this command's own configuration (every flag given to it, --data, --cache_dir, --calibrate, ...)
    with TABLE_OWN's keys set per cell: --stage=vqa from the one SigLIP tower, no twins, from scratch."""
    rows, base = [], Path(cfg["out_dir"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BadConfig("--table under torchrun: every rank would run all six cells; run it with python (each cell is "
                        "its own process)")
    if cfg["llm"]:
        raise BadConfig(f"--table with --llm={cfg['llm']}: the table's rows are the three from-scratch decoder sizes "
                        "(--decoder=s|m|l); run the --llm model alone (without --table)")
    siglip = Path(cfg["siglip_from"] or base / "siglip.pt")
    if not siglip.is_file():
        raise BadConfig(f"--table: {siglip}: no SigLIP tower; train one first (python boundary_vqa.py "
                        f"--stage=siglip --out_dir={base}) or pass --siglip_from")
    as_arg = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else v
    preset = {**DEFAULTS, **PRESETS[cfg["preset"]]}
    given = [f"--{k}={as_arg(v)}" for k, v in cfg.items() if k not in TABLE_OWN and v != preset[k]]
    for size in "sml":
        for pr in ("none", "contour"):
            out = base / f"table_{size}_{pr}"
            argv = [f"--preset={cfg['preset']}", *given, "--stage=vqa", "--baselines=false", f"--decoder={size}",
                    f"--prompt={pr}", f"--out_dir={out}", f"--siglip_from={siglip}"]
            print(f"{size} {pr}: training in its own process -> {out}", flush=True)  # its output comes when it ends
            r = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True)
            if r.returncode:
                print(f"{size} {pr}: failed\n{r.stderr[-2000:]}")
                continue
            rows.append(json.loads((out / "vqa_metrics.json").read_text()))
            s = rows[-1]["scores"]
            print(f"{size} {pr:<8} closed {s.get('closed', 0):.3f} region {s.get('region', 0):.3f} BLEU-4 "
                  f"{s.get('bleu4', 0):.3f} ROUGE-L {s.get('rougeL', 0):.3f} METEOR {s.get('meteor', 0):.3f} "
                  f"peak {rows[-1]['peak_mb']:.0f} MB  decoder {rows[-1]['n_params'] / 1e6:.2f}M", flush=True)
    (base / "table.json").write_text(json.dumps(rows, indent=2))
    return rows


# -----------------------------------------------------------------------------

# Copied from ct_scroll._cast
def _cast(key, value: str, default):
    """Cast a command-line string to the type of the key's default. An error naming the key: a wrong type, a
    list of another length than the default's, a number that is not finite, or negative where the default is not
    (a list whose default values are all positive must stay positive)."""
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false"):
                raise ValueError
            return value.lower() == "true"
        if isinstance(default, tuple):  # comma lists -> tuples of int/float
            out = tuple(int(v) if v.strip().lstrip("-").isdigit() else float(v) for v in value.split(",") if v.strip())
            if out and default and len(out) != len(default):
                raise SystemExit(f"--{key}={value!r}: expected {len(default)} comma-separated values, like "
                                 f"{','.join(map(str, default))}")
            if not all(math.isfinite(v) for v in out) or (all(d > 0 for d in default) and any(v <= 0 for v in out)):
                raise SystemExit(f"--{key}={value!r}: every value must be a positive finite number")
            return out
        out = type(default)(value)
    except ValueError:
        raise SystemExit(f"--{key}={value!r}: expected a value like {default!r}") from None
    if isinstance(out, (int, float)) and (not math.isfinite(out) or (default >= 0 and out < 0)):
        raise SystemExit(f"--{key}={value!r}: expected a finite number" + (" >= 0" if default >= 0 else ""))
    return out


# Copied from ct_scroll.parse_config
def parse_config(argv, defaults, presets):
    """defaults <- preset <- command line. `--key=value` and `--key value` both work; unknown keys and bad values
    stop with a message that lists the valid keys; `--help` prints every key with its default, its cpu preset
    value where that differs, and its comment in this file's config block."""
    args, given = list(sys.argv[1:] if argv is None else argv), {}
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            notes = {}
            for line in Path(__file__).read_text().splitlines():  # `key = value  # what it means`, first one wins
                key, _, rest = line.partition(" = ")
                if key in defaults and "  # " in rest:
                    notes.setdefault(key, rest.split("  # ", 1)[1])
            print(f"usage: python {os.path.basename(sys.argv[0])} [--key=value ...]   presets: {', '.join(presets)}")
            for k, v in defaults.items():
                cpu = f" (cpu: {presets['cpu'][k]!r})" if k in presets.get("cpu", {}) else ""
                print(f"  --{k}={v!r}{cpu}  {notes.get(k, '')}".rstrip())
            raise SystemExit(0)
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in defaults:
            raise SystemExit(f"unknown argument {arg!r}; valid keys: {', '.join('--' + k for k in defaults)}")
        if not eq:
            if not args:
                raise SystemExit(f"--{key} needs a value")
            value = args.pop(0)
        given[key] = value
    name = given.get("preset") or defaults["preset"] or ("paper" if torch.cuda.is_available() else "cpu")
    if name not in presets:
        raise SystemExit(f"unknown preset {name!r}; valid presets: {', '.join(presets)}")
    cfg = {**defaults, **presets[name], "preset": name}
    for key, value in given.items():
        if key != "preset":
            cfg[key] = _cast(key, value, cfg[key])
    return cfg


def get_tokenizer(cfg, items=None, save=True):
    """Llama's tokenizer with --llm; else data.py's BPE on the training reports, questions (both prompts), answers."""
    if cfg["llm"]:
        return load_llama3_tokenizer(Path(cfg["llm"]) / "tokenizer.model")
    path = Path(cfg["out_dir"]) / "bpe.tiktoken"
    if items is None:
        return load_bpe(path)
    texts = [it["report"] for it in items] + [SYSTEM]
    texts += [f"{q['question']} {q['answer']}" for it in items for q in it["questions"]]
    texts += [rewrite(q["question"], "contour").removeprefix(SYSTEM) for it in items[:50] for q in it["questions"]]
    enc = train_bpe(texts, cfg["vocab_size"])
    if save:
        save_bpe(enc, path)
    return enc


def check_config(cfg):
    """What parses but cannot work stops here, before any work, naming the key."""
    for key, ok in (("stage", ("all", "siglip", "vqa")), ("prompt", ("contour", "none")), ("decoder", ("s", "m", "l")),
                    ("init_from", ("scratch", "resume")), ("rescale", ("auto", "header", "none"))):
        if cfg[key] not in ok:
            raise BadConfig(f"--{key}={cfg[key]!r}: expected one of {ok}")
    for key in ("max_iters", "eval_interval", "batch_size", "grad_accum", "n_train", "n_val", "n_test", "siglip_iters",
                "siglip_batch", "enc_kernel", "mixer_tokens", "proj_dim", "text_dim", "text_layers", "mssa_heads",
                "lora_r", "vocab_size", "max_text_len", "max_new_tokens"):
        if cfg[key] < 1:
            raise BadConfig(f"--{key}={cfg[key]}: must be at least 1")
    if cfg["enc_kernel"] % 2 == 0:
        raise BadConfig(f"--enc_kernel={cfg['enc_kernel']}: must be odd (the decomposed convolutions keep the size)")
    if cfg["text_dim"] % 4:
        raise BadConfig(f"--text_dim={cfg['text_dim']}: must be a multiple of the text encoder's 4 heads")
    for key in ("cb_beta", "lora_dropout"):  # negative values stop in parse_config
        if cfg[key] >= 1:
            raise BadConfig(f"--{key}={cfg[key]}: must be below 1")
    if cfg["siglip_contour"] > 1:
        raise BadConfig(f"--siglip_contour={cfg['siglip_contour']}: a share of the volumes, at most 1")
    grid = [s // (st * 2 ** (len(cfg["enc_dims"]) - 1)) for s, st in zip(cfg["shape"], cfg["enc_stem"])]
    if min(grid) < 1:
        raise BadConfig(f"--shape={','.join(map(str, cfg['shape']))}: too small for the encoder (stem "
                        f"{cfg['enc_stem']}, then /2 per stage: the last stage's grid would be {grid})")
    i = "sml".index(cfg["decoder"])
    d, h, kv = cfg["dims"][i], cfg["heads"][i], cfg["kv_heads"][i]
    if not cfg["llm"] and (d % h or h % kv or (d // h) % 2 or d % cfg["mssa_heads"]):
        raise BadConfig(f"--decoder={cfg['decoder']}: width {d}, {h} heads, {kv} key-value heads, --mssa_heads="
                        f"{cfg['mssa_heads']}: the width must split into heads of an even size (RoPE), the heads into "
                        "key-value groups, and the width into --mssa_heads")


def main(argv=None):
    cfg = parse_config(argv, DEFAULTS, PRESETS)
    check_config(cfg)
    if cfg["table"]:
        return table(cfg)
    ddp, rank, world, dev, master = setup_ddp(cfg["device"])
    if master:
        print(f"preset {cfg['preset']}, device {dev}" + ("" if world == 1 else f", DDP world {world}"))
    out = Path(cfg["out_dir"])
    # --init_from=resume: ckpt.pt (the VQA stage), or siglip.pt for --stage=siglip and for --stage=all before any
    # ckpt.pt (a SigLIP stage stopped part-way goes on, then the VQA stage starts); None from scratch
    on_siglip = not cfg["predict"] and (cfg["stage"] == "siglip" or (cfg["stage"] == "all"
                                                                     and not (out / "ckpt.pt").is_file()))
    ckpt = None if on_siglip else resume_checkpoint(cfg, MODEL_KEYS, master, defaults=DEFAULTS)
    sig_ckpt = None if not on_siglip else resume_checkpoint(cfg, MODEL_KEYS, master, "siglip.pt", "log_siglip.jsonl",
                                                            defaults=DEFAULTS)
    if cfg["predict"]:
        if ckpt is None:
            raise BadConfig("--predict needs a trained run: add --init_from=resume (and its --out_dir)")
        enc = get_tokenizer(cfg)
        model = build_model(cfg).to(dev)
        model.load_state_dict(ckpt["model"], strict=not cfg["llm"])
        return predict_file(cfg, model, enc, dev)
    check_out_dir(out)  # writable, before the phantoms are rendered
    if not cfg["llm"]:  # the whole decoder trains (--decoder=l: 1.6B parameters); the smallest BPE vocabulary: a bound
        check_fits(lambda: build_model({**cfg, "vocab_size": 256 + len(SPECIAL_TOKENS)}), dev,
                   f"--decoder={cfg['decoder']}", "pass a smaller --decoder or --llm=<a Meta Llama folder> (frozen, "
                   "with LoRA)")
    siglip_path = Path(cfg["siglip_from"] or out / "siglip.pt")
    if cfg["stage"] == "vqa" and ckpt is None:  # the tower's file and flags, checked before hours of rendering
        if not siglip_path.is_file():
            raise BadConfig(f"--stage=vqa: {siglip_path}: no SigLIP tower; train one (--stage=siglip or --stage=all) "
                            "or pass --siglip_from")
        trained = load_checkpoint(siglip_path, mmap=True)["config"]
        for k in TOWER_KEYS:  # the frozen tower is built from this run's flags: the ones it was trained with
            if (v := trained.get(k, DEFAULTS[k])) != cfg[k]:
                raise BadConfig(f"--{k}={cfg[k]}: {siglip_path} holds a tower trained with --{k}={v}; pass that, or "
                                f"train a tower (--stage=all)")
    items, val_items = get_items(cfg, "train", master), get_items(cfg, "val", master)
    enc = get_tokenizer(cfg, None if ckpt is not None or sig_ckpt is not None else items, save=master)
    if not cfg["llm"]:
        cfg["vocab_size"] = enc.n_vocab  # a small corpus can run out of merges before the requested size
    if cfg["stage"] in ("all", "siglip") and ckpt is None:
        t0 = time.time()
        train_siglip(cfg, items, val_items, enc, dev, ddp, rank, world, master, sig_ckpt)
        if master:
            print(f"SigLIP stage: {time.time() - t0:.0f}s -> {out / 'siglip.pt'}")
            siglip_path = out / "siglip.pt"
        if cfg["stage"] == "siglip":
            return None
    if ddp:
        torch.distributed.barrier()
    sig = load_checkpoint(siglip_path) if ckpt is None else ckpt
    if ckpt is None and sig["iter_num"] < sig["config"]["siglip_iters"] and master:  # a SigLIP stage cut short
        print(f"warning: {siglip_path} holds {sig['iter_num']} of its {sig['config']['siglip_iters']} SigLIP steps; "
              f"finish it first with --stage=siglip --init_from=resume")
    src = sig["model"]  # the twins' frozen tower
    tower_state = {k[len("tower."):]: v for k, v in src.items() if k.startswith("tower.")}
    test_items = get_items(cfg, "test", master)
    variants = [dict(cfg)]
    if cfg["baselines"]:
        other = "none" if cfg["prompt"] == "contour" else "contour"
        variants += [{**cfg, "prompt": other, "out_dir": str(out / f"prompt_{other}")},
                     {**cfg, "blind": True, "out_dir": str(out / "question_only")}]
    results = []
    for k, v in enumerate(variants):
        if v["out_dir"] != cfg["out_dir"]:
            Path(v["out_dir"]).mkdir(parents=True, exist_ok=True)
            if master and not cfg["llm"]:
                save_bpe(enc, Path(v["out_dir"]) / "bpe.tiktoken")
        v_ckpt = ckpt if k == 0 else None
        if k and ckpt is not None and (Path(v["out_dir"]) / "ckpt.pt").is_file():  # resumed: the twins go on too
            v_ckpt = resume_checkpoint(v, MODEL_KEYS, master, defaults=DEFAULTS)
        results.append(run_vqa(v, tower_state, items, val_items, test_items, enc, dev, ddp, rank, world, master,
                               v_ckpt))
    if ddp:
        torch.distributed.destroy_process_group()
    if not master or not results[0]:
        return None
    train_qs, test_qs = questions_of(items), questions_of(test_items)

    def name(r):
        if r["blind"]:
            return "question-only (visual tokens zeroed)"
        return f"--prompt={r['prompt']} --decoder={r['decoder']}"
    priors = {b: blind_answers(train_qs, test_qs, by) for b, by in (("majority answer", "kind"),
                                                                    ("answer-rate prior", "question"))}
    res = {"rows": {**{b: score(test_qs, p) for b, p in priors.items()}, **{name(r): r["scores"] for r in results}},
           "peak_mb": {name(r): r["peak_mb"] for r in results}, "paired": {}, "test_loss own / another scan": {},
           "reads": {name(results[0]): results[0]["reads"]}}
    for r in results:  # the image-blind check without retraining: the same model asked about another scan
        if "another_scan" in r:
            res["rows"][f"{name(r)}, another scan"] = r["another_scan"]
            res["test_loss own / another scan"][name(r)] = (r["loss_own"], r["loss_another"])
    pairs = [(results[0]["preds"], r["preds"], name(r)) for r in results[1:]]
    pairs += [(results[0]["preds"], p, f"the {b}") for b, p in priors.items()]
    if "another_preds" in results[0]:
        pairs.append((results[0]["preds"], results[0]["another_preds"], "the same model asked about another scan"))
    for own, ref, ref_name in pairs:
        for kind in ("closed", "region"):
            a, b = correct(test_qs, own, kind), correct(test_qs, ref, kind)
            if not len(a):  # RadGenome's QA has no closed (whole-scan) questions
                continue
            lo, hi = bootstrap_diff(a, b)
            res["paired"][f"{kind}: {name(results[0])} minus {ref_name}"] = dict(diff=float(a.mean() - b.mean()),
                                                                                 lo=lo, hi=hi, n=len(a))
    print_results(res)
    (out / "metrics.json").write_text(json.dumps({**res, "config": cfg}, indent=2, default=str))
    return res


if __name__ == "__main__":
    run(main)
