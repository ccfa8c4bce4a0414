"""Which of the 18 findings a boundary_vqa.py SigLIP tower carries: a linear probe per finding on its frozen features.

    python -m tools.probe_tower out/boundary_vqa                       # the tower in out/boundary_vqa/siglip.pt
    python -m tools.probe_tower out/boundary_vqa --features=hist       # the same probe on a histogram, no learning

Features of each training phantom (its split as the tower's run cached it; --cache_dir to read it elsewhere):
  tower  the tower's visual tokens, flattened, with the outline of the finding's organ drawn (boundary_vqa.ORGAN;
         both lungs for lung findings), as a closed question about that finding would draw it;
  hist   a 32-bin histogram of the CT inside that organ's mask (the phantom's masks, which no model gets): what the
         48 x 64 x 64 input holds for a probe that is told where to look;
  untrained    the tower's tokens as above, from the tower the SigLIP stage starts from (its flags and seed);
  random_conv  one random, untrained 5 x 5 x 5 convolution of the CT (64 filters), the mean over the volume of each
         filter's positive and of its negative part (128 features, no outline): one nonlinear layer, no learning.
The probe: 5 folds over the scans, a logistic regression on standardised features (L2 1e-2, L-BFGS) fitted on four
folds and scored on the fifth; the AUROC of the out-of-fold scores per finding. A finding is "carried" at AUROC >= 0.8.
Nothing here is used by boundary_vqa.py's own runs; it is the measurement behind the README's "carried" counts.
"""
import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import boundary_vqa as bv
from data import LABELS, BadConfig, auroc, load_checkpoint, run

CARRIED = 0.8


def probe(x: torch.Tensor, y: torch.Tensor, folds: int = 5, l2: float = 1e-2, seed: int = 0) -> float:
    """Out-of-fold AUROC of an L2 logistic regression of the 0/1 labels y (N,) on the features x (N, D)."""
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    score = torch.zeros(len(y))
    for f in range(folds):
        test = idx[f::folds]
        train = torch.ones(len(y), dtype=torch.bool)
        train[test] = False
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-5
        xt, yt = (x[train] - mu) / sd, y[train]
        w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * w.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        with torch.no_grad():
            score[test] = (x[test] - mu) / sd @ w + b
    return auroc(y.numpy(), score.numpy())


@torch.no_grad()
def features(cfg, ckpt, items, kind: str) -> dict:
    """{organ: (N, D)} for every organ a finding points at."""
    organs = sorted({bv.ORGAN.get(label, "lungs") for label in LABELS})
    if kind == "hist":
        out = {}
        for r in organs:
            h = torch.stack([torch.histc(it["volume"][0].float()[bv.region_mask(it, r)], bins=32, min=0, max=1)
                             for it in items])  # (N, 32)
            out[r] = torch.log(h / h.sum(1, keepdim=True).clamp(min=1) + 1e-3)
        return out
    if kind == "random_conv":
        torch.manual_seed(0)
        conv = torch.nn.Conv3d(1, 64, 5, padding=2)
        out = []
        for s in range(0, len(items), 20):
            f = conv(torch.stack([it["volume"].float() for it in items[s: s + 20]]))  # (20, 64, Z, Y, X)
            out.append(torch.cat([f.clamp(min=0).mean((2, 3, 4)), (-f).clamp(min=0).mean((2, 3, 4))], 1))
        return dict.fromkeys(organs, torch.cat(out))  # (N, 128), the same for every organ
    torch.manual_seed(cfg["seed"])
    tower = bv.VisionTower(cfg)
    if kind == "tower":
        tower.load_state_dict({k[len("tower."):]: v for k, v in ckpt["model"].items() if k.startswith("tower.")})
    tower.eval()
    return {r: torch.cat([tower(torch.stack([bv.model_input(it["volume"].float(), bv.outline_of(it, r))
                                             for it in items[s: s + 32]])).flatten(1)
                          for s in range(0, len(items), 32)]) for r in organs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", help="a boundary_vqa.py --out_dir holding siglip.pt")
    ap.add_argument("--features", default="tower", choices=("tower", "hist", "untrained", "random_conv"))
    ap.add_argument("--cache_dir", default="", help="where the phantoms are cached (default: the run's)")
    args = ap.parse_args(argv)
    path = Path(args.out_dir) / "siglip.pt"
    if not path.is_file():
        raise BadConfig(f"{path}: no SigLIP tower; train one with python boundary_vqa.py --stage=siglip "
                        f"--out_dir={args.out_dir}")
    ckpt = load_checkpoint(path)
    cfg = {**bv.DEFAULTS, **ckpt["config"], **({"cache_dir": args.cache_dir} if args.cache_dir else {})}
    if cfg["data"] != "synthetic":
        raise BadConfig(f"{path}: trained on {cfg['data']}; the probe needs the phantoms' labels and masks")
    items = bv.get_items(cfg, "train")
    feats, y = features(cfg, ckpt, items, args.features), torch.tensor(np.array([it["labels"] for it in items]))
    res = {label: probe(feats[bv.ORGAN.get(label, "lungs")], y[:, j].float()) for j, label in enumerate(LABELS)
           if 0 < y[:, j].sum() < len(y)}
    print(f"{path} ({args.features}): linear probe per finding on {len(items)} training phantoms, 5-fold AUROC")
    for label, a in sorted(res.items(), key=lambda kv: -kv[1]):
        print(f"  {a:.2f}  ({int(y[:, LABELS.index(label)].sum()):>4} with it)  {label}")
    carried = [label for label, a in res.items() if a >= CARRIED]
    print(f"{len(carried)} of {len(res)} carried (AUROC >= {CARRIED}), mean AUROC {np.mean(list(res.values())):.3f}")
    return res


if __name__ == "__main__":
    run(main)
