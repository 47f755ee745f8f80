"""How many bytes does each rank send per training step, before and after the owner-based reduction? `python3 tools/comm_bytes.py [--world 8]`

Bytes each rank sends per training step, before and after the owner-based gradient reduction.

    python tools/comm_bytes.py [--world 8]

Parameter shapes come from train_gpt's defaults (the record config), built on the meta device. Ring
algorithms: all-reduce sends 2(W-1)/W of the buffer per rank; all-gather, reduce-scatter and a reduce to
one rank (averaged over ranks) (W-1)/W.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def step_bytes(muon: list[int], adam: list[int], world: int, update_bytes: int = 2) -> dict[str, float]:
    """Bytes sent per rank per step. muon/adam: element counts of the parameters of each optimizer.
    before: one flat fp32 all-reduce of every gradient, then Muon's fp32 all-reduce of a buffer holding
    every update (zeros but for the rank's own). after: Muon gradients reduced to their owners, Adam
    gradients all-reduced, updates all-gathered in Newton-Schulz's dtype (bf16: update_bytes=2) from
    rows padded to the largest owner load; plus the clip's one-element all-reduce."""
    ar, ag = 2 * (world - 1) / world, (world - 1) / world
    own = tg.muon_owners(muon, world)
    load = [sum(n for n, r in zip(muon, own) if r == k) for k in range(world)]
    before = {"grads_allreduce_fp32": ar * 4 * (sum(muon) + sum(adam)), "muon_update_allreduce_fp32": ar * 4 * sum(muon)}
    after = {"muon_grads_reduce_to_owner_fp32": ag * 4 * sum(muon), "adam_grads_allreduce_fp32": ar * 4 * sum(adam),
             "muon_update_allgather": ag * update_bytes * world * max(load), "clip_norm_allreduce": ar * 4}
    return {"before": sum(before.values()), "after": sum(after.values()), **{f"before.{k}": v for k, v in before.items()},
            **{f"after.{k}": v for k, v in after.items()}, "allgather_padding": world * max(load) / sum(muon) - 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=8, help="ranks (at least 1)")
    args = ap.parse_args(argv)
    if args.world < 1 or 8 % args.world:
        ap.error(f"--world {args.world}: the world size must divide 8 (1, 2, 4 or 8)")
    h = tg.Hyperparameters()
    with torch.device("meta"):
        model = tg.GPT(h)
    groups = {"muon": [], "other": []}
    for name, p in model.named_parameters():
        groups["muon" if tg.param_group(name, p) == "muon" else "other"].append(p.numel())
    r = step_bytes(groups["muon"], groups["other"], args.world)
    print(f"world:{args.world} muon_params:{sum(groups['muon'])} adam_params:{sum(groups['other'])}")
    for k, v in r.items():
        print(f"{k}:{v:.4f}" if k == "allgather_padding" else f"{k}:{v / 1e6:.1f}MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
