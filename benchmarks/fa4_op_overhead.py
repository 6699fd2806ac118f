"""Question: where does the op's time go beyond FA4's own kernel? (issue 14, bar 1: the op at
least 1.0x FA4 block-sparse.) On an H100 (commit 7b044a5) the op, which runs FA4 with lists it
builds per call, took 0.73-0.81 ms at density 0.05 where FA4 with prebuilt lists took 0.58-0.59,
and 0.96-1.00x FA4 at densities 0.1-1.0 (``attention-fa4-eager-1.3b-*.json``).

Candidates, each a row here, timed interleaved over ``--rounds`` rounds at the Wan 1.3B shape:

* ``fa4-kmax``: FA4 on lists built beforehand with K = the most blocks a row keeps (the bench's
  ``fa4`` row); ``fa4-knb``: the same lists padded to K = NB, as the op builds them.
* ``lists``: the op's one-launch list builder alone.
* ``op``: ``torch.ops.scaling_attn.sparse_attention`` (checks, lists, FA4).
* ``graph-fa4-knb`` / ``graph-op``: the same work captured once in a CUDA graph and replayed,
  which removes the host's share (a compiled model under ``mode="reduce-overhead"``).
* ``host-*``: the host's time to enqueue one call (``perf_counter`` around the call, the GPU
  idle and synced before each), the floor under a small kernel's time when calls run back to
  back.

If ``graph-op`` equals ``graph-fa4-knb`` while ``op`` is slower than ``fa4-knb``, the gap is
the host's; if ``fa4-knb`` is slower than ``fa4-kmax``, it is the padding of the lists.

    python benchmarks/fa4_op_overhead.py --out fa4-op-overhead.json   # needs FA4 on an sm90 GPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import _common
import mask_families as MF
import torch

CASES = (("bernoulli", 0.05), ("local", 0.05), ("bernoulli", 0.25), ("all", 1.0))


def host_ms(fn, calls: int = 20) -> float:
    """Median host time of one enqueue, the GPU idle before each."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def graphed(fn):
    """``fn`` captured in a CUDA graph (after warm-up on a side stream); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from triton.testing import do_bench

    from scaling_attn_compile import sparse_attention
    from scaling_attn_compile.kernels.fa4 import (
        fa4_available,
        fa4_block_sparse_tensors,
        fa4_forward,
        max_row_blocks,
    )
    from scaling_attn_compile.testing import make_qkv

    if not (torch.cuda.is_available() and fa4_available()):
        print("fa4_op_overhead: needs flash_attn.cute on an sm90 GPU", file=sys.stderr)
        return 2
    env = _common.environment(torch.cuda.get_device_name())
    print(env, flush=True)
    _, B, H, grid, D = "wan2.1-1.3B", 1, 12, MF.GRIDS["1.3b"], 128
    S = math.prod(grid)
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda")
    scale = 1 / math.sqrt(D)
    ts = torch.tensor([500.0], device="cuda")
    records = []
    for family, target in CASES:
        block = MF.block_mask("balanced" if family == "all" else family, H, grid, target, seed=0)
        masks, lt, bb = (t.cuda() for t in MF.mask_tables(block, grid).layer(0))
        density = block.float().mean().item()
        kmax = max_row_blocks(masks, S)
        lists_max = fa4_block_sparse_tensors(masks, lt, bb, ts, B, S, kmax)
        lists_nb = fa4_block_sparse_tensors(masks, lt, bb, ts, B, S)
        runs = {
            "fa4-kmax": lambda lm=lists_max: fa4_forward(q, k, v, scale, lm),
            "fa4-knb": lambda ln=lists_nb: fa4_forward(q, k, v, scale, ln),
            "lists": lambda m=masks, t=lt, b=bb: fa4_block_sparse_tensors(m, t, b, ts, B, S),
            "op": lambda m=masks, t=lt, b=bb: sparse_attention(q, k, v, m, t, b, ts, scale),
        }
        ref = runs["fa4-knb"]()
        torch.testing.assert_close(runs["op"](), ref, rtol=0, atol=0)  # the op is FA4 here
        for name in ("fa4-knb", "op"):
            try:
                runs[f"graph-{name}"] = graphed(runs[name])
            except Exception as e:  # a capture failure is a finding, not the end of the run
                print(f"  graph-{name}: capture failed: {type(e).__name__}: {e}", flush=True)
        for _ in range(2):  # compile and warm everything before timing
            for fn in runs.values():
                fn()
        ms = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                ms[name].append(do_bench(fn, warmup=10, rep=100, return_mode="median"))
        host = {f"host-{name}": host_ms(runs[name]) for name in ("fa4-knb", "op", "lists")}
        rec = {"mask": family, "density": density, "kmax": kmax, "nb": lists_nb[1].shape[-1],
               **{name: statistics.median(t) for name, t in ms.items()},
               "rounds": ms, **host}
        records.append(rec)
        print(f"{family:9s} d {density:.3f} K {kmax}/{rec['nb']}: " +
              "  ".join(f"{n} {rec[n]:.3f}" for n in (*runs, *host)), flush=True)
    with open(args.out, "w") as f:
        json.dump({"question": __doc__.split("\n\n")[0], "env": env, "records": records}, f,
                  indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
