"""Residual fusion of a 2D ResNet and a 3D ViT for multi-abnormality classification of chest CT.

Paper: E. Maestri, "Evaluating a residual learning framework for 3D computed tomography data", Stanford University
course project report (CS231n-style), 2025; no arXiv or DOI was found for it. Algorithm 1, Tables 2-3, Figures 4-5.

What this file implements (x = one CT volume, S centre slices, 18 CT-RATE labels):
    2D branch   f_s = ResNet18(x[s]) in R^512 for every slice s (1-channel first conv)       (Sec. 4.1)
                ResNet alone: logits = mean_s W f_s + b  (per-slice logits averaged)          (Table 2, ResNet)
    3D branch   CTViT-style: 16x16 in-plane patches -> 512-d tokens, 4 spatial layers (attention within a slice),
                4 slice-wise layers (attention across slices at each patch position), 8 heads of 64;
                v = mean over all tokens;  ViT alone: logits = W_v v + b_v                  (Sec. 4.2, Table 2, ViT)
    Fusion      x2d = mean_s f_s ;  res3d = P v  (P: Linear D_vit -> 512, the projection)   (Algorithm 1)
                z = x2d + alpha * res3d ;  logits = W z + b  (W, b: the ResNet head)        (Sec. 5, Table 3)
    Loss        BCEWithLogits over the 18 labels.
Because the head is linear, averaging per-slice logits equals applying the head to the mean-pooled feature, so the
ResNet row of Table 2 is exactly the fusion with alpha = 0 (as in the paper, whose two rows read the same numbers).
alpha = "learned" is a scalar nn.Parameter named `alpha`, initialised at 1.0: training starts from Algorithm 1 as in
Table 2 (equal weights) and may shrink the residual toward 0 if the 3D path does not help, the paper's argument.
It is exempt from weight decay (decay would pull it toward 0 for no reason). Note that alpha and the scale of P are
interchangeable, so only alpha * |P v| is identifiable; and Adam moves alpha by at most about lr per step.

Preprocessing (Sec. 3.1): HU window [-1000, 1000] -> [-1, 1]; crop/pad to 240 x 214 x 214 (z, y, x), keep the 100
centre slices. The 2D branch sees 214 x 214 slices; the ViT sees the same slices resized (bilinear) to 224 x 224.
Real CT is first resampled to `spacing` (1.5 x 0.75 x 0.75 mm, CT-RATE's processed grid), so the 214-pixel crop is
the central 160 mm in-plane, as the paper's numbers imply; `--spacing=1.5,1.5,1.5` would keep the whole chest.

Deviations, on purpose:
- ImageNet weights are optional (`--resnet_weights=path/to/resnet18-f37072fd.pth`, RGB conv1 summed to 1 channel);
  the default is random init, since nothing may be downloaded at run time. The paper's ResNet was pretrained.
- ViT: learned absolute position embeddings (slice + in-plane) and a bidirectional slice-wise transformer, instead
  of CTViT's PEG and causal time attention (those serve generation, not classification); pre-norm LayerNorm, GELU MLP.
- Evaluation reports both the paper's threshold 0.5 and thresholds maximising F1 per label on validation.
- Embedding picture (Fig. 4): PCA instead of t-SNE (no extra package). Attention picture (Fig. 5): Grad-CAM of the
  chosen label on the ResNet's last block and on the ViT's last-layer tokens, on the slice where it is strongest.
- The `cpu` preset shrinks everything but the ResNet-18: the phantom at 24x48x48 (15 x 7.5 x 7.5 mm voxels), its 16
  centre slices, the ViT at 48x48 with 8x8 patches, 128-d, 2 + 2 layers of 4 heads of 32; 128/48/64 volumes, 8 epochs.

Commands (each prints one line per epoch -- val loss, val AUROC, lr, alpha, samples/s -- then the test table at
threshold 0.5 and at validation-F1 thresholds; the cpu fusion run here: test AUROC 0.580, alpha 1.0 -> 0.991):
    python fusion2d3d.py --preset=cpu --mode=fusion          # CPU smoke run on the synthetic phantom
    python fusion2d3d.py --mode=resnet|vit|fusion --alpha=0.5 # one row of Table 2 / Table 3 (paper preset on GPU)
    python fusion2d3d.py --data=/data/CT-RATE --resnet_weights=resnet18-f37072fd.pth
    torchrun --standalone --nproc_per_node=4 fusion2d3d.py    # the paper's 4 GPUs (batch 8 = 2 per GPU)
    python fusion2d3d.py --init_from=resume --predict=scan.nii.gz   # 18 probabilities + calls + Grad-CAM PNG
"""
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data import (LABELS, BadConfig, Interrupted, auroc, best_f1_thresholds, check_out_dir, classification_metrics,
                  get_dataset, load_checkpoint, load_ct, preprocess, run, save_checkpoint, setup_ddp)
from data import collate as data_collate
# the training loop's shared parts (data.py, Runs): the same in every script
from data import (StepTimer, StopOnSigint, Stream, autocast_ctx, forward_flops, gather_rng, log_eval, make_loader,
                  optimizer_step, restore_rng, resume_checkpoint, to_device, wrap_model)

# -----------------------------------------------------------------------------
preset = ""  # cpu | paper; empty: paper on CUDA, cpu otherwise
device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda, cuda:1, ...
dtype = "bfloat16"  # autocast dtype on CUDA (bfloat16 | float32); CPU always runs float32
compile = False  # torch.compile the model
seed = 1337  # model init, batch order and synthetic patients
data = "synthetic"  # synthetic | a prepared cache folder | a CT-RATE root
out_dir = "out/fusion2d3d"  # ckpt.pt, log.jsonl, metrics.json, PNGs
init_from = "scratch"  # scratch | resume (from out_dir/ckpt.pt)
mode = "fusion"  # resnet | vit | fusion (Table 2's rows)
alpha = "learned"  # fusion weight of the 3D residual: a float (fixed) or learned (Table 3's rows)
epochs = 10  # paper: 10 epochs
max_iters = 0  # optimizer steps; 0 = epochs * steps per epoch
eval_interval = 0  # steps between evals (ReduceLROnPlateau steps on each); 0 = once per epoch
log_interval = 10  # steps between progress-bar loss updates
batch_size = 8  # global batch (split across DDP ranks, then into grad_accum micro-batches); paper: 8
grad_accum = 1  # micro-batches per optimizer step
learning_rate = 5e-4  # AdamW, paper: 5e-4
weight_decay = 0.01  # AdamW (torch default); biases, norms, embeddings and alpha are exempt
lr_factor = 0.5  # ReduceLROnPlateau factor on validation loss (paper: 0.5)
lr_patience = 2  # ReduceLROnPlateau patience in evals (paper: 2 epochs)
grad_clip = 1.0  # clip the global gradient norm; 0 = off
n_train = 2100  # synthetic volumes per split (paper: ~3000 patients split 70:20:10)
n_val = 600  # synthetic validation volumes
n_test = 300  # synthetic test volumes
shape = (240, 214, 214)  # volume after crop/pad, (z, y, x) voxels (paper: 214 x 214 x 240)
spacing = (1.5, 0.75, 0.75)  # resample real CT to this (z, y, x) spacing in mm first (CT-RATE's processed grid)
n_slices = 100  # centre slices kept (paper: 100)
window = (-1000, 1000)  # HU window (paper: [-1000, 1000])
norm = "symmetric"  # window -> [-1, 1] (paper)
vit_size = 224  # in-plane size the ViT sees (slices resized from shape[1:]); paper: 224
patch = 16  # ViT in-plane patch size (paper: 16x16)
vit_dim = 512  # ViT token width (paper: 512)
vit_depth = 4  # spatial transformer layers (paper: 4)
vit_slice_depth = 4  # slice-wise transformer layers (paper: 4)
vit_heads = 8  # attention heads (paper: 8)
vit_head_dim = 64  # width per head (paper: 64)
resnet_weights = ""  # local torchvision resnet18 .pth (ImageNet); "" = random init
num_workers = 4  # DataLoader workers for data read from disk (synthetic data is generated once, in memory)
cam_label = "Lung nodule"  # label of the Grad-CAM picture (Figure 5)
predict = ""  # path to a .nii.gz: print its 18 probabilities (with --init_from=resume)
rescale = "auto"  # --predict: stored values -> HU by the header | none | auto (header or header - 1024, by the air level)
strict = False  # a bad volume in a dataset is fatal instead of skipped
debug = False  # print the traceback of every error (without it, bad input is one line `error: ...`)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k.islower() and not k.startswith("_") and type(v) in (bool, int, float, str, tuple)}

PRESETS = {
    "paper": {},  # the defaults above are the paper's settings
    "cpu": dict(shape=(24, 48, 48), n_slices=16, vit_size=48, patch=8, vit_dim=128, vit_depth=2, vit_slice_depth=2,
                vit_heads=4, vit_head_dim=32, epochs=8, n_train=128, n_val=48, n_test=64, num_workers=0,
                spacing=(15.0, 7.5, 7.5)),  # the phantom's grid at this shape (360 mm FOV), used by --predict
}
MODEL_KEYS = ("mode", "alpha", "shape", "n_slices", "vit_size", "patch", "vit_dim", "vit_depth", "vit_slice_depth",
              "vit_heads", "vit_head_dim", "window", "norm", "spacing")


# -----------------------------------------------------------------------------
# Model

class ResNet2D(nn.Module):
    """ResNet-18 on every slice (Sec. 4.1): (B, 1, S, H, W) -> per-slice features (B, S, 512) and last-block maps."""

    def __init__(self, weights: str = ""):
        super().__init__()
        r = torchvision.models.resnet18(weights=None)
        conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # grayscale CT slices
        if weights:  # ImageNet weights from a local file: the RGB filters summed into one grey channel
            sd = torch.load(weights, map_location="cpu", weights_only=True)
            r.load_state_dict(sd)
            with torch.no_grad():  # an in-place copy into a parameter must not be recorded by autograd
                conv1.weight.copy_(sd["conv1.weight"].sum(1, keepdim=True))
        self.trunk = nn.Sequential(conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4)
        self.trunk.to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPU (oneDNN) and GPU

    def forward(self, x):
        B, _, S, H, W = x.shape
        slices = x.transpose(1, 2).reshape(B * S, 1, H, W)  # (B*S, 1, H, W)
        maps = self.trunk(slices.contiguous(memory_format=torch.channels_last))  # (B*S, 512, h, w)
        feats = maps.mean((2, 3)).view(B, S, -1)  # (B, S, 512)
        return feats, maps


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        N, T, _ = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (N, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D)
        return self.out(y.transpose(1, 2).reshape(N, T, -1))  # (N, T, dim)


class Block(nn.Module):
    """Pre-norm transformer layer: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CTViT(nn.Module):
    """CTViT-style encoder (Sec. 4.2): (B, 1, S, P, P) -> tokens (B, S, h, w, dim) and pooled feature (B, dim)."""

    def __init__(self, *, n_slices: int, size: int, patch: int, dim: int, depth: int, slice_depth: int, heads: int,
                 head_dim: int):
        super().__init__()
        assert size % patch == 0, f"vit_size={size} must be a multiple of patch={patch}"
        self.patch, self.grid = patch, size // patch
        self.embed = nn.Sequential(nn.LayerNorm(patch * patch), nn.Linear(patch * patch, dim), nn.LayerNorm(dim))
        self.pos_space = nn.Parameter(torch.randn(self.grid * self.grid, dim) * 0.02)
        self.pos_slice = nn.Parameter(torch.randn(n_slices, 1, dim) * 0.02)
        self.spatial = nn.ModuleList(Block(dim, heads, head_dim) for _ in range(depth))
        self.slicewise = nn.ModuleList(Block(dim, heads, head_dim) for _ in range(slice_depth))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, x):
        B, _, S, H, W = x.shape
        p, g = self.patch, self.grid
        x = x.view(B, S, g, p, g, p).permute(0, 1, 2, 4, 3, 5).reshape(B, S, g * g, p * p)  # (B, S, hw, p*p)
        x = self.embed(x) + self.pos_space + self.pos_slice  # (B, S, hw, dim)
        D = x.shape[-1]
        x = x.view(B * S, g * g, D)  # each slice is a sequence of patches
        for blk in self.spatial:
            x = blk(x)
        x = x.view(B, S, g * g, D).transpose(1, 2).reshape(B * g * g, S, D)  # each patch position: a sequence of slices
        for blk in self.slicewise:
            x = blk(x)
        x = self.ln_f(x).view(B, g, g, S, D).permute(0, 3, 1, 2, 4)  # (B, S, h, w, D)
        return x, x.mean((1, 2, 3))


class Fusion2D3D(nn.Module):
    """mode=resnet | vit | fusion. forward(volume (B, 1, S, H, W)) -> logits (B, 18); keep=True also returns
    the latent fed to the head and the maps Grad-CAM needs."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.mode, self.vit_size = cfg["mode"], cfg["vit_size"]
        assert self.mode in ("resnet", "vit", "fusion"), f"mode={self.mode!r}: expected resnet, vit or fusion"
        n_labels = len(LABELS)
        if self.mode in ("resnet", "fusion"):
            self.resnet = ResNet2D(cfg.get("resnet_weights", ""))
            self.head = nn.Linear(512, n_labels)  # the ResNet's fc, shared by the fusion (alpha = 0 -> ResNet)
        if self.mode in ("vit", "fusion"):
            self.vit = CTViT(n_slices=cfg["n_slices"], size=cfg["vit_size"], patch=cfg["patch"], dim=cfg["vit_dim"],
                             depth=cfg["vit_depth"], slice_depth=cfg["vit_slice_depth"], heads=cfg["vit_heads"],
                             head_dim=cfg["vit_head_dim"])
        if self.mode == "vit":
            self.head = nn.Linear(cfg["vit_dim"], n_labels)
        if self.mode == "fusion":
            self.proj = nn.Linear(cfg["vit_dim"], 512)  # Algorithm 1's projection to the ResNet feature size
            if cfg["alpha"] == "learned":
                self.alpha = nn.Parameter(torch.tensor(1.0))  # starts as Algorithm 1 / Table 2 (equal weights)
            else:
                self.register_buffer("alpha", torch.tensor(parse_alpha(cfg["alpha"])), persistent=False)

    def forward(self, volume, keep: bool = False):
        out = {}
        if self.mode != "vit":
            feats, out["maps2d"] = self.resnet(volume)  # (B, S, 512)
            x2d = feats.mean(1)  # (B, 512): mean pooling over slices
        if self.mode != "resnet":
            B, _, S, H, W = volume.shape
            v = volume
            if (H, W) != (self.vit_size, self.vit_size):  # the ViT's input_3d: slices resized to vit_size
                v = F.interpolate(v, size=(S, self.vit_size, self.vit_size), mode="trilinear", align_corners=False)
            out["tokens3d"], v = self.vit(v)  # (B, S, h, w, D), (B, D)
        if self.mode == "resnet":
            logits = self.head(feats).mean(1)  # Table 2: 18 logits per slice, averaged (= head(x2d), linear head)
            z = x2d
        elif self.mode == "vit":
            z = v
            logits = self.head(z)
        else:
            z = x2d + self.alpha * self.proj(v)  # Algorithm 1 with alpha (Sec. 5): x_2dResNet + alpha residual_3dViT
            logits = self.head(z)
        return (logits, z, out) if keep else logits


def parse_alpha(a: str) -> float:
    try:
        return float(a)
    except ValueError:
        raise BadConfig(f"--alpha={a!r}: expected a number (fixed weight, e.g. 0.5) or 'learned'") from None


def build_model(cfg: dict) -> nn.Module:
    return Fusion2D3D(cfg)


def alpha_value(model):
    a = getattr(model, "alpha", None)
    return None if a is None else a.item()


# -----------------------------------------------------------------------------
# Data

def centre_slices(volume, n: int):
    """(..., Z, Y, X) -> (..., n, Y, X): the n centre slices (Sec. 3.1's 'center sampling'); pads with air if short."""
    Z = volume.shape[-3]
    if Z < n:
        lo = (n - Z) // 2
        return F.pad(volume, (0, 0, 0, 0, lo, n - Z - lo), value=float(volume.min()))
    z0 = (Z - n) // 2
    return volume[..., z0:z0 + n, :, :]


def collate_centre(items, n_slices):
    batch = data_collate(items)
    batch["volume"] = centre_slices(batch["volume"], n_slices)  # (B, 1, S, Y, X)
    return batch


def get_split(cfg, split):
    n = {"train": cfg["n_train"], "val": cfg["n_val"], "test": cfg["n_test"]}[split]
    big = cfg["data"] == "synthetic" and n * int(np.prod(cfg["shape"])) * 4 > 16 * 2**30  # > 16 GiB of float32
    ds = get_dataset(cfg["data"], split, n=n, shape=cfg["shape"], spacing=cfg["spacing"], window=cfg["window"],
                          norm=cfg["norm"], seed=cfg["seed"], strict=cfg["strict"], disk_cache=big)  # int16 on disk
    if len(ds) == 0:
        raise BadConfig(f"--data={cfg['data']}: the {split} split has no usable volume")
    if cfg["data"] == "synthetic" and not big:  # generate the phantoms once, keep in memory the slices the model sees
        items = (ds[i] for i in tqdm(range(len(ds)), desc=f"synthetic {split}", leave=False))
        ds = [{"volume": centre_slices(it["volume"], cfg["n_slices"]).clone(), "labels": it["labels"],
               "name": it["name"]} for it in items]
    return ds


def loader(ds, cfg, batch_sampler):
    return make_loader(ds, batch_sampler, partial(collate_centre, n_slices=cfg["n_slices"]), cfg["num_workers"],
                       cfg["seed"], pin_memory="cuda" in cfg["device"])


def eval_batches(n: int, size: int) -> list:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


# -----------------------------------------------------------------------------
# Train

def configure_optimizer(model, cfg, dev):
    """AdamW; weight decay on matrices only (not on biases, norms, position embeddings or alpha)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("vit.pos")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("vit.pos"))]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg["learning_rate"],
                             fused="cuda" in str(dev))


def compute_loss(model, batch, it, cfg):
    """Binary cross-entropy over the 18 labels."""
    return F.binary_cross_entropy_with_logits(model(batch["volume"]).float(), batch["labels"])


@torch.no_grad()
def predict_split(model, ds, cfg, dev, ctx):
    """Mean BCE, labels (N, 18), probabilities (N, 18) and latents (N, D) over a split."""
    model.eval()
    ys, ps, zs, loss = [], [], [], 0.0
    for b in loader(ds, cfg, eval_batches(len(ds), cfg["batch_size"])):
        x, y = b["volume"].to(dev), b["labels"].to(dev)
        with ctx:
            logits, z, _ = model(x, keep=True)
        loss += F.binary_cross_entropy_with_logits(logits.float(), y, reduction="sum").item() / y.shape[1]
        ys.append(y.cpu()), ps.append(torch.sigmoid(logits.float()).cpu()), zs.append(z.float().cpu())
    model.train()
    return loss / len(ds), torch.cat(ys).numpy(), torch.cat(ps).numpy(), torch.cat(zs)


def evaluate(model, ds, cfg, dev, ctx) -> dict:
    loss, y, p, _ = predict_split(model, ds, cfg, dev, ctx)
    return {"val_loss": loss, "val_auroc": float(np.nanmean([auroc(y[:, j], p[:, j]) for j in range(y.shape[1])])),
            "alpha": alpha_value(model)}


def model_state(model, cfg) -> dict:
    return model.state_dict()


def flops_per_sample(model, cfg, dev):
    """Forward FLOPs of one volume, counted by torch."""
    return forward_flops(model, torch.zeros(1, 1, cfg["n_slices"], *cfg["shape"][1:], device=dev))


def train(cfg, model, train_ds, val_ds, dev, ddp, rank, world, master, ckpt=None):
    """nanoGPT's loop, the same code in every script of this repo except the paper's parts (configure_optimizer,
    the ReduceLROnPlateau schedule, compute_loss, evaluate): grad_accum micro-batches per optimizer step, DDP syncing
    gradients on the last; a step skipped when the gradient is not finite; every eval_interval steps, at the end and
    on Ctrl-C, an eval on rank 0, a log line and a checkpoint that --init_from=resume continues from exactly.
    Returns (raw model, autocast context, stopped by Ctrl-C)."""
    ctx = autocast_ctx(cfg["dtype"], dev)
    raw = model
    opt = configure_optimizer(raw, cfg, dev)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg["lr_factor"], patience=cfg["lr_patience"])
    iter_num, best_val = 0, float("inf")
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"]), sched.load_state_dict(ckpt["scheduler"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
    model = wrap_model(raw, dev, ddp, cfg["compile"])
    micro = cfg["batch_size"] // world // cfg["grad_accum"]  # batch_size is per optimizer step
    batches = iter(loader(train_ds, cfg, Stream(len(train_ds), micro, cfg["seed"], iter_num, cfg["max_iters"],
                                                cfg["grad_accum"], rank, world)))
    timer = StepTimer(dev, 3 * flops_per_sample(raw, cfg, dev))  # forward + backward = 3 forwards
    timer.stats()  # the first call measures the device's peak FLOP/s: here, not inside the first timed window
    if ckpt is not None:  # restored last, right before the loop, so nothing above can draw from it
        restore_rng(ckpt["rng"], rank)
    bad_steps, loss_sum, n_steps = 0, 0.0, 0
    pbar = tqdm(total=cfg["max_iters"], initial=iter_num, disable=not master, desc="train", dynamic_ncols=True)
    with StopOnSigint() as sig:
        while iter_num < cfg["max_iters"] and not sig.stop:
            # this step's learning rate: ReduceLROnPlateau's (the paper's schedule), set after each eval
            lr = opt.param_groups[0]["lr"]
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
                    val = evaluate(raw, val_ds, cfg, dev, ctx)
                    best_val = min(best_val, val["val_loss"])
                    sched.step(val["val_loss"])  # the paper's schedule: halve the lr after lr_patience flat evals
                    log_eval(Path(cfg["out_dir"]) / "log.jsonl",
                             {"iter": iter_num, "train_loss": loss_sum / n_steps, **val, "lr": lr, **perf})
                    save_checkpoint(Path(cfg["out_dir"]) / "ckpt.pt", {
                        "model": model_state(raw, cfg), "optimizer": opt.state_dict(), "iter_num": iter_num,
                        "best_val_loss": best_val, "config": cfg, "rng": rng, "scheduler": sched.state_dict()})
                if ddp:
                    torch.distributed.barrier()
                    share_lr(opt, sched)
                loss_sum, n_steps = 0.0, 0
                timer.reset()
    pbar.close()
    return raw, ctx, sig.stop


def share_lr(opt, sched):
    """DDP: rank 0's scheduler decided; every rank takes its learning rates and state."""
    state = [sched.state_dict(), [g["lr"] for g in opt.param_groups]]
    torch.distributed.broadcast_object_list(state, src=0)
    sched.load_state_dict(state[0])
    for g, lr in zip(opt.param_groups, state[1]):
        g["lr"] = lr


def final_eval(cfg, model, dev, ctx, val_ds, t_start=None):
    """Table 2's columns on the test split, at 0.5 and at validation-F1 thresholds; metrics.json; the pictures."""
    yv, pv = predict_split(model, val_ds, cfg, dev, ctx)[1:3]
    thr = best_f1_thresholds(yv, pv)
    test_ds = get_split(cfg, "test")
    test_loss, yt, pt, zt = predict_split(model, test_ds, cfg, dev, ctx)
    res = {"mode": cfg["mode"], "alpha": alpha_value(model) if cfg["mode"] == "fusion" else None,
           "test_loss": test_loss, "at_0.5": classification_metrics(yt, pt, np.full(yt.shape[1], 0.5)),
           "at_val_f1_thresholds": classification_metrics(yt, pt, thr), "thresholds": thr.tolist()}
    print(f"\ntest ({len(test_ds)} volumes), mode={cfg['mode']}" + (f", alpha={res['alpha']:.4f}" if res["alpha"]
                                                                     is not None else ""))
    print(f"{'thresholds':<22}{'AUC':>7}{'Acc':>7}{'Prec':>7}{'Rec':>7}{'F1':>7}{'wF1':>7}")
    for name in ("at_0.5", "at_val_f1_thresholds"):
        m = res[name]
        print(f"{name:<22}" + "".join(f"{m[k]:>7.3f}" for k in ("auroc", "accuracy", "precision", "recall", "f1",
                                                                 "weighted_f1")))
    out = Path(cfg["out_dir"])
    ck = load_checkpoint(out / "ckpt.pt")  # --predict calls each label at its validation-F1 threshold
    ck["thresholds"] = thr.tolist()
    save_checkpoint(out / "ckpt.pt", ck)
    embedding_png(zt, yt.sum(1), out / "embedding.png", f"{cfg['mode']} latent, PCA, test split")
    label = LABELS.index(cfg["cam_label"])
    pos = np.flatnonzero(yt[:, label] > 0.5)
    i = int(pos[np.argmax(pt[pos, label])]) if len(pos) else int(np.argmax(pt[:, label]))
    vol = collate_centre([test_ds[i]], cfg["n_slices"])["volume"].to(dev)
    attention_png(model, vol, label, out / "attention.png", f"{test_ds[i]['name']}: {cfg['cam_label']} "
                  f"(label {int(yt[i, label])}, p={pt[i, label]:.2f})")
    res["runtime_s"] = time.time() - t_start if t_start else None  # the whole run: data, training, eval, pictures
    (out / "metrics.json").write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {out / 'metrics.json'}, {out / 'embedding.png'}, {out / 'attention.png'}; "
          f"{res['runtime_s'] or 0:.0f} s in all")
    return res


# -----------------------------------------------------------------------------
# Pictures (Figures 4 and 5): PIL only

def _jet(t):
    """t in [0, 1] (any shape) -> uint8 RGB (..., 3), a jet-like colormap."""
    anchors = torch.tensor([[0, 0, .5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [.5, 0, 0]])
    s = t.clamp(0, 1) * (len(anchors) - 1)
    i = s.floor().long().clamp(max=len(anchors) - 2)
    f = (s - i)[..., None]
    return ((anchors[i] * (1 - f) + anchors[i + 1] * f) * 255).round().to(torch.uint8)


def gradcam(acts, grads):
    """Grad-CAM: acts, grads (S, C, h, w) -> relu(sum_c mean_hw(grad_c) * act_c), (S, h, w)."""
    w = grads.mean((2, 3), keepdim=True)
    return F.relu((w * acts).sum(1))


@torch.enable_grad()
def attention_png(model, vol, label: int, path, title: str):
    """Grad-CAM of `label` on the ResNet's last block and/or the ViT's last tokens, on the slice where it peaks."""
    model.eval()
    logits, _, out = model(vol, keep=True)
    acts = {k: out[k] for k in ("maps2d", "tokens3d") if k in out}
    grads = torch.autograd.grad(logits[0, label], list(acts.values()))
    cams = {}
    for (k, a), g in zip(acts.items(), grads):
        if k == "tokens3d":
            a, g = a[0].permute(0, 3, 1, 2), g[0].permute(0, 3, 1, 2)  # (S, D, h, w)
        cams[k] = gradcam(a.float(), g.float()).detach().cpu()  # (S, h, w)
    model.train()
    first = next(iter(cams.values()))
    s = int(first.flatten(1).sum(1).argmax())  # the slice where the first branch's CAM is largest
    img = vol[0, 0, s].float().cpu()
    gray = ((img - img.min()) / (img.max() - img.min() + 1e-8) * 255).to(torch.uint8)
    size = 256
    panels = [Image.fromarray(gray.numpy()).convert("RGB").resize((size, size), Image.BILINEAR)]
    for k, cam in cams.items():
        c = F.interpolate(cam[s][None, None], size=img.shape, mode="bilinear", align_corners=False)[0, 0]
        c = c / (cam.max() + 1e-8)  # normalised over the volume, so a weak slice looks weak
        blend = (0.55 * gray[..., None].float() + 0.45 * _jet(c).float()).to(torch.uint8)
        panels.append(Image.fromarray(blend.numpy()).resize((size, size), Image.BILINEAR))
    names = ["slice"] + [{"maps2d": "ResNet Grad-CAM", "tokens3d": "ViT Grad-CAM"}[k] for k in cams]
    canvas = Image.new("RGB", (size * len(panels), size + 36), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=13)
    for j, (p, n) in enumerate(zip(panels, names)):
        canvas.paste(p, (j * size, 36))
        draw.text((j * size + 4, 20), f"{n} (slice {s})", fill="black", font=font)
    draw.text((4, 4), title, fill="black", font=font)
    canvas.save(path)


def embedding_png(z, counts, path, title: str):
    """Figure 4: 2-D PCA of the latents, coloured by the number of abnormalities."""
    z = z.float() - z.float().mean(0)
    _, _, V = torch.linalg.svd(z, full_matrices=False)
    xy = z @ V[:2].T  # (N, 2)
    size, m = 512, 40
    lo, hi = xy.min(0).values, xy.max(0).values
    pix = (xy - lo) / (hi - lo + 1e-8) * (size - 2 * m) + m
    cmax = max(float(counts.max()), 1.0)
    canvas = Image.new("RGB", (size + 120, size), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=13)
    draw.rectangle([m - 5, m - 5, size - m + 5, size - m + 5], outline="gray")
    for (px, py), c in zip(pix.tolist(), counts.tolist()):
        col = tuple(_jet(torch.tensor(c / cmax)).tolist())
        draw.ellipse([px - 4, size - py - 4, px + 4, size - py + 4], fill=col, outline="black")
    for j, c in enumerate(sorted(set(int(c) for c in counts.tolist()))):
        col = tuple(_jet(torch.tensor(c / cmax)).tolist())
        draw.ellipse([size + 10, m + 16 * j, size + 20, m + 16 * j + 10], fill=col, outline="black")
        draw.text((size + 26, m + 16 * j), f"{c} findings", fill="black", font=font)
    draw.text((m, 8), title, fill="black", font=font)
    draw.text((size // 2 - 10, size - m + 12), "PC1", fill="black", font=font)
    draw.text((6, size // 2), "PC2", fill="black", font=font)
    canvas.save(path)


# -----------------------------------------------------------------------------
# Predict

@torch.no_grad()
def predict_file(cfg, model, ckpt, dev, path):
    vol, sp = load_ct(path, cfg["rescale"])
    x = preprocess(vol, sp, target_spacing=cfg["spacing"], shape=cfg["shape"], window=cfg["window"],
                        norm=cfg["norm"])
    x = centre_slices(x, cfg["n_slices"])[None, None].to(dev)  # (1, 1, S, Y, X)
    model.eval()
    probs = torch.sigmoid(model(x).float())[0].cpu()
    thr = ckpt.get("thresholds") or [0.5] * len(LABELS)
    print(f"{path}: mode={cfg['mode']}" + (f", alpha={alpha_value(model):.4f}" if cfg["mode"] == "fusion" else ""))
    print(f"{'label':<36}{'prob':>7}{'thr':>7}  call")
    for name, p, t in zip(LABELS, probs.tolist(), thr):
        print(f"{name:<36}{p:>7.3f}{t:>7.3f}  {'POSITIVE' if p >= t else '-'}")
    top = int(probs.argmax())
    png = Path(cfg["out_dir"]) / (Path(path).name.split(".")[0] + "_gradcam.png")
    attention_png(model, x, top, png, f"{Path(path).name}: {LABELS[top]} p={probs[top]:.2f}")
    print(f"wrote {png}")
    return probs


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
    choices = {"mode": ("resnet", "vit", "fusion"), "init_from": ("scratch", "resume"), "rescale": ("auto", "header",
               "none"), "norm": ("symmetric", "unit", "ctscroll", "hu"), "cam_label": LABELS}
    for key, options in choices.items():
        if cfg[key] not in options:
            raise BadConfig(f"--{key}={cfg[key]}: expected one of {', '.join(options)}")
    if cfg["mode"] == "fusion" and cfg["alpha"] != "learned":
        parse_alpha(cfg["alpha"])
    for key in ("epochs", "batch_size", "grad_accum", "n_train", "n_val", "n_test", "n_slices", "vit_size", "patch",
                "vit_dim", "vit_depth", "vit_slice_depth", "vit_heads", "vit_head_dim"):
        if cfg[key] < 1:
            raise BadConfig(f"--{key}={cfg[key]}: must be at least 1")
    for key in ("shape", "spacing", "window"):
        if len(cfg[key]) != len(DEFAULTS[key]):
            raise BadConfig(f"--{key}={cfg[key]}: expected {len(DEFAULTS[key])} values")
    if cfg["window"][0] >= cfg["window"][1]:
        raise BadConfig(f"--window={cfg['window']}: expected low,high with low < high")
    if cfg["vit_size"] % cfg["patch"]:
        raise BadConfig(f"--patch={cfg['patch']}: must divide --vit_size={cfg['vit_size']}")
    if cfg["batch_size"] % cfg["grad_accum"]:
        raise BadConfig(f"--batch_size={cfg['batch_size']}: must be a multiple of --grad_accum={cfg['grad_accum']}")
    if cfg["n_train"] < cfg["batch_size"] and cfg["data"] == "synthetic":
        raise BadConfig(f"--n_train={cfg['n_train']}: smaller than --batch_size={cfg['batch_size']} (no full batch)")
    if cfg["predict"] and cfg["init_from"] != "resume":
        raise BadConfig("--predict needs a trained model: add --init_from=resume (and --out_dir of the run)")
    for key in ("predict", "resnet_weights"):
        if cfg[key] and not os.path.isfile(cfg[key]):
            raise BadConfig(f"--{key}={cfg[key]}: no such file")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise BadConfig(f"--device={cfg['device']}: CUDA is not available here (--device=cpu)")
    if cfg["data"] != "synthetic" and not os.path.isdir(cfg["data"]):
        raise BadConfig(f"--data={cfg['data']}: not 'synthetic' and not a folder (a CT-RATE root or a prepared cache)")


# -----------------------------------------------------------------------------

def main(argv=None):
    t_start = time.time()
    cfg = parse_config(argv, DEFAULTS, PRESETS)
    check_config(cfg)
    ddp, rank, world, dev, master = setup_ddp(cfg["device"])
    if cfg["batch_size"] % (world * cfg["grad_accum"]):
        raise BadConfig(f"--batch_size={cfg['batch_size']}: must divide by the {world} processes x --grad_accum")
    ckpt = resume_checkpoint(cfg, MODEL_KEYS, master)  # None from scratch
    if master:
        check_out_dir(cfg["out_dir"])  # predict writes its Grad-CAM PNG there too
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    model = build_model(cfg).to(dev)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if cfg["predict"]:
        return predict_file(cfg, model, ckpt, dev, cfg["predict"])
    torch.manual_seed(cfg["seed"] + rank)  # dropout differs across ranks
    Path(cfg["out_dir"]).mkdir(parents=True, exist_ok=True)
    train_ds, val_ds = get_split(cfg, "train"), get_split(cfg, "val") if master else None
    steps_per_epoch = len(train_ds) // cfg["batch_size"]
    if steps_per_epoch < 1:
        raise BadConfig(f"--batch_size={cfg['batch_size']}: larger than the {len(train_ds)} training volumes")
    cfg["max_iters"] = cfg["max_iters"] or cfg["epochs"] * steps_per_epoch  # the paper counts epochs
    cfg["eval_interval"] = cfg["eval_interval"] or steps_per_epoch
    if master:
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{3 * flops_per_sample(model, cfg, dev) / 1e9:.1f} GFLOP per training sample, {len(train_ds)} train / "
              f"{len(val_ds)} val volumes, {steps_per_epoch} steps per epoch, {cfg['max_iters']} steps")
    model, ctx, stopped = train(cfg, model, train_ds, val_ds, dev, ddp, rank, world, master, ckpt)
    res = final_eval(cfg, model, dev, ctx, val_ds, t_start) if master and not stopped else None
    if ddp:
        torch.distributed.destroy_process_group()
    if stopped:
        raise Interrupted(f"checkpoint saved in {cfg['out_dir']}/ckpt.pt; continue with --init_from=resume")
    return res


if __name__ == "__main__":
    run(main)
