"""What a finished boundary_vqa.py run's yes/no head reads on the training scans it was trained on, against the test
scans: a decoder that memorised its training scans' cached features would read them far better than new ones.

    python -m tools.train_reads out/boundary_vqa                      # the run's contour model (+ its twin if there)
    python -m tools.train_reads out/boundary_vqa --cache_dir=out/phantoms

For the run's model (out_dir/ckpt.pt) and, when it is there, its question-only twin (out_dir/question_only/ckpt.pt),
on the run's training and test phantoms (evaluation only; nothing is trained):
- reads: every scan asked every closed question ("Is there <finding> in this scan?") and every region question, the
  AUROC of the head's log-odds against that scan's labels, per question, training scans beside test scans;
- closed / region accuracy on each split's own questions (data.make_questions', the extra ones left out), Yes above 0;
- the same test questions with the Yes threshold chosen on the training scans' own questions instead of 0 (they are
  asked as the test's are: one present finding and two absent ones a scan, where the training questions the head
  learned from are mostly every finding of every scan), one threshold per kind, or one per question text (for a head
  that ignores the scan, that is the answer-rate prior); the model minus its twin, 95% paired bootstrap.
The test labels are only scored against.
"""
import argparse
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import boundary_vqa as bv
from data import BadConfig, bootstrap_diff, load_checkpoint, run

GRID = sorted(np.linspace(-4, 4, 321).round(3), key=abs)  # thresholds tried, nearest 0 first


def best_threshold(d: np.ndarray, y: np.ndarray) -> float:
    """The log-odds threshold (GRID) with the most right answers (Yes above it) on (d, y); of equals, nearest 0."""
    return float(max(GRID, key=lambda t: int(((d > t) == y).sum())))  # max keeps the first of equals


def thresholds(samples, log_odds) -> dict:
    """{(kind,): t, (kind, question text): t} chosen by best_threshold on the yes/no samples."""
    groups = {}
    for j, d in log_odds.items():
        q = samples[j][1]
        for key in ((q["kind"],), (q["kind"], q["question"])):
            groups.setdefault(key, []).append((d, q["answer"] == "Yes"))
    return {key: best_threshold(np.array([d for d, _ in v]), np.array([y for _, y in v])) for key, v in groups.items()}


def right(samples, log_odds, kind: str, t=lambda q: 0.0) -> np.ndarray:
    """1 per yes/no sample of `kind` answered right with Yes above t(question), else 0."""
    return np.array([(d > t(samples[j][1])) == (samples[j][1]["answer"] == "Yes") for j, d in log_odds.items()
                     if samples[j][1]["kind"] == kind], float)


@torch.no_grad()
def head_log_odds(path: Path, cache_dir: str) -> dict:
    """{split: (own questions, their log-odds, every question of every scan, their log-odds)} for one checkpoint."""
    ckpt = load_checkpoint(path)
    cfg = {**bv.DEFAULTS, **ckpt["config"], **({"cache_dir": cache_dir} if cache_dir else {}), "device": "cpu"}
    if cfg["data"] != "synthetic":
        raise BadConfig(f"{path}: trained on {cfg['data']}; this needs the phantoms' labels")
    model = bv.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    enc = bv.get_tokenizer(cfg)
    out = {}
    for split in ("train", "test"):
        items = bv.get_items(cfg, split)
        own, every = bv.questions_of(items), bv.extra_questions(items, split, cfg["seed"])
        yes = {(i, q["question"]) for i, q in every if q["kind"] == "closed" and q["answer"] == "Yes"}
        if yes != {(i, f"Is there {bv._finding_name(l)} in this scan?") for i, it in enumerate(items)
                   for l, y in zip(bv.LABELS, it["labels"]) if y}:
            raise BadConfig(f"{cfg['cache_dir']}: the cached {split} phantoms are not the ones --seed={cfg['seed']} "
                            "draws; pass the run's --cache_dir")
        cache = bv.feature_cache(model, items, own + every, cfg, "cpu")
        out[split] = tuple(x for qs in (own, every)
                           for x in (qs, bv.yes_log_odds(model, enc, cfg, qs, cache, "cpu", nullcontext())))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", help="a finished boundary_vqa.py --out_dir (ckpt.pt; question_only/ckpt.pt if there)")
    ap.add_argument("--cache_dir", default="", help="where the phantoms are cached (default: the run's)")
    args = ap.parse_args(argv)
    paths = {"model": Path(args.out_dir) / "ckpt.pt", "twin": Path(args.out_dir) / "question_only" / "ckpt.pt"}
    if not paths["model"].is_file():
        raise BadConfig(f"{paths['model']}: no VQA checkpoint; train one with python boundary_vqa.py "
                        f"--out_dir={args.out_dir}")
    res, acc = {}, {}
    for name, path in paths.items():
        if not path.is_file():
            continue
        lo = head_log_odds(path, args.cache_dir)
        res[name] = {"reads": {split: bv.reads(lo[split][2], lo[split][3]) for split in lo}}
        t = thresholds(lo["train"][0], lo["train"][1])
        own, d = lo["test"][0], lo["test"][1]
        rules = {"0": lambda q: 0.0, "per kind": lambda q: t.get((q["kind"],), 0.0),
                 "per question": lambda q: t.get((q["kind"], q["question"]), t.get((q["kind"],), 0.0))}
        acc[name] = {kind: {"train": right(lo["train"][0], lo["train"][1], kind).mean(),
                            **{rule: right(own, d, kind, f) for rule, f in rules.items()}}
                     for kind in ("closed", "region")}
        train_reads = res[name]["reads"]["train"]
        if all(r["auroc"] == 0.5 for v in res[name]["reads"].values() for r in v.values()):  # one log-odds a text
            print(f"{path}: AUROC of P(Yes) 0.50 for every question on both splits (the scan is not read)")
            train_reads = {}
        else:
            print(f"{path}: AUROC of P(Yes), every scan asked every yes/no question   train  test")
        for text, r in train_reads.items():
            r_test = res[name]["reads"]["test"].get(text)
            shown = "  -  " if r_test is None else f"{r_test['auroc']:.2f}"
            print(f"  {text[:62]:62s}  {r['auroc']:.2f}  {shown}")
    print("own questions, accuracy (x100): train (Yes above 0) | test, Yes above 0 / the threshold chosen on the "
          "training questions, per kind / per question text")
    for name, a in acc.items():
        for kind, v in a.items():
            print(f"  {name:5s} {kind:6s}  {100 * v['train']:5.1f} | " +
                  " / ".join(f"{100 * v[r].mean():5.1f}" for r in ("0", "per kind", "per question")))
            res[name][kind] = {r: float(v[r].mean()) for r in v}
    if "twin" in acc:
        for kind in ("closed", "region"):
            for rule in ("0", "per kind", "per question"):
                a, b = acc["model"][kind][rule], acc["twin"][kind][rule]
                lo_, hi_ = bootstrap_diff(a, b)
                res.setdefault("model minus twin", {})[(kind, rule)] = float(a.mean() - b.mean())
                print(f"  model minus twin, {kind}, threshold {rule}: {100 * (a.mean() - b.mean()):+.1f} "
                      f"[{100 * lo_:+.1f}, {100 * hi_:+.1f}]")
    return res


if __name__ == "__main__":
    run(main)
