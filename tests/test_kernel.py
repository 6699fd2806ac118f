"""The Triton kernel against the reference.

Without CUDA these run in the Triton interpreter (conftest sets TRITON_INTERPRET=1) at small
sizes in fp16/fp32: the interpreter's bf16 dot is broken. On the GPU (``-m gpu``) they run in
bf16/fp16 at Wan sizes.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from scaling_attn_compile import sparse_attention, sparse_attention_reference
from scaling_attn_compile.contract.masks import dense_tables, num_blocks, pack_blocks
from scaling_attn_compile.kernels.launch import CONFIGS, block_sparse_attention_forward, launch_meta
from scaling_attn_compile.testing import assert_close_to_oracle, make_qkv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_tables(H, S, levels, buckets, seed, p, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(S)
    masks = pack_blocks(torch.rand(H, levels, nb, nb, generator=g) < p)
    level_table = torch.randint(0, levels, (buckets, H), generator=g, dtype=torch.int32)
    bounds = torch.sort(torch.rand(buckets - 1, generator=g) * 1000).values
    return masks.to(device), level_table.to(device), bounds.to(device)


@pytest.mark.parametrize("words, padded", [(1, 32), (8, 32), (19, 32), (32, 32), (33, 64)])
def test_word_vector_is_padded_to_a_warp(words, padded):
    # 32 words (one per lane) ran 13% faster than 8 at S = 32,760 on the H200 (kernel_shapes.py);
    # the interpreter tests here (1 word, 31 of padding) check that padding changes no result.
    assert launch_meta(128 * 32 * words, words, 0, 128)["NUM_WORDS_P2"] == padded


def run_kernel(q, k, v, masks, lt, bb, ts, scale, config):
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    block_sparse_attention_forward(q, k, v, masks, lt, bb, ts, out, scale, config)
    assert not torch.isnan(out).any(), "kernel left output elements unwritten"
    return out


def check_against_reference(q, k, v, masks, lt, bb, ts, out, scale):
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale,
                                        compute_dtype=torch.float64)
    # Same-dtype eager reference: the reference's own math, rounded through q's dtype.
    same = sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale)
    assert_close_to_oracle(out, golden.double(), same, k=3.0)


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs interpreter or GPU")
@given(
    S=st.sampled_from([128, 200, 256, 300, 520]), D=st.sampled_from([64, 128]),
    dtype=st.sampled_from([torch.float16, torch.float32]), p=st.sampled_from([0.0, 0.3, 1.0]),
    config=st.sampled_from([(128, 4, 1), (64, 4, 1)]), seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(S, D, dtype, p, config, seed):
    B, H = 2, 2
    if dtype == torch.float32 and not INTERPRET:
        dtype = torch.bfloat16
    q, k, v = make_qkv(B, H, S, D, dtype=dtype, device=DEVICE, seed=seed)
    masks, lt, bb = random_tables(H, S, 2, 3, seed, p)
    ts = torch.tensor([50.0, 950.0], device=DEVICE)
    out = run_kernel(q, k, v, masks, lt, bb, ts, D**-0.5, config)
    check_against_reference(q, k, v, masks, lt, bb, ts, out, D**-0.5)


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs interpreter or GPU")
def test_kernel_zero_sparsity_equals_sdpa():
    B, H, S, D = 1, 2, 300, 64
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float16, device=DEVICE)
    masks, lt, bb = (t.to(DEVICE) for t in dense_tables(H, S))
    out = run_kernel(q, k, v, masks, lt, bb, torch.tensor(3.0, device=DEVICE), D**-0.5,
                     (128, 4, 1))
    golden = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).half()
    assert_close_to_oracle(out, golden, ref, k=3.0)


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs interpreter or GPU")
def test_kernel_scalar_timestep_and_per_batch_levels():
    """Timestep () applies to the whole batch; timestep (B,) picks a level per batch element."""
    B, H, S, D = 2, 2, 256, 64
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float16, device=DEVICE, seed=3)
    masks, lt, bb = random_tables(H, S, 3, 4, 3, 0.3)
    for ts in (torch.tensor(700.0, device=DEVICE), torch.tensor([10, 990], device=DEVICE)):
        out = run_kernel(q, k, v, masks, lt, bb, ts, D**-0.5, (128, 4, 1))
        check_against_reference(q, k, v, masks, lt, bb, ts, out, D**-0.5)


# -- GPU: bf16 at Wan sizes, through the op (autotuned launch) ------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("S", [32760, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_op_matches_reference(S, dtype, D):
    B, H = 1, 2
    q, k, v = make_qkv(B, H, S, D, dtype=dtype, device="cuda", seed=S + D)
    masks, lt, bb = random_tables(H, S, 3, 3, 0, 0.25, device="cuda")
    ts = torch.tensor([600.0], device="cuda")
    out = sparse_attention(q, k, v, masks, lt, bb, ts, 1 / math.sqrt(D))
    assert out.stride() == q.stride()
    check_against_reference(q, k, v, masks, lt, bb, ts, out, 1 / math.sqrt(D))


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS)
def test_gpu_every_config_is_correct(config):
    B, H, S, D = 2, 3, 3000, 128
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda", seed=7)
    masks, lt, bb = random_tables(H, S, 2, 2, 7, 0.5, device="cuda")
    ts = torch.tensor([100.0, 900.0], device="cuda")
    out = run_kernel(q, k, v, masks, lt, bb, ts, D**-0.5, config)
    check_against_reference(q, k, v, masks, lt, bb, ts, out, D**-0.5)


@pytest.mark.gpu
def test_gpu_zero_sparsity_equals_sdpa_wan_shape():
    B, H, S, D = 1, 12, 32760, 128
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda")
    masks, lt, bb = (t.cuda() for t in dense_tables(H, S))
    out = sparse_attention(q, k, v, masks, lt, bb, torch.tensor([999.0], device="cuda"), D**-0.5)
    ref = F.scaled_dot_product_attention(q, k, v)
    golden = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert_close_to_oracle(out, golden, ref, k=3.0)


@pytest.mark.gpu
def test_gpu_op_is_cuda_graph_capturable():
    """No host sync in the op: it captures into a CUDA graph and follows the timestep on replay."""
    B, H, S, D = 1, 2, 1024, 128
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda")
    masks, lt, bb = random_tables(H, S, 3, 3, 1, 0.3, device="cuda")
    ts = torch.tensor([900.0], device="cuda")
    sparse_attention(q, k, v, masks, lt, bb, ts, D**-0.5)  # warm up (autotune, compile)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparse_attention(q, k, v, masks, lt, bb, ts, D**-0.5)
    for t in (900.0, 20.0):
        ts.fill_(t)
        graph.replay()
        check_against_reference(q, k, v, masks, lt, bb, ts, out, D**-0.5)


def test_autotune_times_all_blocks_tables_whatever_the_call_holds(monkeypatch):
    """The eager launcher's config choice is cached per shape; it must not depend on the first
    call's masks (issue 14: the same masks ran 1.35 ms or 1.60 ms by which density came first).
    So it times tables with every block kept: checked by recording what each timed launch got
    (the CUDA path is entered with a stand-in q whose device says cuda)."""
    from types import SimpleNamespace

    import triton.testing

    from scaling_attn_compile.kernels import launch

    H, S = 2, 300
    masks, lt, bb = random_tables(H, S, 2, 3, seed=0, p=0.1, device="cpu")
    seen = []

    def fake_forward(q, k, v, m, l, b, ts, out, scale, cfg, **kw):
        seen.append((m.clone(), l.clone(), kw.get("kv_lens")))

    q = SimpleNamespace(shape=(1, H, S, 64), dtype=torch.float16,
                        device=SimpleNamespace(type="cuda", __str__=lambda self: "cuda:0"))
    monkeypatch.setattr(launch, "block_sparse_attention_forward", fake_forward)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    monkeypatch.setattr(launch, "_TUNED", {})
    lens = torch.tensor([10], dtype=torch.int32)
    launch.pick_config(q, None, None, masks, lt, bb, None, None, 0.1, kv_lens=lens)
    assert len(seen) == len(launch.CONFIGS)
    for m, l, kv in seen:
        assert m.shape == masks.shape and bool((m == -1).all()), "every block kept"
        assert l.shape == lt.shape and not l.any()
        assert kv.tolist() == [S], "every key kept"
