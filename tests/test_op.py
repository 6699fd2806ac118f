"""The op against SDPA and the reference, on the CPU path (the reference) and its contract.

Kernel-specific checks (interpreter and GPU) are in test_kernel.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from scaling_attn_compile import sparse_attention, sparse_attention_reference
from scaling_attn_compile.contract.masks import (
    dense_tables,
    num_blocks,
    pack_blocks,
    select_levels,
    unpack_blocks,
)
from scaling_attn_compile.testing import assert_close_to_oracle, make_qkv

OP = torch.ops.scaling_attn.sparse_attention.default


def random_tables(H, S, levels, buckets, seed, p=0.4):
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(S)
    masks = pack_blocks(torch.rand(H, levels, nb, nb, generator=g) < p)
    level_table = torch.randint(0, levels, (buckets, H), generator=g, dtype=torch.int32)
    bounds = torch.sort(torch.rand(buckets - 1, generator=g) * 1000).values
    return masks, level_table, bounds


@given(
    bits=st.lists(st.booleans(), min_size=1, max_size=200),
)
def test_pack_unpack_roundtrip(bits):
    m = torch.tensor(bits)
    assert torch.equal(unpack_blocks(pack_blocks(m), len(bits)), m)


@given(
    B=st.integers(1, 2), H=st.integers(1, 3), S=st.integers(1, 400),
    D=st.sampled_from([16, 64]), seed=st.integers(0, 2**16),
)
def test_zero_sparsity_equals_sdpa(B, H, S, D, seed):
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float32, seed=seed)
    masks, lt, bb = dense_tables(H, S)
    out = sparse_attention(q, k, v, masks, lt, bb, torch.tensor(500.0), 1 / math.sqrt(D))
    golden = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert_close_to_oracle(out, golden, F.scaled_dot_product_attention(q, k, v))


@given(
    B=st.integers(1, 2), H=st.integers(1, 3), S=st.integers(1, 400),
    levels=st.integers(1, 3), buckets=st.integers(1, 4), seed=st.integers(0, 2**16),
)
def test_random_masks_equal_token_masked_sdpa(B, H, S, levels, buckets, seed):
    """The reference's block semantics, checked independently against SDPA with a token mask."""
    D = 16
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float32, seed=seed)
    masks, lt, bb = random_tables(H, S, levels, buckets, seed)
    ts = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(seed))
    out = sparse_attention(q, k, v, masks, lt, bb, ts, D**-0.5)

    nb = num_blocks(S)
    lv = select_levels(lt, bb, ts, B)  # (B, H)
    blocks = unpack_blocks(masks, nb)[torch.arange(H)[None], lv]  # (B, H, NB, NB)
    blocks |= torch.eye(nb, dtype=torch.bool)
    tok = blocks.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :S, :S]
    golden = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=tok)
    assert_close_to_oracle(out, golden, F.scaled_dot_product_attention(q, k, v, attn_mask=tok))


def test_level_follows_timestep():
    """Two levels (dense / diagonal-only) and one boundary at t=500: the output switches with t."""
    B, H, S, D = 1, 2, 384, 16
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float32)
    nb = num_blocks(S)
    dense = torch.ones(H, 1, nb, nb, dtype=torch.bool)
    diag = torch.zeros(H, 1, nb, nb, dtype=torch.bool)
    masks = pack_blocks(torch.cat([dense, diag], 1))
    level_table = torch.tensor([[1, 1], [0, 0]], dtype=torch.int32)  # t < 500: diag; t >= 500: dense
    bounds = torch.tensor([500.0])
    full = F.scaled_dot_product_attention(q, k, v)
    hi = sparse_attention(q, k, v, masks, level_table, bounds, torch.tensor([999]), D**-0.5)
    lo = sparse_attention(q, k, v, masks, level_table, bounds, torch.tensor([10]), D**-0.5)
    torch.testing.assert_close(hi, full)
    blockdiag = torch.block_diag(*[torch.ones(128, 128, dtype=torch.bool)] * nb)
    torch.testing.assert_close(lo, F.scaled_dot_product_attention(q, k, v, attn_mask=blockdiag))
    assert (hi - lo).abs().max() > 1e-2


@given(seed=st.integers(0, 2**16), b=st.integers(0, 2))
def test_batch_element_alone_equals_inside_batch(seed, b):
    B, H, S, D = 3, 2, 300, 16
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float32, seed=seed)
    masks, lt, bb = random_tables(H, S, 3, 3, seed)
    ts = torch.tensor([100, 500, 900])
    full = sparse_attention(q, k, v, masks, lt, bb, ts, 0.25)
    one = sparse_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], masks, lt, bb, ts[b:b + 1], 0.25)
    torch.testing.assert_close(one[0], full[b], rtol=0, atol=0)


def test_output_keeps_q_strides():
    q, k, v = make_qkv(1, 2, 200, 16, dtype=torch.float32)  # (B, H, S, D) views of BSHD memory
    out = sparse_attention(q, k, v, *dense_tables(2, 200), torch.tensor(1.0), 0.25)
    assert out.stride() == q.stride()


def test_opcheck():
    q, k, v = make_qkv(2, 2, 260, 16, dtype=torch.float32)
    masks, lt, bb = random_tables(2, 260, 2, 3, 0)
    torch.library.opcheck(OP, (q, k, v, masks, lt, bb, torch.tensor([100, 800]), 0.25))


def test_reference_never_builds_s_by_s(monkeypatch):
    """At S >= 8192 the reference works in query chunks: no score tensor spans all S rows."""
    S, seen = 8192, []
    real_einsum = torch.einsum

    def spy(eq, *ops):
        out = real_einsum(eq, *ops)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "einsum", spy)
    q, k, v = make_qkv(1, 2, S, 16, dtype=torch.float32)
    sparse_attention_reference(q, k, v, *dense_tables(2, S), torch.tensor(1.0),
                               max_chunk_elements=2**24)
    scores = [s for s in seen if s[-1] == S]
    assert scores and all(s[-2] < S for s in scores)


# -- bad input: ValueError / TypeError naming the argument ---------------------------------------

def _good(S=256, H=2, B=1, D=16):
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float32)
    return [q, k, v, *dense_tables(H, S), torch.tensor([1.0] * B), 0.25]


@pytest.mark.parametrize("mutate, exc, word", [
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "q must be 4-D"),
    (lambda a: a.__setitem__(1, a[1][:, :, :128]), ValueError, "same shape"),
    (lambda a: a.__setitem__(2, a[2].half()), TypeError, "dtype"),
    (lambda a: a.__setitem__(3, a[3].long()), TypeError, "masks must be int32"),
    (lambda a: a.__setitem__(3, a[3][:, :, :1]), ValueError, "masks must have shape"),
    (lambda a: a.__setitem__(3, a[3][:1]), ValueError, "masks must have shape"),
    (lambda a: a.__setitem__(4, torch.zeros(2, 2, dtype=torch.int32)), ValueError, "level_table"),
    (lambda a: a.__setitem__(4, a[4].float()), TypeError, "level_table must be int32"),
    (lambda a: a.__setitem__(5, a[5].double()), TypeError, "bucket_bounds must be float32"),
    (lambda a: a.__setitem__(6, torch.zeros(2, 3)), ValueError, "timestep"),
    (lambda a: a.__setitem__(6, torch.zeros(5)), ValueError, "timestep"),
])
def test_bad_input(mutate, exc, word):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=word):
        sparse_attention(*args)


def test_kernel_rejects_cpu_tensors_without_interpreter():
    from scaling_attn_compile.contract.validate import validate_kernel_inputs

    q = torch.zeros(1, 1, 128, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        validate_kernel_inputs(q, interpret=False)
    with pytest.raises(ValueError, match="head_dim"):
        validate_kernel_inputs(torch.zeros(1, 1, 128, 96, dtype=torch.float16), interpret=True)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        validate_kernel_inputs(torch.zeros(1, 1, 128, 64, dtype=torch.float64), interpret=True)


@given(seed=st.integers(0, 2**16), S=st.integers(1, 700), chunk=st.sampled_from([2**14, 2**25]),
       lens=st.none() | st.tuples(st.integers(-5, 800), st.integers(-5, 800)))
def test_cpu_gather_path_equals_reference(seed, S, chunk, lens):
    """The op's CPU path computes only kept blocks (kernels/block_gather_cpu.py); in float64 it
    must give the reference's numbers, for any tables, partial last blocks, key lengths (zeros
    for rows left without keys) and chunkings."""
    from scaling_attn_compile.contract.reference import block_masks_for
    from scaling_attn_compile.kernels.block_gather_cpu import block_sparse_attention_cpu

    B, H, D = 2, 3, 8
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float64, seed=seed)
    masks, lt, bb = random_tables(H, S, 3, 3, seed)
    ts = torch.tensor([100, 900])
    blocks = block_masks_for(masks, lt, bb, ts, B, S)
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    out = block_sparse_attention_cpu(q, k, v, blocks, 0.3, max_chunk_elements=chunk,
                                     kv_lens=kv_lens)
    ref = sparse_attention_reference(q, k, v, masks, lt, bb, ts, 0.3, kv_lens=kv_lens)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
