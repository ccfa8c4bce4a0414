"""CT-Scroll: a global-local attention model for multi-label anomaly classification of 3D chest CT.

Paper: T. Di Piazza, C. Lazarus, O. Nempont, L. Boussel, "Imitating Radiological Scrolling: A Global-Local Attention
Model for 3D Chest CT Volumes Multi-Label Anomaly Classification", Medical Imaging with Deep Learning (MIDL) 2025,
PMLR 301:1313-1325; arXiv:2503.20652. Authors' code: github.com/theodpzz/ct-scroll.

A volume x in R^{240 x 480 x 480} (z, y, x; z = 0 the most cranial slice) is cut into 80 triplets of consecutive
axial slices, each read by a ResNet-18 as a 3-channel image:
    h_i = (f_GAP o f_ResNet)(x_i^t),  i = 1..80                                            Eq. (1)
(the authors' code then applies Linear 512->512, ReLU, Dropout 0.2 to every h_i). A Scrolling Block refines the
80 visual tokens with three pre-norm Transformer encoders (LayerNorm, 8-head attention, residual, LayerNorm,
GeGLU feed-forward, residual):
    h^u = f_SB(h) = (f_CRA->CAU o f_CAU->CRA o f_G)(h)                                     Eq. (2)
f_G is global; f_CAU->CRA and f_CRA->CAU are sliding windows of q tokens (Figure 3 b, c), oriented as in the
authors' code, which produced the paper's numbers: their volumes run inferior -> superior along axis 0, and their
f_CAU->CRA (`get_lower_mask`) lets token i see itself and the q-1 tokens on the caudal side. Here z = 0 is cranial,
so f_CAU->CRA is keys i..i+q-1, window (0, q-1), and f_CRA->CAU (itself and the q-1 cranial tokens) is (q-1, 0). The tokens are aggregated and classified by an MLP Psi (512->128->18, ReLU, Dropout 0.5):
    y_hat = Psi(sum_i h_i^u)                                                                Eq. (3)
trained with binary cross-entropy. Thresholds: per label, the one maximising F1 on validation.

Deviations and choices (each on purpose):
- Aggregation: `aggregation=mean` (default) is the authors' code, LayerNorm then mean over tokens; `sum` is Eq. (3)
  read literally (no final norm). Mean is default because it is what produced the paper's numbers and it keeps the
  head's input scale independent of the number of triplets (the cpu preset has 16, the paper 80).
- Attention dropout: the authors use nn.MultiheadAttention(dropout=0.1), i.e. dropout on attention probabilities;
  the fused kernel has no dropout, so dropout 0.1 is applied to the attention block's output instead.
- No positional embeddings, as in the authors' code: position enters only through the sliding-window masks.
- Intensity: `norm=ctscroll` (HU window [-1000, 200] -> [0, 1] minus 0.449, the authors' code) by default;
  the paper's text says [-1, 1] (`--norm=symmetric`).
- Ablations (Tables 2-3) are config: `reduction` gap | linear (flatten 512 x h x w -> 512 per triplet) | conv3d
  (CT-Net's three reducing 3D convolutions, 80 triplets as channels, then Linear 7200 -> 512: one token per volume);
  `interactions` none | causal (3 causal encoders) | global (3 global) | global_local (global, then 2 standard
  symmetric sliding windows of q//2 each side, Longformer-style) | scrolling; `window` q in {4, 8, 16, 32, 64},
  0 = global (Table 3's last row).

Commands:
    python ct_scroll.py --preset=cpu                          # synthetic data, ~5 min on 2 cores
    python ct_scroll.py --preset=paper --data=/data/ct-rate   # 1 GPU, the paper's run (bf16, 50k steps)
    torchrun --nproc_per_node=2 ct_scroll.py --preset=cpu     # DDP (gloo on CPU, NCCL on GPU)
    python ct_scroll.py --preset=cpu --init_from=resume --predict=scan.nii.gz --gradcam=true
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from data import (LABELS, BadConfig, Interrupted, best_f1_thresholds, bootstrap_auroc, check_out_dir,
                  classification_metrics, collate, get_dataset, load_checkpoint, load_ct, preprocess, run,
                  save_checkpoint, setup_ddp)
# the training loop's shared parts (data.py, Runs): the same in every script
from data import (StepTimer, StopOnSigint, Stream, autocast_ctx, gather_rng, log_eval, make_loader, optimizer_step,
                  restore_rng, resume_checkpoint, to_device, wrap_model)
from kernels import sliding_window_attention

# -----------------------------------------------------------------------------
# config (every key can be overridden: --key=value or --key value)
preset = ""  # "cpu" or "paper"; empty: paper on CUDA, cpu otherwise
device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda, cuda:1, ...
dtype = "bfloat16"  # autocast dtype on CUDA; CPU always runs float32 (bf16 matmul is ~300x slower there)
compile = False  # torch.compile the model
seed = 1337  # model init, data order, dropout
data = "synthetic"  # "synthetic", a prepared cache folder, or a CT-RATE root
out_dir = "out/ct_scroll"  # ckpt.pt, log.jsonl, metrics.json, Grad-CAM PNGs
init_from = "scratch"  # scratch | resume (from out_dir/ckpt.pt)
max_iters = 50000  # optimizer steps
eval_interval = 1000  # steps between validation passes (and checkpoints)
log_interval = 50  # steps between progress-bar loss updates
batch_size = 4  # volumes per optimizer step, over all processes and micro-steps
grad_accum = 1  # micro-steps per optimizer step
learning_rate = 1e-4  # peak AdamW learning rate
min_lr = 0.0  # cosine floor
warmup_iters = 20000  # linear warm-up steps
weight_decay = 0.01  # AdamW (torch's default; the paper is silent)
grad_clip = 1.0  # max gradient norm; 0 disables
n_train = 2000  # synthetic training volumes (the sizes are ignored for CT-RATE)
n_val = 200  # synthetic validation volumes
n_test = 200  # synthetic test volumes
ram_cache = False  # generate/read every volume once (num_workers processes) and keep it in RAM
num_workers = 4  # DataLoader worker processes
shape = (240, 480, 480)  # (z, y, x) voxels fed to the model; z divisible by 3
spacing = (1.5, 0.75, 0.75)  # (z, y, x) mm; the synthetic phantom spans 360 mm, so 360 / shape
hu_window = (-1000, 200)  # HU clip
norm = "ctscroll"  # ctscroll (authors' code) | symmetric (paper text) | unit | hu
reduction = "gap"  # gap | linear | conv3d (Table 2)
interactions = "scrolling"  # none | causal | global | global_local | scrolling (Table 2)
window = 16  # sliding window q (Table 3); 0 = global
depth = 1  # Scrolling Blocks stacked (the paper uses one)
n_heads = 8  # attention heads of the Scrolling Block
aggregation = "mean"  # mean (authors: LayerNorm + mean) | sum (Eq. 3)
resnet_weights = ""  # path to torchvision's resnet18-f37072fd.pth; empty = random init
predict = ""  # path to a .nii/.nii.gz to classify with the trained run (needs --init_from=resume)
rescale = "auto"  # --predict: stored values -> HU by the header | none | auto (header or header - 1024, by the air level)
gradcam = False  # with --predict: Grad-CAM PNGs for every positive label
strict = False  # a bad input file is fatal instead of skipped
debug = False  # print the traceback of every error (without it, bad input is one line `error: ...`)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k.islower() and not k.startswith("_") and type(v) in (bool, int, float, str, tuple)}

PRESETS = {
    "cpu": dict(device="cpu", compile=False, shape=(48, 64, 64), spacing=(7.5, 5.625, 5.625), max_iters=200,
                eval_interval=100, log_interval=5, batch_size=4, learning_rate=2e-3, warmup_iters=10, n_train=320,
                n_val=64, n_test=128, ram_cache=True, num_workers=2, window=4),
    "paper": dict(compile=True, shape=(240, 480, 480), spacing=(1.5, 0.75, 0.75), max_iters=50000,
                  eval_interval=1000, batch_size=4, learning_rate=1e-4, warmup_iters=20000, window=16),
}


# =============================================================================
# Model
# =============================================================================

def interaction_windows(interactions: str, q: int) -> list:
    """The (left, right) attention windows of the three encoders that replace each other in Table 2.
    Token i attends keys i-left..i+right (None = unbounded); q = 0 means global. Anatomy as in the authors' code:
    their axis 0 runs from the feet up, so their lower-triangular masks (`get_lower_mask`: f_CAU->CRA and the causal
    ablation) let a token see the caudal side; here z = 0 is the most cranial slice, so the caudal side is larger
    indices: f_CAU->CRA is (0, q-1), causal is (0, None), and f_CRA->CAU (their `get_upper_mask`) is (q-1, 0)."""
    G = (None, None)
    if interactions == "none":
        return []
    if interactions == "causal":  # each token sees itself and everything caudal to it
        return [(0, None)] * 3
    if interactions == "global":
        return [G] * 3
    if interactions == "global_local":  # standard (symmetric) sliding windows after a global layer
        return [G] + [(q // 2, q // 2) if q else G] * 2
    if interactions == "scrolling":  # Eq. (2): f_G, then f_CAU->CRA (caudal window), then f_CRA->CAU (cranial)
        return [G, (0, q - 1) if q else G, (q - 1, 0) if q else G]
    raise ValueError(f"interactions must be none|causal|global|global_local|scrolling, got {interactions!r}")


class GeGLU(nn.Module):
    """FFN(x) = (x W) * GELU(x V) (Shazeer 2020) with W, V: d -> d and no output projection, as the authors' MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim, bias=False)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class Encoder(nn.Module):
    """Pre-norm Transformer encoder: x + Attn(LN(x)), then x + GeGLU(LN(x)); attention restricted to `window`."""

    def __init__(self, dim: int, n_heads: int, window: tuple, dropout: float = 0.1):
        super().__init__()
        self.n_heads, self.window = n_heads, window
        self.norm_attn, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.ffn = GeGLU(dim)

    def attend(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
        y = sliding_window_attention(q, k, v, window=self.window)  # (B, H, N, D)
        return self.out(y.transpose(1, 2).reshape(B, N, C))  # (B, N, C)

    def forward(self, x):
        x = x + self.drop(self.attend(self.norm_attn(x)))
        return x + self.ffn(self.norm_ffn(x))


class ScrollingBlock(nn.Module):
    """Eq. (2): three encoders applied in order. With the default windows they are f_G, f_CAU->CRA, f_CRA->CAU;
    the Table 2 ablations keep the three layers (matching cost) and change only their windows."""

    def __init__(self, dim: int, n_heads: int, windows: list):
        super().__init__()
        self.encoders = nn.ModuleList(Encoder(dim, n_heads, w) for w in windows)

    def forward(self, h):
        for enc in self.encoders:
            h = enc(h)
        return h


def feature_map_size(n: int) -> int:
    """Side of ResNet-18's layer4 output: conv1, maxpool and three stride-2 stages each map n -> ceil(n / 2)."""
    for _ in range(5):
        n = -(-n // 2)
    return n


class CTNetReduction(nn.Module):
    """CT-Net's reducing 3D convolutions (Draelos et al. 2021, published layer sizes; the triplets are the input
    channels, ResNet's 512 features the depth), then Linear(16 x 18 x h' x w' -> 512): one token per volume."""

    def __init__(self, n_triplets: int, fmap: int, dim: int = 512):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv3d(n_triplets, 64, (3, 3, 3), stride=(3, 1, 1)), nn.ReLU(),
            nn.Conv3d(64, 32, (3, 3, 3), stride=(3, 1, 1)), nn.ReLU(),
            nn.Conv3d(32, 16, (3, 2, 2), stride=(3, 2, 2)), nn.ReLU())
        d, s = dim, fmap
        d, s = (d - 3) // 3 + 1, s - 2
        d, s = (d - 3) // 3 + 1, s - 2
        d, s = (d - 3) // 3 + 1, (s - 2) // 2 + 1
        if s < 1:
            raise ValueError(f"reduction=conv3d needs a layer4 map of at least 6x6 (in-plane >= 161 voxels), got {fmap}x{fmap}")
        self.fc = nn.Linear(16 * d * s * s, dim)

    def forward(self, fmap, B):
        x = fmap.view(B, -1, *fmap.shape[1:])  # (B, N, 512, h, w): triplets as channels, features as depth
        return self.fc(self.convs(x).flatten(1)).unsqueeze(1)  # (B, 1, 512)


class CTScroll(nn.Module):
    def __init__(self, *, shape, reduction="gap", interactions="scrolling", window=16, depth=1, n_heads=8,
                 aggregation="mean", n_labels=18, dim=512):
        super().__init__()
        Z, Y, X = shape
        assert Z % 3 == 0, f"the depth {Z} must be a multiple of 3 (slices are read in triplets)"
        assert Y == X, f"square slices expected, got {Y}x{X}"
        assert aggregation in ("mean", "sum"), f"aggregation must be mean or sum, got {aggregation!r}"
        self.n_triplets, self.reduction, self.aggregation = Z // 3, reduction, aggregation
        resnet = torchvision.models.resnet18(weights=None)
        self.resnet = nn.Sequential(*list(resnet.children())[:-2])  # conv1 .. layer4, no avgpool / fc
        fmap = feature_map_size(Y)
        if reduction == "gap":
            self.reduce = None
        elif reduction == "linear":
            self.reduce = nn.Linear(dim * fmap * fmap, dim)
        elif reduction == "conv3d":
            assert interactions == "none", "reduction=conv3d leaves one token per volume: use interactions=none"
            self.reduce = CTNetReduction(self.n_triplets, fmap, dim)
        else:
            raise ValueError(f"reduction must be gap|linear|conv3d, got {reduction!r}")
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(0.2))  # the authors' code
        windows = interaction_windows(interactions, window)
        self.blocks = nn.ModuleList(ScrollingBlock(dim, n_heads, windows) for _ in range(depth if windows else 0))
        self.norm_out = nn.LayerNorm(dim) if aggregation == "mean" else nn.Identity()
        self.head = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, n_labels))  # Psi

    def triplet_features(self, volume):
        """(B, 1, Z, Y, X) -> ResNet layer4 maps (B * Z/3, 512, h, w), triplet i = slices 3i, 3i+1, 3i+2."""
        B, _, Z, Y, X = volume.shape
        return self.resnet(volume.reshape(B * Z // 3, 3, Y, X))  # (B * N, 3, Y, X) -> (B * N, 512, h, w)

    def classify(self, fmap, B):
        """ResNet maps -> logits (B, n_labels)."""
        if self.reduction == "gap":
            h = fmap.mean((2, 3)).view(B, -1, fmap.shape[1])  # Eq. (1): (B, N, 512)
        elif self.reduction == "linear":
            h = self.reduce(fmap.flatten(1)).view(B, -1, fmap.shape[1])  # (B, N, 512)
        else:
            h = self.reduce(fmap, B)  # (B, 1, 512)
        h = self.projection(h)
        for blk in self.blocks:
            h = blk(h)  # Eq. (2)
        h = self.norm_out(h)
        z = h.mean(1) if self.aggregation == "mean" else h.sum(1)  # Eq. (3): (B, 512)
        return self.head(z)

    def forward(self, volume):
        return self.classify(self.triplet_features(volume), volume.shape[0])


def build_model(cfg: dict) -> CTScroll:
    model = CTScroll(shape=tuple(cfg["shape"]), reduction=cfg["reduction"], interactions=cfg["interactions"],
                     window=cfg["window"], depth=cfg["depth"], n_heads=cfg["n_heads"], aggregation=cfg["aggregation"],
                     n_labels=len(LABELS))
    if cfg.get("resnet_weights"):
        sd = torch.load(cfg["resnet_weights"], map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]  # Sequential indices
        sd = {f"{names.index(k.split('.')[0])}.{k.split('.', 1)[1]}": v for k, v in sd.items()}
        model.resnet.load_state_dict(sd)
    return model


def flops_per_sample(model, cfg: dict, dev=None) -> float:
    """Forward FLOPs of one volume, counted by torch.utils.flop_counter on a copy of the model built on the meta
    device (no memory used, `model` itself is not run); convolutions and matmuls count 2 per multiply-accumulate."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build_model({**cfg, "resnet_weights": ""})
        x = torch.empty(1, 1, *cfg["shape"])
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops()


# =============================================================================
# Data
# =============================================================================

def get_split(cfg, split):
    n = {"train": cfg["n_train"], "val": cfg["n_val"], "test": cfg["n_test"]}[split]
    ds = get_dataset(cfg["data"], split, n=n, shape=tuple(cfg["shape"]), spacing=tuple(cfg["spacing"]),
                     window=tuple(cfg["hu_window"]), norm=cfg["norm"], seed=cfg["seed"], strict=cfg["strict"])
    if len(ds) == 0:
        raise BadConfig(f"--data={cfg['data']}: the {split} split has no usable volume")
    if cfg["ram_cache"]:  # generate/read every volume once, num_workers processes in parallel
        t0 = time.time()
        items = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg["num_workers"],
                                            generator=torch.Generator().manual_seed(cfg["seed"]))
        ds = [{"volume": it["volume"], "labels": it["labels"]}
              for it in tqdm(items, desc=f"{split} to RAM", leave=False, dynamic_ncols=True)]
        print(f"{split}: {len(ds)} volumes cached in RAM in {time.time() - t0:.1f}s")
    return ds


def loader(ds, cfg, batch_sampler):
    return make_loader(ds, batch_sampler, collate, cfg["num_workers"], cfg["seed"], pin_memory=cfg["device"] != "cpu")


def eval_batches(n: int, size: int) -> list:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


# =============================================================================
# Train
# =============================================================================

def configure_optimizer(model, cfg, dev):
    return torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"],
                             betas=(0.9, 0.999), fused="cuda" in str(dev))


def get_lr(it, cfg):
    """Linear warm-up to learning_rate, then cosine down to min_lr at max_iters (the paper's schedule)."""
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    ratio = min(1.0, (it - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"]))
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


def compute_loss(model, batch, it, cfg):
    """Binary cross-entropy over the 18 labels."""
    return F.binary_cross_entropy_with_logits(model(batch["volume"]).float(), batch["labels"])


@torch.no_grad()
def predict_split(model, ds, cfg, dev, ctx):
    """Scores of every volume of a split: (labels (N, 18), probabilities (N, 18)), plus the mean BCE."""
    model.eval()
    ys, ps, losses = [], [], []
    for batch in loader(ds, cfg, eval_batches(len(ds), cfg["batch_size"])):
        x, y = batch["volume"].to(dev), batch["labels"].to(dev)
        with ctx:
            logits = model(x).float()
        losses.append(F.binary_cross_entropy_with_logits(logits, y, reduction="sum").item() / y.shape[1])
        ys.append(y.cpu())
        ps.append(torch.sigmoid(logits).cpu())
    model.train()
    y, p = torch.cat(ys).numpy(), torch.cat(ps).numpy()
    return y, p, sum(losses) / len(y)


def evaluate(model, ds, cfg, dev, ctx) -> dict:
    y, p, loss = predict_split(model, ds, cfg, dev, ctx)
    return {"val_loss": loss, "val_auroc": classification_metrics(y, p, np.full(y.shape[1], 0.5))["auroc"]}


def model_state(model, cfg) -> dict:
    return model.state_dict()


def train(cfg, model, train_ds, val_ds, dev, ddp, rank, world, master, ckpt=None):
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
                    val = evaluate(raw, val_ds, cfg, dev, ctx)
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

# =============================================================================
# Eval
# =============================================================================

def final_eval(cfg, model, dev, ctx, val_ds):
    """The paper's protocol: per-label thresholds maximising F1 on validation, then every metric on test."""
    yv, pv, _ = predict_split(model, val_ds, cfg, dev, ctx)
    th = best_f1_thresholds(yv, pv)
    yt, pt, tloss = predict_split(model, get_split(cfg, "test"), cfg, dev, ctx)
    m = classification_metrics(yt, pt, th)
    keys = ["auroc", "accuracy", "f1", "weighted_f1", "precision", "recall"]
    print(f"\ntest ({len(yt)} volumes; thresholds from {len(yv)} validation volumes)")
    print(f"{'label':<36}{'support':>8}" + "".join(f"{k:>12}" for k in keys[:2] + keys[2:3] + keys[4:]))
    for name, r in m["per_label"].items():
        print(f"{name:<36}{r['support']:>8}" + "".join(f"{r[k]:>12.4f}" for k in ("auroc", "accuracy", "f1",
                                                                                  "precision", "recall")))
    print(f"{'mean over labels':<44}" + "".join(f"{m[k]:>12.4f}" for k in ("auroc", "accuracy", "f1", "precision",
                                                                           "recall")) + f"   weighted F1 {m['weighted_f1']:.4f}")
    lo, hi = bootstrap_auroc(yt, pt)
    print(f"macro AUROC {m['auroc']:.4f}, 95% bootstrap interval over the test volumes [{lo:.4f}, {hi:.4f}]")
    out = {"test": {k: m[k] for k in keys}, "test_auroc_95ci": [lo, hi], "test_loss": tloss,
           "thresholds": dict(zip(LABELS, th.tolist())),
           "per_label": m["per_label"], "undefined": m["undefined"], "n_val": len(yv), "n_test": len(yt)}
    with open(os.path.join(cfg["out_dir"], "metrics.json"), "w") as f:
        json.dump(out, f, indent=1)
    path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if os.path.exists(path):
        ck = load_checkpoint(path)
        ck["thresholds"] = torch.tensor(th, dtype=torch.float64)  # weights_only loads tensors, not numpy
        save_checkpoint(path, ck)
    return out


# =============================================================================
# Predict and Grad-CAM
# =============================================================================

def gradcam(model, x, label: int):
    """Grad-CAM (Selvaraju et al.) on ResNet's last block (layer4) of every triplet: (N, h, w) maps."""
    fmap = model.triplet_features(x).detach().requires_grad_()  # (N, 512, h, w)
    logit = model.classify(fmap, x.shape[0])[0, label]
    (g,) = torch.autograd.grad(logit, fmap)
    return F.relu((g.mean((2, 3), keepdim=True) * fmap).sum(1)).detach()  # (N, h, w)


def save_gradcam_png(x, cam, path, top=3):
    """The `top` triplets with the most activation: middle slice in grey, the map overlaid in a jet colour scale."""
    Z, Y, X = x.shape[-3:]
    idx = cam.sum((1, 2)).topk(min(top, cam.shape[0])).indices.sort().values
    c = F.interpolate(cam[idx, None], size=(Y, X), mode="bilinear", align_corners=False)  # (k, 1, Y, X)
    c = c / c.max().clamp_min(1e-8)
    sl = x[0, 0, 3 * idx + 1][:, None]  # (k, 1, Y, X) middle slice of each triplet
    sl = (sl - sl.min()) / (sl.max() - sl.min()).clamp_min(1e-8)
    jet = torch.cat([(1.5 - (4 * c - k).abs()).clamp(0, 1) for k in (3, 2, 1)], 1)  # (k, 3, Y, X)
    torchvision.utils.save_image(0.6 * sl.expand(-1, 3, -1, -1) + 0.4 * jet * c, path, nrow=len(idx), padding=2)
    return idx.tolist()


def predict_file(cfg, model, ckpt, dev, path):
    vol, sp = load_ct(path, cfg["rescale"])
    x = preprocess(vol, sp, target_spacing=tuple(cfg["spacing"]), shape=tuple(cfg["shape"]),
                   window=tuple(cfg["hu_window"]), norm=cfg["norm"])[None, None].to(dev)  # (1, 1, Z, Y, X)
    th = np.asarray(ckpt["thresholds"] if "thresholds" in ckpt else np.full(len(LABELS), 0.5), dtype=np.float64)
    if "thresholds" not in ckpt:
        print("warning: this checkpoint has no validation thresholds yet (training did not finish): using 0.5")
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(x).float())[0].cpu().numpy()
    print(f"{path}: {cfg['reduction']} + {cfg['interactions']} (q={cfg['window']}), thresholds from validation")
    print(f"{'label':<36}{'prob':>7}{'thr':>7}  call")
    for name, p, t in zip(LABELS, probs, th):
        print(f"{name:<36}{p:>7.3f}{t:>7.3f}  {'POSITIVE' if p >= t else '-'}")
    if cfg["gradcam"]:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        stem = os.path.basename(path).split(".")[0]
        for l in np.flatnonzero(probs >= th):
            png = os.path.join(cfg["out_dir"], f"gradcam_{stem}_{LABELS[l].lower().replace(' ', '_')}.png")
            idx = save_gradcam_png(x, gradcam(model, x, int(l)), png)
            print(f"wrote {png} (triplets {idx})")
    return probs


# =============================================================================
# CLI and main
# =============================================================================

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


MODEL_KEYS = ("shape", "spacing", "hu_window", "norm", "reduction", "interactions", "window", "depth", "n_heads",
              "aggregation")
CHOICES = {"init_from": ("scratch", "resume"), "norm": ("ctscroll", "symmetric", "unit", "hu"),
           "reduction": ("gap", "linear", "conv3d"), "interactions": ("none", "causal", "global", "global_local",
                                                                       "scrolling"),
           "aggregation": ("mean", "sum"), "rescale": ("auto", "header", "none"), "dtype": ("bfloat16", "float16",
                                                                                             "float32")}


def check_config(cfg):
    """What parses but cannot work stops here, before any work, naming the key."""
    for key, options in CHOICES.items():
        if cfg[key] not in options:
            raise BadConfig(f"--{key}={cfg[key]}: expected one of {', '.join(options)}")
    for key in ("max_iters", "eval_interval", "log_interval", "batch_size", "grad_accum", "n_train", "n_val", "n_test",
                "depth", "n_heads"):
        if cfg[key] < 1:
            raise BadConfig(f"--{key}={cfg[key]}: must be at least 1")
    for key in ("shape", "spacing", "hu_window"):
        if len(cfg[key]) != len(DEFAULTS[key]):
            raise BadConfig(f"--{key}={cfg[key]}: expected {len(DEFAULTS[key])} values")
    if cfg["shape"][0] % 3 or cfg["shape"][1] != cfg["shape"][2]:
        raise BadConfig(f"--shape={','.join(map(str, cfg['shape']))}: (z, y, x) with z a multiple of 3 (triplets) and "
                        f"square slices (y = x)")
    if cfg["hu_window"][0] >= cfg["hu_window"][1]:
        raise BadConfig(f"--hu_window={cfg['hu_window']}: expected low,high with low < high")
    if 512 % cfg["n_heads"]:
        raise BadConfig(f"--n_heads={cfg['n_heads']}: must divide the token width 512")
    if cfg["reduction"] == "conv3d" and (cfg["interactions"] != "none" or feature_map_size(cfg["shape"][1]) < 6):
        raise BadConfig("--reduction=conv3d: needs --interactions=none (one token per volume) and slices of at least "
                        "161 x 161 voxels (a 6 x 6 layer4 map)")
    if cfg["data"] != "synthetic" and not os.path.isdir(cfg["data"]):
        raise BadConfig(f"--data={cfg['data']}: not 'synthetic' and not a folder (a CT-RATE root or a prepared cache)")
    if cfg["predict"] and cfg["init_from"] != "resume":
        raise BadConfig("--predict needs a trained run: add --init_from=resume (and its --out_dir)")
    for key in ("predict", "resnet_weights"):
        if cfg[key] and not os.path.isfile(cfg[key]):
            raise BadConfig(f"--{key}={cfg[key]}: no such file")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise BadConfig(f"--device={cfg['device']}: CUDA is not available here (--device=cpu)")


def main(argv=None):
    cfg = parse_config(argv, DEFAULTS, PRESETS)
    check_config(cfg)
    ddp, rank, world, dev, master = setup_ddp(cfg["device"])
    if cfg["batch_size"] % (world * cfg["grad_accum"]):
        raise BadConfig(f"--batch_size={cfg['batch_size']}: must divide by the {world} processes x --grad_accum")
    ckpt = resume_checkpoint(cfg, MODEL_KEYS, master)  # None from scratch
    if master and (not cfg["predict"] or cfg["gradcam"]):
        check_out_dir(cfg["out_dir"])
    if master:
        print(f"preset {cfg['preset']}, device {dev}" + ("" if world == 1 else f", DDP world {world}"))
        print(f"ResNet-18: {'ImageNet weights from ' + cfg['resnet_weights'] if cfg['resnet_weights'] else 'random init (--resnet_weights=path/to/resnet18-f37072fd.pth for ImageNet)'}")
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    model = build_model(cfg).to(dev)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if cfg["predict"]:
        return predict_file(cfg, model, ckpt, dev, cfg["predict"])
    torch.manual_seed(cfg["seed"] + rank)  # dropout differs across ranks
    Path(cfg["out_dir"]).mkdir(parents=True, exist_ok=True)
    if master:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"CT-Scroll: reduction {cfg['reduction']}, interactions {cfg['interactions']}, window {cfg['window'] or 'global'}, "
              f"aggregation {cfg['aggregation']}: {n / 1e6:.2f}M trainable parameters, "
              f"{flops_per_sample(model, cfg) / 1e12:.4f} TFLOPs per volume {tuple(cfg['shape'])}")
    train_ds, val_ds = get_split(cfg, "train"), get_split(cfg, "val") if master else None
    model, ctx, stopped = train(cfg, model, train_ds, val_ds, dev, ddp, rank, world, master, ckpt)
    res = final_eval(cfg, model, dev, ctx, val_ds) if master and not stopped else None
    if ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if stopped:
        raise Interrupted(f"checkpoint saved in {cfg['out_dir']}/ckpt.pt; continue with --init_from=resume")
    return res


if __name__ == "__main__":
    run(main)
