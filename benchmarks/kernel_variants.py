"""Question: which kernel variant (tile shape, pipelining depth, TMA loads, warp specialisation)
is fastest at the Wan2.1-1.3B 480p shape, dense and at density 0.25? Each variant's output is
checked against the default variant's before it is timed.

    python benchmarks/kernel_variants.py [--out FILE]
"""

import argparse
import json
import sys

import torch

from scaling_attn_compile.contract.tables import uniform_tables
from scaling_attn_compile.kernels.launch import KernelConfig, block_sparse_attention_forward
from scaling_attn_compile.testing import make_qkv

VARIANTS = [
    KernelConfig(128, 8, 3),
    KernelConfig(128, 8, 4),
    KernelConfig(128, 8, 2, use_tma=True),
    KernelConfig(128, 8, 3, use_tma=True),
    KernelConfig(128, 8, 4, use_tma=True),
    KernelConfig(128, 8, 3, use_tma=False, warp_specialize=True),
    KernelConfig(128, 8, 3, use_tma=True, warp_specialize=True),
    KernelConfig(128, 8, 2, use_tma=True, warp_specialize=True),
]


def main(argv=None):
    from triton.testing import do_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--S", type=int, default=32760)
    ap.add_argument("--H", type=int, default=12)
    args = ap.parse_args(argv)
    B, H, S, D = 1, args.H, args.S, 128
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda")
    ts = torch.tensor([500.0], device="cuda")
    rows = []
    for density in (1.0, 0.25):
        tables = uniform_tables(1, H, (1, 1, S), density).to("cuda")
        masks, lt, bb = tables.layer(0)
        base = torch.empty_like(q)
        block_sparse_attention_forward(q, k, v, masks, lt, bb, ts, base, D**-0.5, VARIANTS[0])
        for cfg in VARIANTS:
            out = torch.full_like(q, float("nan"))
            try:
                block_sparse_attention_forward(q, k, v, masks, lt, bb, ts, out, D**-0.5, cfg)
                err = (out.float() - base.float()).abs().max().item()
                ms = do_bench(lambda c=cfg, o=out: block_sparse_attention_forward(
                    q, k, v, masks, lt, bb, ts, o, D**-0.5, c), warmup=25, rep=100,  # noqa: B023
                    return_mode="median")
            except Exception as e:  # report and go on: a variant may not compile on this triton
                print(f"{cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                rows.append({"config": cfg._asdict(), "density": density, "error": str(e)[:300]})
                continue
            tf = 4 * B * H * S * S * D * density / ms / 1e9
            print(f"density {density}: {cfg} {ms:.3f} ms {tf:.0f} TFLOP/s (nominal) "
                  f"max|diff vs base| {err:.2e}", flush=True)
            rows.append({"config": cfg._asdict(), "density": density, "ms": ms,
                         "max_abs_diff_vs_base": err})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "S": S, "H": H, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
