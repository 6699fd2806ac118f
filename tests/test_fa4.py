"""``kernels/fa4.py``: our tables -> FlashAttention-4's block-sparse lists (CPU, against a
pure-Python decoding of both formats), and FA4's block-sparse forward against the reference
(GPU tests: skipped without CUDA or ``flash_attn.cute``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaling_attn_compile.contract.masks import num_blocks, num_words
from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.kernels.fa4 import (
    fa4_available,
    fa4_block_sparse_attention,
    fa4_block_sparse_tensors,
    fa4_forward,
    max_row_blocks,
)
from scaling_attn_compile.testing import assert_close_to_oracle, make_qkv


def raw_tables(H, S, levels, buckets, seed, extra_words=0):
    """Random words with ragged rows: each row's keep probability differs (empty rows, full
    rows, and everything between), stray bits past NB set, some levels out of range."""
    g = torch.Generator().manual_seed(seed)
    nw = num_words(S) + extra_words
    p = torch.rand(H, levels, num_blocks(S), 1, 1, generator=g)  # per-row density
    p[:, :, 0] = 0.0  # first row of each level: only the diagonal survives
    bits = torch.rand(H, levels, num_blocks(S), nw, 32, generator=g) < p
    bits[:, :, -1] = True  # last row of each level: every block (and every stray bit)
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    masks = ((bits.long() * weights).sum(-1) & 0xFFFFFFFF)
    masks = torch.where(masks >= 2**31, masks - 2**32, masks).to(torch.int32)
    level_table = torch.randint(-1, levels + 1, (buckets, H), generator=g, dtype=torch.int32)
    bounds = torch.sort(torch.rand(buckets - 1, generator=g) * 1000).values
    return masks, level_table, bounds


def python_rows(masks, level_table, bounds, timestep, batch, S):
    """Our format decoded with Python ints, per the contract: {(b, h, u): sorted kept blocks}."""
    nb = num_blocks(S)
    ts = [float(t) for t in timestep.reshape(-1).tolist()]
    ts = ts * batch if len(ts) == 1 else ts
    levels = masks.shape[1]
    rows = {}
    for b in range(batch):
        bucket = sum(1 for x in bounds.tolist() if x <= ts[b])  # NaN: no comparison is true
        for h in range(masks.shape[0]):
            lvl = min(max(int(level_table[bucket, h]), 0), levels - 1)
            for u in range(nb):
                words = [int(w) & 0xFFFFFFFF for w in masks[h, lvl, u].tolist()]
                kept = {j for j in range(nb) if (words[j // 32] >> (j % 32)) & 1}
                rows[b, h, u] = sorted(kept | {u})
    return rows


def python_fa4_rows(full_cnt, full_idx, mask_cnt):
    """FA4's format decoded: the list entries ``[0, count)`` per row, checked ascending."""
    rows = {}
    B, H, NB = full_cnt.shape
    for b in range(B):
        for h in range(H):
            for u in range(NB):
                assert int(mask_cnt[b, h, u]) == 0, "no partial (mask_mod) blocks"
                lst = full_idx[b, h, u, :int(full_cnt[b, h, u])].tolist()
                assert lst == sorted(set(lst)), f"row {(b, h, u)} must ascend: {lst}"
                rows[b, h, u] = lst
    return rows


@pytest.mark.parametrize("S,extra_words", [(100, 0), (128 * 32, 0), (128 * 37 + 5, 0),
                                           (128 * 37 + 5, 1), (128 * 70 - 1, 0)])
@pytest.mark.parametrize("timestep", [[950.0, 10.0], [float("nan"), 1e9], [400.0]])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_conversion_matches_python_decoding(S, extra_words, timestep, impl):
    H, L, NT = 3, 3, 4
    masks, lt, bb = raw_tables(H, S, L, NT, seed=S + extra_words, extra_words=extra_words)
    ts = torch.tensor(timestep)
    B = 2
    full_cnt, full_idx, mask_cnt, mask_idx = fa4_block_sparse_tensors(masks, lt, bb, ts, B, S,
                                                                       impl=impl)
    if impl == "triton":  # the same tensors as the torch form, zeros past each count included
        for got, want in zip((full_cnt, full_idx, mask_cnt, mask_idx),
                             fa4_block_sparse_tensors(masks, lt, bb, ts, B, S, impl="torch"),
                             strict=True):
            assert torch.equal(got, want)
    nb = num_blocks(S)
    assert full_cnt.shape == mask_cnt.shape == (B, H, nb) and full_idx.shape == (B, H, nb, nb)
    assert mask_idx.shape == (B, H, nb, 1)
    assert all(t.dtype == torch.int32 for t in (full_cnt, full_idx, mask_cnt, mask_idx))
    want = python_rows(masks, lt, bb, ts, B, S)
    got = python_fa4_rows(full_cnt, full_idx, mask_cnt)
    assert got == want
    lengths = [len(r) for r in want.values()]
    if nb > 2:  # the tables really are ragged: an only-diagonal row and a full one
        assert min(lengths) == 1 and max(lengths) == nb


def test_max_blocks_shortens_lists_and_max_row_blocks_fits_every_level():
    S, H, L = 128 * 45 + 17, 2, 3
    masks, lt, bb = raw_tables(H, S, L, 2, seed=1)
    # Thin the tables so the longest row is short of NB.
    masks = masks & torch.tensor(0x01010101, dtype=torch.int32)
    masks[:, :, -1] = 0
    k = max_row_blocks(masks, S)
    nb = num_blocks(S)
    longest = max(len(r) for t in range(L) for r in python_rows(
        masks, torch.arange(L, dtype=torch.int32)[:, None].expand(L, H), torch.arange(1., L),
        torch.tensor([float(t)]), 1, S).values())
    assert k == longest < nb
    for t in (0.0, 999.0):
        ts = torch.tensor([t])
        full = fa4_block_sparse_tensors(masks, lt, bb, ts, 1, S)
        short = fa4_block_sparse_tensors(masks, lt, bb, ts, 1, S, max_blocks=k)
        assert short[1].shape[-1] == k
        assert torch.equal(full[0], short[0]) and torch.equal(full[1][..., :k], short[1])
    # Too short a list: counts are clamped so nothing past the list is read.
    clipped = fa4_block_sparse_tensors(masks, lt, bb, torch.tensor([0.0]), 1, S, max_blocks=2)
    assert int(clipped[0].max()) == 2
    # The kernel keeps the first K blocks of a row and clamps the count the same way.
    for kk in (2, k):
        for t in (0.0, 999.0):
            ts = torch.tensor([t])
            for got, want in zip(
                    fa4_block_sparse_tensors(masks, lt, bb, ts, 1, S, kk, impl="triton"),
                    fa4_block_sparse_tensors(masks, lt, bb, ts, 1, S, kk, impl="torch"),
                    strict=True):
                assert torch.equal(got, want)
    with pytest.raises(ValueError, match="max_blocks"):
        fa4_block_sparse_tensors(masks, lt, bb, torch.tensor([0.0]), 1, S, max_blocks=nb + 1)


def test_conversion_traces_without_a_graph_break():
    """No .item() or data-dependent shape: one graph under fullgraph=True (what CUDA-graph
    capture and an Inductor extern need)."""
    S, H = 128 * 9 + 3, 2
    masks, lt, bb = raw_tables(H, S, 2, 3, seed=5)
    ts = torch.tensor([700.0, 3.0])
    fn = torch.compile(fa4_block_sparse_tensors, fullgraph=True, backend="eager", dynamic=False)
    eager = fa4_block_sparse_tensors(masks, lt, bb, ts, 2, S)
    for got, want in zip(fn(masks, lt, bb, ts, 2, S), eager, strict=True):
        assert torch.equal(got, want)


def test_fa4_refuses_cpu_tensors_in_one_line():
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    masks, lt, bb = raw_tables(2, 256, 1, 1, seed=0)
    if not torch.cuda.is_available():
        assert not fa4_available()
    with pytest.raises(ValueError, match="CUDA device"):
        fa4_block_sparse_attention(q, q, q, masks, lt, bb, torch.tensor(1.0), 0.1)
    with pytest.raises(ValueError, match="head_dim"):
        z = torch.zeros(1, 2, 256, 192, dtype=torch.bfloat16)
        fa4_block_sparse_attention(z, z, z, masks, lt, bb, torch.tensor(1.0), 0.1)


needs_fa4 = pytest.mark.skipif(not fa4_available(), reason="needs flash_attn.cute on an sm90 GPU")


def gpu_tables(H, S, levels, buckets, seed, p):
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(S)
    from scaling_attn_compile.contract.masks import pack_blocks

    rows = torch.rand(H, levels, nb, 1, generator=g) * 2 * p  # ragged: densities 0..2p per row
    masks = pack_blocks(torch.rand(H, levels, nb, nb, generator=g) < rows)
    level_table = torch.randint(0, levels, (buckets, H), generator=g, dtype=torch.int32)
    bounds = torch.sort(torch.rand(buckets - 1, generator=g) * 1000).values
    return masks.cuda(), level_table.cuda(), bounds.cuda()


def check(q, k, v, masks, lt, bb, ts, out, scale):
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale,
                                        compute_dtype=torch.float64)
    same = sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale)
    assert_close_to_oracle(out, golden, same, k=3.0, what="FA4 block-sparse")


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("S", [128 * 24, 128 * 24 + 37, 32760])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fa4_block_sparse_matches_reference(S, dtype):
    B, H, D = 2, 3, 128
    q, k, v = make_qkv(B, H, S, D, dtype=dtype, device="cuda", seed=S)
    masks, lt, bb = gpu_tables(H, S, 3, 3, seed=S, p=0.25)
    ts = torch.tensor([900.0, 20.0], device="cuda")
    scale = 0.06  # not FA4's default 1/sqrt(128) = 0.088: the op's scale must reach the kernel
    out = fa4_block_sparse_attention(q, k, v, masks, lt, bb, ts, scale)
    assert out.shape == q.shape and out.stride() == q.stride()
    check(q, k, v, masks, lt, bb, ts, out, scale)
    short = fa4_block_sparse_attention(q, k, v, masks, lt, bb, ts, scale,
                                       max_blocks=max_row_blocks(masks, S))
    assert torch.equal(short, out)


@pytest.mark.gpu
@needs_fa4
def test_gpu_fa4_dense_tables_equal_sdpa():
    B, H, S, D = 1, 4, 128 * 30 + 64, 128
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda")
    from scaling_attn_compile.contract.masks import dense_tables

    masks, lt, bb = (t.cuda() for t in dense_tables(H, S))
    out = fa4_block_sparse_attention(q, k, v, masks, lt, bb, torch.tensor(500.0).cuda(), D**-0.5)
    golden = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert_close_to_oracle(out, golden, F.scaled_dot_product_attention(q, k, v), k=3.0)
    dense = fa4_forward(q, k, v, D**-0.5)
    assert_close_to_oracle(dense, golden, F.scaled_dot_product_attention(q, k, v), k=3.0)


@pytest.mark.gpu
@needs_fa4
def test_gpu_fa4_conversion_has_no_host_sync_and_graph_captures():
    B, H, S, D = 1, 2, 128 * 12 + 5, 128
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda", seed=3)
    masks, lt, bb = gpu_tables(H, S, 3, 3, seed=3, p=0.3)
    ts = torch.tensor([900.0], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        fa4_block_sparse_tensors(masks, lt, bb, ts, B, S)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    fa4_block_sparse_attention(q, k, v, masks, lt, bb, ts, D**-0.5)  # warm up (FA4 JIT compile)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fa4_block_sparse_attention(q, k, v, masks, lt, bb, ts, D**-0.5)
    for t in (900.0, 20.0, 500.0):
        ts.fill_(t)
        graph.replay()
        torch.cuda.synchronize()
        check(q, k, v, masks, lt, bb, ts, out, D**-0.5)



COMPILE_LISTS = r'''
import json
from scaling_attn_compile.kernels import fa4
from scaling_attn_compile.testing import compile_for_sm90, sm90_ptx_facts
POINTERS = {"MASKS": "*i32", "LEVEL_TABLE": "*i32", "BOUNDS": "*fp32", "TS": "*fp32",
            "CNT": "*i32", "IDX": "*i32"}
# Wan 14B/720p: NB = 591 blocks (NB_P2 1024), 10 levels, 6 buckets
kernel = compile_for_sm90(fa4._fa4_lists_kernel, POINTERS, set(), set(POINTERS),
                          {"stride_mw": 1, "NUM_BOUNDS": 5, "BOUNDS_P2": 8, "NB_P2": 1024},
                          num_warps=4, num_stages=1)
print(json.dumps(sm90_ptx_facts(kernel)))
'''


@pytest.mark.slow
def test_list_kernel_compiles_for_sm90():
    """The list-building kernel compiles for Hopper at the 14B row length (the interpreter,
    which the tests above run, cannot see GPU-only compile errors)."""
    from scaling_attn_compile.testing import run_script_compiled

    result = run_script_compiled(COMPILE_LISTS)
    assert result["cubin"] and result["spills"] == 0, result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
@pytest.mark.parametrize("S", [128 * 256 - 8, 75600])  # Wan 1.3B/480p and 14B/720p lengths
def test_gpu_list_kernel_equals_the_torch_form(S):
    """On the GPU (no FA4 needed): the list kernel's tensors equal the torch form's, at both
    Wan lengths, per-batch timesteps, a short K included."""
    H, L, NT = 4, 3, 4
    masks, lt, bb = (t.cuda() for t in raw_tables(H, S, L, NT, seed=11))
    ts = torch.tensor([950.0, 10.0], device="cuda")
    nb = num_blocks(S)
    for k in (None, nb // 3):
        got = fa4_block_sparse_tensors(masks, lt, bb, ts, 2, S, k, impl="triton")
        want = fa4_block_sparse_tensors(masks, lt, bb, ts, 2, S, k, impl="torch")
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
