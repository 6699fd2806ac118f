"""Question: how much faster is one Wan2.1-14B 720p transformer step on N GPUs (Ulysses sequence
parallelism, diffusers' context parallelism) than on 1 GPU, dense and with a 0.25-density plan?

    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py                 # 14B, 40 layers
    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --layers 10     # fewer layers
    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --rows ours-0.25  # some rows; merged
    python benchmarks/bench_parallel.py --tiny            # CPU smoke run, 1 process (1-GPU rows)
    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --tiny   # CPU, gloo, both phases

Rows (B=1, CFG off, random bf16 weights: speed does not depend on them): ``inductor``
(``torch.compile``, dense SDPA) and ``ours-0.25`` (our backend, ``uniform_tables`` at block
density 0.25, ``--pattern``). Each row runs twice: on rank 0 alone (the 1-GPU step, the other
ranks wait), then on all N ranks with ``enable_ulysses`` (diffusers'
``ContextParallelConfig(ulysses_degree=N)``; our backend binds each rank's heads with
``parallel=transformer``). Step time: median over ``--repeats`` steps of the slowest rank
(barrier, then ``perf_counter`` around a synchronised step). Speedup = t1 / tN; scaling
efficiency = speedup / N. The N-GPU output is compared with the 1-GPU output of the same row
(max abs and relative L2 difference; both bf16, so not bit-equal; the exact check is
tests/test_parallel.py in fp32).

Writes ``benchmarks/results/parallel-<gpu>.json`` (``--tiny``: ``$TMPDIR/parallel-cpu-tiny.json``);
records of other (layers, row, gpus) keys from earlier runs are kept.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from _common import record_file
from bench_compile import MODELS, build_model, environment, latent_shape, make_inputs

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.compile.parallel import enable_ulysses
from scaling_attn_compile.contract.tables import uniform_tables

ROWS = {"inductor": None, "ours-0.25": 0.25}
ARGS = None  # the parsed command line (main)
BAR = 1.8  # issue 8: 2 GPUs at least 1.8x faster per step than 1 GPU with the same plan


@dataclass
class Record:
    model: str
    layers: int
    layers_of: int
    video: tuple
    seq_len: int
    row: str
    gpus: int
    ms: float | None
    speedup_vs_1gpu: float | None = None
    scaling_efficiency: float | None = None
    max_abs_diff_vs_1gpu: float | None = None
    rel_l2_vs_1gpu: float | None = None
    head_range: tuple | None = None
    first_call_s: float | None = None
    error: str | None = None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, device, repeats: int, parallel: bool) -> float:
    """Median ms of the slowest rank (a step ends when every rank is done)."""
    times = []
    for _ in range(repeats):
        if parallel:
            dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    ms = torch.tensor([statistics.median(times)], dtype=torch.float64)
    if parallel:
        if dist.get_backend() == "nccl":
            ms = ms.to(device)
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms.item())


def compiled_row(model, row, layers, heads, grid, parallel):
    torch._dynamo.reset()
    if ROWS[row] is None:
        return torch.compile(model, backend="inductor", fullgraph=True, dynamic=False), None
    tables = uniform_tables(layers, heads, grid, ROWS[row], seed=0, pattern=ARGS.pattern)
    backend = scaling_attn_backend(tables, parallel=model if parallel else None)
    return torch.compile(model, backend=backend, fullgraph=True, dynamic=False), backend


def run(model, inputs, row, spec, layers, grid, device, parallel):
    heads = spec["config"]["num_attention_heads"]
    fn, backend = compiled_row(model, row, layers, heads, grid, parallel)

    def step():
        with torch.no_grad():
            return fn(**inputs, return_dict=False)[0]

    if parallel:
        dist.barrier()
    t0 = time.perf_counter()
    out = step()
    sync(device)
    first = time.perf_counter() - t0
    ms = time_step(step, device, ARGS.repeats, parallel)
    head_range = backend.reports[-1].head_range if backend and backend.reports else None
    return ms, first, out.float().cpu(), head_range


def main(argv=None) -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None,
                    help="transformer blocks (default all 40; said in the output)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--pattern", default="local", choices=["local", "random"])
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per row")
    ap.add_argument("--skip-1gpu", action="store_true",
                    help="N-GPU rows only (1-GPU records of an earlier run are reused)")
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (gloo)")
    ap.add_argument("--out", default=None)
    ARGS = args = ap.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.tiny:
        spec = dict(MODELS["tiny"])
        spec["config"] = dict(spec["config"], num_attention_heads=4)  # a head split to bind
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    else:
        if not torch.cuda.is_available():
            print("bench_parallel: needs CUDA GPUs (use --tiny for a CPU smoke run)",
                  file=sys.stderr)
            return 2
        spec, dtype = MODELS["14b"], torch.bfloat16
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    layers_of = spec["config"]["num_layers"]
    layers = args.layers or layers_of
    lat = latent_shape(spec)
    grid = (lat[2], lat[3] // 2, lat[4] // 2)
    seq_len = grid[0] * grid[1] * grid[2]
    if seq_len % world:
        raise SystemExit(f"bench_parallel: sequence length {seq_len} is not divisible by "
                         f"{world} ranks (diffusers' equipartition split)")
    env = environment(device.type)
    env.update(world=world, pattern=args.pattern, repeats=args.repeats,
               timing="median of per-step perf_counter (synchronised), slowest rank")
    label = f"{spec['name']}, {layers} of {layers_of} layers, video {spec['video']}, S={seq_len}"
    if rank == 0:
        print(env, "\n", label, flush=True)

    def build():
        torch.manual_seed(0)  # the same random weights on every rank and in the 1-GPU model
        return build_model(spec, layers, device.type, dtype).to(device)

    inputs = make_inputs(spec, device, dtype)
    records: list[Record] = []
    one = {}  # row -> (ms, output) of the 1-GPU run
    base = dict(model=spec["name"], layers=layers, layers_of=layers_of,
                video=tuple(spec["video"]), seq_len=seq_len)

    # -- 1 GPU: rank 0 alone -----------------------------------------------------------------
    if not args.skip_1gpu:
        if rank == 0:
            model = build()
            for row in args.rows:
                try:
                    ms, first, out, _ = run(model, inputs, row, spec, layers, grid, device,
                                            parallel=False)
                    one[row] = (ms, out)
                    records.append(Record(**base, row=row, gpus=1, ms=ms, first_call_s=first))
                except Exception as e:  # noqa: BLE001 - recorded, the other rows still run
                    records.append(Record(**base, row=row, gpus=1, ms=None,
                                          error=f"{type(e).__name__}: {e}"[:2000]))
                print(records[-1], flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if world > 1:
            dist.barrier()

    # -- N GPUs: Ulysses ---------------------------------------------------------------------
    if world > 1:
        model = build()
        enable_ulysses(model, world)
        for row in args.rows:
            rec = Record(**base, row=row, gpus=world, ms=None)
            try:
                ms, first, out, head_range = run(model, inputs, row, spec, layers, grid, device,
                                                 parallel=True)
                rec.ms, rec.first_call_s, rec.head_range = ms, first, head_range
                if row in one:
                    t1, ref = one[row]
                    rec.speedup_vs_1gpu = t1 / ms
                    rec.scaling_efficiency = t1 / ms / world
                    rec.max_abs_diff_vs_1gpu = (out - ref).abs().max().item()
                    rec.rel_l2_vs_1gpu = ((out - ref).norm() / ref.norm()).item()
            except Exception as e:  # noqa: BLE001
                rec.error = f"{type(e).__name__}: {e}"[:2000]
            if rank == 0:
                print(rec, flush=True)
                records.append(rec)
    elif rank == 0:
        print("bench_parallel: one process: only the 1-GPU rows ran; launch with torchrun "
              "--nproc-per-node N for the Ulysses rows", flush=True)

    if rank == 0:
        write(records, env, label, args, device)
    if world > 1:
        dist.destroy_process_group()
    return 0


def write(records, env, label, args, device):
    path, stored = record_file(args, env, "parallel")
    old = stored.get("records", [])
    new = [asdict(r) for r in records]
    keys = {(r["layers"], r["row"], r["gpus"]) for r in new}
    merged = [r for r in old if (r["layers"], r["row"], r["gpus"]) not in keys] + new
    # A N-GPU record without its 1-GPU time in this run (--skip-1gpu) gets it from the file.
    for r in merged:
        if r["gpus"] > 1 and r["speedup_vs_1gpu"] is None and r["ms"]:
            t1 = [o["ms"] for o in merged if o["gpus"] == 1 and o["row"] == r["row"]
                  and o["layers"] == r["layers"] and o["ms"]]
            if t1:
                r["speedup_vs_1gpu"] = t1[0] / r["ms"]
                r["scaling_efficiency"] = r["speedup_vs_1gpu"] / r["gpus"]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"question": __doc__.split("\n\n")[0], "env": env, "label": label,
                   "bar": f"ours-0.25 on 2 GPUs >= {BAR}x the 1-GPU step",
                   "records": merged}, f, indent=1)
    print(f"\n{label}\n{'row':>10} {'gpus':>4} {'ms':>10} {'speedup':>8} {'eff':>6} "
          f"{'maxdiff':>9}")
    for r in merged:
        f = (lambda x, p: "-" if x is None else f"{x:.{p}f}")
        print(f"{r['row']:>10} {r['gpus']:>4} {f(r['ms'], 1):>10} "
              f"{f(r['speedup_vs_1gpu'], 2):>8} {f(r['scaling_efficiency'], 2):>6} "
              f"{f(r['max_abs_diff_vs_1gpu'], 4):>9}" + (f"  {r['error'][:80]}" if r["error"]
                                                          else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
