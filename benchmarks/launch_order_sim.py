"""Question: how much of the ragged-row slowdown can the longest-first launch order remove, if
the GPU hands programs to SMs greedily in launch order? A prediction, on the CPU, to hold the GPU
measurement (``bench_attention.py``'s ``ours-triton`` vs ``ours-triton-lpt``) against.

    python benchmarks/launch_order_sim.py                  # both Wan shapes, every mask family
    python benchmarks/launch_order_sim.py --shapes 1.3b --overhead 0 2

Model: one program per (head, 128-row query block) (the BLOCK_M = 128 configs); a program costs
``overhead + kept blocks`` block-steps (``overhead``: its prologue and epilogue, Q load and output
store, in units of one KV block's work; 2 fits the measured 515 vs 560 TFLOP/s of balanced rows
at density 0.1 against dense, issue 14); ``slots`` programs run at once (132 SMs x 1 CTA: the
128x128 tiles at 2-3 stages use most of an SM's shared memory); each program starts on the slot
that frees first, in launch order (list scheduling). Predicted time is the makespan; ``ideal``
is total work / slots. The masks are ``mask_families.py``'s, the order is the backend's
(``contract.masks.launch_order``).

Writes ``benchmarks/results/launch-order-sim.json`` (one record per shape, family, density,
overhead) and prints a table: makespan over ideal in index order and longest first, the
predicted speedup, and the ragged-row figure ``time(d) / (d x time(1.0))`` in each order.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys

import _common
import mask_families as MF
import torch

from scaling_attn_compile.contract.masks import launch_order, pack_blocks

HEADS = {"1.3b": 12, "14b": 40}
SLOTS = 132  # H100 / H200 SMs, one 128-row program each


def makespan(costs: list[float], slots: int) -> float:
    """Greedy list scheduling in the given order: each job starts on the earliest-free slot."""
    free = [0.0] * slots
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def simulate(shape: str, family: str, density: float, overheads, slots: int) -> list[dict]:
    heads, grid = HEADS[shape], MF.GRIDS[shape]
    block = MF.block_mask(family, heads, grid, density, seed=0)  # (H, NB, NB), diagonal kept
    nb = block.shape[-1]
    counts = block.sum(-1).flatten()  # (H * NB,), index order: head-major
    order = launch_order(pack_blocks(block)[:, None], torch.zeros(1, heads, dtype=torch.int32),
                         nb * 128)[0].long()
    out = []
    for c0 in overheads:
        index = (counts.double() + c0).tolist()
        lpt = (counts[order].double() + c0).tolist()
        ideal = sum(index) / slots
        m_index, m_lpt = makespan(index, slots), makespan(lpt, slots)
        out.append(dict(shape=shape, heads=heads, num_blocks=nb, family=family,
                        target_density=density, density=float(block.float().mean()),
                        raggedness=MF.row_raggedness(block[None]), overhead=c0, slots=slots,
                        ideal=ideal, makespan_index=m_index, makespan_lpt=m_lpt,
                        index_over_ideal=m_index / ideal, lpt_over_ideal=m_lpt / ideal,
                        predicted_speedup=m_index / m_lpt))
    return out


def add_ragged_figure(records: list[dict]) -> None:
    """``time(d) / (d x time(1.0))`` per order, against the same shape and overhead at 1.0."""
    dense = {(r["shape"], r["overhead"]): r for r in records if r["target_density"] == 1.0}
    for r in records:
        d = dense.get((r["shape"], r["overhead"]))
        if d:
            r["ragged_index"] = r["makespan_index"] / (r["density"] * d["makespan_index"])
            r["ragged_lpt"] = r["makespan_lpt"] / (r["density"] * d["makespan_lpt"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--families", nargs="+", default=list(MF.FAMILIES), choices=list(MF.FAMILIES))
    ap.add_argument("--densities", nargs="+", type=float, default=list(MF.DENSITIES))
    ap.add_argument("--overhead", nargs="+", type=float, default=[0.0, 2.0],
                    help="per-program cost in KV-block steps (default 0 and 2)")
    ap.add_argument("--slots", type=int, default=SLOTS, help=f"concurrent programs (default {SLOTS})")
    ap.add_argument("--out", default=os.path.join(_common.RESULTS, "launch-order-sim.json"))
    args = ap.parse_args(argv)
    if 1.0 not in args.densities:
        args.densities.append(1.0)  # the ragged figure's reference
    records = []
    for shape in args.shapes:
        for density in sorted(set(args.densities)):
            for family in (["balanced"] if density == 1.0 else args.families):
                records += simulate(shape, family, density, args.overhead, args.slots)
    add_ragged_figure(records)
    print("| shape | family | density | overhead | index / ideal | lpt / ideal | speedup "
          "| t/(d x dense) index | lpt |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['shape']} | {r['family']} | {r['density']:.3f} | {r['overhead']:g} | "
              f"{r['index_over_ideal']:.3f} | {r['lpt_over_ideal']:.3f} | "
              f"{r['predicted_speedup']:.3f} | {r.get('ragged_index', float('nan')):.3f} | "
              f"{r.get('ragged_lpt', float('nan')):.3f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"env": _common.environment("cpu (a model, not a timing)", slots=args.slots),
                   "command": " ".join(["python", *sys.argv]), "records": records}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
