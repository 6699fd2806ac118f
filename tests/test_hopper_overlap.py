"""``benchmarks/hopper_overlap.py``'s study kernels compute the op's attention: each list-walk
variant (plain, warp-specialised, pipelined) against the reference on a ragged mask, in the
interpreter on the CPU (on the GPU the benchmark checks each against our kernel itself)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.kernels.fa4 import fa4_block_sparse_tensors
from scaling_attn_compile.testing import load_module, make_qkv

ROOT = Path(__file__).resolve().parent.parent
MF = load_module(ROOT / "benchmarks" / "mask_families.py", "mask_families")
HO = load_module(ROOT / "benchmarks" / "hopper_overlap.py", "hopper_overlap")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter test")
@pytest.mark.parametrize("variant", HO.LIST_VARIANTS, ids=[v[0] for v in HO.LIST_VARIANTS])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_list_kernels_match_the_reference(variant, density):
    if variant[5] and density < 1.0:
        pytest.skip("the all-blocks loop is for all-blocks masks only")
    grid, B, H, D = (2, 8, 24), 1, 2, 64  # 384 tokens, 3 blocks a row: rows of 1 to 3 blocks
    S = grid[0] * grid[1] * grid[2]
    q, k, v = (t.contiguous() for t in make_qkv(B, H, S, D, dtype=torch.float32, seed=5))
    masks, lt, bb = MF.mask_tables(MF.block_mask("bernoulli", H, grid, density, seed=5),
                                   grid).layer(0)
    ts = torch.tensor([500.0])
    cnt, idx, _, _ = fa4_block_sparse_tensors(masks, lt, bb, ts, B, S, impl="torch")
    out = torch.full_like(q, float("nan"))
    HO.run_list(variant, q, k, v, (cnt.contiguous(), idx.contiguous()), out, D ** -0.5)
    ref = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
