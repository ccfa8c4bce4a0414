"""HILT: radiology report generation for 3D high-resolution CT, with 64 visual tokens at any input resolution.

Paper: C. Liu, Z. Wan, Y. Wang, H. Shen, H. Wang, K. Zheng, M. Zhang, R. Arcucci, "Benchmarking and Boosting
Radiology Report Generation for 3D High-Resolution Medical Images", arXiv:2406.07146 (2024; later versions retitled
"Argus: Benchmarking and Enhancing Vision-Language Models for 3D Radiology Report Generation", Findings of ACL 2025).
Eq. 1-4, Table 3 (ablations), Table 5 (training), A.5 (projector layers) refer to the 2024 version.

What this file implements (X_HR one CT volume, E_V one ViT shared by both views):
    Eq. 1-2   Z_HR = E_V(X_HR) in R^{N x C},  Z_LR = E_V(X_LR) in R^{N' x C},  X_LR = trilinear resize of X_HR.
              E_V: (16, 32, 32) (z, y, x) patches -> linear + positional embedding (a grid sized for HR, trilinearly
              interpolated to the LR grid) -> pre-norm ViT (ViT-Base at the paper preset) -> LayerNorm.
    Eq. 3     Z_HILT = F(Q + softmax(Q K^T / sqrt(C)) V),  Q = Z_LR, K = V = Z_HR, through kernels.cross_attention;
              F = `proj_layers` Linear layers with GELU between (2 = LLaVA-1.5's projector; 1-3 in A.5).
    Eq. 4     report = LLM(concat(Z_HILT, Z_T)): Z_HILT is a prefix of input embeddings (LLaVA), then
              <|begin_of_text|> + an instruction, then the findings; the loss is on the findings and the end token.
How Eq. 3 is read: the paper writes no scaling, heads or projections, so Q, K, V are the encoder's own tokens, one
head, no learned q/k/v maps (the learned parts are E_V and F): the simplest faithful reading. The one addition is the
usual 1/sqrt(C): after E_V's LayerNorm, q.k of two 768-d tokens spreads by ~sqrt(C) = 28 and an unscaled softmax would
be one-hot with vanishing gradients; kernels.cross_attention scales so. "Q +" keeps the LR token's global content.

Resolution on the command line is the paper's H x W x D, depth LAST: `--hr 512,512,256` is 512 x 512 in-plane and
256 slices, a (z, y, x) = (256, 512, 512) tensor -> 16 x 16 x 16 = 4096 HR tokens; the LR view `--lr 128,128,64` is
(64, 128, 128) -> 4 x 4 x 4 = 64 tokens, all the decoder sees at every HR size.

Ablations (Table 3) as --mode: hilt | all_tokens (every HR token into the decoder) | random_queries (64 learned
queries, BLIP-style) | slices2d (LLaVA-1.5: depth as channels, 16 x 16 patches: 1024 tokens at 512 x 512); and
lr_only (the LR view's tokens straight into the decoder, no HR view: what HILT adds, not a row of the paper).

The decoder (DESIGN §5, copied by samf.py and boundary_vqa.py) is Llama 3: RMSNorm, RoPE (Meta's interleaved pairs,
optional Llama-3.1 scaling), SwiGLU, grouped-query attention, KV-cache generation (greedy / top-k), LoRA. Module
names equal Meta's checkpoint keys, so `load_llama(path)` reads params.json + consolidated.00.pth + tokenizer.model
with a strict load_state_dict; `--llm=path` freezes it and trains LoRA (r 128, alpha 64, dropout 0.1: Table 5) on
every attention and MLP projection. Without --llm the decoder is small, trained from scratch and fully (no LoRA: that
is for pretrained bases), with data.py's BPE trained on the training reports.

Training (Table 5): AdamW lr 1e-4, 3% warm-up then linear decay, weight decay 0, bf16 on CUDA (fp32 on CPU), batch 4
= 2 micro-batches x accumulation 2, max text length 512; plus grad clip 1.0.

Deviations, on purpose:
- The paper fine-tunes Llama3-8B-Instruct (--llm); nothing is downloaded at run time, so the default decoder is
  trained from scratch. The prompt is a plain instruction, not Llama 3's chat template.
- Five departures that make a from-scratch model's reports depend on the scan at the `cpu` preset's budget; each
  is a flag whose default is the paper's (the `paper` preset keeps all five off):
  --encoder=hybrid  a 3D CNN stem (ConvStem: stride-2 3x3x3 conv + GroupNorm + GELU, 16-32-64-128 channels) under
      E_V's blocks, the ViT paper's "hybrid". Trained from scratch on a few hundred volumes, the paper's pure ViT
      learns nothing of the labels (trained on them alone, 1200 steps: test macro AUROC 0.47), so its tokens carry
      no finding for the decoder to read; a CNN of this shape reaches 0.59 after 600 steps and 0.645 after 1200
      (pleural effusion 0.95, cardiomegaly 0.93). The token grid is unchanged.
  --pretrain_iters=N  E_V (+ a linear label head on the mean visual feature) trains alone on the 18 labels (BCE)
      for the first N steps, before the decoder joins: the decoder starts on features that already vary with the
      findings, instead of learning the template against tokens that do not (then it never looks back at them).
  --aux_weight=w  that label BCE stays beside the report loss afterwards (w = 1 at the cpu preset).
  --standardize  the visual features, per token position and channel, minus their running mean over scans and over
      their running std (Standardize), before F and the label head: E_V's tokens vary far more between positions
      than between scans.
  --label_prompt  one more prefix token after F(Z_HILT): Linear(18 -> dim) of a finding vector. In training it is
      the scan's true labels (teacher forcing), so the decoder learns to write each finding's sentence from it; at
      test time it is the label head's calls on the scan's own features: the head refit after training to
      convergence on the training scans' features, each finding called above its best-F1 threshold on those scans
      (refit_label_head; at p >= 0.5 the head, well ranked, called almost nothing: pleural effusion p 0.30-0.47). This is classification-guided report
      generation, not HILT's: the image's findings reach the text through a linear classifier on E_V's features.
      Why: with the first four alone, E_V's features separated pleural effusion (linear-probe test AUROC 1.00),
      pericardial effusion (0.95-0.99) and cardiomegaly (0.88-0.94), yet the decoder wrote one all-normal report
      for all 32 test scans with the same loss on its own as on another scan's volume (gap 0.0%), with and
      without --standardize: trained on the report loss, it learnt the template and never the few tokens that
      carry a finding, and greedy decoding of a finding rarer than 50% picks its normal sentence.
  Labels are used in training only; at test time the model sees the volume and the instruction, nothing else.
- `cpu` preset (all five on): HR 96 x 96 x 48 with patch 8 x 16 x 16 (216 HR tokens), LR 64 x 64 x 32 (the 64 tokens the
  decoder sees): patch and LR view at half the paper's size per axis; hybrid ViT 128-d x 2, decoder 192-d x 4;
  batch 8 = 2 micro-batches x accumulation 2, lr 2e-3, 300 label steps then 700 report steps; 256 training
  phantoms rendered once by 2 processes.

Commands:
    python hilt.py --preset=cpu                              # CPU: trains, evaluates, prints reports vs references,
                                                             # CE vs image-blind callers, own- vs other-volume loss
    python hilt.py --hr 512,512,256                          # the headline: paper preset (CUDA's default), 4096 HR tokens
    python hilt.py --mode=all_tokens|random_queries|slices2d  # Table 3's rows; --mode=lr_only: no HR view at all
    python hilt.py --llm=/path/to/Meta-Llama-3-8B-Instruct/original   # paper preset on CUDA: LoRA on Llama 3
    torchrun --standalone --nproc_per_node=2 hilt.py         # DDP
    python hilt.py --init_from=resume --predict=scan.nii.gz  # print the report of one NIfTI file
    python hilt.py --bench=true                              # Figure 1's shape: step time / memory vs HR size
"""
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from data import (FOV, LABELS, auroc, best_f1_thresholds, ce_baselines, clinical_metrics, collate, get_dataset,
                  labels_of, load_bpe, load_checkpoint, load_llama3_tokenizer, load_ct, preprocess, report_metrics,
                  reports_of, save_bpe, save_checkpoint, setup_ddp, train_bpe)
from data import BadConfig, Interrupted, check_out_dir, run  # run(main): the repo's errors as one line `error: ...`, exit 2; Ctrl-C exits 130
# the training loop's shared parts (data.py, Runs): the same in every script
from data import (StepTimer, StopOnSigint, Stream, autocast_ctx, forward_flops, gather_rng, log_eval, make_loader,
                  optimizer_step, restore_rng, resume_checkpoint, to_device, wrap_model)
from kernels import cross_attention

# -----------------------------------------------------------------------------
preset = ""  # cpu | paper; empty: paper on CUDA, cpu otherwise
device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda, cuda:1, ...
dtype = "bfloat16"  # autocast dtype on CUDA (bfloat16 | float32); CPU always runs float32
compile = False  # torch.compile the model
seed = 1337  # model init, batch order and synthetic patients
data = "synthetic"  # synthetic | a prepared cache folder | a CT-RATE root
out_dir = "out/hilt"  # ckpt.pt, log.jsonl, metrics.json, samples.txt, the BPE tokenizer
init_from = "scratch"  # scratch | resume (from out_dir/ckpt.pt)
mode = "hilt"  # hilt | all_tokens | random_queries | slices2d (Table 3's rows) | lr_only (LR tokens alone, no HR)
hr = (512, 512, 256)  # HR input H, W, D as the paper writes it: depth is LAST; the tensor is (D, H, W) = (z, y, x)
lr = (128, 128, 64)  # LR view H, W, D (Sec. 5.1: 128 x 128 x 64 -> 64 queries)
patch = (16, 32, 32)  # ViT patch in (z, y, x) (the paper's 32 x 32 x 16)
spacing = (1.5, 0.75, 0.75)  # real CT is resampled to this (z, y, x) mm before crop/pad to hr (A.4); () = 360 mm / hr
vit_dim = 768  # E_V width (ViT-Base)
vit_depth = 12  # E_V layers
vit_heads = 12  # E_V heads
vit_checkpoint = True  # activation checkpointing of the ViT blocks (recompute in backward: 4096 HR tokens fit)
encoder = "vit"  # vit: the paper's E_V (linear patch embedding) | hybrid: a 3D CNN stem under E_V's blocks (ViT paper)
stem_channels = (16, 32, 64, 128)  # hybrid: one stride-2 3x3x3 conv + GroupNorm + GELU stage per entry
pretrain_iters = 0  # the first steps train E_V alone on the 18 labels (BCE head); 0 = the paper (no such phase)
aux_weight = 0.0  # weight of that label BCE beside the report loss afterwards; 0 = the paper (report loss only)
standardize = False  # visual features minus their running mean over scans, over their running std, before F
label_prompt = False  # one more prefix token, the 18 findings: true labels in training, the label head's calls at test
proj_layers = 2  # layers of the projector F (A.5: 1-3, 2 is the paper's)
llm = ""  # Meta-format Llama folder (params.json, consolidated.00.pth, tokenizer.model): frozen + LoRA
dim = 1024  # decoder width (from scratch)
n_layers = 12  # decoder layers (from scratch)
n_heads = 16  # decoder query heads (from scratch)
n_kv_heads = 4  # decoder key/value heads, grouped-query attention (from scratch)
vocab_size = 4096  # BPE vocabulary trained on the training reports (from scratch)
lora_r = 128  # LoRA rank (Table 5), used with --llm
lora_alpha = 64  # LoRA alpha (Table 5)
lora_dropout = 0.1  # LoRA dropout (Table 5)
max_text_len = 512  # instruction + report tokens (Table 5: maximum sequence length 512)
max_iters = 424975  # optimizer steps (100 epochs of CT-RATE's 70% split, 16,999 volumes, at batch 4)
eval_interval = 2000  # steps between validation loss + checkpoint
log_interval = 10  # steps between progress-bar loss updates
batch_size = 4  # total batch per optimizer step (split across DDP ranks, then into grad_accum micro-batches)
grad_accum = 2  # micro-batches per optimizer step (Table 5)
learning_rate = 1e-4  # AdamW (Table 5)
warmup_ratio = 0.03  # linear warm-up share of max_iters, then linear decay to 0 (Table 5)
weight_decay = 0.0  # AdamW (Table 5)
grad_clip = 1.0  # clip the global gradient norm; 0 = off
n_train = 2000  # synthetic volumes in the training split
n_val = 100  # synthetic validation volumes
n_test = 200  # synthetic test volumes
max_new_tokens = 400  # generation cap per report
top_k = 0  # 0 = greedy decoding; k > 0 samples from the k most likely tokens
predict = ""  # path to a .nii.gz: print its report (with --init_from=resume)
bench = False  # time and peak memory of one training step vs HR size for hilt and all_tokens (Figure 1), then exit
strict = False  # a bad volume in a dataset is fatal instead of skipped
rescale = "auto"  # --predict: stored values -> HU by the header | none | auto (header or header - 1024, by the air level)
debug = False  # print the traceback of every error (without it, bad input is one line `error: ...`)
num_workers = 4  # processes that render the synthetic splits at start, or render (GPU) / read volumes not in RAM
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k.islower() and not k.startswith("_") and type(v) in (bool, int, float, str, tuple)}

PRESETS = {
    "paper": {},  # the defaults above are the paper's settings
    "cpu": dict(hr=(96, 96, 48), lr=(64, 64, 32), patch=(8, 16, 16), spacing=(), encoder="hybrid", vit_dim=128,
                vit_depth=2, vit_heads=2, vit_checkpoint=False, dim=192, n_layers=4, n_heads=6, n_kv_heads=2,
                vocab_size=1024, standardize=True, label_prompt=True, pretrain_iters=300, aux_weight=1.0, max_iters=1000, eval_interval=200,
                batch_size=8, learning_rate=2e-3, n_train=256, n_val=8, n_test=32, max_new_tokens=256, num_workers=2),
}
MODEL_KEYS = ("mode", "hr", "lr", "patch", "spacing", "encoder", "stem_channels", "standardize", "label_prompt", "vit_dim", "vit_depth", "vit_heads",
              "proj_layers", "llm", "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "lora_r", "lora_alpha", "lora_dropout",
              "max_text_len")
MODES = ("hilt", "all_tokens", "random_queries", "slices2d", "lr_only")
ENCODERS = ("vit", "hybrid")
INSTRUCTION = "Write the findings of this chest CT."
CACHE_BYTES = 2 * 2**30  # fp16 synthetic splits up to this stay in RAM; larger: rendered on the GPU, or once to disk


# -----------------------------------------------------------------------------
# Vision: E_V and HILT (Eq. 1-3)

def zyx(hwd) -> tuple:
    """The paper's H x W x D (depth last, as typed on the command line) -> the tensor's (z, y, x) = (D, H, W)."""
    return (hwd[2], hwd[0], hwd[1])


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


class ConvStem(nn.Module):
    """The CNN of a hybrid ViT (Dosovitskiy et al., ICLR 2021, Sec. 3.1 "Hybrid Architecture"), in 3D: one stage per
    channel count, each a 3x3x3 conv + GroupNorm + GELU with stride 2 along every axis the patch still spans (else 1).
    (B, 1, Z, Y, X) -> (B, C_last, Z / sz, Y / sy, X / sx); `cell` = the patch left for the token embedding."""
    def __init__(self, channels, patch):
        super().__init__()
        layers, c, cell = [], 1, list(patch)
        for c_out in channels:
            stride = tuple(2 if r % 2 == 0 else 1 for r in cell)
            cell = [r // s for r, s in zip(cell, stride)]
            layers += [nn.Conv3d(c, c_out, 3, stride=stride, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.GELU()]
            c = c_out
        self.net, self.cell, self.out_channels = nn.Sequential(*layers), tuple(cell), c

    def forward(self, x):
        return self.net(x)


class ViT3D(nn.Module):
    """E_V (Eq. 1): (B, 1, Z, Y, X) -> tokens (B, N, C). The positional embedding is a grid of the HR token layout,
    trilinearly interpolated when a view has another grid (the LR view). With `stem_channels` (--encoder=hybrid) a
    ConvStem runs first and each token embeds the stem's features over what is left of the patch: the same token
    grid, so Eq. 3 and the 64 visual tokens are unchanged."""
    def __init__(self, *, grid, patch, dim: int, depth: int, heads: int, grad_checkpoint: bool = False,
                 stem_channels=()):
        super().__init__()
        self.grid, self.grad_checkpoint = tuple(grid), grad_checkpoint
        self.stem = ConvStem(stem_channels, patch) if stem_channels else None
        self.patch, c_in = (self.stem.cell, self.stem.out_channels) if self.stem else (tuple(patch), 1)
        self.patch_embed = nn.Linear(c_in * math.prod(self.patch), dim)  # = Conv3d(c_in, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, dim, *grid) * 0.02)  # (1, C, gz, gy, gx)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        if self.stem is not None:
            x = self.stem(x)  # (B, C_stem, Z', Y', X')
        B, C, Z, Y, X = x.shape
        (pz, py, px) = self.patch
        g = (Z // pz, Y // py, X // px)
        x = x.reshape(B, C, g[0], pz, g[1], py, g[2], px).permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, gz, gy, gx, C, pz, py, px)
        x = self.patch_embed(x.reshape(B, math.prod(g), C * pz * py * px))  # (B, N, dim)
        pos = self.pos_embed if g == self.grid else F.interpolate(self.pos_embed, size=g, mode="trilinear",
                                                                  align_corners=False)  # Sec. 3.1
        x = x + pos.flatten(2).transpose(1, 2)  # (B, N, C)
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpoint and self.training else blk(x)
        return self.norm(x)


def hilt_attention(q, z_hr):
    """Eq. (3) inside F: Q + softmax(Q K^T / sqrt(C)) V with K = V = Z_HR. One head, no projections. q (B, N', C)."""
    return q + cross_attention(q[:, None], z_hr[:, None], z_hr[:, None])[:, 0]  # (B, 1, N', C) -> (B, N', C)


def projector(c_in: int, c_out: int, layers: int) -> nn.Sequential:
    """F: `layers` Linear layers with GELU between (LLaVA-1.5's mlp2x_gelu for layers=2)."""
    mods = [nn.Linear(c_in, c_out)]
    for _ in range(layers - 1):
        mods += [nn.GELU(), nn.Linear(c_out, c_out)]
    return nn.Sequential(*mods)


def token_grids(cfg) -> tuple:
    """(patch, HR grid, number of visual tokens the decoder sees) for cfg's mode, all in (z, y, x)."""
    hr, lr_, patch = zyx(cfg["hr"]), zyx(cfg["lr"]), tuple(cfg["patch"])
    if cfg["mode"] == "slices2d":  # depth as channels: one 2D patch of 16 x 16 spans every slice (Table 3's baseline)
        patch = (hr[0], patch[1] // 2, patch[2] // 2)
    if any(s % p for s, p in zip(hr, patch)):
        raise ValueError(f"--hr {cfg['hr']}: (z, y, x) {hr} is not a multiple of the patch (z, y, x) {patch}")
    if cfg["mode"] in ("hilt", "random_queries", "lr_only") and any(s % p for s, p in zip(lr_, patch)):
        raise ValueError(f"--lr {cfg['lr']}: (z, y, x) {lr_} is not a multiple of the patch (z, y, x) {patch}")
    grid = tuple(s // p for s, p in zip(hr, patch))
    lr_grid = tuple(s // p for s, p in zip(lr_, patch))
    n_visual = math.prod(lr_grid) if cfg["mode"] in ("hilt", "random_queries", "lr_only") else math.prod(grid)
    return patch, grid, n_visual


class Standardize(nn.Module):
    """(B, N, C) -> (x - m) / sqrt(v + eps) per token position and channel, m and v running means over scans (updated
    from each training batch, detached; never the batch's own statistics, so no scan's output depends on another's).
    E_V's tokens differ far more between positions than between scans: after it, what varies with the scan is O(1)."""
    def __init__(self, n: int, c: int, momentum: float = 0.02, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(n, c))
        self.register_buffer("var", torch.ones(n, c))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                m = 1.0 if self.count == 0 else self.momentum  # the first batch sets the statistics
                self.mean.lerp_(x.float().mean(0), m)
                self.var.lerp_(x.float().var(0, unbiased=False) if x.shape[0] > 1 else self.var, m)
                self.count += 1
        return (x - self.mean) * torch.rsqrt(self.var + self.eps)


class HILT(nn.Module):
    """volume (B, 1, Z, Y, X) at HR -> visual tokens (B, n_visual, dim) -> decoder. forward(volume, inputs, targets)
    returns the mean cross-entropy of the report tokens; with `labels` (B, 18) and aux_weight > 0 plus aux_weight x
    the BCE of a linear label head on the mean visual feature; with inputs None that BCE alone (--pretrain_iters)."""
    def __init__(self, cfg: dict, decoder: "Decoder"):
        super().__init__()
        assert cfg["mode"] in MODES, f"--mode={cfg['mode']!r}: expected one of {MODES}"
        self.mode, self.lr_shape = cfg["mode"], zyx(cfg["lr"])
        patch, grid, self.n_visual = token_grids(cfg)
        assert cfg["encoder"] in ENCODERS, f"--encoder={cfg['encoder']!r}: expected one of {ENCODERS}"
        self.encoder = ViT3D(grid=grid, patch=patch, dim=cfg["vit_dim"], depth=cfg["vit_depth"],
                             heads=cfg["vit_heads"], grad_checkpoint=cfg["vit_checkpoint"],
                             stem_channels=cfg["stem_channels"] if cfg["encoder"] == "hybrid" else ())
        if self.mode == "random_queries":  # BLIP-style learned queries, as many as the LR tokens
            self.queries = nn.Parameter(torch.randn(1, self.n_visual, cfg["vit_dim"]) * 0.02)
        self.projector = projector(cfg["vit_dim"], decoder.args.dim, cfg["proj_layers"])  # F
        self.label_head = nn.Linear(cfg["vit_dim"], len(LABELS))  # not the paper's: --pretrain_iters, --aux_weight
        self.standardize = Standardize(self.n_visual, cfg["vit_dim"]) if cfg["standardize"] else nn.Identity()
        self.label_embed = nn.Linear(len(LABELS), decoder.args.dim) if cfg["label_prompt"] else None
        self.decoder = decoder

    def features(self, volume):
        """The visual features before F: (B, n_visual, C)."""
        if self.mode == "lr_only":  # the LR view's tokens straight to F: no HR view, no Eq. (3)
            x_lr = F.interpolate(volume, size=self.lr_shape, mode="trilinear", align_corners=False)
            return self.standardize(self.encoder(x_lr))
        z_hr = self.encoder(volume)  # Eq. (1): (B, N, C)
        if self.mode == "hilt":
            x_lr = F.interpolate(volume, size=self.lr_shape, mode="trilinear", align_corners=False)  # the LR view
            z = hilt_attention(self.encoder(x_lr), z_hr)  # Eq. (1) then (3): (B, N', C)
        elif self.mode == "random_queries":
            z = hilt_attention(self.queries.expand(volume.shape[0], -1, -1), z_hr)  # (B, N', C)
        else:  # all_tokens, slices2d: every token goes to the decoder
            z = z_hr
        return self.standardize(z)

    def prefix(self, z, labels=None):
        """F(z) (Eq. 3), then with --label_prompt one token of the 18 findings: `labels` when given (training), else
        the label head's calls (logit >= 0; refit_label_head moves each cut) from this volume's own features."""
        vis = self.projector(z)  # (B, n_visual, dim)
        if self.label_embed is None:
            return vis
        calls = labels if labels is not None else (self.label_head(z.mean(1)) >= 0).float()  # (B, 18)
        return torch.cat([vis, self.label_embed(calls)[:, None]], dim=1)  # (B, n_visual + 1, dim)

    def visual_tokens(self, volume):
        return self.prefix(self.features(volume))  # (B, n_visual [+ 1], dim)

    def forward(self, volume, inputs, targets, labels=None, aux_weight=0.0):
        z = self.features(volume)
        bce = lambda: F.binary_cross_entropy_with_logits(self.label_head(z.mean(1)), labels)
        if inputs is None:  # E_V alone on the labels
            return bce()
        vis = self.prefix(z, labels if self.training else None)
        logits = self.decoder(inputs, vis)[:, vis.shape[1]:]  # Eq. (4), the text positions: (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return loss + aux_weight * bce() if labels is not None and aux_weight else loss


def build_model(cfg: dict) -> nn.Module:
    """HILT around a from-scratch decoder, or around a frozen Meta Llama with LoRA when cfg['llm'] is set."""
    _, _, n_visual = token_grids(cfg)
    seq = n_visual + int(cfg["label_prompt"]) + cfg["max_text_len"]
    if cfg["llm"]:
        decoder, _ = load_llama(cfg["llm"], max_seq_len=seq)
        if "cuda" not in str(cfg["device"]):
            decoder.float()  # Meta ships bf16; bf16 matmul is very slow on CPU
        add_lora(decoder, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"])
    else:
        decoder = Decoder(ModelArgs(dim=cfg["dim"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                                    n_kv_heads=cfg["n_kv_heads"], vocab_size=cfg["vocab_size"], max_seq_len=seq))
    return HILT(cfg, decoder)


# -----------------------------------------------------------------------------
# Decoder: Llama 3 (RMSNorm, RoPE, SwiGLU, GQA, KV cache) and LoRA; samf.py and boundary_vqa.py copy it (tests/test_copies.py checks the copies).
# Attribute names equal Meta's checkpoint keys (tok_embeddings, layers.N.attention.wq, feed_forward.w1, norm, ...).

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


def rope_scaling(freqs: torch.Tensor, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, old_context=8192):
    """Llama 3.1's RoPE scaling: wavelengths longer than old_context / low_freq_factor are slowed by `factor`, shorter
    than old_context / high_freq_factor are kept, and the band between is blended linearly in old_context / wavelength."""
    wavelen = 2 * math.pi / freqs
    smooth = ((old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * freqs / factor + smooth * freqs  # smooth = 1: high frequency (kept), 0: low (divided)


def precompute_rope(head_dim: int, seq_len: int, theta: float, scaled: bool) -> torch.Tensor:
    """cos and sin of position * frequency: (seq_len, head_dim // 2, 2), the real form of Meta's complex freqs_cis."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
    if scaled:
        freqs = rope_scaling(freqs)
    angles = torch.outer(torch.arange(seq_len).float(), freqs)  # (S, D/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) by its angle, as Meta's complex multiply does. x (B, T, H, D), rope (T, D/2, 2)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    rope = rope.view(1, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * rope[..., 0] - xs[..., 1] * rope[..., 1],
                       xs[..., 0] * rope[..., 1] + xs[..., 1] * rope[..., 0]], dim=-1)
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


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


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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


def sample(logits, temperature: float = 1.0, top_k: int = 0):
    """logits (B, V) -> ids (B,): argmax when top_k == 0, else a draw from the top_k most likely at `temperature`."""
    if top_k <= 0:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-5)
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
    probs = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
    return torch.multinomial(probs, 1)[:, 0]


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


# -----------------------------------------------------------------------------
# Data: volumes at HR, reports as BOS + instruction + findings + EOS

def target_spacing(cfg) -> tuple:
    """mm per voxel real scans are resampled to: cfg['spacing'], or the phantom's field of view (FOV) over hr."""
    return tuple(cfg["spacing"]) or tuple(f / s for f, s in zip(FOV, zyx(cfg["hr"])))


def get_split(cfg, split: str):
    n = {"train": cfg["n_train"], "val": cfg["n_val"], "test": cfg["n_test"]}[split]
    big, gpu = n * math.prod(zyx(cfg["hr"])) * 2 > CACHE_BYTES, "cuda" in cfg["device"]  # big: GPU or disk cache
    ds = get_dataset(cfg["data"], split, n=n, shape=zyx(cfg["hr"]), spacing=target_spacing(cfg),
                     window=(-1000, 200), norm="unit", seed=cfg["seed"], strict=cfg["strict"],  # A.4: [-1000, 200] -> [0, 1]
                     device=cfg["device"] if big and gpu else None, disk_cache=big and not gpu)
    if cfg["data"] == "synthetic" and not big:  # render once, keep as fp16
        items = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg["num_workers"])
        ds = [{"volume": it["volume"].half(), "labels": it["labels"], "report": it["report"], "name": it["name"]}
              for it in tqdm(items, total=n, desc=f"synthetic {split} {zyx(cfg['hr'])}", leave=False)]
    return ds


def get_tokenizer(cfg, train_reports=None, save=True):
    """Llama's tokenizer with --llm; else data.py's BPE, trained on the training reports (scratch) or loaded."""
    if cfg["llm"]:
        return load_llama3_tokenizer(Path(cfg["llm"]) / "tokenizer.model")
    path = Path(cfg["out_dir"]) / "bpe.tiktoken"
    if train_reports is None:
        return load_bpe(path)
    enc = train_bpe(train_reports + [INSTRUCTION], cfg["vocab_size"])  # a fresh run never reuses a stale file
    if save:  # DDP: every rank trains the same BPE, rank 0 writes it
        save_bpe(enc, path)
    return enc


def prompt_ids(enc) -> list:
    return [enc.encode_single_token("<|begin_of_text|>")] + enc.encode(INSTRUCTION)


def tokenize(reports, enc, max_text_len: int):
    """inputs, targets (B, T): BOS + instruction + report + EOS shifted by one; targets -1 (no loss) on the prompt
    and the padding. Padding goes after the end, where causal attention never looks back at it."""
    prompt, eos = prompt_ids(enc), enc.encode_single_token("<|end_of_text|>")
    seqs = [(prompt + enc.encode(r, disallowed_special=()) + [eos])[: max_text_len + 1] for r in reports]
    T = max(map(len, seqs)) - 1
    inputs, targets = torch.full((len(seqs), T), eos), torch.full((len(seqs), T), -1)
    for i, s in enumerate(seqs):
        inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
        targets[i, len(prompt) - 1: len(s) - 1] = torch.tensor(s[len(prompt):])
    return inputs, targets


def collate_reports(items, enc, max_text_len: int) -> dict:
    """volume (B, 1, Z, Y, X) float32, inputs and targets (B, T), labels (B, 18)."""
    b = collate(items)
    inputs, targets = tokenize(b["report"], enc, max_text_len)
    return {"volume": b["volume"].float(), "inputs": inputs, "targets": targets, "labels": b["labels"].float()}


def get_batch(ds, idx, enc, cfg, dev, shift=0):
    """volumes, inputs, targets, labels of items idx; shift > 0 pairs report i with the volume of item i + shift."""
    b = collate_reports([ds[i] for i in idx], enc, cfg["max_text_len"])
    if shift:
        b["volume"] = collate([ds[(i + shift) % len(ds)] for i in idx])["volume"].float()
    return b["volume"].to(dev), b["inputs"].to(dev), b["targets"].to(dev), b["labels"].to(dev)


def loader(ds, cfg, batch_sampler, enc):
    return make_loader(ds, batch_sampler, partial(collate_reports, enc=enc, max_text_len=cfg["max_text_len"]),
                       cfg["num_workers"], cfg["seed"], pin_memory="cuda" in cfg["device"])


# -----------------------------------------------------------------------------
# Train / eval

def get_lr(it: int, cfg) -> float:
    """Table 5: linear warm-up over 3% of the steps, then linear decay to 0. With --pretrain_iters the E_V-only phase
    and the report phase each run this schedule over their own steps."""
    pre = cfg["pretrain_iters"]
    it, n = (it, pre) if it < pre else (it - pre, cfg["max_iters"] - pre)
    warm = max(1, round(cfg["warmup_ratio"] * n))
    if it < warm:
        return cfg["learning_rate"] * (it + 1) / warm
    return cfg["learning_rate"] * max(0.0, (n - it) / max(1, n - warm))


@torch.no_grad()
def evaluate_loss(model, ds, enc, cfg, dev, ctx, micro: int, shift: int = 0) -> float:
    """Mean report-token loss over ds; shift > 0: each report with another item's volume (the image probe)."""
    model.eval()
    total = 0.0
    for i in range(0, len(ds), micro):
        idx = list(range(i, min(i + micro, len(ds))))
        with ctx:
            total += model(*get_batch(ds, idx, enc, cfg, dev, shift)[:3]).item() * len(idx)
    model.train()
    return total / len(ds)


@torch.no_grad()
def generate_reports(model, volumes, enc, cfg, ctx) -> list:
    """volumes (B, 1, Z, Y, X) -> B report strings (greedy, or top-k with --top_k)."""
    model.eval()
    eos = enc.encode_single_token("<|end_of_text|>")
    prompt = torch.tensor([prompt_ids(enc)] * volumes.shape[0], device=volumes.device)
    with ctx:
        prefix = model.visual_tokens(volumes)  # (B, n_visual [+ 1 with --label_prompt], dim)
        room = model.decoder.args.max_seq_len - prefix.shape[1] - prompt.shape[1]
        ids = generate(model.decoder, prompt, prefix, max_new_tokens=min(cfg["max_new_tokens"], room), eos_id=eos,
                       top_k=cfg["top_k"])
    return [enc.decode(row[: row.index(eos)] if eos in row else row) for row in ids.tolist()]


def configure_optimizer(model, cfg, dev):
    """AdamW (Table 5) over what trains: everything from scratch; with --llm, E_V, F and the LoRA adapters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"], fused="cuda" in str(dev))


def compute_loss(model, batch, it, cfg):
    """The report's next-token loss (+ aux_weight x the label BCE); during --pretrain_iters E_V alone on the labels."""
    if it < cfg["pretrain_iters"]:  # the decoder idle
        return model(batch["volume"], None, None, batch["labels"])
    return model(batch["volume"], batch["inputs"], batch["targets"], batch["labels"], cfg["aux_weight"])


def evaluate(model, ds, enc, cfg, dev, ctx) -> dict:
    return {"val_loss": evaluate_loss(model, ds, enc, cfg, dev, ctx, max(1, cfg["batch_size"] // cfg["grad_accum"]))}


def model_state(model, cfg) -> dict:
    """With --llm, everything but the frozen Llama weights (LoRA adapters kept)."""
    return {k: v for k, v in model.state_dict().items()
            if not cfg["llm"] or not k.startswith("decoder.") or ".lora_" in k}


def flops_per_sample(model, cfg, dev, enc, ds) -> float:
    """Forward FLOPs of one training sample, counted by torch on the first training volume and its report."""
    volume, inputs, targets, labels = get_batch(ds, [0], enc, cfg, dev)
    return forward_flops(model, volume, inputs, targets, labels, cfg["aux_weight"])


def train(cfg, model, enc, train_ds, val_ds, dev, ddp, rank, world, master, ckpt=None):
    """nanoGPT's loop, the same code in every script of this repo except the paper's parts (configure_optimizer,
    get_lr, compute_loss, evaluate): grad_accum micro-batches per optimizer step, DDP syncing gradients on the last;
    a step skipped when the gradient is not finite; every eval_interval steps, at the end and on Ctrl-C, an eval on
    rank 0, a log line and a checkpoint that --init_from=resume continues from exactly.
    Returns (raw model, autocast context, stopped by Ctrl-C)."""
    ctx = autocast_ctx(cfg["dtype"], dev)
    raw = model
    opt = configure_optimizer(raw, cfg, dev)
    iter_num, best_val = 0, float("inf")
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
    model = wrap_model(raw, dev, ddp, cfg["compile"], find_unused=True)  # an idle decoder or label head
    micro = cfg["batch_size"] // world // cfg["grad_accum"]  # batch_size is per optimizer step
    batches = iter(loader(train_ds, cfg, Stream(len(train_ds), micro, cfg["seed"], iter_num, cfg["max_iters"],
                                                cfg["grad_accum"], rank, world), enc))
    timer = StepTimer(dev, 3 * flops_per_sample(raw, cfg, dev, enc, train_ds))  # forward + backward = 3 forwards
    timer.stats()  # the first call measures the device's peak FLOP/s: here, not inside the first timed window
    if ckpt is not None:  # restored last, right before the loop, so nothing above can draw from it
        restore_rng(ckpt["rng"], rank)
    bad_steps, loss_sum, n_steps = 0, 0.0, 0
    pbar = tqdm(total=cfg["max_iters"], initial=iter_num, disable=not master, desc="train", dynamic_ncols=True)
    with StopOnSigint() as sig:
        while iter_num < cfg["max_iters"] and not sig.stop:
            # this step's learning rate
            lr = get_lr(iter_num, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            # forward and backward over grad_accum micro-batches; DDP all-reduces the gradients on the last one
            for micro_step in range(cfg["grad_accum"]):
                with timer.data():
                    batch = to_device(next(batches), dev)
                if ddp:
                    model.require_backward_grad_sync = micro_step == cfg["grad_accum"] - 1
                with ctx:
                    loss = compute_loss(model, batch, iter_num, cfg)
                (loss / cfg["grad_accum"]).backward()
                loss_sum += loss.item() / cfg["grad_accum"]
            # clip and step; a non-finite gradient skips the step on every rank
            bad_steps = optimizer_step(opt, raw.parameters(), cfg["grad_clip"], bad_steps, iter_num)
            iter_num, n_steps = iter_num + 1, n_steps + 1
            timer.step(micro * cfg["grad_accum"])
            pbar.update(1)
            if master and iter_num % cfg["log_interval"] == 0:
                pbar.set_postfix_str(f"loss {loss.item():.4f} lr {lr:.2e}")
            # eval on rank 0, log, checkpoint: every eval_interval steps, at the end, on Ctrl-C
            if iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"] or sig.stop:
                rng, perf = gather_rng(ddp, world), timer.stats()
                if master:
                    val = evaluate(raw, val_ds, enc, cfg, dev, ctx)
                    best_val = min(best_val, val["val_loss"])
                    log_eval(Path(cfg["out_dir"]) / "log.jsonl",
                             {"iter": iter_num, "train_loss": loss_sum / n_steps, **val, "lr": lr, **perf})
                    save_checkpoint(Path(cfg["out_dir"]) / "ckpt.pt", {
                        "model": model_state(raw, cfg), "optimizer": opt.state_dict(), "iter_num": iter_num,
                        "best_val_loss": best_val, "config": cfg, "rng": rng})
                if ddp:
                    torch.distributed.barrier()
                loss_sum, n_steps = 0.0, 0
                timer.reset()
    pbar.close()
    return raw, ctx, sig.stop


def refit_label_head(model, train_ds, dev, ctx, thresholds=True):
    """--label_prompt: the label head, refit to convergence on the training scans' frozen features (the linear probe,
    folded back through its standardisation); its calls (logit >= 0) at test time are the findings prefix token.
    thresholds: each finding's cut moved from p = 0.5 to its best-F1 threshold on the training scans (folded into
    the bias): the refit head ranks well but, for findings rarer than 50%, rarely reaches p = 0.5."""
    x = mean_features(model, train_ds, dev, ctx)
    y = labels_of(train_ds).float()
    mu, sd = x.mean(0), x.std(0) + 1e-6
    probe = fit_probe((x - mu) / sd, y)
    with torch.no_grad():
        w = probe.weight / sd  # (18, C): w.(x - mu) / sd + b = (w / sd).x + (b - (w / sd).mu)
        bias = probe.bias - w @ mu
        if thresholds:
            t = best_f1_thresholds(y.numpy(), torch.sigmoid(x @ w.T + bias).numpy()).clip(1e-4, 1 - 1e-4)
            bias -= torch.from_numpy(np.log(t / (1 - t))).float()  # p >= t  <=>  logit - logit(t) >= 0
        model.label_head.weight.copy_(w.to(dev))
        model.label_head.bias.copy_(bias.to(dev))


@torch.no_grad()
def mean_features(model, ds, dev, ctx, batch: int = 8) -> torch.Tensor:
    """(n, C): the mean of each volume's visual features before F (what the label head and the probe read)."""
    model.eval()
    out = []
    for i in range(0, len(ds), batch):
        volumes = collate([ds[j] for j in range(i, min(i + batch, len(ds)))])["volume"].to(dev).float()
        with ctx:
            out.append(model.features(volumes).mean(1).float().cpu())
    model.train()
    return torch.cat(out)


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


def linear_probe(x_train, y_train, x_test, l2: float = 1e-3) -> torch.Tensor:
    """Test probabilities of a logistic regression on standardised frozen features: what E_V's features hold,
    whatever the decoder makes of them."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    with torch.no_grad():
        return torch.sigmoid(fit_probe((x_train - mu) / sd, y_train, l2)((x_test - mu) / sd))


def macro_auroc(y, scores) -> tuple:
    per = [auroc(y[:, k], scores[:, k]) for k in range(y.shape[1])]
    return (float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")), per  # nan: no label has 2 classes


def final_eval(cfg, model, enc, dev, ctx, train_ds, train_reports, t_start=None):
    """On the test split: the nine metrics of Sec. 4.2 and their mean beside the trivial baseline (the most frequent
    training report for every volume); clinical efficacy (the findings read out of each generated report vs the
    scan's labels) beside three image-blind callers; the image probe (report loss with each scan's own volume vs
    another's); distinct reports; what E_V alone knows of the labels (label head, linear probe). metrics.json and
    samples.txt in out_dir."""
    test_ds = get_split(cfg, "test")
    refs, preds = [[r] for r in reports_of(test_ds)], []
    for i in tqdm(range(0, len(test_ds), 16), desc="generate", leave=False):
        volumes = collate([test_ds[j] for j in range(i, min(i + 16, len(test_ds)))])["volume"]
        preds += generate_reports(model, volumes.to(dev).float(), enc, cfg, ctx)
    trivial = Counter(train_reports).most_common(1)[0][0]
    res = {"mode": cfg["mode"], "hr": cfg["hr"], "n_visual": model.n_visual, "model": report_metrics(preds, refs),
           "trivial": report_metrics([trivial] * len(refs), refs)}
    print(f"\ntest ({len(refs)} volumes), mode={cfg['mode']}: nine metrics of Sec. 4.2 (x100)\n"
          f"{'metric':<8}{'model':>8}{'trivial':>9}")
    for k in res["model"]:
        print(f"{k:<8}{100 * res['model'][k]:>8.2f}{100 * res['trivial'][k]:>9.2f}")

    y_train, y_test = labels_of(train_ds).numpy(), labels_of(test_ds).numpy()
    ce = res["ce"] = {"model": clinical_metrics(preds, y_test), **ce_baselines(y_train, y_test, seed=cfg["seed"])}
    print(f"\nclinical efficacy: the 18 findings read out of each report (data.report_labels) vs the scan's labels;"
          f" macro over the 18 (x100)\n{'':<10}" + "".join(f"{k:>18}" for k in ce))
    for k in ("f1", "micro_f1", "precision", "recall"):
        print(f"{k:<10}" + "".join(f"{100 * m[k]:>18.2f}" for m in ce.values()))
    print(f"per finding F1 (x100); * = at least 10 above both all_positive and prevalence_random\n"
          f"{'finding':<36}{'n':>4}{'model':>7}{'random':>8}{'all_pos':>8}")
    for k, name in enumerate(LABELS):
        f = {b: ce[b]["per_label"][k]["f1"] for b in ce}
        star = "*" if f["model"] >= max(f["prevalence_random"], f["all_positive"]) + 0.10 else ""
        print(f"{name:<36}{int(y_test[:, k].sum()):>4}{100 * f['model']:>7.1f}{100 * f['prevalence_random']:>8.1f}"
              f"{100 * f['all_positive']:>8.1f} {star}")
    res["findings_read"] = [n for k, n in enumerate(LABELS) if ce["model"]["per_label"][k]["f1"] >= max(
        ce["prevalence_random"]["per_label"][k]["f1"], ce["all_positive"]["per_label"][k]["f1"]) + 0.10]
    res["distinct_reports"] = len(set(preds))

    micro = max(1, cfg["batch_size"] // cfg["grad_accum"])
    own = evaluate_loss(model, test_ds, enc, cfg, dev, ctx, micro)
    other = evaluate_loss(model, test_ds, enc, cfg, dev, ctx, micro, shift=len(test_ds) // 2) if len(test_ds) > 1 else own
    res["image_probe"] = {"own_volume_loss": own, "shuffled_volume_loss": other, "gap": 1 - own / other}
    x_train, x_test = mean_features(model, train_ds, dev, ctx), mean_features(model, test_ds, dev, ctx)
    probe = linear_probe(x_train, torch.as_tensor(y_train, dtype=torch.float32), x_test).numpy()
    with torch.no_grad():
        head = torch.sigmoid(model.label_head(x_test.to(dev))).float().cpu().numpy()
    res["encoder_auroc"] = {"linear_probe": macro_auroc(y_test, probe)[0], "label_head": macro_auroc(y_test, head)[0],
                            "linear_probe_per_label": dict(zip(LABELS, macro_auroc(y_test, probe)[1]))}
    rss = [resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    res["peak_rss_mb"] = {"main": rss[0], "render_workers": rss[1]}
    res["wall_s"] = None if t_start is None else time.time() - t_start
    best = sorted(res["encoder_auroc"]["linear_probe_per_label"].items(), key=lambda kv: -np.nan_to_num(kv[1]))[:4]
    print(f"distinct reports: {res['distinct_reports']} of {len(preds)}; findings read (*): {len(res['findings_read'])}\n"
          f"image probe: report loss with own volumes {own:.4f} vs shifted volumes {other:.4f} "
          f"({100 * res['image_probe']['gap']:.1f}% lower with own)\n"
          f"E_V alone, test macro AUROC: linear probe {res['encoder_auroc']['linear_probe']:.3f} ("
          + ", ".join(f"{n.lower()} {a:.2f}" for n, a in best) + ")"
          + (f", label head {res['encoder_auroc']['label_head']:.3f}" if cfg["pretrain_iters"] or cfg["aux_weight"]
             else "") + f"\npeak RSS {rss[0]:.0f} MB (render workers {rss[1]:.0f} MB)"
          + ("" if t_start is None else f", wall {res['wall_s']:.0f} s"))
    out = Path(cfg["out_dir"])
    (out / "metrics.json").write_text(json.dumps(res, indent=2))
    lines = [f"--- {test_ds[i]['name']}\nGENERATED: {p}\nREFERENCE: {r[0]}\n" for i, (p, r) in enumerate(zip(preds, refs))]
    (out / "samples.txt").write_text("\n".join(lines))
    print("\n" + "\n".join(lines[:3]) + f"(all in {out / 'samples.txt'})")
    return res


@torch.no_grad()
def predict_file(cfg, model, enc, dev, path) -> str:
    vol, sp = load_ct(path, cfg["rescale"])
    x = preprocess(vol, sp, target_spacing=target_spacing(cfg), shape=zyx(cfg["hr"]), window=(-1000, 200), norm="unit")
    report = generate_reports(model, x[None, None].to(dev).float(), enc, cfg, nullcontext())[0]
    print(f"{path}: (z, y, x) {tuple(vol.shape)} at {tuple(round(s, 2) for s in sp)} mm -> {tuple(x.shape)}\n{report}")
    return report


# -----------------------------------------------------------------------------
# Benchmark (Figure 1's shape): one training step vs HR size, each case in a fresh process for an honest peak memory

def bench_case(argv: list) -> dict:
    """Best time of a training step (batch 1, 128-token report) and of the decoder's fwd + bwd alone; peak memory."""
    cfg = parse_config(argv, DEFAULTS, PRESETS)
    dev = cfg["device"]
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.rand(1, 1, *zyx(cfg["hr"]), device=dev)
    ids = torch.randint(0, model.decoder.args.vocab_size, (1, 129), device=dev)
    vis = torch.randn(1, model.n_visual, model.decoder.args.dim, device=dev, requires_grad=True)
    sync = torch.cuda.synchronize if "cuda" in dev else (lambda: None)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if "cuda" in dev else nullcontext()

    def step():
        with ctx:
            model(x, ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def decoder_only():
        with ctx:
            logits = model.decoder(ids[:, :-1], vis)[:, model.n_visual:]
            F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()

    def timed(fn):  # the best of two after one warm-up
        ts = []
        for _ in range(3):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return min(ts[1:])

    res = {"mode": cfg["mode"], "hr": cfg["hr"], "hr_tokens": math.prod(model.encoder.grid),
           "visual_tokens": model.n_visual, "step_s": timed(step), "decoder_s": timed(decoder_only)}
    res["peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if "cuda" in dev
                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(res))
    return res


def bench(cfg):
    rows = []
    for mode in ("hilt", "all_tokens"):
        for size in ((128, 128, 64), (256, 256, 128), (384, 384, 192), (512, 512, 256)):  # H, W, D
            argv = [f"--preset={cfg['preset']}", f"--device={cfg['device']}", f"--mode={mode}",
                    "--hr=" + ",".join(map(str, size))]
            r = subprocess.run([sys.executable, "-c", f"import hilt; hilt.bench_case({argv!r})"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent)
            if r.returncode:
                print(f"{mode} {size}: failed\n{r.stderr[-2000:]}")
                continue
            rows.append(b := json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"{mode:<11} HR {'x'.join(map(str, size)):<12} HR tokens {b['hr_tokens']:>5}  decoder visual tokens "
                  f"{b['visual_tokens']:>5}  step {b['step_s']:7.2f} s  decoder fwd+bwd {b['decoder_s']:6.3f} s  peak "
                  f"{b['peak_mb']:8.0f} MB", flush=True)
    return rows


# -----------------------------------------------------------------------------
# CLI: the parser (copied from ct_scroll) and the config checks

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


def check_config(cfg):
    """What parses but cannot work stops here, before any work, naming the key."""
    if cfg["mode"] not in MODES:
        raise BadConfig(f"--mode={cfg['mode']}: expected one of {', '.join(MODES)}")
    if cfg["init_from"] not in ("scratch", "resume"):
        raise BadConfig(f"--init_from={cfg['init_from']}: expected one of scratch, resume")
    if cfg["encoder"] not in ENCODERS:
        raise BadConfig(f"--encoder={cfg['encoder']}: expected one of {', '.join(ENCODERS)}")
    for key in ("max_iters", "eval_interval", "batch_size", "grad_accum", "n_train", "n_val", "n_test", "n_heads",
                "n_kv_heads"):
        if cfg[key] < 1:
            raise BadConfig(f"--{key}={cfg[key]}: must be at least 1")
    if not cfg["llm"] and (cfg["dim"] % cfg["n_heads"] or cfg["n_heads"] % cfg["n_kv_heads"]
                           or cfg["dim"] // cfg["n_heads"] % 2):
        raise BadConfig(f"--dim={cfg['dim']}, --n_heads={cfg['n_heads']}, --n_kv_heads={cfg['n_kv_heads']}: the width "
                        "must split into heads of an even size (RoPE), the heads into key-value groups")
    if cfg["data"] != "synthetic" and not os.path.isdir(cfg["data"]):
        raise BadConfig(f"--data={cfg['data']}: not 'synthetic' and not a folder (a CT-RATE root or a prepared cache)")
    if cfg["predict"] and cfg["init_from"] != "resume":
        raise BadConfig("--predict needs a trained run: add --init_from=resume (and its --out_dir)")
    if cfg["predict"] and not os.path.isfile(cfg["predict"]):
        raise BadConfig(f"--predict={cfg['predict']}: no such file")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise BadConfig(f"--device={cfg['device']}: CUDA is not available here (--device=cpu)")
    check_out_dir(cfg["out_dir"])


def main(argv=None):
    t_start = time.time()
    cfg = parse_config(argv, DEFAULTS, PRESETS)
    check_config(cfg)
    if cfg["bench"]:
        return bench(cfg)
    ddp, rank, world, dev, master = setup_ddp(cfg["device"])
    cfg["device"] = dev  # under torchrun cuda:<local rank>: where this rank's loader workers render its phantoms
    if cfg["batch_size"] % (world * cfg["grad_accum"]):
        raise BadConfig(f"--batch_size={cfg['batch_size']}: must divide by the {world} processes x --grad_accum")
    ckpt = resume_checkpoint(cfg, MODEL_KEYS, master)  # None from scratch
    if master:
        print(f"preset {cfg['preset']}, device {dev}" + ("" if world == 1 else f", DDP world {world}"))
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    train_ds = None if cfg["predict"] else get_split(cfg, "train")
    train_reports = None if train_ds is None or ckpt is not None else reports_of(train_ds)
    enc = get_tokenizer(cfg, train_reports, save=master)
    if not cfg["llm"]:
        cfg["vocab_size"] = enc.n_vocab  # a small corpus can run out of merges before the requested size
    model = build_model(cfg).to(dev)
    if ckpt is not None:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=not cfg["llm"])
        assert not unexpected and all(k.startswith("decoder.") and ".lora_" not in k for k in missing), (missing, unexpected)
    torch.manual_seed(cfg["seed"] + rank)  # dropout (LoRA) and sampling differ across ranks
    if cfg["predict"]:
        return predict_file(cfg, model, enc, dev, cfg["predict"])
    Path(cfg["out_dir"]).mkdir(parents=True, exist_ok=True)
    val_ds = get_split(cfg, "val")
    if master:
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
              f"({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trained), "
              f"mode={cfg['mode']}, HR (z, y, x) {zyx(cfg['hr'])}, {model.n_visual} visual tokens to the decoder, "
              f"{len(train_ds)} train / {len(val_ds)} val volumes, {cfg['max_iters']} steps")
    model, ctx, stopped = train(cfg, model, enc, train_ds, val_ds, dev, ddp, rank, world, master, ckpt)
    if cfg["label_prompt"] and not stopped:  # the label head refit on the final features, saved with the model
        refit_label_head(model, train_ds, dev, ctx)
        if master:
            ck = load_checkpoint(Path(cfg["out_dir"]) / "ckpt.pt")
            ck["model"] = model_state(model, cfg)
            save_checkpoint(Path(cfg["out_dir"]) / "ckpt.pt", ck)
    res = (final_eval(cfg, model, enc, dev, ctx, train_ds, train_reports or reports_of(train_ds), t_start)
           if master and not stopped else None)
    if ddp:
        torch.distributed.destroy_process_group()
    if stopped:
        raise Interrupted(f"checkpoint saved in {cfg['out_dir']}/ckpt.pt; continue with --init_from=resume")
    return res


if __name__ == "__main__":
    run(main)
