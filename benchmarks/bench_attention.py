"""Question: how fast is our block-sparse kernel against SDPA (cuDNN, flash) and compiled
FlexAttention given the identical block mask, at Wan2.1 self-attention shapes? And the 8-bit
kernel (issue 15): ``ours-int8`` / ``ours-fp8`` time the kernel on pre-quantized inputs,
``ours-int8-op`` / ``ours-fp8-op`` the op with its quantize pre-pass; their
``rel_l2_vs_ours_bf16`` is the output's rel-L2 against the bf16 kernel's (bar: 0.03).

    python benchmarks/bench_attention.py                 # both Wan shapes, bf16, on the GPU
    python benchmarks/bench_attention.py --shapes 1.3b   # just the 1.3B / 480p shape

Prints a table and writes ``benchmarks/results/attention-<gpu>.json``: one record per
(impl, shape, density) with median ms (``triton.testing.do_bench``), TFLOP/s on active blocks
(4 * B * H * S^2 * D * density / time, density = kept blocks / all blocks of the mask actually
used) and speedup over dense cuDNN, plus GPU, torch, triton and git SHA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import _common
import torch
import torch.nn.functional as F

from scaling_attn_compile import sparse_attention
from scaling_attn_compile.contract.masks import unpack_blocks
from scaling_attn_compile.contract.tables import uniform_tables
from scaling_attn_compile.kernels.launch import tuned_configs
from scaling_attn_compile.testing import make_qkv

SHAPES = {  # name: (B, H, S, D)
    "1.3b": ("wan2.1-1.3B 480x832x81", 1, 12, 32760, 128),
    "14b": ("wan2.1-14B 720x1280x81", 1, 40, 75600, 128),
}
DENSITIES = (1.0, 0.5, 0.25, 0.1)


@dataclass(frozen=True)
class Record:
    impl: str
    shape: str
    B: int
    H: int
    S: int
    D: int
    density: float
    ms: float
    tflops_active: float
    speedup_vs_cudnn_dense: float | None = None
    max_abs_err_vs_flex: float | None = None
    rel_l2_vs_ours_bf16: float | None = None


def environment() -> dict:
    return _common.environment(torch.cuda.get_device_name())


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def flex_block_mask(block: torch.Tensor, S: int):
    """Our (B, H, NB, NB) boolean block mask as a FlexAttention BlockMask of *full* blocks (the
    fast path: no mask_mod evaluated inside a block)."""
    from torch.nn.attention.flex_attention import BlockMask

    num = block.sum(-1).to(torch.int32)
    idx = torch.argsort((~block).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=128,
                                    seq_lengths=(S, S))


def run_shape(key: str, densities, records: list[Record], impls: set[str]) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    name, B, H, S, D = SHAPES[key]
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda")
    scale = 1 / math.sqrt(D)
    flops_dense = 4 * B * H * S * S * D
    ts = torch.tensor([500.0], device="cuda")

    def record(impl, density, ms, err=None, rel=None):
        records.append(Record(impl, name, B, H, S, D, density, ms,
                              flops_dense * density / ms / 1e9, None, err, rel))
        print(f"  {impl:12s} density {density:.3f}: {ms:8.3f} ms  "
              f"{records[-1].tflops_active:6.1f} TFLOP/s" + (f"  err {err:.2e}" if err else ""),
              flush=True)

    for backend, impl in ((SDPBackend.CUDNN_ATTENTION, "sdpa-cudnn"),
                          (SDPBackend.FLASH_ATTENTION, "sdpa-flash")):
        if impl in impls:
            with sdpa_kernel(backend):
                record(impl, 1.0, bench(lambda: F.scaled_dot_product_attention(q, k, v)))
    flex = torch.compile(flex_attention, dynamic=False)
    for target in densities:
        tables = uniform_tables(1, H, (1, 1, S), target, seed=0, pattern="random").to("cuda")
        masks, lt, bb = tables.layer(0)
        block = unpack_blocks(masks[:, 0], masks.shape[2])[None]  # (1, H, NB, NB)
        density = block.float().mean().item()
        out = None
        if "ours" in impls:
            out = sparse_attention(q, k, v, masks, lt, bb, ts, scale)  # autotunes once
            ms = bench(lambda: sparse_attention(q, k, v, masks, lt, bb, ts, scale))  # noqa: B023
        err = None
        if "flex" in impls:
            bm = flex_block_mask(block, S)
            ref = flex(q, k, v, block_mask=bm, scale=scale)
            err = (out.float() - ref.float()).abs().max().item() if out is not None else None
            record("flex", density, bench(lambda: flex(q, k, v, block_mask=bm, scale=scale)))  # noqa: B023
        if out is not None:
            record("ours", density, ms, err)
        for prec in ("int8", "fp8"):
            if f"ours-{prec}" in impls or f"ours-{prec}-op" in impls:
                run_q8(prec, q, k, v, masks, lt, bb, ts, scale, density, out, impls, record)


def run_q8(prec, q, k, v, masks, lt, bb, ts, scale, density, out_bf16, impls, record):
    """The 8-bit kernel alone (inputs quantized once) and the op (pre-pass + kernel)."""
    from scaling_attn_compile.contract.quant import rel_l2
    from scaling_attn_compile.kernels.launch_q8 import (
        launch_quantized,
        pick_config_q8,
        quantize_for_kernel,
    )

    quant = quantize_for_kernel(q, k, v, prec)
    o8 = torch.empty_like(q)
    cfg = pick_config_q8(quant, q, masks, lt, bb, ts, o8, scale, prec)
    launch_quantized(quant, q.shape, masks, lt, bb, ts, o8, scale, prec, cfg)
    rel = rel_l2(o8, out_bf16) if out_bf16 is not None else None
    op = torch.ops.scaling_attn.sparse_attention_q8
    if f"ours-{prec}" in impls:
        record(f"ours-{prec}", density, bench(lambda: launch_quantized(
            quant, q.shape, masks, lt, bb, ts, o8, scale, prec, cfg)), None, rel)
    if f"ours-{prec}-op" in impls:
        record(f"ours-{prec}-op", density,
               bench(lambda: op(q, k, v, masks, lt, bb, ts, scale, prec)), None, rel)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    ap.add_argument("--impls", nargs="+", default=["ours", "flex", "sdpa-cudnn", "sdpa-flash",
                                                   "ours-int8", "ours-fp8", "ours-int8-op"])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention-<gpu>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    print(env, flush=True)
    records: list[Record] = []
    for key in args.shapes:
        print(f"== {SHAPES[key][0]}", flush=True)
        run_shape(key, args.densities, records, set(args.impls))
    # Speedup over dense cuDNN of the same shape.
    cudnn = {r.shape: r.ms for r in records if r.impl == "sdpa-cudnn"}
    records = [Record(**{**asdict(r), "speedup_vs_cudnn_dense": cudnn[r.shape] / r.ms})
               if r.shape in cudnn else r for r in records]
    print("\n| shape | impl | density | ms | TFLOP/s (active) | speedup vs cuDNN dense |")
    print("|---|---|---|---|---|---|")
    for r in records:
        sp = f"{r.speedup_vs_cudnn_dense:.2f}x" if r.speedup_vs_cudnn_dense else ""
        print(f"| {r.shape} | {r.impl} | {r.density:.3f} | {r.ms:.3f} | {r.tflops_active:.0f} | {sp} |")
    tuned = {str(k): {"chosen": v, "ms_by_config": {str(c): t for c, t in times.items()}}
             for k, (v, times) in tuned_configs().items()}
    gpu = _common.gpu_slug(env["gpu"])
    path = args.out or os.path.join(os.path.dirname(__file__), "results", f"attention-{gpu}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"env": env, "tuned_configs": tuned,
                   "records": [asdict(r) for r in records]}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
