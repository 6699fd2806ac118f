"""Question: what does the bad-table hardening (level clamp, clearing mask bits past the last
block, never counting padding bounds) cost the kernel?

    python benchmarks/bench_clamp.py --before /tmp/before_kernel.py --out clamp.json

Times the current kernel module and an older copy (``--before``: a file made with
``git show <old>:<path>/block_sparse_attention.py``) side by side in one process, at the 1.3B
shape (B=1, H=12, S=32,760, D=128, bf16) and densities 1.0 / 0.25 / 0.1, with the same random
block masks, inputs and tile configs: the config each module's autotuner picks, plus the TMA and
the plain 3-stage configs pinned. Rounds alternate before/now so clock drift hits both.
``triton.testing.do_bench`` medians; JSON with GPU, versions and git SHA.

The added work is per program, outside the KV loop: a min/max on the level and a 32-lane
and-mask on the row's words (13-18 more PTX instructions of ~1,300-2,200 in the sm_90 compile).

On a CPU, ``TRITON_INTERPRET=1 ... --shape 1,2,300,64 --dtype fp16 --rounds 1`` smoke-tests it.

Since the kernel's math and its launcher are two files (``kernels/block_sparse_attention.py``,
``kernels/launch.py``), ``--before`` takes a kernel file from before that split (one file held
both; its ``from ..reference`` / ``from ..op`` imports need that commit's package layout). To
compare two commits after the split, check the old one out in a second tree and run this there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys

import _common
import torch

from scaling_attn_compile.contract.masks import unpack_blocks
from scaling_attn_compile.contract.tables import uniform_tables
from scaling_attn_compile.kernels import launch as current
from scaling_attn_compile.testing import make_qkv

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_before(path: str):
    """The old kernel file as ``scaling_attn_compile.kernels._before``: a module of the same
    package, so its relative imports (``from ..reference import ENERGY_RULES``) resolve."""
    name = "scaling_attn_compile.kernels._before"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise SystemExit(f"bench_clamp: --before {path!r} is not a Python file; make it with "
                         "git show <commit>:<path>/block_sparse_attention.py > FILE")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # triton's jit reads the source through the module
    spec.loader.exec_module(mod)
    return mod


def environment() -> dict:
    return _common.environment(_common.gpu_name(cpu="cpu (interpreter)"))


def timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn):  # the interpreter: one call, wall clock (a smoke test, not a measurement)
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=None, help="old block_sparse_attention.py to compare with")
    ap.add_argument("--shape", default="1,12,32760,128", help="B,H,S,D (default the 1.3B shape)")
    ap.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.25, 0.1])
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--rounds", type=int, default=3, help="alternating before/now rounds")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    B, H, S, D = (int(x) for x in args.shape.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_clamp: needs a CUDA GPU, or TRITON_INTERPRET=1 for a CPU smoke test",
              file=sys.stderr)
        return 2
    modules = {"now": current}
    if args.before:
        modules = {"before": load_before(args.before), "now": current}
    env = environment()
    print(env, flush=True)
    q, k, v = make_qkv(B, H, S, D, dtype=DTYPES[args.dtype], device=device)
    ts = torch.tensor([500.0], device=device)
    scale = D**-0.5
    flops = 4 * B * H * S * S * D
    # The config each module's autotuner picks (None), and two pinned (fields as tuples, so the
    # old module's KernelConfig takes them too); the interpreter runs one small config.
    configs = ([None, (128, 8, 3, True, False), (128, 8, 3, False, False)] if device == "cuda"
               else [(128, 4, 1, False, False)])
    bench = timer(device)
    records = []
    for target in args.densities:
        tables = uniform_tables(1, H, (1, 1, S), target, seed=0, pattern="random").to(device)
        masks, lt, bb = tables.layer(0)
        density = unpack_blocks(masks[:, 0], masks.shape[2]).float().mean().item()
        outs = {name: torch.empty_like(q) for name in modules}
        for cfg in configs:
            times = {name: [] for name in modules}
            for _ in range(args.rounds):
                for name, mod in modules.items():
                    def fn(m=mod, o=outs[name], c=cfg, tables=(masks, lt, bb)):
                        return m.block_sparse_attention_forward(q, k, v, *tables, ts, o, scale, c)
                    fn()  # compile / autotune outside the timing
                    times[name].append(bench(fn))
            same = (len(outs) < 2 or torch.equal(outs["before"], outs["now"]))
            row = {"density": round(density, 4), "config": "autotuned" if cfg is None else cfg,
                   "bit_identical": bool(same)}
            for name, ts_ms in times.items():
                ms = statistics.median(ts_ms)
                row[f"{name}_ms"] = ms
                row[f"{name}_tflops"] = flops * density / ms / 1e9
                row[f"{name}_rounds_ms"] = ts_ms
            if "before" in times:
                row["now_over_before"] = row["now_ms"] / row["before_ms"]
            records.append(row)
            print(f"density {density:.3f} config {row['config']}: " + ", ".join(
                f"{n} {row[f'{n}_ms']:.3f} ms ({row[f'{n}_tflops']:.0f} TFLOP/s)" for n in times)
                + (f", now/before {row['now_over_before']:.4f}" if "before" in times else "")
                + ("" if same else "  OUTPUTS DIFFER"), flush=True)
    tuned = {"now": {str(key): str(c) for key, (c, _) in current.tuned_configs().items()}}
    if "before" in modules:
        tuned["before"] = {str(key): str(c) for key, c in modules["before"]._TUNED.items()}
    result = {"question": "cost of the bad-table hardening (level clamp, bits past NB)",
              "env": env, "shape": {"B": B, "H": H, "S": S, "D": D, "dtype": args.dtype},
              "before": args.before, "tuned_configs": tuned, "records": records}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
