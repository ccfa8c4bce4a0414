"""boundary_vqa.py's VQA stage with the decoder's initial weights drawn from another seed: how much of a result is its
initialisation's.

    python -m tools.init_seed --init_seed=1 --siglip_from=out/bvqa_region/siglip.pt --out_dir=out/bv_init1

--init_seed=N seeds torch's RNG just before each variant's model is built (boundary_vqa.run_vqa seeds it with --seed
there), so the adapter, the decoder with its slice attention, and the yes/no head start from other weights. The split,
the frozen tower, the questions and the batch order (data.Stream, a function of --seed) stay as they are, and nothing
after the build draws from that RNG (answers are greedy): --init_seed equal to --seed is the plain run. Every other flag
is boundary_vqa.py's; --stage=vqa is implied.
"""
import sys
from unittest import mock

import torch

import boundary_vqa as bv
from data import BadConfig, run
from tools.oracle_vqa import own_flag

_build_model = bv.build_model


def seeded(build, seed: int):
    """build(cfg) with torch's RNG seeded by `seed` first: the same initial weights whatever the RNG's state was."""
    def build_seeded(cfg):
        torch.manual_seed(seed)
        return build(cfg)
    return build_seeded


def main(argv=None):
    seed, argv = own_flag(list(sys.argv[1:] if argv is None else argv), "init_seed")
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise BadConfig(f"--init_seed={seed}: expected an integer" if seed is not None else
                        "--init_seed=N is required (the seed of the VQA models' initial weights)") from None
    with mock.patch.object(bv, "build_model", seeded(_build_model, seed)):  # put back after the run
        return bv.main(argv + ["--stage=vqa"])


if __name__ == "__main__":
    run(main)
