"""An upper bound for boundary_vqa.py: its VQA stage on a tower that carries every finding perfectly.

    python -m tools.oracle_vqa --siglip_from=out/bvqa_region/siglip.pt --out_dir=out/bv_oracle --baselines=false
    python -m tools.oracle_vqa --findings=Atelectasis ...       # one finding's label beside the tower's own features

Each scan's 18 labels (x 3) replace the first 18 channels of its first visual token, in training, validation and
test alike; the rest is boundary_vqa.py as it is (every flag is its own; --stage=vqa is implied). This is not a model
(the labels reach it at test time): it measures how far the decoder and its training could go on the closed and
region questions if the frozen tower carried every finding, against the tower's four (tools/probe_tower.py). The
question-only twin is unchanged (its visual tokens are zeroed), so its numbers are the plain run's. This tool's two
flags: --labels_only=true zeroes the tower's own features around the labels; --findings=A,B (data.LABELS' names) writes
only those findings' labels (each in its own channel; the others keep the tower's features): what one more carried
finding would give.
"""
import functools
import sys
from unittest import mock

import torch

import boundary_vqa as bv
from data import BadConfig, LABELS, run

_feature_cache = bv.feature_cache


def with_labels(cache: dict, items: list, only: bool = False, findings=LABELS) -> dict:
    """{(item, region): (N_s, proj_dim)} -> the same with the item's label of each of `findings` (x 3) in token 0,
    channel data.LABELS.index(finding) (only: zeros everywhere else)."""
    js = [LABELS.index(f) for f in findings]
    out = {}
    for (i, r), f in cache.items():
        f = torch.zeros_like(f) if only else f.clone()
        f[0, js] = 3.0 * torch.as_tensor(items[i]["labels"], dtype=f.dtype)[js]
        out[(i, r)] = f
    return out


def oracle_feature_cache(model, items, qs, cfg, dev, only: bool = False, findings=LABELS) -> dict:
    cache = _feature_cache(model, items, qs, cfg, dev)
    return cache if cfg["blind"] else with_labels(cache, items, only, findings)


def own_flag(argv: list, key: str):
    """This tool's --key=value taken out of boundary_vqa.py's command line -> (its last value or None, the rest)."""
    mine = [a for a in argv if a.startswith(f"--{key}=")]
    return (mine[-1].split("=", 1)[1] if mine else None), [a for a in argv if a not in mine]


def main(argv=None):
    only, argv = own_flag(list(sys.argv[1:] if argv is None else argv), "labels_only")
    if only not in (None, "true", "false"):
        raise BadConfig(f"--labels_only={only}: expected true or false")
    findings, argv = own_flag(argv, "findings")
    findings = findings.split(",") if findings is not None else LABELS
    if unknown := [f for f in findings if f not in LABELS]:
        raise BadConfig(f"--findings: {unknown[0]!r} is not a finding; expected names from {', '.join(LABELS)}")
    cfg = bv.parse_config(argv, bv.DEFAULTS, bv.PRESETS)
    if cfg["data"] != "synthetic":
        raise BadConfig(f"--data={cfg['data']}: the oracle needs the phantoms' 18 labels")
    if cfg["proj_dim"] < len(LABELS):
        raise BadConfig(f"--proj_dim={cfg['proj_dim']}: the oracle writes {len(LABELS)} labels into one token")
    oracle = functools.partial(oracle_feature_cache, only=only == "true", findings=findings)
    with mock.patch.object(bv, "feature_cache", oracle):  # put back after the run
        return bv.main(argv + ["--stage=vqa"])


if __name__ == "__main__":
    run(main)
