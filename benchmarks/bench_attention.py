"""Question: how fast is our block-sparse attention against FlashAttention-4 (dense and
block-sparse), SDPA (cuDNN) and compiled FlexAttention given the identical block mask, at Wan2.1
self-attention shapes, on balanced and on ragged rows? And the 8-bit kernel
(issue 15): ``ours-int8`` / ``ours-fp8`` time the kernel on pre-quantized inputs,
``ours-int8-op`` / ``ours-fp8-op`` the op with its quantize pre-pass (one Triton launch),
``ours-int8-torchprep`` / ``ours-fp8-torchprep`` the same with the spec's torch pre-pass,
``ours-int8-runacc`` / ``ours-fp8-runacc`` the kernel with P.V into the running accumulator
(opt-in: faster, outside its accuracy bound on an H200), ``ours-int8-deferred`` /
``ours-fp8-deferred`` two-level P.V with each block's add a trip late and
``ours-int8-twolevel`` / ``ours-fp8-twolevel`` added at once (``ours-int8`` / ``ours-fp8`` run
the autotuner's pick of config and of these two exact forms; the variants run its config); their
``rel_l2_vs_ours_bf16`` is the output's rel-L2 against the bf16 kernel's (bar: 0.03).

    python benchmarks/bench_attention.py                       # both Wan shapes, every family
    python benchmarks/bench_attention.py --shapes 1.3b --masks bernoulli --densities 0.1 1.0
    python benchmarks/bench_attention.py --shapes ltx          # LTX-Video 2B's self-attention

Mask families (``mask_families.py``): ``balanced`` (every row keeps the same number of blocks),
``bernoulli`` (independent blocks, ragged rows), ``local`` (3D windows on the latent grid with
per-head radii, ragged rows); density 1.0 (mask ``all``) is shared by the families.

Impls: ``ours`` (the op, what it picks: FA4 with its one-launch lists where FA4 is installed
and can run, ``ops/fa4_op.fa4_eager_refusal``, else the Triton kernel, with a launch order where
the backend binds one: ``SCALING_ATTN_LAUNCH_ORDER=1``, which keeps the Triton kernel),
``ours-triton`` (our Triton kernel alone, autotuned, programs in index order), ``ours-triton-lpt``
(the same kernel with the backend's longest-first launch order, ``contract/masks.launch_order``:
the A/B pair for the ragged-row tail),
``fa4`` (FlashAttention-4: ``mask none`` is its dense kernel, otherwise block-sparse with our
blocks as full blocks; ``ms`` is the kernel, ``convert_ms`` building its lists from our tables:
on CUDA one Triton kernel since 2026-12-05, ~25 torch ops before, 0.52-0.82 ms on an H100),
``flex`` (compiled FlexAttention, full blocks), ``sdpa-cudnn`` (dense), ``sdpa-flash`` (dense,
opt-in).

Writes ``benchmarks/results/attention-masks-<gpu>.json``: one record per (shape, mask, density,
impl) with median ms (``triton.testing.do_bench``), ``tflops_active`` (4 B H S^2 D x achieved
density / time), ``time_over_d_dense`` (time / (density x the same impl's time at density 1.0),
the ragged-row bar: at most 1.15), ``rel_l2_vs_triton`` and the speedup over dense cuDNN;
and beside it the same path with ``.png``: that ragged-row figure against density.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass, replace

import _common
import mask_families as MF
import torch
import torch.nn.functional as F

from scaling_attn_compile import sparse_attention
from scaling_attn_compile.contract.masks import launch_order
from scaling_attn_compile.kernels.launch import (
    block_sparse_attention_forward,
    launch_order_enabled,
    tuned_configs,
)
from scaling_attn_compile.kernels.launch_q8 import tuned_configs_q8
from scaling_attn_compile.testing import make_qkv

SHAPES = {  # key: (name, B, H, latent grid, head dim); S = F * H * W
    "1.3b": ("wan2.1-1.3B 480x832x81", 1, 12, MF.GRIDS["1.3b"], 128),
    "14b": ("wan2.1-14B 720x1280x81", 1, 40, MF.GRIDS["14b"], 128),
    # LTX-Video 2B at LTXPipeline's default 704x480x161: grid (21, 15, 22); x 28 layers, the
    # attention share of bench_compile's `--models ltx` eager step.
    "ltx": ("ltx-video-2B 704x480x161", 1, 32, (21, 15, 22), 64),
}
IMPLS = ("ours", "ours-triton", "ours-triton-lpt", "fa4", "flex", "sdpa-cudnn")
Q8_IMPLS = ("ours-int8", "ours-fp8", "ours-int8-op", "ours-fp8-op", "ours-int8-tma",
            "ours-fp8-tma", "ours-int8-torchprep", "ours-fp8-torchprep", "ours-int8-runacc",
            "ours-fp8-runacc", "ours-int8-deferred", "ours-fp8-deferred", "ours-int8-twolevel",
            "ours-fp8-twolevel")
RAGGED_BAR = 1.15  # issue 14: time at density d <= 1.15 x d x dense time on ragged rows


@dataclass(frozen=True)
class Record:
    impl: str
    mask: str  # a family, "all" (density 1.0, every family) or "none" (a dense kernel)
    shape: str
    B: int
    H: int
    S: int
    D: int
    target_density: float
    density: float  # achieved: kept blocks / all blocks
    raggedness: float  # std / mean of kept blocks per row
    ms: float
    tflops_active: float
    convert_ms: float | None = None
    rel_l2_vs_triton: float | None = None
    speedup_vs_cudnn_dense: float | None = None
    time_over_d_dense: float | None = None
    rel_l2_vs_ours_bf16: float | None = None
    ms_rounds: list[float] | None = None  # --rounds: each interleaved round's median
    config: dict | None = None  # the kernel config (+ pv), where a row pins one (ours-int8)


def environment() -> dict:
    """The record's env block (bench_energy.py shares it), with FA4's version when installed."""
    try:
        from importlib.metadata import version

        fa4 = version("flash-attn-4")
    except Exception:  # not installed
        fa4 = None
    return _common.environment(torch.cuda.get_device_name(), flash_attn_4=fa4)


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def flex_block_mask(block: torch.Tensor, S: int):
    """Our (B, H, NB, NB) boolean block mask as a FlexAttention BlockMask of *full* blocks (the
    fast path: no mask_mod evaluated inside a block)."""
    from torch.nn.attention.flex_attention import BlockMask

    num = block.sum(-1).to(torch.int32)
    idx = torch.argsort((~block).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=128,
                                    seq_lengths=(S, S))


def mask_plan(families, densities):
    """(mask, target density) pairs to time: density 1.0 once, as ``all``."""
    plan = [("all", 1.0)] if 1.0 in densities else []
    return plan + [(f, d) for f in families for d in densities if d < 1.0]


def interleaved(runs: list, rounds: int) -> list[list[float]]:
    """Each of ``runs`` timed ``rounds`` times, round-robin (A B C A B C ...), so a clock or
    thermal drift over the run lands on every impl alike: one list of medians per run."""
    out = [[] for _ in runs]
    for _ in range(rounds):
        for i, fn in enumerate(runs):
            out[i].append(bench(fn))
    return out


def run_shape(key: str, families, densities, impls: set[str], records: list[Record],
              rounds: int = 1) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from scaling_attn_compile.kernels.fa4 import (
        fa4_available,
        fa4_block_sparse_tensors,
        fa4_forward,
        max_row_blocks,
    )

    name, B, H, grid, D = SHAPES[key]
    S = math.prod(grid)
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda")
    scale = 1 / math.sqrt(D)
    ts = torch.tensor([500.0], device="cuda")

    def record(impl, mask, target, density, ragged, ms, **extra):
        r = Record(impl, mask, name, B, H, S, D, target, density, ragged, ms,
                   4 * B * H * S * S * D * density / ms / 1e9, **extra)
        records.append(r)
        print(f"  {impl:12s} {mask:9s} d {density:.3f} (ragged {ragged:.2f}): {ms:8.3f} ms  "
              f"{r.tflops_active:6.1f} TFLOP/s" +
              (f"  rel-L2 {r.rel_l2_vs_triton:.1e}" if r.rel_l2_vs_triton is not None else "") +
              (f"  convert {r.convert_ms:.3f} ms" if r.convert_ms is not None else ""), flush=True)

    for backend, impl in ((SDPBackend.CUDNN_ATTENTION, "sdpa-cudnn"),
                          (SDPBackend.FLASH_ATTENTION, "sdpa-flash")):
        if impl in impls:
            with sdpa_kernel(backend):
                record(impl, "none", 1.0, 1.0, 0.0,
                       bench(lambda: F.scaled_dot_product_attention(q, k, v)))
    use_fa4 = "fa4" in impls and fa4_available()
    if "fa4" in impls and not use_fa4:
        print("  fa4: skipped (flash_attn.cute does not import, or the GPU is not sm90)")
    if use_fa4:
        fa4_forward(q, k, v, scale)  # JIT-compiles the dense kernel
        record("fa4", "none", 1.0, 1.0, 0.0, bench(lambda: fa4_forward(q, k, v, scale)))
    flex = torch.compile(flex_attention, dynamic=False)
    for mask, target in mask_plan(families, densities):
        block = MF.block_mask("balanced" if mask == "all" else mask, H, grid, target, seed=0)
        masks, lt, bb = (t.cuda() for t in MF.mask_tables(block, grid).layer(0))
        block = block.cuda()[None]  # (1, H, NB, NB)
        density, ragged = block.float().mean().item(), MF.row_raggedness(block)
        timed = []  # (impl, run, extra): timed together, interleaved, after every impl is built
        rec = lambda impl, run, **kw: timed.append((impl, run, kw))  # noqa: B023, E731
        ref = None
        if "ours-triton" in impls:
            out = torch.empty_like(q)
            run = lambda: block_sparse_attention_forward(q, k, v, masks, lt, bb, ts, out, scale)  # noqa: B023, E731
            ref = run().clone()  # autotunes once per shape
            rec("ours-triton", run)
        order = launch_order(masks, lt, S)  # what the backend binds with these tables
        if "ours-triton-lpt" in impls:
            out = torch.empty_like(q)
            run = lambda: block_sparse_attention_forward(q, k, v, masks, lt, bb, ts, out, scale,  # noqa: B023, E731
                                                         launch_order=order)  # noqa: B023
            o = run().clone()
            rec("ours-triton-lpt", run,
                rel_l2_vs_triton=rel_l2(o, ref) if ref is not None else None)
        if "ours" in impls:  # as the backend binds it: the order only with the env switch on
            bound = order if launch_order_enabled() else None
            run = lambda: sparse_attention(q, k, v, masks, lt, bb, ts, scale, launch_order=bound)  # noqa: B023, E731
            o = run()
            rec("ours", run, rel_l2_vs_triton=rel_l2(o, ref) if ref is not None else None)
        if use_fa4:
            K = max_row_blocks(masks, S)  # host sync, once per mask: the bound a backend binds
            conv = lambda: fa4_block_sparse_tensors(masks, lt, bb, ts, B, S, K)  # noqa: B023, E731
            lists = conv()
            o = fa4_forward(q, k, v, scale, lists)  # JIT-compiles the sparse kernel
            rec("fa4", lambda: fa4_forward(q, k, v, scale, lists), convert_ms=bench(conv),  # noqa: B023
                rel_l2_vs_triton=rel_l2(o, ref) if ref is not None else None)
        if "flex" in impls:
            bm = flex_block_mask(block, S)
            o = flex(q, k, v, block_mask=bm, scale=scale)
            rec("flex", lambda: flex(q, k, v, block_mask=bm, scale=scale),  # noqa: B023
                rel_l2_vs_triton=rel_l2(o, ref) if ref is not None else None)
        for prec in ("int8", "fp8"):
            if any(i.startswith(f"ours-{prec}") for i in impls):
                run_q8(prec, q, k, v, masks, lt, bb, ts, scale, ref, impls, rec)
        times = interleaved([run for _, run, _ in timed], rounds)
        for (impl, _, kw), ms in zip(timed, times, strict=True):
            record(impl, mask, target, density, ragged, statistics.median(ms),
                   ms_rounds=ms if rounds > 1 else None, **kw)


def derive(records: list[Record]) -> list[Record]:
    """Fill ``speedup_vs_cudnn_dense`` (dense cuDNN of the same shape) and
    ``time_over_d_dense`` (the impl's own density-1.0 time: ``all`` for sparse impls)."""
    cudnn = {r.shape: r.ms for r in records if r.impl == "sdpa-cudnn"}
    dense = {(r.shape, r.impl): r.ms for r in records if r.mask == "all"}
    out = []
    for r in records:
        extra = {}
        if r.shape in cudnn:
            extra["speedup_vs_cudnn_dense"] = cudnn[r.shape] / r.ms
        if r.mask != "none" and (r.shape, r.impl) in dense:
            extra["time_over_d_dense"] = r.ms / (r.density * dense[r.shape, r.impl])
        out.append(replace(r, **extra))
    return out


def table(records: list[Record]) -> str:
    lines = ["| shape | mask | impl | density | ragged | ms | TFLOP/s (active) | vs cuDNN dense "
             "| t / (d x dense) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        sp = f"{r.speedup_vs_cudnn_dense:.2f}x" if r.speedup_vs_cudnn_dense else ""
        td = f"{r.time_over_d_dense:.2f}" if r.time_over_d_dense is not None else ""
        lines.append(f"| {r.shape} | {r.mask} | {r.impl} | {r.density:.3f} | {r.raggedness:.2f} "
                     f"| {r.ms:.3f} | {r.tflops_active:.0f} | {sp} | {td} |")
    return "\n".join(lines)


def versus_fa4(records: list[Record]) -> str:
    """The issue's bars per (shape, mask, density): ours / FA4 and the Triton kernel / FA4 in
    speed (FA4 time / our time; bars 1.0 and 0.9), index order and longest-first, and the
    ragged-row figure of each (bar 1.15)."""
    by = {(r.shape, r.mask, r.target_density, r.impl): r for r in records}
    nan = float("nan")
    lines = ["| shape | mask | density | ours / fa4 | triton / fa4 | triton-lpt / fa4 "
             "| triton t / (d x dense) | triton-lpt t / (d x dense) |",
             "|---|---|---|---|---|---|---|---|"]
    for (shape, mask, d, impl), r in by.items():
        if impl != "fa4" or mask == "none":
            continue
        o, t, lpt = (by.get((shape, mask, d, i)) for i in ("ours", "ours-triton", "ours-triton-lpt"))
        lines.append(f"| {shape} | {mask} | {r.density:.3f} | "
                     f"{r.ms / o.ms if o else nan:.2f} | "
                     f"{r.ms / t.ms if t else nan:.2f} | "
                     f"{r.ms / lpt.ms if lpt else nan:.2f} | "
                     f"{t.time_over_d_dense if t and t.time_over_d_dense else nan:.2f} | "
                     f"{lpt.time_over_d_dense if lpt and lpt.time_over_d_dense else nan:.2f} |")
    return "\n".join(lines)


def plot(records: list[Record], path: str) -> None:
    """The ragged-row figure: time / (d x dense time) against density, one panel per shape,
    one line per (impl, mask family), the bar at 1.15 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.shape for r in records))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        lines: dict[tuple[str, str], list[Record]] = {}
        for r in records:
            if r.shape == shape and r.time_over_d_dense is not None and r.mask not in ("all", "none"):
                lines.setdefault((r.impl, r.mask), []).append(r)
        for (impl, mask), rs in sorted(lines.items()):
            rs.sort(key=lambda r: r.density)
            ax.plot([r.density for r in rs], [r.time_over_d_dense for r in rs], marker="o",
                    linestyle={"balanced": ":", "bernoulli": "-", "local": "--"}.get(mask, "-"),
                    label=f"{impl} {mask}")
        ax.axhline(RAGGED_BAR, color="k", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("density (kept blocks)")
        ax.set_ylabel("time / (d x dense time)")
        ax.set_title(shape, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_q8(prec, q, k, v, masks, lt, bb, ts, scale, out_bf16, impls, rec):
    """The 8-bit kernel alone (inputs quantized once) and the op (pre-pass + kernel); ``rec``
    takes (impl, the call to time, record fields)."""
    from scaling_attn_compile.contract.quant import rel_l2 as q_rel_l2
    from scaling_attn_compile.kernels.launch_q8 import (
        CONFIGS_Q8_TMA,
        launch_quantized,
        pick_config_q8,
        quantize_for_kernel,
    )

    quant = quantize_for_kernel(q, k, v, prec)
    o8 = torch.empty_like(q)
    cfg, pv = pick_config_q8(quant, q, masks, lt, bb, ts, o8, scale, prec)  # what the op runs
    launch_quantized(quant, q.shape, masks, lt, bb, ts, o8, scale, prec, cfg, pv=pv)
    rel = q_rel_l2(o8, out_bf16) if out_bf16 is not None else None
    op = torch.ops.scaling_attn.sparse_attention_q8
    if f"ours-{prec}" in impls:
        rec(f"ours-{prec}", lambda: launch_quantized(
            quant, q.shape, masks, lt, bb, ts, o8, scale, prec, cfg, pv=pv),
            rel_l2_vs_ours_bf16=rel, config={**cfg._asdict(), "pv": pv})
    if f"ours-{prec}-op" in impls:
        rec(f"ours-{prec}-op", lambda: op(q, k, v, masks, lt, bb, ts, scale, prec),
            rel_l2_vs_ours_bf16=rel)

    def variant(name, c, config=None, **kw):  # a kernel variant on the same codes, own output
        o = torch.empty_like(q)
        launch_quantized(quant, q.shape, masks, lt, bb, ts, o, scale, prec, c, **kw)
        rec(name, lambda: launch_quantized(quant, q.shape, masks, lt, bb, ts, o, scale, prec, c,
                                           **kw),
            rel_l2_vs_ours_bf16=q_rel_l2(o, out_bf16) if out_bf16 is not None else None,
            config=config)

    # The P.V forms at the autotuned config (which raced two-level and deferred with each)
    if f"ours-{prec}-runacc" in impls:  # P.V into the running accumulator (opt-in, inexact)
        variant(f"ours-{prec}-runacc", cfg, pv="running")
    if f"ours-{prec}-deferred" in impls:  # two-level, each block's P.V added a trip late
        variant(f"ours-{prec}-deferred", cfg, pv="deferred")
    if f"ours-{prec}-twolevel" in impls:  # each block's P.V added in fp32 at once
        variant(f"ours-{prec}-twolevel", cfg, pv="two-level")
    if f"ours-{prec}-torchprep" in impls:  # the op's work with the torch pre-pass (the spec's)
        rec(f"ours-{prec}-torchprep", lambda: launch_quantized(
            quantize_for_kernel(q, k, v, prec, impl="torch"), q.shape, masks, lt, bb, ts, o8,
            scale, prec, cfg, pv=pv), rel_l2_vs_ours_bf16=rel)
    if f"ours-{prec}-tma" in impls:  # the TMA configs, not autotune candidates: each timed
        for c in CONFIGS_Q8_TMA:
            variant(f"ours-{prec}-tma", c, config=c._asdict())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["1.3b", "14b"], choices=list(SHAPES))
    ap.add_argument("--masks", nargs="+", default=list(MF.FAMILIES), choices=list(MF.FAMILIES))
    ap.add_argument("--densities", nargs="+", type=float, default=list(MF.DENSITIES))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=[*IMPLS, "sdpa-flash", *Q8_IMPLS],
                    help=f"default {' '.join(IMPLS)}; also sdpa-flash and the 8-bit rows "
                         f"{' '.join(Q8_IMPLS)} (ours-triton gives their bf16 reference)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every impl of a mask this many times, interleaved (A B A B ...), "
                         "and record the median of the rounds' medians: an A/B whose gap is a "
                         "few percent needs it (the launch-order A/B's dense pair, identical "
                         "work, differed by 2.8%% timed one after the other)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/attention-masks-<gpu>.json)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds: at least 1, got {args.rounds}")
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    print(env, flush=True)
    records: list[Record] = []
    for key in args.shapes:
        print(f"== {SHAPES[key][0]}", flush=True)
        run_shape(key, args.masks, args.densities, set(args.impls), records, args.rounds)
    records = derive(records)
    print("\n" + table(records) + "\n\n" + versus_fa4(records))
    tuned = {f"{prefix}{k}": {"chosen": v, "ms_by_config": {str(c): t for c, t in times.items()}}
             for prefix, configs in (("", tuned_configs()), ("q8 ", tuned_configs_q8()))
             for k, (v, times) in configs.items()}  # the bf16 kernel's, then the 8-bit one's
    gpu = _common.gpu_slug(env["gpu"])
    path = args.out or os.path.join(os.path.dirname(__file__), "results",
                                    f"attention-masks-{gpu}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"env": env, "ragged_bar": RAGGED_BAR, "tuned_configs": tuned,
                   "records": [asdict(r) for r in records]}, f, indent=1)
    plot(records, path.removesuffix(".json") + ".png")
    print(f"wrote {path} and its .png (the ragged-row figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
