"""Run the block-sparse kernel once per tile config on deliberately bad tables, for
``compute-sanitizer`` (memcheck / racecheck) to watch:

    compute-sanitizer --tool memcheck python benchmarks/sanitize_bad_tables.py

Bad values: levels -1, L, INT32_MIN, INT32_MAX and L + 5; every mask bit past the last block
set, plus a spare word of ones; a +inf and a NaN timestep over 3 bounds (padded to 4 lanes). At
S = 1000 (partial last block) and S = 1024 (even), B = 2, H = 2, D = 128, bf16. The inputs are
made on the CPU and the reference runs there, so the GPU runs little besides the kernel. Each
output is compared with the reference's defined behaviour; exit status 1 on a mismatch.
"""

from __future__ import annotations

import sys

import torch

from scaling_attn_compile.contract.masks import num_blocks, pack_blocks
from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.kernels.launch import CONFIGS, block_sparse_attention_forward
from scaling_attn_compile.testing import make_qkv


def bad_tables(H: int, S: int, L: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(S)
    masks = pack_blocks(torch.rand(H, L, nb, nb, generator=g) < 0.3)
    masks[..., -1] |= torch.tensor(-(1 << (nb % 32)), dtype=torch.int32)  # bits >= NB (nb < 32)
    masks = torch.cat([masks, torch.full_like(masks, -1)], -1)  # a spare word, all ones
    lt = torch.tensor([[-1, L], [-(2**31), 2**31 - 1], [1, 2], [L + 5, -7]], dtype=torch.int32)
    bounds = torch.tensor([200.0, 500.0, 800.0])
    return masks, lt, bounds


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_bad_tables: needs a CUDA GPU", file=sys.stderr)
        return 2
    B, H, D = 2, 2, 128
    ok = True
    for S in (1000, 1024):
        q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, seed=S)
        masks, lt, bb = bad_tables(H, S)
        ts = torch.tensor([float("inf"), float("nan")])
        golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5,
                                            compute_dtype=torch.float64)
        gpu = [t.cuda() for t in (q, k, v, masks, lt, bb, ts)]
        for cfg in CONFIGS:
            out = torch.full_like(gpu[0], float("nan"))
            block_sparse_attention_forward(*gpu, out, D**-0.5, cfg)
            torch.cuda.synchronize()
            err = (out.cpu().double() - golden).abs().max().item()
            good = err < 2e-2  # bf16 output, |out| < 1: a few rounding steps of 2**-8
            ok &= good
            print(f"S={S} {cfg}: max abs error vs reference {err:.2e} {'ok' if good else 'FAIL'}",
                  flush=True)
    print("all outputs match the reference" if ok else "SOME OUTPUTS DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
