"""SAMF + Ao2D: a DINO-pretrained 2D slice encoder, a 3D aggregator and slice-attentive fusion feed an LLM that writes
CT reports and answers multiple-choice questions.

Paper: A. Hosseini, A. Ibrahim, A. Serag, "From Slices to Volumes: Multi-Scale Fusion of 2D and 3D Features for CT
Scan Report Generation", MICCAI 2025 (open access; code github.com/serag-ai/SAMF). Eq. 1-12, Tables 1-3.

x one CT volume, s one of its S centre axial slices, t one of the T question tokens, d = d_proj = the decoder width:
    Eq. 1     z_2d^s = f_2d(s): a ViT (CLS token) pretrained with DINO on slices of the three planes (stage 1)
    Eq. 2     z_3d = f_3d({z_2d^s}): a CLS token + positions + 2 transformer layers over the S slices; the CLS output
    Eq. 3-4   F_2d = W_2d z_2d (B, S, d),   F_3d = W_3d z_3d (B, d),   F_text = W_text E(question) (B, T, d)
    Eq. 5     alpha = softmax_S(F_2d . F_3d / sqrt(d))                 (B, S)
    Eq. 6     beta  = softmax_T(F_text . F_3d / sqrt(d))               (B, T), padding masked
    Eq. 7     gamma = softmax_S(F_text . F_2d^T / sqrt(d))             (B, T, S)   (Ao2D only)
    Eq. 8-9   F_2d3d = alpha^T F_2d,   F_t3d = beta^T F_text            (B, d) each
    Eq. 11    F_t2d = 1/T sum_t sum_s gamma_ts F_2d,s                   (B, d)      (Ao2D only)
    Eq. 10/12 F_fused = W_fusion [F_3d || F_2d3d || F_t3d (|| F_t2d)]   (B, dim)
    Decoder   <BOS> [F_fused, F_2d,1 .. F_2d,S] question answer <EOS>, loss on the answer tokens and <EOS> only.
Eq. 9 as printed (beta^T F_3d) would return F_3d (beta sums to one); the authors' code pools the text, as here.
The fusion sees the question only (their code feeds the whole training sequence, answer included; a test holds that
the answer never reaches F_fused). Visual tokens: F_fused and the S slice tokens; the authors repeat F_fused 256
times, one vector, too little for a report naming 18 findings with side and level (--slice_tokens=false: F_fused).

Stages (`python samf.py` runs the missing ones in order: dino -> [warmup] -> finetune):
    --stage=dino      DINO (Caron et al. 2021) on axial, coronal and sagittal training slices: teacher = EMA of the
                      student (momentum 0.996 -> 1, cosine), centring and sharpening (temperatures 0.04 / 0.1), 2
                      global + n local crops, head MLP -> L2-normalised bottleneck -> prototypes; k-NN probe logged.
    --stage=warmup    Table 3's SSL warm-up (--ssl_warmup): f_2d frozen, f_3d trained with InfoNCE. Anchor i: z_3d of S
                      adjacent axial slices of volume i; positive: z_3d of S adjacent coronal or sagittal slices (one
                      random plane) of volume i; negatives: that view of the other B - 1 volumes of the batch.
                      L = (CE(U V^T / tau, diag) + CE(V U^T / tau, diag)) / 2, U, V the L2-normalised z_3d.
    --stage=finetune  f_2d -> f_3d -> SAMF or --fusion=ao2d -> decoder, on each volume's report ("Write the findings
                      of this chest CT.") and its M3D multiple choice ("... Choices: A. .. B. .. C. .. D. ..", answer
                      "B. text") in one micro-batch. Without dino.pt it warns and f_2d starts from random init.
Evaluation (test split): BLEU-1..4, METEOR, ROUGE-L, CIDEr and the clinical-efficacy metrics of the 18 findings read
from the reports; MCQ accuracy (M3D's rule: the answer's letter and its period appear in the output) and precision /
recall / F1 over letters: the predicted letter is the output's first "X." (X in A-D), each letter a class, macro over
A-D, zero_division = 0. Beside them, image-blind baselines: chance, the most frequent letter, the prevalence prior, the
answer-rate prior (the option most often right when offered in training), the visual tokens zeroed, another scan's
tokens, each margin with a paired bootstrap interval; and how often the letter is that of the option named after it
(a decoder from scratch must learn that binding; M3D's rule scores the letter alone). A second read of the same
model, "ranked" (not in the paper): the likeliest of the four offered answers, so letter and text always agree, with
its own zeroed and another-scan twins. BERT-F1 and the Llama-70B score need downloaded models: not computed.

Deviations:
- --vit_stem=conv (cpu preset): a ViT on a conv stem (Xiao et al. 2021) at 64 px, 128-d x 2, since a patch ViT learns
  nothing from a few hundred phantoms in minutes (paper preset: ViT-B/16 at 224). DINO on the training phantoms'
  slices (MedMNIST cannot be downloaded), 2 + 4 crops instead of 2 + 10.
- W_text on both fusions (their SAMF uses the embeddings unprojected); the 1/sqrt(d) scale is ours (at d = 3072 an
  unscaled softmax is one-hot).
- norm_2d: z_2d standardised over the batch before W_2d and f_3d (without it f_2d collapsed to a constant).
- --prompt_iters=N, a findings token (not in the paper; 3000 at cpu, 0 at paper; from-scratch decoder only): the last
  N steps first train f_2d for --label_iters steps on the 18 labels (a binary cross-entropy through a linear head on
  the training scans' slice embeddings z_2d, all S side by side), then freeze f_2d and f_3d (features cached), fit the
  label head (a logistic regression on the training scans' z_2d, flattened; a finding is `readable` at validation
  AUROC >= 0.8), re-initialise the decoder and train it on multiple choice (reports every 8th step) with one more
  prefix token, label_embed(readable * calls): the true labels in training, the label head's calls at evaluation and
  --predict. Labels of training and validation scans only; none reaches a test answer. --feat_noise adds Gaussian
  noise to the cached features in training: without it the decoder memorised the training scans (0.97 of their
  questions right, 0.52 of the test's) instead of learning the prior and the token.
- --mcq_aug: training questions get reshuffled letters and absent options redrawn from the patient's absent labels.
- --llm=path: a Meta-format Llama 3 with LoRA (as hilt.py) instead of Phi-3 (other loading code); without it the
  decoder trains from scratch on data.py's BPE. Learning rates and steps are not in the paper.

Commands:
    python samf.py                                           # cpu preset on CPU: dino -> warmup -> finetune -> eval
    python samf.py --stage=dino|warmup|finetune              # one stage (each resumable with --init_from=resume)
    python samf.py --init_from=resume                        # after Ctrl-C: that stage goes on, then the later ones
    python samf.py --fusion=ao2d --out_dir=out/samf_ao2d     # + Ao2D (Eq. 11-12)
    python samf.py --max_iters=250 --prompt_iters=0 --eval_interval=125   # the paper's fine-tuning alone
    python samf.py --freeze_vit=true --freeze_aggregator=true --ssl_warmup=false   # Table 3's rows
    python samf.py --preset=paper --param_counts=true        # paper sizes on the meta device: parameter counts
    python samf.py --preset=paper --llm=/path/to/Llama-3.2-1B-Instruct/original   # GPU, LoRA on a Llama
    torchrun --standalone --nproc_per_node=2 samf.py --stage=finetune               # DDP
    python samf.py --init_from=resume --predict=scan.nii.gz [--question="... Choices: A. .. B. .. C. .. D. .."]
--predict reads the NIfTI with data.load_ct (--rescale) and writes <name>_attention.png (alpha, and gamma for Ao2D);
with --question it prints the generated answer and the ranked one.
"""
import copy
import json
import math
import os
import re
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
from PIL import Image, ImageDraw
from tqdm import tqdm

from data import (FOV, LABELS, SPECIAL_TOKENS, BadConfig, InputError, Interrupted, StopOnSigint, auroc,
                  best_f1_thresholds, bootstrap_diff, ce_baselines, choice_correct, clinical_metrics, get_dataset,
                  labels_of, load_bpe, load_checkpoint, load_ct, load_llama3_tokenizer, preprocess, questions_in,
                  report_metrics, reports_of, resume_cleanup, rng_state, run, save_bpe, save_checkpoint, set_rng_state,
                  setup_ddp, train_bpe)
from data import (StepTimer, Stream, autocast_ctx, check_fits, check_out_dir, forward_flops, log_eval, optimizer_step,
                  wrap_model)

# -----------------------------------------------------------------------------
preset = ""  # cpu | paper; empty: paper on CUDA, cpu otherwise
device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda, cuda:1, ...
dtype = "bfloat16"  # autocast dtype on CUDA (bfloat16 | float32); CPU always runs float32
compile = False  # torch.compile the model
seed = 1337  # model init, batch order and synthetic patients
data = "synthetic"  # synthetic | a prepared cache folder | a CT-RATE root
out_dir = "out/samf"  # dino.pt, warmup.pt, ckpt.pt, log*.jsonl, metrics.json, samples.txt, bpe.tiktoken, PNGs
init_from = "scratch"  # scratch | resume (the checkpoint of --stage)
stage = ""  # dino | warmup | finetune; empty: the missing stages in order (dino if no dino.pt, warmup, finetune)
fusion = "samf"  # samf (Eq. 10) | ao2d (+ Attention over 2D slices, Eq. 11-12)
shape = (32, 224, 224)  # (z, y, x) volume the phantom is rendered at / real CT is resampled and cropped to
spacing = ()  # mm (z, y, x) real CT is resampled to; () = the phantom's field of view (360 mm) over shape
n_slices = 24  # S: centre axial slices given to f_2d (the authors' code: 24 around the middle)
vit_img = 224  # f_2d input size (slices are resized to vit_img x vit_img)
vit_patch = 16  # f_2d patch size: tokens are (vit_img / vit_patch)^2
vit_stem = "patch"  # patch (ViT-B/16's linear patch embedding) | conv (log2(patch) stride-2 3x3 convs)
vit_dim = 768  # f_2d width (ViT-B); f_3d has the same width
vit_depth = 12  # f_2d layers
vit_heads = 12  # f_2d heads
agg_depth = 2  # f_3d transformer layers
agg_heads = 8  # f_3d heads
dino_iters = 170000  # stage 1 steps (~100 epochs of the paper's 108k slices at batch 64)
dino_batch = 64  # slices per DINO step
dino_lr = 1.25e-4  # DINO: 5e-4 * batch / 256
dino_local = 10  # local crops per slice (DINO: 2 global + 10 local)
dino_local_size = 96  # local crop size in px (global crops are vit_img)
dino_hidden = 2048  # DINO head MLP width
dino_bottleneck = 256  # DINO head bottleneck before the prototypes
dino_out = 2048  # DINO prototypes (the authors' projection head: 2048-d)
dino_momentum = 0.996  # teacher EMA momentum at the start, cosine to 1
ssl_warmup = False  # stage 2 (Table 3's SSL warm-up of f_3d) before fine-tuning
warmup_iters = 2000  # stage 2 steps
warmup_batch = 32  # volumes per InfoNCE step (2B views)
warmup_tau = 0.1  # InfoNCE temperature
slice_tokens = True  # give the decoder the S projected slice tokens after F_fused (false: F_fused alone)
llm = ""  # Meta-format Llama folder (params.json, consolidated.00.pth, tokenizer.model): frozen + LoRA
dim = 3072  # decoder width (from scratch; Phi-3-mini's shape) = d_proj
n_layers = 32  # decoder layers (from scratch)
n_heads = 32  # decoder query heads (from scratch)
n_kv_heads = 32  # decoder key/value heads (from scratch)
vocab_size = 32064  # BPE vocabulary trained on the training texts (from scratch)
lora_r = 128  # LoRA rank, used with --llm
lora_alpha = 64  # LoRA alpha
lora_dropout = 0.1  # LoRA dropout
max_text_len = 512  # question + answer tokens
mcq_aug = True  # training MCQs: letters reshuffled, the absent options redrawn from the patient's absent labels
prompt_iters = 0  # the last N of max_iters: the findings-token phase (docstring); 0 = the paper
label_iters = 0  # --prompt_iters: steps of f_2d on the labels (batch 16, AdamW 1e-3) before the phase freezes it
feat_noise = 0.0  # --prompt_iters: std of Gaussian noise on the cached z_2d, z_3d in training (against memorising)
freeze_vit = False  # Table 3: f_2d frozen during fine-tuning
freeze_aggregator = False  # Table 3: f_3d frozen during fine-tuning
max_iters = 30000  # stage 3 optimizer steps (not in the paper)
eval_interval = 2000  # stage 3 steps between validation loss + checkpoint
batch_size = 8  # volumes per optimizer step (each with its report and its multiple choice), over DDP ranks
grad_accum = 2  # micro-batches per optimizer step
learning_rate = 5e-5  # AdamW peak (not in the paper)
warmup_ratio = 0.03  # linear learning-rate warm-up share of each stage, then cosine to 10%
weight_decay = 0.0  # AdamW
grad_clip = 1.0  # clip the global gradient norm; 0 = off
n_train = 2000  # synthetic volumes in the training split
n_val = 100  # synthetic validation volumes
n_test = 200  # synthetic test volumes
num_workers = 4  # processes rendering the synthetic splits once into RAM
max_new_tokens = 400  # generation cap per report (answers: 16), greedy
predict = ""  # path to a .nii.gz: its report, or the answer to --question (with --init_from=resume)
question = ""  # with --predict: an M3D multiple-choice question ("... Choices: A. x B. y C. z D. w")
param_counts = False  # build the model on the meta device, print parameter counts of f_2d, f_3d, fusion, decoder; exit
strict = False  # a bad volume in a dataset is fatal instead of skipped
rescale = "auto"  # --predict: stored values -> HU by the header | none | auto (header or header - 1024, by air)
debug = False  # tracebacks instead of one-line errors
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if k.islower() and not k.startswith("_") and type(v) in (bool, int, float, str, tuple)}

PRESETS = {
    "paper": {},  # the defaults above are the paper's settings where it gives them
    "cpu": dict(shape=(32, 64, 64), vit_img=64, vit_stem="conv", vit_dim=128, vit_depth=2, vit_heads=4, agg_heads=4,
                dino_iters=150, dino_batch=32, dino_lr=1e-3, dino_local=4, dino_local_size=32, dino_hidden=256,
                dino_bottleneck=64, dino_out=1024, ssl_warmup=True, warmup_iters=40, warmup_batch=16, dim=128,
                n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=1024, max_iters=3250, prompt_iters=3000,
                label_iters=400, feat_noise=0.5, eval_interval=250, batch_size=8, grad_accum=1, learning_rate=2e-3,
                n_train=1200, n_val=128, n_test=128, num_workers=2, max_new_tokens=320),
}
MODEL_KEYS = ("fusion", "shape", "n_slices", "vit_img", "vit_patch", "vit_stem", "vit_dim", "vit_depth", "vit_heads",
              "agg_depth", "agg_heads", "slice_tokens", "llm", "dim", "n_layers", "n_heads", "n_kv_heads",
              "vocab_size", "lora_r", "lora_alpha", "lora_dropout", "max_text_len", "prompt_iters")
FUSIONS = ("samf", "ao2d")
STAGES = ("dino", "warmup", "finetune")
CKPT = {"dino": "dino.pt", "warmup": "warmup.pt", "finetune": "ckpt.pt"}
VIT_KEYS = ("vit_img", "vit_patch", "vit_stem", "vit_dim", "vit_depth", "vit_heads")
AGG_KEYS = VIT_KEYS + ("n_slices", "agg_depth", "agg_heads")
INSTRUCTION = "Write the findings of this chest CT."
CACHE_BYTES = 2 * 2**30  # synthetic splits up to this size (float16) are rendered once and kept in RAM


# -----------------------------------------------------------------------------
# The paper's model: f_2d (Eq. 1) and DINO, f_3d (Eq. 2) and its InfoNCE warm-up, SAMF / Ao2D (Eq. 3-12)

def plane_slices(volume, plane: int, start: int, n: int, img: int):
    """n adjacent slices from index `start` of one plane (0 axial, 1 coronal, 2 sagittal), resized to img x img.
    volume (B, 1, Z, Y, X) -> (B, n, img, img)."""
    v = volume[:, 0].movedim(1 + plane, 1)  # (B, Z, Y, X) | (B, Y, Z, X) | (B, X, Z, Y)
    s = v[:, start: start + n]
    if tuple(s.shape[-2:]) != (img, img):
        s = F.interpolate(s, size=(img, img), mode="bilinear", align_corners=False)
    return s


def centre_slices(volume, n: int, img: int):
    """The n centre axial slices (the authors' code: 24 around the middle) -> (B, n, img, img)."""
    Z = volume.shape[2]
    if Z < n:
        raise BadConfig(f"--n_slices={n}: the volume has only {Z} axial slices "
                        f"(--shape={','.join(map(str, volume.shape[2:]))})")
    return plane_slices(volume, 0, (Z - n) // 2, n, img)


class SliceEncoder(nn.Module):
    """f_2d (Eq. 1): slices (N, 1, H, W) -> z_2d, the CLS output (N, C). stem "patch": ViT's linear patch embedding;
    "conv": log2(patch) stride-2 3x3 convs (BatchNorm, GELU) and a 1x1 conv to C. The position embedding is a grid of
    (img / patch)^2 cells, bicubically resized for other inputs (DINO's local crops)."""
    def __init__(self, *, img: int, patch: int, dim: int, depth: int, heads: int, stem: str):
        super().__init__()
        assert stem in ("patch", "conv") and img % patch == 0, (stem, img, patch)  # check_config names them
        if stem == "patch":
            self.stem = nn.Conv2d(1, dim, patch, stride=patch)
        else:
            n, layers, c_in = int(math.log2(patch)), [], 1
            for i in range(n):  # widths dim/2^(n-1) .. dim
                c = max(16, dim >> (n - 1 - i))
                layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.GELU()]
                c_in = c
            self.stem = nn.Sequential(*layers, nn.Conv2d(c_in, dim, 1))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, dim, img // patch, img // patch) * 0.02)  # (1, C, g, g)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.stem(x)  # (N, C, h, w)
        pos = self.pos
        if x.shape[-2:] != pos.shape[-2:]:
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)  # (N, h * w, C)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # (N, 1 + h * w, C)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x[:, 0])


def slice_encoder(cfg: dict) -> SliceEncoder:
    return SliceEncoder(img=cfg["vit_img"], patch=cfg["vit_patch"], dim=cfg["vit_dim"], depth=cfg["vit_depth"],
                        heads=cfg["vit_heads"], stem=cfg["vit_stem"])


def random_crops(x, n: int, size: int, scale) -> list:
    """DINO's multi-crop for one grey channel: n random resized crops of x (N, 1, H, W) at size x size (area share
    U(scale), aspect ratio 3/4-4/3, horizontal flip), then contrast x(1 +- 0.2), brightness +- 0.1, noise 0.02."""
    N, dev, out = x.shape[0], x.device, []
    for _ in range(n):
        area, log_r = torch.empty(N).uniform_(*scale), torch.empty(N).uniform_(math.log(3 / 4), math.log(4 / 3))
        w, h = (area * log_r.exp()).sqrt().clamp(max=1), (area / log_r.exp()).sqrt().clamp(max=1)
        theta = torch.zeros(N, 2, 3)
        theta[:, 0, 0] = w * torch.where(torch.rand(N) < 0.5, -1.0, 1.0)
        theta[:, 1, 1] = h
        theta[:, 0, 2], theta[:, 1, 2] = (torch.rand(N) * 2 - 1) * (1 - w), (torch.rand(N) * 2 - 1) * (1 - h)
        grid = F.affine_grid(theta.to(dev, x.dtype), [N, 1, size, size], align_corners=False)  # (N, size, size, 2)
        c = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        jitter = torch.rand(2, N, 1, 1, 1, device=dev) - 0.5
        out.append((c - 0.5) * (1 + 0.4 * jitter[0]) + 0.5 + 0.2 * jitter[1] + 0.02 * torch.randn_like(c))
    return out


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> cosine to `out` prototypes (DINO's weight-normalised last layer, g = 1)."""
    def __init__(self, dim: int, hidden: int, bottleneck: int, out: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(out, bottleneck) * 0.02)

    def forward(self, x):
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


class DINO(nn.Module):
    """Stage 1. forward(slices (N, 1, H, W)) -> the DINO loss: the teacher sees the 2 global crops, the student every
    crop; cross-entropy of the centred, sharpened teacher distribution (temperature 0.04) against the student's
    (0.1) for every pair of different crops. The teacher is an EMA of the student (update_teacher) and gets no
    gradient; the centre is an EMA (0.9) of the teacher's mean output."""
    def __init__(self, f_2d: SliceEncoder, head: DINOHead, *, n_local: int, local_size: int, img: int):
        super().__init__()
        self.student, self.student_head = f_2d, head
        self.teacher, self.teacher_head = copy.deepcopy(f_2d), copy.deepcopy(head)
        for p in [*self.teacher.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, head.prototypes.shape[0]))
        self.n_local, self.local_size, self.img = n_local, local_size, img

    def forward(self, x, t_temp=0.04, s_temp=0.1, center_m=0.9):
        glob = torch.cat(random_crops(x, 2, self.img, (0.4, 1.0)))  # (2N, 1, img, img)
        with torch.no_grad():
            t = self.teacher_head(self.teacher(glob))  # (2N, K)
            t_prob = F.softmax((t - self.center) / t_temp, dim=-1).chunk(2)
        s = [self.student_head(self.student(glob))]
        if self.n_local:
            local = torch.cat(random_crops(x, self.n_local, self.local_size, (0.05, 0.4)))  # (n_local N, 1, px, px)
            s.append(self.student_head(self.student(local)))
        s_logp = F.log_softmax(torch.cat(s) / s_temp, dim=-1).chunk(2 + self.n_local)
        loss = sum(-(tp * sp).sum(-1).mean() for i, tp in enumerate(t_prob) for j, sp in enumerate(s_logp) if i != j)
        if self.training:
            with torch.no_grad():
                mean = t.mean(0, keepdim=True)
                if torch.distributed.is_initialized():
                    torch.distributed.all_reduce(mean)
                    mean /= torch.distributed.get_world_size()
                self.center.mul_(center_m).add_(mean, alpha=1 - center_m)
        return loss / (2 * (1 + self.n_local))

    @torch.no_grad()
    def update_teacher(self, m: float):
        student = [*self.student.parameters(), *self.student_head.parameters()]
        teacher = [*self.teacher.parameters(), *self.teacher_head.parameters()]
        for ps, pt in zip(student, teacher):
            pt.mul_(m).add_(ps.detach(), alpha=1 - m)


class Aggregator(nn.Module):
    """f_3d (Eq. 2): z_2d (B, S, C) -> z_3d (B, C): a CLS token and learned slice positions, `depth` pre-norm
    transformer layers; z_3d is the CLS output."""
    def __init__(self, *, n_slices: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_slices + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, z_2d):
        x = torch.cat([self.cls.expand(z_2d.shape[0], -1, -1), z_2d], dim=1)  # (B, 1 + S, C)
        x = x + self.pos[:, : z_2d.shape[1] + 1]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x[:, 0])


def info_nce(u, v, tau: float):
    """Symmetric InfoNCE: row i of u (B, C) and row i of v are a positive pair, every other row of the other view a
    negative; cosine similarity / tau."""
    logits = F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T / tau  # (B, B)
    target = torch.arange(u.shape[0], device=u.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class Warmup(nn.Module):
    """Stage 2. forward(volume (B, 1, Z, Y, X)) -> InfoNCE between z_3d of S adjacent axial slices and z_3d of S
    adjacent coronal or sagittal slices (one random plane and random starts per batch) of the same volumes; f_2d is
    frozen (no gradient, eval mode); z_2d is standardised by norm_2d as in fine-tuning."""
    def __init__(self, f_2d: SliceEncoder, norm_2d: nn.Module, f_3d: Aggregator, *, n_slices: int, img: int,
                 tau: float):
        super().__init__()
        self.f_2d, self.norm_2d, self.f_3d = f_2d.requires_grad_(False), norm_2d, f_3d
        self.S, self.img, self.tau = n_slices, img, tau

    def view(self, volume, plane: int, start: int):
        B = volume.shape[0]
        s = plane_slices(volume, plane, start, self.S, self.img)  # (B, S, img, img)
        with torch.no_grad():
            z = self.f_2d.eval()(s.reshape(B * self.S, 1, self.img, self.img))  # (B * S, C)
        return self.f_3d(self.norm_2d(z).view(B, self.S, -1))  # (B, S, C) -> (B, C)

    def forward(self, volume):
        plane = int(torch.randint(1, 3, ()))  # coronal or sagittal (check_config: the volume has >= S slices)
        starts = [int(torch.randint(0, volume.shape[2 + p] - self.S + 1, ())) for p in (0, plane)]
        return info_nce(self.view(volume, 0, starts[0]), self.view(volume, plane, starts[1]), self.tau)


class SAMF(nn.Module):
    """Eq. 3-12: forward(z_2d (B, S, C), z_3d (B, C), text (B, T, D_text), text_mask (B, T) bool) ->
    F_fused (B, dim), F_2d (B, S, d_proj), {alpha (B, S), beta (B, T), gamma (B, T, S) with Ao2D}."""
    def __init__(self, *, c_vis: int, d_text: int, d_proj: int, dim: int, ao2d: bool):
        super().__init__()
        self.ao2d = ao2d
        self.W_2d, self.W_3d = nn.Linear(c_vis, d_proj), nn.Linear(c_vis, d_proj)
        self.W_text = nn.Linear(d_text, d_proj)
        self.W_fusion = nn.Linear((4 if ao2d else 3) * d_proj, dim)

    def forward(self, z_2d, z_3d, text, text_mask):
        # Eq. 3-4: F_2d (B, S, d), F_3d (B, d, 1), F_text (B, T, d)
        F_2d, F_3d, F_text = self.W_2d(z_2d), self.W_3d(z_3d)[:, :, None], self.W_text(text)
        scale = F_2d.shape[-1] ** -0.5
        alpha = torch.softmax((F_2d @ F_3d)[..., 0] * scale, dim=1)  # Eq. 5: over slices (B, S)
        beta = ((F_text @ F_3d)[..., 0] * scale).masked_fill(~text_mask, float("-inf"))
        beta = torch.softmax(beta, dim=1)  # Eq. 6: over the question's tokens (B, T)
        parts = [F_3d[..., 0], (alpha[:, None] @ F_2d)[:, 0], (beta[:, None] @ F_text)[:, 0]]  # Eq. 8-9: (B, d) each
        att = {"alpha": alpha, "beta": beta}
        if self.ao2d:
            gamma = torch.softmax(F_text @ F_2d.transpose(1, 2) * scale, dim=2)  # Eq. 7: over slices (B, T, S)
            w = text_mask.float() / text_mask.sum(1, keepdim=True)  # 1/T over the real tokens (B, T)
            parts.append((w[:, None] @ gamma @ F_2d)[:, 0])  # Eq. 11: (B, 1, S) @ (B, S, d) -> (B, d)
            att["gamma"] = gamma
        return self.W_fusion(torch.cat(parts, dim=-1)), F_2d, att  # Eq. 10 / 12


class SAMFModel(nn.Module):
    """volume (B, 1, Z, Y, X) + question -> visual tokens [F_fused, F_2d] (B, n_visual, dim) -> decoder.
    forward(volume, labels, *texts): texts are (q_ids, q_mask, inputs, targets) groups about the same volumes (a
    report and a multiple choice share one pass of f_2d and f_3d) -> the mean over groups of their answer loss.
    labels (B, 18): the training scans' labels, read only by the findings token in training (--prompt_iters)."""
    def __init__(self, cfg: dict, decoder):
        super().__init__()
        assert cfg["fusion"] in FUSIONS, f"--fusion={cfg['fusion']!r}: expected one of {FUSIONS}"
        dim = decoder.args.dim  # = d_proj, as in the paper
        self.S, self.img, self.slice_tokens = cfg["n_slices"], cfg["vit_img"], cfg["slice_tokens"]
        self.f_2d = slice_encoder(cfg)
        self.f_3d = Aggregator(n_slices=self.S, dim=cfg["vit_dim"], depth=cfg["agg_depth"], heads=cfg["agg_heads"])
        self.norm_2d = nn.BatchNorm1d(cfg["vit_dim"], affine=False)  # z_2d standardised over the batch (docstring)
        self.fusion = SAMF(c_vis=cfg["vit_dim"], d_text=dim, d_proj=dim, dim=dim, ao2d=cfg["fusion"] == "ao2d")
        self.decoder = decoder
        self.label_head = self.label_embed = None  # --prompt_iters: the findings token (not in the paper)
        if cfg["prompt_iters"]:
            self.label_head = nn.Linear(self.S * cfg["vit_dim"], len(LABELS)).requires_grad_(False)  # fit_findings
            self.register_buffer("readable", torch.zeros(len(LABELS)))  # 1: a finding the token carries
            self.label_embed = nn.Linear(len(LABELS), dim)
        self.n_visual = 1 + (self.S if self.slice_tokens else 0) + (self.label_embed is not None)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in (self.f_2d, self.f_3d):  # a frozen encoder (Table 3) also keeps its BatchNorm statistics
            if not any(p.requires_grad for p in m.parameters()):
                m.eval()
        return self

    def encode(self, volume):
        s = centre_slices(volume, self.S, self.img)  # (B, S, img, img)
        B = s.shape[0]
        z_2d = self.f_2d(s.reshape(B * self.S, 1, self.img, self.img))  # Eq. 1: (B * S, C)
        z_2d = self.norm_2d(z_2d).view(B, self.S, -1)  # (B, S, C)
        return z_2d, self.f_3d(z_2d)  # Eq. 2: (B, C)

    def visual_tokens(self, volume, q_ids, q_mask, z=None, labels=None):
        """The question / instruction ids alone reach the fusion (never the answer) -> (B, n_visual, dim), weights.
        The findings token: label_embed(readable * calls), the calls being the label head's on z_2d (logit >= 0), or
        `labels` in training (teacher forcing). z: (z_2d, z_3d) when cached."""
        z_2d, z_3d = self.encode(volume) if z is None else z
        fused, F_2d, att = self.fusion(z_2d, z_3d, self.decoder.tok_embeddings(q_ids), q_mask)
        vis = [fused[:, None]] + ([F_2d] if self.slice_tokens else [])
        if self.label_embed is not None:
            calls = (self.label_head(z_2d.flatten(1)) >= 0).float() if labels is None else labels.float()  # (B, 18)
            vis.append(self.label_embed(calls * self.readable)[:, None])
        return torch.cat(vis, dim=1), att

    def prefix(self, inputs, vis):  # <BOS> then the visual tokens
        return torch.cat([self.decoder.tok_embeddings(inputs[:, :1]), vis.to(self.decoder.output.weight.dtype)], 1)

    def forward(self, volume, labels, *texts):
        """volume (B, 1, Z, Y, X), or (B, S + 1, C): z_2d then z_3d, cached while f_2d and f_3d are frozen."""
        z, losses = (volume[:, :-1], volume[:, -1]) if volume.dim() == 3 else self.encode(volume), []
        for q_ids, q_mask, inputs, targets in zip(*[iter(texts)] * 4):
            vis, _ = self.visual_tokens(volume, q_ids, q_mask, z, labels if self.training else None)
            prefix = self.prefix(inputs, vis)
            logits = self.decoder(inputs[:, 1:], prefix)[:, prefix.shape[1]:]  # text after <BOS> (B, T - 1, V)
            losses.append(F.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-1))
        return sum(losses) / len(losses)


def build_model(cfg: dict) -> nn.Module:
    """f_2d + f_3d + SAMF/Ao2D around a from-scratch decoder, or a frozen Meta Llama with LoRA (--llm)."""
    seq = 1 + 1 + (cfg["n_slices"] if cfg["slice_tokens"] else 0) + (cfg["prompt_iters"] > 0) + cfg["max_text_len"]
    if cfg["llm"]:
        decoder, _ = load_llama(cfg["llm"], max_seq_len=seq)
        if "cuda" not in str(cfg["device"]):
            decoder.float()  # Meta ships bf16; bf16 matmul is very slow on CPU
        add_lora(decoder, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"])
    else:
        decoder = Decoder(ModelArgs(dim=cfg["dim"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                                    n_kv_heads=cfg["n_kv_heads"], vocab_size=cfg["vocab_size"], max_seq_len=seq))
    return SAMFModel(cfg, decoder)


def build_dino(cfg: dict) -> DINO:
    f_2d = slice_encoder(cfg)  # before the head: the same initial weights as always
    head = DINOHead(cfg["vit_dim"], cfg["dino_hidden"], cfg["dino_bottleneck"], cfg["dino_out"])
    return DINO(f_2d, head, n_local=cfg["dino_local"], local_size=cfg["dino_local_size"], img=cfg["vit_img"])


def build_warmup(cfg: dict) -> Warmup:  # f_2d, norm_2d and f_3d as build_model makes them (same init, same RNG use)
    m = build_model({**cfg, "llm": "", "dim": 8, "n_layers": 0, "n_heads": 1, "n_kv_heads": 1, "vocab_size": 8})
    return Warmup(m.f_2d, m.norm_2d, m.f_3d, n_slices=cfg["n_slices"], img=cfg["vit_img"], tau=cfg["warmup_tau"])


# -----------------------------------------------------------------------------
# Copied from hilt.py: the Llama 3 decoder (RMSNorm, RoPE, SwiGLU, GQA, KV cache), LoRA, Meta-format loading,
# generation (DESIGN §5), the pre-norm ViT layer (f_2d and f_3d) and the resumable batch stream.


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


# Copied from hilt.ViTBlock
class ViTBlock(nn.Module):
    """Pre-norm ViT layer: x + MHSA(LN(x)), then x + MLP(LN(x))."""
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.ln2(x))


def micro_batch(n: int, k: int, micro: int, seed: int, rank: int = 0, world: int = 1) -> list:
    """Items of micro-batch k (k = step * grad_accum + micro_step) of this rank in data.Stream's epochs."""
    return next(iter(Stream(n, micro, seed, k, k + 1, 1, rank, world)))


# -----------------------------------------------------------------------------
# Data: volumes rendered once; examples are (question, answer): the report instruction or an M3D multiple choice

CHOICE = re.compile(r"([A-Z])\. (.+?)(?= [A-Z]\. |$)")


def parse_choices(question: str, what="--question") -> dict:
    """'... Choices: A. x B. y C. z D. w' -> {"A": "x", ...}; anything else is an error naming `what`."""
    if "Choices:" not in question:
        raise InputError(f"{what}: no 'Choices: A. .. B. .. C. .. D. ..' in {question!r}; this model answers M3D "
                         "multiple-choice questions (leave --question empty for a report)")
    options = dict(CHOICE.findall(question.split("Choices:", 1)[1].strip()))
    if sorted(options) != list("ABCD"):
        raise InputError(f"{what}: expected the four options A-D after 'Choices:', found {sorted(options) or 'none'}")
    return options


def answer_letter(answer: str, what="answer") -> str:
    m = re.match(r"\s*([A-Za-z])\.", answer)
    if not m or m.group(1) not in "ABCD":
        raise InputError(f"{what}: {answer!r} is not an answer 'X. text' with the letter X in A-D")
    return m.group(1)


def choice_of(item: dict, augment: bool):
    """The item's M3D question and answer. augment (training): letters reshuffled, the three absent options redrawn
    from the patient's absent labels (the global RNG: resumed runs redraw the same)."""
    qa = next(q for q in item["questions"] if q["kind"] == "choice")
    options = parse_choices(qa["question"], f"{item['name']}: question")
    letter = answer_letter(qa["answer"], item["name"])
    if not augment:
        return qa["question"], qa["answer"]
    absent = [l for l, y in zip(LABELS, item["labels"].tolist()) if not y]
    wrong = [absent[i] for i in torch.randperm(len(absent))[:3].tolist()] if len(absent) >= 3 else \
        [o for k, o in options.items() if k != letter]
    opts = [wrong[i] if i < 3 else options[letter] for i in torch.randperm(4).tolist()]
    right = "ABCD"[opts.index(options[letter])]
    choices = " ".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(opts))
    return qa["question"].split("Choices:")[0] + "Choices: " + choices, f"{right}. {options[letter]}"


def target_spacing(cfg) -> tuple:
    return tuple(cfg["spacing"]) or tuple(f / s for f, s in zip(FOV, cfg["shape"]))


_SPLITS = {}


def get_split(cfg, split: str):
    """A split as a list of dicts (volume fp16, labels, report, name, questions), synthetic ones rendered once by
    num_workers processes and kept in RAM for every stage of this process; large or real sets stay lazy."""
    n = {"train": cfg["n_train"], "val": cfg["n_val"], "test": cfg["n_test"]}[split]
    key = (cfg["data"], split, n, tuple(cfg["shape"]), target_spacing(cfg), cfg["seed"], cfg["strict"])
    if key not in _SPLITS:
        ds = get_dataset(cfg["data"], split, n=n, shape=tuple(cfg["shape"]), spacing=target_spacing(cfg),
                         window=(-1000, 200), norm="unit", seed=cfg["seed"], strict=cfg["strict"])
        if cfg["data"] == "synthetic" and n * math.prod(cfg["shape"]) * 2 <= CACHE_BYTES:
            t0 = time.time()
            items = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg["num_workers"])
            ds = [{**{k: it[k] for k in ("labels", "report", "name", "questions")}, "volume": it["volume"].half()}
                  for it in tqdm(items, total=n, desc=f"synthetic {split} {tuple(cfg['shape'])}", leave=False)]
            print(f"{split}: {n} phantoms rendered into RAM in {time.time() - t0:.1f} s")
        _SPLITS[key] = ds
    return _SPLITS[key]


def get_tokenizer(cfg, train_ds=None, save=True):
    """Llama's tokenizer with --llm; else data.py's BPE, trained on train_ds's reports and multiple choices, or
    loaded from out_dir when train_ds is None."""
    if cfg["llm"]:
        return load_llama3_tokenizer(Path(cfg["llm"]) / "tokenizer.model")
    path = Path(cfg["out_dir"]) / "bpe.tiktoken"
    if train_ds is None:
        return load_bpe(path)
    texts = reports_of(train_ds) + [q["question"] + " " + q["answer"] for q in questions_in(train_ds)
                                    if q["kind"] == "choice"]
    enc = train_bpe(texts + [INSTRUCTION], cfg["vocab_size"])
    if save:
        save_bpe(enc, path)
    return enc


def tokenize(qa: list, enc, max_text_len: int):
    """[(question, answer)] -> q_ids, q_mask (B, Tq) for the fusion; inputs, targets (B, T) = <BOS> question answer
    <EOS> shifted by one, targets -1 (no loss) on the question and the padding (after the end)."""
    bos, eos = enc.encode_single_token("<|begin_of_text|>"), enc.encode_single_token("<|end_of_text|>")
    qs = [enc.encode(q, disallowed_special=())[: max_text_len // 2] for q, _ in qa]
    seqs = [([bos] + q + enc.encode(" " + a, disallowed_special=()) + [eos])[: max_text_len + 1]
            for q, (_, a) in zip(qs, qa)]
    T, Tq = max(map(len, seqs)) - 1, max(map(len, qs))
    inputs, targets = torch.full((len(seqs), T), eos), torch.full((len(seqs), T), -1)
    q_ids, q_mask = torch.zeros(len(qs), Tq, dtype=torch.long), torch.zeros(len(qs), Tq, dtype=torch.bool)
    for i, (q, s) in enumerate(zip(qs, seqs)):
        inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
        targets[i, len(q): len(s) - 1] = torch.tensor(s[len(q) + 1:])
        q_ids[i, : len(q)], q_mask[i, : len(q)] = torch.tensor(q), True
    return q_ids, q_mask, inputs, targets


def get_batch(ds, idx, tasks, enc, cfg, dev, train=True):
    """tasks: 0 report, 1 multiple choice -> (volume, labels, then q_ids, q_mask, inputs, targets of each task)."""
    items = [ds[i] for i in idx]
    out = [torch.stack([it["labels"] for it in items]).to(dev)]
    for task in tasks:
        qa = [(INSTRUCTION, it["report"]) if task == 0 else choice_of(it, train and cfg["mcq_aug"]) for it in items]
        out += [t.to(dev) for t in tokenize(qa, enc, cfg["max_text_len"])]
    return (torch.stack([it["volume"] for it in items]).to(dev).float(), *out)


# -----------------------------------------------------------------------------
# Train: one loop with hilt.train's skeleton for the three stages

def get_lr(it: int, iters: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up over warmup_ratio of the steps, then cosine to 10% of the peak."""
    warm = max(1, round(warmup_ratio * iters))
    if it < warm:
        return peak * (it + 1) / warm
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (it - warm) / max(1, iters - warm))))


def train(cfg, stage, model, batch_fn, evaluate, dev, ddp, master, ckpt=None, describe=""):
    """batch_fn(iter_num, j) -> the model's inputs for micro-batch j; evaluate() -> dict, every eval interval.
    Checkpoints (atomic) in out_dir/<stage>.pt with optimizer, RNG and position: --init_from=resume continues exactly.
    Trains `model` in place."""
    iters = {"dino": cfg["dino_iters"], "warmup": cfg["warmup_iters"], "finetune": cfg["max_iters"]}[stage]
    accum = cfg["grad_accum"] if stage == "finetune" else 1
    interval = cfg["eval_interval"] if stage == "finetune" else max(1, iters // 3)
    peak = cfg["dino_lr"] if stage == "dino" else cfg["learning_rate"]
    # --prompt_iters: the findings phase from step `phase` restarts the learning-rate schedule (warm-up, cosine)
    phase = cfg["max_iters"] - cfg["prompt_iters"] if stage == "finetune" and cfg["prompt_iters"] else 0
    raw, params = model, [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.04 if stage == "dino" else cfg["weight_decay"],
                            fused="cuda" in dev)
    iter_num, best_val = 0, float("inf")
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        set_rng_state(ckpt["rng"])
    model = wrap_model(raw, dev, ddp, cfg["compile"], find_unused=stage == "finetune" and cfg["prompt_iters"] > 0)
    if master:
        print(f"stage {stage}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters "
              f"({sum(p.numel() for p in params) / 1e6:.2f}M trained), {describe}, {iters} steps")

    def save():
        if master:  # with --llm, all but the frozen Llama weights
            weights = {k: v for k, v in raw.state_dict().items()
                       if not cfg["llm"] or not k.startswith("decoder.") or ".lora_" in k}
            save_checkpoint(Path(cfg["out_dir"]) / CKPT[stage], {
                "model": weights, "optimizer": opt.state_dict(), "iter_num": iter_num, "best_val_loss": best_val,
                "config": cfg, "rng": rng_state()})

    # FLOPs of one training sample, without moving the RNG (exact resume): forward x 3 (forward + backward); the
    # warm-up counts the forward once (f_2d is frozen and dominates; the aggregator's backward is left out: a lower
    # bound); the findings phase is recounted when it starts (cached features: the decoder alone)
    fps = 0.0  # a finished run (resumed for its evaluation) asks for no batch
    if iter_num < iters:
        with torch.random.fork_rng():
            first = batch_fn(iter_num, 0)
            fps = (1 if stage == "warmup" else 3) * forward_flops(raw, *first) / first[0].shape[0]
    timer = StepTimer(dev, fps)  # data wait vs compute, samples/s, TFLOP/s, MFU: means since the last eval
    timer.stats()  # the first call measures the device's peak FLOP/s, outside the first timed window
    log = Path(cfg["out_dir"]) / ("log.jsonl" if stage == "finetune" else f"log_{stage}.jsonl")
    bad_steps, steps, loss_sum = 0, 0, 0.0
    pbar = tqdm(total=iters, initial=iter_num, disable=not master, desc=stage)
    with StopOnSigint() as sig:
        while iter_num < iters and not sig.stop:
            for g in opt.param_groups:
                g["lr"] = get_lr(iter_num, phase, peak, cfg["warmup_ratio"]) if iter_num < phase else \
                    get_lr(iter_num - phase, iters - phase, peak, cfg["warmup_ratio"])
            losses = []
            for j in range(accum):
                sync = nullcontext() if not ddp or j == accum - 1 else model.no_sync()
                with timer.data():
                    inputs = batch_fn(iter_num, j)
                if phase and j == 0 and iter_num == phase:  # the findings phase starts: cached features
                    timer.flops = 3 * forward_flops(raw, *inputs) / inputs[0].shape[0]
                with autocast_ctx(cfg["dtype"], dev), sync:
                    loss = model(*inputs)
                    (loss / accum).backward()
                losses.append(loss.item())
            bad_steps = optimizer_step(opt, params, cfg["grad_clip"], bad_steps, iter_num)  # skips a non-finite step
            if stage == "dino" and bad_steps == 0:  # stepped: teacher momentum, cosine from dino_momentum to 1
                raw.update_teacher(1 - (1 - cfg["dino_momentum"]) * (math.cos(math.pi * iter_num / iters) + 1) / 2)
            iter_num += 1
            steps += 1
            timer.step(inputs[0].shape[0] * accum)
            loss_sum += sum(losses) / len(losses)
            pbar.update(1)
            if master:
                pbar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
            if iter_num % interval == 0 or iter_num == iters:
                perf = timer.stats()
                rec = {"stage": stage, "iter": iter_num, "train_loss": loss_sum / steps, **evaluate(),
                       "lr": opt.param_groups[0]["lr"], **perf}
                best_val = min(best_val, rec.get("val_loss", float("inf")))
                if master:
                    log_eval(log, rec)
                save()
                steps, loss_sum = 0, 0.0
                timer.reset()
    pbar.close()
    if sig.stop:  # saved, then out through run(main): exit code 130, and no later stage starts on a cut-short one
        save()
        raise Interrupted(f"stage {stage}: checkpoint saved in {cfg['out_dir']}; continue with "
                          f"{'--stage=' + stage + ' ' if cfg['stage'] else ''}--init_from=resume")


@torch.no_grad()
def knn_probe(f_2d, cfg, dev, k=10) -> dict:
    """k-NN (cosine, k = 10) on f_2d's CLS of slices: training volumes are the bank, validation volumes the queries.
    knn_plane: which plane the centre slice is from (chance 1/3); knn_finding: balanced accuracy (chance 0.5) of
    'cardiomegaly, pericardial or pleural effusion' from the axial slice at 60% depth (through the heart)."""
    f_2d.eval()
    hf = [LABELS.index(l) for l in ("Cardiomegaly", "Pericardial effusion", "Pleural effusion")]

    def embed(ds, n):
        xs, finding = [], []
        for i in range(min(n, len(ds))):
            v, y = ds[i]["volume"][None].float().to(dev), ds[i]["labels"]
            xs += [plane_slices(v, p, v.shape[2 + p] // 2, 1, cfg["vit_img"])[0] for p in range(3)]  # centres
            xs.append(plane_slices(v, 0, int(0.6 * v.shape[2]), 1, cfg["vit_img"])[0])  # through the heart
            finding.append(int(y[hf].max()))
        z = F.normalize(f_2d(torch.stack(xs)), dim=-1).view(-1, 4, f_2d.norm.normalized_shape[0])  # (n, 4, C)
        return z, torch.tensor([0, 1, 2] * len(finding)), torch.tensor(finding)

    zb, pb, fb = embed(get_split(cfg, "train"), 128)
    zq, pq, fq = embed(get_split(cfg, "val"), 64)

    def vote(bank, yb, q, n_cls):  # each class's share of the k neighbours over its share of the bank: balanced
        nn_idx = (q @ bank.T).topk(min(k, len(bank)), dim=1).indices  # (Nq, k)
        share = F.one_hot(yb, n_cls).float().mean(0).clamp(min=1e-6)  # (n_cls,)
        return (F.one_hot(yb[nn_idx.cpu()], n_cls).float().mean(1) / share).argmax(1)

    plane_acc = (vote(zb[:, :3].flatten(0, 1), pb, zq[:, :3].flatten(0, 1), 3) == pq).float().mean().item()
    pred = vote(zb[:, 3], fb, zq[:, 3], 2)
    bal = np.mean([(pred[fq == c] == c).float().mean().item() for c in (0, 1) if (fq == c).any()])
    f_2d.train()
    return {"knn_plane": plane_acc, "knn_finding": float(bal)}


@torch.no_grad()
def warmup_probe(warm: Warmup, cfg, dev) -> dict:
    """Validation InfoNCE and top-1 retrieval (the coronal view of the same volume among the batch's) with fixed
    views: the centre S axial vs the centre S coronal slices."""
    ds = get_split(cfg, "val")
    vol = torch.stack([ds[i]["volume"] for i in range(min(64, len(ds)))]).to(dev).float()
    warm.eval()
    u = warm.view(vol, 0, (vol.shape[2] - warm.S) // 2)
    v = warm.view(vol, 1, (vol.shape[3] - warm.S) // 2)
    warm.train()
    hit = (F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T).argmax(1) == torch.arange(len(u), device=u.device)
    return {"val_loss": info_nce(u, v, warm.tau).item(), "val_retrieval": hit.float().mean().item()}


def load_parts(cfg, stage: str, parts: dict, keys, master: bool, what: str):
    """parts {prefix: module} from the checkpoint of an earlier stage in out_dir; one of other sizes is an error;
    without one, a warning and `what` keeps its random init."""
    path = Path(cfg["out_dir"]) / CKPT[stage]
    if not path.is_file():
        if master:
            print(f"warning: {path}: no {stage} checkpoint; {what} starts from random init")
        return
    ck = load_checkpoint(path)
    bad = [k for k in keys if tuple(np.atleast_1d(ck["config"].get(k))) != tuple(np.atleast_1d(cfg[k]))]
    if bad:
        theirs, ours = (" ".join(f"--{k}={c[k]}" for k in bad) for c in (ck["config"], cfg))
        raise InputError(f"{path}: trained with {theirs}; this run has {ours} (use its settings or run that stage again)")
    for prefix, module in parts.items():
        module.load_state_dict({k[len(prefix):]: v for k, v in ck["model"].items() if k.startswith(prefix)})


# Copied from hilt.fit_probe
def fit_probe(x, y, l2: float = 1e-3) -> nn.Linear:
    """A logistic regression per label (full-batch L-BFGS, L2 penalty) on features x (n, C), labels y (n, 18)."""
    head = nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return head


def train_labels(model, train_ds, cfg, dev):
    """--label_iters, entering the findings phase: f_2d learns the 18 labels (binary cross-entropy through a linear
    head on z_2d, all S slices side by side; head discarded after), so that the label head fit next can read them.
    f_2d frozen by --freeze_vit stays so (the head alone trains)."""
    f_2d, norm_2d = model.f_2d, model.norm_2d  # trained as copies (DDP's gradient hooks sit on the originals)
    model.f_2d, model.norm_2d = copy.deepcopy(f_2d), copy.deepcopy(norm_2d)
    head = nn.Linear(model.label_head.in_features, len(LABELS)).to(dev)
    opt = torch.optim.AdamW(list(model.f_2d.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.01)
    y, g = labels_of(train_ds).float().to(dev), torch.Generator().manual_seed(cfg["seed"])
    model.train()
    for _ in tqdm(range(cfg["label_iters"]), desc="f_2d on the labels", leave=False):
        idx = torch.randint(len(train_ds), (16,), generator=g).tolist()
        z_2d, _ = model.encode(torch.stack([train_ds[i]["volume"] for i in idx]).to(dev).float())
        loss = F.binary_cross_entropy_with_logits(head(z_2d.flatten(1)), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    f_2d.load_state_dict(model.f_2d.state_dict())  # back into the originals, in place
    norm_2d.load_state_dict(model.norm_2d.state_dict())
    model.f_2d, model.norm_2d = f_2d, norm_2d
    tqdm.write(f"f_2d on the labels: {cfg['label_iters']} steps, last training loss {loss.item():.4f}")


@torch.no_grad()
def fit_findings(model, train_ds, val_ds, dev, min_auroc: float = 0.8, l2: float = 1e-2):
    """--prompt_iters, at the start of the findings phase (f_2d, f_3d frozen from here): the label head becomes a
    logistic regression on the training scans' z_2d, flattened (standardised, folded back); a finding is `readable`
    when its validation AUROC is >= min_auroc with >= 2 validation positives, and is called above its best-F1
    threshold on the validation scans (folded into the bias: logit >= 0). Labels of training and validation scans
    only.
    -> the training scans' cached features (n, S + 1, C): z_2d then z_3d."""
    model.eval()
    feats = {}
    for name, ds in (("train", train_ds), ("val", val_ds)):
        z = [model.encode(torch.stack([ds[j]["volume"] for j in range(i, min(i + 16, len(ds)))]).to(dev).float())
             for i in range(0, len(ds), 16)]
        feats[name] = torch.cat([torch.cat([z_2d, z_3d[:, None]], 1) for z_2d, z_3d in z])  # (n, S + 1, C)
    model.train()
    x, xv = (feats[k][:, :-1].flatten(1).float().cpu() for k in ("train", "val"))  # z_2d (n, S * C)
    y, yv = (labels_of(ds).float() for ds in (train_ds, val_ds))
    mu, sd = x.mean(0), x.std(0) + 1e-6
    probe = fit_probe((x - mu) / sd, y, l2)
    w = probe.weight / sd  # (18, S * C): w.(x - mu) / sd + b = (w / sd).x + (b - (w / sd).mu)
    bias = probe.bias - w @ mu
    pv = torch.sigmoid(xv @ w.T + bias).numpy()
    auc = np.array([auroc(yv[:, j].numpy(), pv[:, j]) for j in range(len(LABELS))])
    t = best_f1_thresholds(yv.numpy(), pv).clip(1e-4, 1 - 1e-4)
    model.label_head.weight.copy_(w.to(dev))
    model.label_head.bias.copy_((bias - torch.from_numpy(np.log(t / (1 - t))).float()).to(dev))  # p >= t: logit >= 0
    model.readable.copy_(torch.from_numpy((np.nan_to_num(auc) >= min_auroc) & (yv.sum(0).numpy() >= 2)).float())
    tqdm.write("findings token: " + ", ".join(f"{l} (val AUROC {a:.2f})"
                                              for l, a, r in zip(LABELS, auc, model.readable) if r))
    return feats["train"]


# -----------------------------------------------------------------------------
# Eval: reports (NLG + clinical efficacy) and multiple choice, each beside its image-blind baselines

@torch.no_grad()
def generate_answers(model, volumes, questions, enc, cfg, ctx, max_new: int, zero_visual=False):
    """volumes (B, 1, Z, Y, X) + B questions of the same token length -> (B answers, attention weights). Greedy."""
    model.eval()
    eos = enc.encode_single_token("<|end_of_text|>")
    q_ids, q_mask, inputs, _ = (t.to(volumes.device) for t in tokenize([(q, "") for q in questions], enc,
                                                                        cfg["max_text_len"]))
    assert q_mask.all(), "generate_answers: questions of one batch must have the same token length"
    with ctx:
        vis, att = model.visual_tokens(volumes, q_ids, q_mask)
        prefix = model.prefix(inputs, torch.zeros_like(vis) if zero_visual else vis)
        room = model.decoder.args.max_seq_len - prefix.shape[1] - q_ids.shape[1]
        ids = generate(model.decoder, q_ids, prefix, max_new_tokens=min(max_new, room), eos_id=eos)
    model.train()
    return [enc.decode(row[: row.index(eos)] if eos in row else row).strip() for row in ids.tolist()], att


@torch.no_grad()
def rank_answers(model, volume, question: str, enc, cfg, ctx, zero_visual=False) -> str:
    """volume (1, 1, Z, Y, X) -> the likeliest of the four offered answers "X. text" (the sum of its tokens' log-
    probabilities, <EOS> included, after <BOS>, the visual tokens and the question): greedy decoding restricted to
    the well-formed answers, so the letter always goes with its option's text."""
    model.eval()
    cands = [f"{k}. {v}" for k, v in sorted(parse_choices(question).items())]
    q_ids, q_mask, inputs, targets = (t.to(volume.device) for t in tokenize([(question, c) for c in cands], enc,
                                                                           cfg["max_text_len"]))
    with ctx:
        vis, _ = model.visual_tokens(volume, q_ids[:1], q_mask[:1])  # the same question for all four
        prefix = model.prefix(inputs, (torch.zeros_like(vis) if zero_visual else vis).expand(len(cands), -1, -1))
        logits = model.decoder(inputs[:, 1:], prefix)[:, prefix.shape[1]:].float()
    t = targets[:, 1:]
    nll = (F.cross_entropy(logits.transpose(1, 2), t.clamp(min=0), reduction="none") * (t >= 0)).sum(1)
    model.train()
    return cands[int(nll.argmin())]


def mcq_metrics(preds, answers) -> dict:
    """accuracy: M3D's rule (data.choice_correct). precision / recall / F1: the predicted letter is the first 'X.' with
    X in A-D; each letter a class; macro means over A-D, zero_division = 0 (sklearn's average='macro')."""
    true = [answer_letter(a) for a in answers]
    pred = [m.group(1) if (m := re.search(r"\b([A-D])\.", p)) else None for p in preds]
    prf = []
    for c in "ABCD":
        tp = sum(p == c and t == c for p, t in zip(pred, true))
        n_pred, n_true = sum(p == c for p in pred), sum(t == c for t in true)
        pr, rc = tp / n_pred if n_pred else 0.0, tp / n_true if n_true else 0.0
        prf.append((pr, rc, 2 * pr * rc / (pr + rc) if pr + rc else 0.0))
    p, r, f = (float(np.mean(x)) for x in zip(*prf))
    return {"accuracy": float(np.mean([choice_correct(p, a) for p, a in zip(preds, answers)])), "precision": p,
            "recall": r, "f1": f}


def letter_matches_text(preds, questions) -> float:
    """Share of answers "X. text" whose letter X is the letter of `text` among the question's choices: a decoder
    trained from scratch must learn that binding, which M3D's rule scores (only the letter counts)."""
    said = [re.match(r"\s*([A-D])\. (.+)", p) for p in preds]
    return float(np.mean([bool(m) and parse_choices(q).get(m[1]) == m[2].strip() for m, q in zip(said, questions)]))


def answer_rate(ds) -> dict:
    """Image-blind: each option's share of being the answer when it is offered, over ds's multiple-choice questions.
    data.py offers three absent findings and one present one (or "None of these", then always right), so a text-only
    decoder can learn this rule."""
    offered, right = Counter(), Counter()
    for it in ds:
        q, a = choice_of(it, False)
        options = parse_choices(q, f"{it['name']}: question")
        offered.update(options.values())
        right[options[answer_letter(a, it["name"])]] += 1
    return {o: right[o] / n for o, n in offered.items()}


@torch.no_grad()
def test_loss(model, ds, enc, cfg, dev, ctx, task: int, shuffle: bool) -> float:
    """Mean answer loss on ds; shuffle: each example sees the next example's volume (does the text use the scan?)."""
    model.eval()
    total, micro = 0.0, max(1, cfg["batch_size"] // cfg["grad_accum"])
    for i in range(0, len(ds), micro):
        vol, _, *text = get_batch(ds, list(range(i, min(i + micro, len(ds)))), (task,), enc, cfg, dev, train=False)
        if shuffle:
            vol = torch.stack([ds[(j + 1) % len(ds)]["volume"] for j in range(i, i + len(vol))]).to(dev).float()
        with ctx:
            total += model(vol, None, *text).item() * len(vol)
    model.train()
    return total / len(ds)


def final_eval(cfg, model, enc, dev, ctx, train_ds) -> dict:
    test_ds = get_split(cfg, "test")
    vols = lambda idx: torch.stack([test_ds[i]["volume"] for i in idx]).to(dev).float()
    bs = max(1, cfg["batch_size"] // cfg["grad_accum"])
    batches = [list(range(i, min(i + bs, len(test_ds)))) for i in range(0, len(test_ds), bs)]
    res = {"fusion": cfg["fusion"], "n_visual": model.n_visual, "n_test": len(test_ds)}
    refs, gen, gen0 = reports_of(test_ds), [], []
    for idx in tqdm(batches, desc="reports", leave=False):
        for out, zero in ((gen, False), (gen0, True)):
            out += generate_answers(model, vols(idx), [INSTRUCTION] * len(idx), enc, cfg, ctx, cfg["max_new_tokens"],
                                    zero)[0]
    res["report"] = {"model": report_metrics(gen, [[r] for r in refs]),
                     "zero_visual": report_metrics(gen0, [[r] for r in refs])}
    y_test, y_train = (labels_of(ds).numpy().astype(int) for ds in (test_ds, train_ds))
    res["ce"] = {"model": clinical_metrics(gen, y_test), "zero_visual": clinical_metrics(gen0, y_test),
                 **ce_baselines(y_train, y_test, seed=0)}
    if model.label_head is not None:  # how well the slices carry each finding: test AUROC of the label head
        model.eval()
        with torch.no_grad(), ctx:
            p = torch.cat([model.label_head(model.encode(vols(idx))[0].flatten(1)).float()
                           for idx in batches]).sigmoid()
        model.train()
        p = p.cpu().numpy()
        res["label_auroc"] = {l: auroc(y_test[:, j], p[:, j]) for j, l in enumerate(LABELS)}
    res["report_loss"] = {"own": test_loss(model, test_ds, enc, cfg, dev, ctx, 0, False),
                          "shuffled": test_loss(model, test_ds, enc, cfg, dev, ctx, 0, True)}
    lines = [f"--- {test_ds[i]['name']}\nGENERATED: {g}\nREFERENCE: {r}\n" for i, (g, r) in enumerate(zip(gen, refs))]
    if "questions" in test_ds[0]:
        qa = [choice_of(test_ds[i], False) for i in range(len(test_ds))]
        answers = [a for _, a in qa]
        runs = {k: [] for k in ("model", "zero_visual", "shuffled_visual", "ranked", "ranked_zero_visual",
                                "ranked_shuffled_visual")}  # shuffled: the next scan's tokens, not its own
        greedy = lambda v, q, **k: generate_answers(model, vols(v), [q], enc, cfg, ctx, 16, **k)[0][0]
        ranked = lambda v, q, **k: rank_answers(model, vols(v), q, enc, cfg, ctx, **k)
        for i, (q, _) in enumerate(tqdm(qa, desc="multiple choice", leave=False)):
            for read, pre, ask in (("model", "", greedy), ("ranked", "ranked_", ranked)):
                runs[read].append(ask([i], q))
                runs[pre + "zero_visual"].append(ask([i], q, zero_visual=True))
                runs[pre + "shuffled_visual"].append(ask([(i + 1) % len(qa)], q))
        letters = Counter(answer_letter(choice_of(train_ds[i], False)[1])
                          for i in range(len(train_ds))).most_common(1)[0][0]
        prev = dict(zip(LABELS, y_train.mean(0)), **{"None of these": float((y_train.sum(1) == 0).mean())})
        prior, rate = ([max(parse_choices(q).items(), key=lambda kv: p.get(kv[1], 0.0))[0] + "." for q, _ in qa]
                       for p in (prev, answer_rate(train_ds)))
        blind = {f"letter {letters}": [letters + "."] * len(qa), "prevalence_prior": prior, "answer_rate_prior": rate}
        runs.update(blind)
        res["mcq"] = {**{k: mcq_metrics(v, answers) for k, v in runs.items()}, "chance": {"accuracy": 0.25}}
        right = {k: [choice_correct(p, a) for p, a in zip(v, answers)] for k, v in runs.items()}
        right["chance"] = [0.25] * len(qa)
        res["mcq_margin"] = {read: {k: [float(np.mean(right[read]) - np.mean(right[k])),  # 95% paired bootstrap
                                        *bootstrap_diff(right[read], right[k])]
                                    for k in (pre + "zero_visual", pre + "shuffled_visual", *blind, "chance")}
                             for read, pre in (("model", ""), ("ranked", "ranked_"))}
        res["mcq_letter_matches_text"] = letter_matches_text(runs["model"], [q for q, _ in qa])
        res["mcq_loss"] = {"own": test_loss(model, test_ds, enc, cfg, dev, ctx, 1, False),
                           "shuffled": test_loss(model, test_ds, enc, cfg, dev, ctx, 1, True)}
        lines += [f"--- {test_ds[i]['name']}\nQUESTION: {q}\nMODEL: {p}\nRANKED: {r}\nZEROED VISUAL: {p0}\n"
                  f"ANSWER: {a}\n" for i, ((q, a), p, r, p0) in enumerate(zip(qa, runs["model"], runs["ranked"],
                                                                               runs["zero_visual"]))]
    print_results(res)
    out = Path(cfg["out_dir"])
    (out / "metrics.json").write_text(json.dumps(res, indent=2, default=float))
    (out / "samples.txt").write_text("\n".join(lines))
    print("\n" + "\n".join(lines[:2] + lines[len(refs): len(refs) + 3]) + f"(all in {out / 'samples.txt'})")
    return res


def print_results(res):
    def table(rows: dict, keys, name_width=18, fmt="{:>8.3f}", scale=1):
        for name, m in rows.items():
            print(f"{name:<{name_width}}" + "".join(fmt.format(scale * m[k]) if k in m else " " * 8 for k in keys))

    print(f"\ntest ({res['n_test']} volumes), fusion={res['fusion']}, {res['n_visual']} visual tokens. Reports (x100):")
    nlg = ("bleu1", "bleu4", "rougeL", "meteor", "cider")
    print(" " * 14 + "".join(f"{k:>8}" for k in nlg))
    table(res["report"], nlg, 14, "{:>8.2f}", 100)
    print("clinical efficacy of the 18 findings read from the reports (macro precision / recall / F1, micro F1):")
    table(res["ce"], ("precision", "recall", "f1", "micro_f1"))
    if "label_auroc" in res:
        au = res["label_auroc"]
        top = sorted(au.items(), key=lambda kv: -kv[1])[:6]
        print(f"label head on the slices (z_2d), test AUROC: macro {np.nanmean(list(au.values())):.3f}; " +
              ", ".join(f"{k} {v:.2f}" for k, v in top))
    loss = "loss: own volumes {own:.4f}, shuffled volumes {shuffled:.4f}"
    print("report " + loss.format(**res["report_loss"]))
    if "mcq" in res:
        print("multiple choice (accuracy: M3D's rule; precision / recall / F1: macro over the letters A-D):")
        table(res["mcq"], ("accuracy", "precision", "recall", "f1"), 24)
        print("answer " + loss.format(**res["mcq_loss"]))
        print(f"the answer's letter is that of the option it names in {res['mcq_letter_matches_text']:.3f} of them")
        for read, margin in res["mcq_margin"].items():  # read: greedy decoding (the model), or ranked answers
            print(f"{read} minus each (95% paired bootstrap over the questions): " +
                  ", ".join(f"{k} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for k, (d, lo, hi) in margin.items()))
            least = min((k for k in margin if "shuffled" not in k), key=lambda k: margin[k][0])
            print(f"  target, 0.10 above every image-blind baseline: {'met' if margin[least][0] >= 0.10 else 'not met'}"
                  f" (least margin {margin[least][0]:+.3f}, over {least})")
    print("BERT-F1 and the Llama-3-70B score (Tables 1-2) need downloaded models: not computed.")


# -----------------------------------------------------------------------------
# Predict: one NIfTI file -> a report or an answer, and alpha (and gamma) over the slices as a PNG

def attention_png(x, att, cfg, path):
    """The S centre slices in a row; under each, bars of alpha (red) and, with Ao2D, gamma averaged over the
    question tokens (green), scaled to the largest weight."""
    s = centre_slices(x[None, None], cfg["n_slices"], 64)[0]  # (S, 64, 64)
    S, bars = s.shape[0], [("alpha", att["alpha"][0], (230, 60, 60))]
    if "gamma" in att:
        bars.append(("gamma", att["gamma"][0].mean(0), (60, 200, 60)))
    img = Image.new("RGB", (64 * S, 64 + 50 * len(bars)), "white")
    row = (s.clamp(0, 1) * 255).byte().permute(1, 0, 2).reshape(64, S * 64)  # (S, 64, 64) -> (64, S * 64)
    img.paste(Image.fromarray(row.cpu().numpy()), (0, 0))
    draw = ImageDraw.Draw(img)
    for b, (name, w, color) in enumerate(bars):
        top = 64 + 50 * b
        for i, v in enumerate((w / w.max()).tolist()):
            draw.rectangle([64 * i + 8, top + 48 - int(44 * v), 64 * i + 56, top + 48], fill=color)
        draw.text((2, top + 2), name, fill="black")
    img.save(path)


@torch.no_grad()
def predict_file(cfg, model, enc, dev, path, question: str) -> str:
    if question:
        parse_choices(question)
    vol, sp = load_ct(path, cfg["rescale"])
    x = preprocess(vol, sp, target_spacing=target_spacing(cfg), shape=tuple(cfg["shape"]), window=(-1000, 200),
                   norm="unit")
    text, att = generate_answers(model, x[None, None].to(dev).float(), [question or INSTRUCTION], enc, cfg,
                                 nullcontext(), 16 if question else cfg["max_new_tokens"])
    png = Path(cfg["out_dir"]) / (Path(path).name.split(".")[0] + "_attention.png")
    attention_png(x, {k: v.float().cpu() for k, v in att.items()}, cfg, png)
    print(f"{path}: (z, y, x) {tuple(vol.shape)} at {tuple(round(s, 2) for s in sp)} mm -> {tuple(x.shape)}")
    print(f"alpha over the {cfg['n_slices']} centre slices: {' '.join(f'{a:.3f}' for a in att['alpha'][0].tolist())}")
    print(f"{question or INSTRUCTION}\n{text[0]}\n(attention over slices: {png})")
    if question:
        print(f"ranked (the likeliest of the four offered answers): "
              f"{rank_answers(model, x[None, None].to(dev).float(), question, enc, cfg, nullcontext())}")
    return text[0]


# -----------------------------------------------------------------------------
# CLI: the parser (copied from ct_scroll)

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


# -----------------------------------------------------------------------------
# Stages and main

def param_counts(cfg) -> dict:
    """The model at cfg's sizes on the meta device (no memory): parameters of f_2d, f_3d, the fusion, the decoder."""
    with torch.device("meta"):
        m = build_model(cfg)
        head = DINOHead(cfg["vit_dim"], cfg["dino_hidden"], cfg["dino_bottleneck"], cfg["dino_out"])
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    counts = {"f_2d": n(m.f_2d), "f_3d": n(m.f_3d), "fusion": n(m.fusion), "decoder": n(m.decoder),
              "dino_head (stage 1 only)": n(head)}
    print(f"preset {cfg['preset']}, fusion {cfg['fusion']}: parameters")
    print("\n".join(f"  {k:<26}{v / 1e6:>10.2f}M" for k, v in counts.items()))
    return counts


def check_config(cfg):
    for key, allowed in (("stage", ("",) + STAGES), ("fusion", FUSIONS), ("init_from", ("scratch", "resume")),
                         ("vit_stem", ("patch", "conv")), ("rescale", ("auto", "header", "none"))):
        if cfg[key] not in allowed:
            raise BadConfig(f"--{key}={cfg[key]!r}: not one of the allowed values (see --help)")
    for key in ("max_iters", "eval_interval", "batch_size", "grad_accum", "n_train", "n_val", "n_test", "n_slices",
                "vit_img", "vit_patch", "vit_dim", "vit_depth", "vit_heads", "agg_heads", "dino_batch", "warmup_batch",
                "dim", "n_layers", "n_heads", "n_kv_heads", "max_new_tokens"):
        if cfg[key] < 1:
            raise BadConfig(f"--{key}={cfg[key]}: must be at least 1")
    for a, b in (("vit_dim", "vit_heads"), ("vit_dim", "agg_heads"), ("dim", "n_heads"), ("n_heads", "n_kv_heads")):
        if cfg[a] % cfg[b]:
            raise BadConfig(f"--{a}={cfg[a]}: not a multiple of --{b}={cfg[b]}")
    if cfg["n_slices"] > cfg["shape"][0]:
        raise BadConfig(f"--n_slices={cfg['n_slices']}: the volume has only {cfg['shape'][0]} axial slices (--shape)")
    if cfg["prompt_iters"] and (cfg["prompt_iters"] >= cfg["max_iters"] or cfg["llm"]):
        raise BadConfig(f"--prompt_iters={cfg['prompt_iters']}: must be below --max_iters={cfg['max_iters']}, "
                        "without --llm (it re-initialises the decoder)")
    if cfg["vit_img"] % cfg["vit_patch"]:
        raise BadConfig(f"--vit_img={cfg['vit_img']}: not a multiple of --vit_patch={cfg['vit_patch']}")


def resume_ckpt(cfg, stage, master):
    """--init_from=resume: the stage's checkpoint, whose model keys replace cfg's (as hilt.main); None from scratch."""
    if cfg["init_from"] != "resume":
        return None
    ckpt = load_checkpoint(Path(cfg["out_dir"]) / CKPT[stage])
    theirs = {k: ckpt["config"].get(k, DEFAULTS[k]) for k in MODEL_KEYS}  # a key older checkpoints lack: its default
    changed = {k: (cfg[k], theirs[k]) for k in MODEL_KEYS if cfg[k] != theirs[k]}
    if changed and master:
        print(f"resume: model keys come from the checkpoint, ignoring {changed}")
    cfg.update(theirs)
    if stage == "finetune" and master and not cfg["predict"]:
        resume_cleanup(cfg["out_dir"], ckpt["iter_num"])  # a ckpt.pt.tmp of a killed save, log lines past the ckpt
    return ckpt


def run_dino(cfg, dev, ddp, rank, world, master):
    ckpt = resume_ckpt(cfg, "dino", master)
    torch.manual_seed(cfg["seed"])
    model = build_dino(cfg).to(dev)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    train_ds = get_split(cfg, "train")
    if ckpt is None and master:
        print(f"k-NN probe of the random-init f_2d: {knn_probe(model.teacher, cfg, dev)}")

    def batch(it, j):  # dino_batch slices: random volume, plane, and position in the central 80% of that axis
        xs, n = [], cfg["dino_batch"]
        for i, p in zip(torch.randint(len(train_ds), (n,)).tolist(), torch.randint(3, (n,)).tolist()):
            v = train_ds[i]["volume"][None].float()
            L = v.shape[2 + p]
            xs.append(plane_slices(v, p, int(torch.randint(L // 10, L - L // 10, ())), 1, cfg["vit_img"])[0])
        return (torch.stack(xs).to(dev),)  # (N, 1, img, img)

    crops = f"(2 global {cfg['vit_img']} px + {cfg['dino_local']} local {cfg['dino_local_size']} px crops)"
    train(cfg, "dino", model, batch, lambda: knn_probe(model.teacher, cfg, dev), dev, ddp, master, ckpt,
          f"{cfg['dino_batch']} slices x {crops}")


def run_warmup(cfg, dev, ddp, rank, world, master):
    ckpt = resume_ckpt(cfg, "warmup", master)
    torch.manual_seed(cfg["seed"])
    model = build_warmup(cfg).to(dev)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    else:
        load_parts(cfg, "dino", {"teacher.": model.f_2d}, VIT_KEYS, master, "the warm-up's f_2d")
    train_ds = get_split(cfg, "train")
    B = cfg["warmup_batch"] // world

    def batch(it, j):
        idx = micro_batch(len(train_ds), it, B, cfg["seed"], rank, world)
        return (torch.stack([train_ds[i]["volume"] for i in idx]).to(dev).float(),)

    if ckpt is None and master:
        print(f"warm-up probe before training: {warmup_probe(model, cfg, dev)}")
    train(cfg, "warmup", model, batch, lambda: warmup_probe(model, cfg, dev), dev, ddp, master, ckpt,
          f"InfoNCE, {B} volumes x (axial, coronal|sagittal) views of {cfg['n_slices']} slices, "
          f"tau {cfg['warmup_tau']}")


def run_finetune(cfg, dev, ddp, rank, world, master):
    ckpt = resume_ckpt(cfg, "finetune", master)
    torch.manual_seed(cfg["seed"])
    train_ds = None if cfg["predict"] else get_split(cfg, "train")
    enc = get_tokenizer(cfg, None if ckpt is not None else train_ds, save=master)
    if not cfg["llm"]:
        cfg["vocab_size"] = enc.n_vocab  # a small corpus can run out of merges before the requested size
    model = build_model(cfg).to(dev)
    if ckpt is not None:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=not cfg["llm"])
        frozen = all(k.startswith("decoder.") and ".lora_" not in k for k in missing)  # --llm: Meta's weights
        assert not unexpected and frozen, (missing, unexpected)
    else:
        load_parts(cfg, "dino", {"teacher.": model.f_2d}, VIT_KEYS, master, "f_2d")
        if cfg["ssl_warmup"]:
            load_parts(cfg, "warmup", {"f_3d.": model.f_3d, "norm_2d.": model.norm_2d}, AGG_KEYS, master, "f_3d")
    if cfg["predict"]:
        return predict_file(cfg, model, enc, dev, cfg["predict"], cfg["question"])
    model.f_2d.requires_grad_(not cfg["freeze_vit"])
    model.f_3d.requires_grad_(not cfg["freeze_aggregator"])
    model.train()
    val_ds = get_split(cfg, "val")
    tasks = (0, 1) if "questions" in train_ds[0] else (0,)  # a dataset without questions trains reports only
    micro = cfg["batch_size"] // world // cfg["grad_accum"]
    assert micro * world * cfg["grad_accum"] == cfg["batch_size"], "batch_size must divide by world size * grad_accum"
    start, findings = cfg["max_iters"] - cfg["prompt_iters"], {}  # --prompt_iters: the findings phase from `start`

    def batch(it, j):  # every volume of the micro-batch with its report and its multiple-choice question
        idx = micro_batch(len(train_ds), it * cfg["grad_accum"] + j, micro, cfg["seed"], rank, world)
        if it < start:
            return get_batch(train_ds, idx, tasks, enc, cfg, dev)
        if not findings:  # the findings phase: f_2d on the labels, f_2d and f_3d frozen, the label head fit, a new
            with torch.random.fork_rng():  # decoder (docstring); the same batches after, resumed here or not
                fresh = it == start and j == 0  # (a run resumed later has these in its checkpoint)
                if fresh and cfg["label_iters"]:
                    torch.manual_seed(cfg["seed"] + 2)
                    train_labels(model, train_ds, cfg, dev)
                model.f_2d.requires_grad_(False)
                model.f_3d.requires_grad_(False)
                torch.manual_seed(cfg["seed"] + 3)  # the probe's init: the same head wherever a run resumed
                findings["z"] = fit_findings(model, train_ds, val_ds, dev)
                if fresh:
                    torch.manual_seed(cfg["seed"] + 1)
                    model.decoder.load_state_dict(Decoder(model.decoder.args).state_dict())
        _, labels, *text = get_batch(train_ds, idx, (1,) if len(tasks) > 1 and (it - start) % 8 else tasks, enc, cfg, dev)
        z = findings["z"][idx]
        return (z + cfg["feat_noise"] * torch.randn_like(z) if cfg["feat_noise"] else z, labels, *text)

    def evaluate():
        res = {f"val_loss_{['report', 'mcq'][t]}": test_loss(model, val_ds, enc, cfg, dev, nullcontext(), t, False)
               for t in tasks}
        return {"val_loss": sum(res.values()) / len(tasks), **res}

    train(cfg, "finetune", model, batch, evaluate, dev, ddp, master, ckpt,
          f"fusion={cfg['fusion']}, {model.n_visual} visual tokens, freeze_vit={cfg['freeze_vit']}, "
          f"freeze_aggregator={cfg['freeze_aggregator']}, {len(train_ds)} train / {len(val_ds)} val volumes")
    return final_eval(cfg, model, enc, dev, autocast_ctx(cfg["dtype"], dev), train_ds) if master else None


def main(argv=None):
    cfg = parse_config(argv, DEFAULTS, PRESETS)
    check_config(cfg)
    if cfg["param_counts"]:
        return param_counts(cfg)
    ddp, rank, world, dev, master = setup_ddp(cfg["device"])
    if master:
        print(f"preset {cfg['preset']}, device {dev}" + ("" if world == 1 else f", DDP world {world}"))
    out = Path(cfg["out_dir"])
    if cfg["predict"]:
        if cfg["init_from"] != "resume":
            raise BadConfig("--predict: needs a trained run: add --init_from=resume (and its --out_dir)")
        return run_finetune(cfg, dev, ddp, rank, world, master)
    if cfg["question"]:
        raise BadConfig("--question: only used with --predict=scan.nii.gz")

    def finetune_model():  # the smallest vocabulary the BPE can end with: a lower bound
        m = build_model({**cfg, "vocab_size": 256 + len(SPECIAL_TOKENS)})
        m.f_2d.requires_grad_(not cfg["freeze_vit"])
        m.f_3d.requires_grad_(not cfg["freeze_aggregator"])
        return m
    if not cfg["llm"]:  # the paper preset's 3.8B decoder from scratch: stop now, not after stage 1 (DINO)
        check_fits(finetune_model, dev, "--stage=finetune", "pass --llm=<a Meta Llama folder> (the paper's setting: "
                   "a frozen decoder with LoRA) or a smaller decoder (--dim, --n_layers)")
    check_out_dir(out)  # made, and writable, before any stage works
    iters = {"dino": cfg["dino_iters"], "warmup": cfg["warmup_iters"]}
    done = lambda s: (out / CKPT[s]).is_file() and load_checkpoint(out / CKPT[s], mmap=True)["iter_num"] >= iters[s]
    if cfg["stage"]:
        stages = [cfg["stage"]]
    elif cfg["init_from"] == "resume" and (out / CKPT["finetune"]).is_file():
        stages = ["finetune"]
    else:  # what is missing, in order (a stage cut short by Ctrl-C is not done); --init_from=resume continues the
        # first of them from its checkpoint and starts the later ones from scratch
        stages = [s for s in ("dino", "warmup") if (s == "dino" or cfg["ssl_warmup"]) and not done(s)] + ["finetune"]
    res, times = None, {}
    for k, s in enumerate(stages):
        t0 = time.time()
        run_stage = {"dino": run_dino, "warmup": run_warmup, "finetune": run_finetune}[s]
        res = run_stage(cfg if k == 0 else {**cfg, "init_from": "scratch"}, dev, ddp, rank, world, master)
        times[s] = time.time() - t0
        if master:
            print(f"stage {s}: {times[s]:.0f} s wall (including rendering the phantoms it first needed)")
    if master and len(times) > 1:
        print("stage times: " + ", ".join(f"{s} {t:.0f} s" for s, t in times.items()) +
              f", total {sum(times.values()):.0f} s")
    if isinstance(res, dict) and master:
        res["stage_seconds"] = times
        (out / "metrics.json").write_text(json.dumps(res, indent=2, default=float))
    if ddp:
        torch.distributed.destroy_process_group()
    return res


if __name__ == "__main__":
    run(main)
