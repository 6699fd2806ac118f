"""The online energy filter (cumulative energy / DynSparse, and BLASST): the reference's rule,
its promised bound on dropped mass, and the kernel against the reference (interpreter on the
CPU, bf16 on the GPU)."""

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scaling_attn_compile import sparse_attention, sparse_attention_reference
from scaling_attn_compile.contract.masks import BLOCK, dense_tables, num_blocks, pack_blocks
from scaling_attn_compile.contract.reference import (
    block_masks_for,
    energy_filtered_attention_reference,
    visit_order,
)
from scaling_attn_compile.kernels.launch import block_sparse_attention_forward
from scaling_attn_compile.ops.op import lambda_from_recall
from scaling_attn_compile.testing import assert_close_to_oracle, make_local_qkv, make_qkv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                  reason="needs the Triton interpreter or a GPU")


def tables(H, S, seed, p=0.7):
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(S)
    masks = pack_blocks(torch.rand(H, 1, nb, nb, generator=g) < p)
    return masks, torch.zeros(1, H, dtype=torch.int32), torch.zeros(0)


def test_visit_order_diagonal_then_neighbours_then_ascending_partial_last():
    blocks = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    order, count = visit_order(blocks, seq_len=5 * BLOCK - 7)
    assert order[0, 0, 2].tolist() == [2, 1, 3, 0, 4]
    assert order[0, 0, 0].tolist() == [0, 1, 2, 3, 4]  # no left neighbour
    assert order[0, 0, 4].tolist() == [4, 3, 0, 1, 2]  # the partial block is the diagonal here
    assert order[0, 0, 1].tolist() == [1, 0, 2, 3, 4]
    assert count.tolist() == [[[5] * 5]]
    order, _ = visit_order(blocks, seq_len=5 * BLOCK)
    assert order[0, 0, 0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("rule", [1, 2])
def test_minus_infinity_threshold_is_no_filter(rule):
    B, H, S, D = 2, 2, 300, 16
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float64)
    masks, lt, bb = tables(H, S, 0)
    ts = torch.tensor(1.0)
    blocks = block_masks_for(masks, lt, bb, ts, B, S)
    out, skipped = energy_filtered_attention_reference(q, k, v, blocks, D**-0.5, rule,
                                                       float("-inf"), return_skipped=True)
    plain = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5,
                                       compute_dtype=torch.float64)
    assert not skipped.any()
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**16), rule=st.sampled_from([1, 2]),
       threshold=st.sampled_from([-12.0, -8.0, -5.0, -3.0]), S=st.sampled_from([512, 700]))
def test_dropped_mass_within_the_rule_bound(seed, rule, threshold, S):
    """Each skipped block has mass < Bc * exp(threshold) x the row's kept mass (cumulative energy:
    vs the running sum; BLASST: vs exp(running max) <= running sum), so per row
    dropped / kept <= (skipped blocks) * Bc * exp(threshold)."""
    B, H, D = 1, 2, 32
    q, k, v = make_local_qkv(B, H, S, D, seed, dtype=torch.float64)
    masks, lt, bb = tables(H, S, seed, p=1.0)
    blocks = block_masks_for(masks, lt, bb, torch.tensor(0.0), B, S)
    _, skipped = energy_filtered_attention_reference(q, k, v, blocks, D**-0.5, rule, threshold,
                                                     return_skipped=True)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * D**-0.5
    mass = (scores - scores.amax(-1, keepdim=True)).exp()  # per row, common scale
    tok = lambda m: m.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., :S, :S]
    skip_tok = tok(skipped)
    dropped = (mass * skip_tok).sum(-1)
    kept = (mass * ~skip_tok).sum(-1)
    n_skip = skipped.sum(-1).repeat_interleave(BLOCK, -1)[..., :S].double()  # per query row
    bound = n_skip * BLOCK * math.exp(threshold)
    assert (dropped / kept <= bound + 1e-12).all()
    if threshold == -3.0:
        assert skipped.any(), "a local pattern at threshold -3 should skip some far blocks"


def test_lambda_from_recall():
    lam = lambda_from_recall(1.46, 75600)
    assert lam == pytest.approx(-6.0, abs=0.01)  # DynSparse's Wan2.2-14B setting: P_real 1.46
    with pytest.raises(ValueError, match="recall_budget"):
        lambda_from_recall(0.0, 1000)


@needs_kernel
@given(seed=st.integers(0, 2**16), rule=st.sampled_from([1, 2]),
       threshold=st.sampled_from([-9.0, -5.0, -3.0, float("-inf")]),
       S=st.sampled_from([384, 600]), D=st.sampled_from([64, 128]))
def test_kernel_matches_energy_reference(seed, rule, threshold, S, D):
    B, H = 1, 2
    dtype = torch.float32 if INTERPRET else torch.float16
    q, k, v = make_local_qkv(B, H, S, D, seed, dtype=dtype, device=DEVICE)
    masks, lt, bb = (t.to(DEVICE) for t in tables(H, S, seed, p=0.8))
    ts = torch.tensor(0.0, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    n_prog = B * H * num_blocks(S)
    skipped = torch.zeros(n_prog, dtype=torch.int32, device=DEVICE)
    block_sparse_attention_forward(q, k, v, masks, lt, bb, ts, out, D**-0.5, (128, 4, 1),
                                   energy_rule=rule, energy_threshold=threshold, skipped=skipped)
    blocks = block_masks_for(masks, lt, bb, ts, B, S)
    golden, ref_skipped = energy_filtered_attention_reference(
        q, k, v, blocks, D**-0.5, rule, threshold, return_skipped=True)
    same = energy_filtered_attention_reference(q, k, v, blocks, D**-0.5, rule, threshold,
                                               compute_dtype=torch.float32).to(dtype)
    assert skipped.tolist() == ref_skipped.sum(-1).flatten().tolist()
    assert_close_to_oracle(out, golden, same, k=3.0)


@needs_kernel
def test_op_energy_path_cpu_and_kernel_agree_on_skips():
    """The op's filter reaches the kernel on CUDA and the reference on the CPU."""
    B, H, S, D = 1, 2, 512, 64
    q, k, v = make_local_qkv(B, H, S, D, 1, dtype=torch.float16 if DEVICE == "cuda" else torch.float32,
                        device=DEVICE)
    masks, lt, bb = (t.to(DEVICE) for t in dense_tables(H, S))
    ts = torch.tensor(0.0, device=DEVICE)
    out = sparse_attention(q, k, v, masks, lt, bb, ts, D**-0.5, 1, -4.0)
    blocks = block_masks_for(masks, lt, bb, ts, B, S)
    golden = energy_filtered_attention_reference(q, k, v, blocks, D**-0.5, 1, -4.0)
    same = energy_filtered_attention_reference(q, k, v, blocks, D**-0.5, 1, -4.0,
                                               compute_dtype=torch.float32).to(q.dtype)
    assert_close_to_oracle(out, golden, same, k=3.0)


def test_energy_rule_validation():
    q, k, v = make_qkv(1, 1, 128, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="energy_rule"):
        sparse_attention(q, k, v, *dense_tables(1, 128), torch.tensor(1.0), 0.25, 7, -3.0)
    with pytest.raises(ValueError, match="energy_threshold"):
        sparse_attention(q, k, v, *dense_tables(1, 128), torch.tensor(1.0), 0.25, 1, float("nan"))
