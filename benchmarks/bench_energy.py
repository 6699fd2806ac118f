"""Question: what does the online energy filter (cumulative energy, and BLASST as the baseline)
buy at Wan2.1 self-attention shapes: fraction of visited blocks it skips, attention speedup over
the same static mask without the filter, and output error against dense attention, across its
threshold, alone (dense mask) and on top of a static mask at density 0.25?

    python benchmarks/bench_energy.py                       # 1.3B / 480p shape, on the GPU
    python benchmarks/bench_energy.py --shapes 1.3b 14b     # and 14B / 720p
    python benchmarks/bench_energy.py --precision int8      # the 8-bit kernel (issue 15)

Two kinds of input, because what the filter can skip depends entirely on how peaked attention is:
``random`` (i.i.d. Gaussian q, k, v: attention close to uniform, nothing is negligible) and
``local`` (q, k carry random Fourier features of each token's 3D latent position, so a token's
logits fall off with distance in frames, rows and columns like a video DiT's local heads; the
``--logit-range`` knob sets how far above the background the nearest keys sit). Neither is a real
model's activations: read the numbers as what the kernel does for a given attention shape.

Writes ``benchmarks/results/energy-<gpu>.json`` (or ``--out``): one record per (shape, input,
static density, rule, threshold) with median ms (``triton.testing.do_bench``), skipped / visited
blocks, speedup over the unfiltered kernel on the same mask, and relative L2 error against dense
SDPA and against the unfiltered kernel on the same mask. With ``--precision int8`` / ``fp8`` the
8-bit kernel runs on inputs quantized once (config 128/8/2, two-level P.V: what its autotuner
races with the filter); it reports no skipped-block count (``skipped_fraction`` is null).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from scaling_attn_compile.contract.masks import ENERGY_RULES, num_blocks, unpack_blocks
from scaling_attn_compile.contract.tables import uniform_tables
from scaling_attn_compile.kernels import launch as kernel
from scaling_attn_compile.ops.op import lambda_from_recall
from scaling_attn_compile.testing import make_qkv
from scaling_attn_compile.tiny.metrics import rel_l2

RESULTS = Path(__file__).parent / "results"
SHAPES = {  # name: (label, H, (F, H, W) latent grid after patching, head_dim)
    "1.3b": ("wan2.1-1.3B 480x832x81", 12, (21, 30, 52), 128),
    "14b": ("wan2.1-14B 720x1280x81", 40, (21, 45, 80), 128),
}
# Cumulative energy: the paper's P_real knob (lambda = ln P_real + ln(Bc / L)); BLASST: lambda_B.
P_REAL = (0.1, 0.5, 1.46, 5.0, 20.0)
BLASST_LAMBDA = (1e-4, 1e-3, 1e-2, 5e-2)


def local_qkv(H: int, grid: tuple[int, int, int], D: int, logit_range: float, seed: int = 0):
    """q, k, v whose logits fall off with 3D distance: random Fourier features of the token's
    (frame, row, column), a length scale of a few tokens, drawn per head; q is scaled so the
    nearest keys sit ``logit_range`` nats above far ones, and a little noise keeps ties apart."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    f, h, w = grid
    pos = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w),
                                     indexing="ij"), -1).reshape(-1, 3).float()  # (S, 3)
    qs, ks = [], []
    for _ in range(H):
        ell = torch.tensor([1.5, 3.0, 3.0]) * (0.5 + torch.rand(3, generator=g))  # per axis
        freq = torch.randn(D // 2, 3, generator=g) / ell  # RBF kernel of those length scales
        phase = pos @ freq.T  # (S, D/2)
        phi = torch.cat([phase.cos(), phase.sin()], -1) / math.sqrt(D // 2)  # phi.phi' = RBF
        qs.append(phi * logit_range * math.sqrt(D) + 0.1 * torch.randn(phi.shape, generator=g))
        ks.append(phi + 0.1 / math.sqrt(D) * torch.randn(phi.shape, generator=g))
    v = torch.randn(len(pos), H, D, generator=g)
    to = lambda t: t.to("cuda", torch.bfloat16)[None].permute(0, 2, 1, 3)  # noqa: E731
    return to(torch.stack(qs, 1)), to(torch.stack(ks, 1)), to(v)


def run(shape: str, inputs: str, densities, logit_range: float, records: list,
        precision: str = "bf16") -> None:
    from triton.testing import do_bench

    from scaling_attn_compile.kernels import launch_q8

    label, H, grid, D = SHAPES[shape]
    S = math.prod(grid)
    if inputs == "random":
        q, k, v = make_qkv(1, H, S, D, dtype=torch.bfloat16, device="cuda")
    else:
        q, k, v = local_qkv(H, grid, D, logit_range)
    scale = D**-0.5
    ts = torch.tensor([500.0], device="cuda")
    dense = F.scaled_dot_product_attention(q, k, v, scale=scale)
    cfg = kernel.KernelConfig(128, 8, 3)  # the filter needs BLOCK_M 128; pinned for comparability
    quant = None
    if precision != "bf16":
        cfg = kernel.KernelConfig(128, 8, 2)
        quant = launch_q8.quantize_for_kernel(q, k, v, precision)
    skipped = torch.zeros(H, num_blocks(S), dtype=torch.int32, device="cuda")  # per program
    for density in densities:
        tables = uniform_tables(1, H, grid, density, pattern="local").to("cuda")
        masks, lt, bb = tables.layer(0)
        visited = unpack_blocks(masks[:, 0], masks.shape[2]).sum().item()

        def launch(rule=0, thr=float("-inf"), out=None, skip=None):  # used in this iteration only
            out = torch.empty_like(q) if out is None else out
            if quant is not None:  # the 8-bit kernel: no skipped counts
                return launch_q8.launch_quantized(
                    quant, q.shape, masks, lt, bb, ts, out, scale, precision, cfg,  # noqa: B023
                    energy_rule=rule, energy_threshold=thr)
            return kernel.block_sparse_attention_forward(
                q, k, v, masks, lt, bb, ts, out, scale, cfg, energy_rule=rule,  # noqa: B023
                energy_threshold=thr, skipped=skip)

        base = launch()
        base_ms = do_bench(lambda o=base: launch(out=o), warmup=25, rep=100, return_mode="median")
        settings = [("off", float("-inf"), None)]
        settings += [("cumulative", lambda_from_recall(p, S), p) for p in P_REAL]
        settings += [("blasst", math.log(lb), lb) for lb in BLASST_LAMBDA]
        for rule, thr, knob in settings:
            code = 0 if rule == "off" else ENERGY_RULES[rule]
            skipped.zero_()
            out = launch(code, thr, skip=skipped)
            ms = base_ms if rule == "off" else do_bench(
                lambda: launch(code, thr, out=out), warmup=25, rep=100, return_mode="median")  # noqa: B023
            counted = quant is None
            rec = dict(shape=label, S=S, H=H, D=D, inputs=inputs, logit_range=logit_range,
                       precision=precision,
                       static_density=visited / (H * masks.shape[2] ** 2), rule=rule, knob=knob,
                       threshold=thr, ms=ms,
                       skipped_fraction=skipped.sum().item() / visited if counted else None,
                       speedup_vs_unfiltered=base_ms / ms, rel_l2_vs_dense=rel_l2(out, dense),
                       rel_l2_vs_unfiltered=rel_l2(out, base))
            records.append(rec)
            frac = "   n/a" if not counted else f"{rec['skipped_fraction']:6.1%}"
            print(f"{shape} {precision} {inputs:6s} density {rec['static_density']:.3f} "
                  f"{rule:10s} knob {knob!s:7s} {ms:7.3f} ms  skipped {frac}  "
                  f"x{rec['speedup_vs_unfiltered']:.2f}  relL2 vs dense {rec['rel_l2_vs_dense']:.2e} "
                  f"vs unfiltered {rec['rel_l2_vs_unfiltered']:.2e}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["1.3b"], choices=list(SHAPES))
    ap.add_argument("--inputs", nargs="+", default=["local", "random"], choices=["local", "random"])
    ap.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.25])
    ap.add_argument("--logit-range", type=float, default=12.0,
                    help="local inputs: nats between the nearest and the far keys (default 12)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "int8", "fp8"],
                    help="the bf16 kernel (default) or the 8-bit one")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_energy: needs a CUDA GPU", file=sys.stderr)
        return 1
    from bench_attention import environment

    records: list = []
    for shape in args.shapes:
        for inputs in args.inputs:
            run(shape, inputs, args.densities, args.logit_range, records, args.precision)
    out = args.out or RESULTS / f"energy-{torch.cuda.get_device_name().lower().replace(' ', '-')}.json"
    out.write_text(json.dumps({**environment(), "records": records},
                              indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
