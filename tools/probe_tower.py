"""Which of the 18 findings a boundary_vqa.py SigLIP tower carries: a linear probe per finding on its frozen features.

    python -m tools.probe_tower out/boundary_vqa                       # the tower in out/boundary_vqa/siglip.pt
    python -m tools.probe_tower out/boundary_vqa --features=hist       # the same probe on a histogram, no learning
    python -m tools.probe_tower out/boundary_vqa --closed --n_test=400 # + the test closed questions, no decoder

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
--closed: the same regression fitted on all training scans answers the test split's closed questions (what a decoder
that read the tower's features perfectly linearly would answer), beside the image-blind answers.
Nothing here is used by boundary_vqa.py's own runs; it is the measurement behind the README's "carried" counts.
"""
import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import boundary_vqa as bv
from data import LABELS, BadConfig, _finding_name, auroc, load_checkpoint, run

CARRIED = 0.8


def fit(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2):
    """An L2 logistic regression of the 0/1 labels y (N,) on the standardised features x (N, D) -> its scoring
    function: rows (M, D) -> logits (M,)."""
    mu, sd = x.mean(0), x.std(0) + 1e-5
    xt = (x - mu) / sd
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xt @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return lambda rows: ((rows - mu) / sd @ w + b).detach()


def probe(x: torch.Tensor, y: torch.Tensor, folds: int = 5, l2: float = 1e-2, seed: int = 0) -> float:
    """Out-of-fold AUROC of fit() on the 0/1 labels y (N,) and the features x (N, D)."""
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    score = torch.zeros(len(y))
    for f in range(folds):
        test = idx[f::folds]
        train = torch.ones(len(y), dtype=torch.bool)
        train[test] = False
        score[test] = fit(x[train], y[train], l2)(x[test])
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


def closed_answers(cfg, ckpt, kind: str, train: list, f_train: dict, test: list, carried: set) -> dict:
    """--closed: the test split's closed questions ("Is there <finding> in this scan?") answered without a decoder,
    each by fit() on its finding's organ features over all training scans (Yes when its logit is above 0); by the
    answer-rate prior (boundary_vqa.blind_answers); and by the probe for the carried findings, the prior elsewhere.
    f_train: features(cfg, ckpt, train, kind). -> {rule: accuracy}, "No" everywhere included. The test labels are
    only scored against, never fitted."""
    finding = {f"Is there {_finding_name(label)} in this scan?": label for label in LABELS}
    train_qs, test_qs = bv.questions_of(train), [s for s in bv.questions_of(test) if s[1]["kind"] == "closed"]
    y = torch.tensor(np.array([it["labels"] for it in train])).float()
    f_test = features(cfg, ckpt, test, kind)
    logit = {}
    for label in sorted({finding[q["question"]] for _, q in test_qs}):
        j, organ = LABELS.index(label), bv.ORGAN.get(label, "lungs")
        logit[label] = fit(f_train[organ], y[:, j])(f_test[organ]) if 0 < y[:, j].sum() < len(y) else None
    probed = ["Yes" if logit[finding[q["question"]]] is not None and logit[finding[q["question"]]][i] > 0 else "No"
              for i, q in test_qs]
    prior = bv.blind_answers(train_qs, test_qs, by="question")
    mixed = [p if finding[q["question"]] in carried else a for (_, q), p, a in zip(test_qs, probed, prior)]
    rules = {'"No"': ["No"] * len(test_qs), "answer-rate prior": prior, "probe": probed,
             "probe on the carried findings, the prior elsewhere": mixed}
    return {name: float(np.mean([bv.same_answer(a, q["answer"]) for (_, q), a in zip(test_qs, ans)]))
            for name, ans in rules.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", help="a boundary_vqa.py --out_dir holding siglip.pt")
    ap.add_argument("--features", default="tower", choices=("tower", "hist", "untrained", "random_conv"))
    ap.add_argument("--cache_dir", default="", help="where the phantoms are cached (default: the run's)")
    ap.add_argument("--closed", action="store_true", help="also answer the test split's closed questions with the "
                    "probes (fitted on all training scans), against the answer-rate prior and \"No\"")
    ap.add_argument("--n_test", type=int, default=0, help="--closed: test phantoms (default: the run's n_test)")
    args = ap.parse_args(argv)
    if args.n_test < 0:
        raise BadConfig(f"--n_test={args.n_test}: a number of test phantoms, at least 1 (0: the run's)")
    path = Path(args.out_dir) / "siglip.pt"
    if not path.is_file():
        raise BadConfig(f"{path}: no SigLIP tower; train one with python boundary_vqa.py --stage=siglip "
                        f"--out_dir={args.out_dir}")
    ckpt = load_checkpoint(path)
    cfg = {**bv.DEFAULTS, **ckpt["config"], **({"cache_dir": args.cache_dir} if args.cache_dir else {}),
           **({"n_test": args.n_test} if args.n_test else {})}
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
    if args.closed:
        acc = closed_answers(cfg, ckpt, args.features, items, feats, bv.get_items(cfg, "test"), set(carried))
        print(f"closed questions of the {cfg['n_test']} test phantoms, answered without a decoder (x100):")
        for name, a in acc.items():
            print(f"  {100 * a:5.1f}  {name}")
        res["closed"] = acc
    return res


if __name__ == "__main__":
    run(main)
