"""Per-batch key lengths (``kv_lens``): the reference against SDPA with the boolean key-padding
mask, the Triton kernel (interpreted: fp16/fp32) against the reference, and the op's checks.

``kv_lens[b]`` drops keys ``>= kv_lens[b]`` for every query row of batch element ``b`` (the
prefix mask HunyuanVideo builds from its text mask); lengths are clamped to ``[0, S]`` and a row
with no kept key outputs zeros.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from scaling_attn_compile import sparse_attention, sparse_attention_reference
from scaling_attn_compile.contract.masks import dense_tables, num_blocks, pack_blocks
from scaling_attn_compile.contract.reference import (
    block_masks_for,
    energy_filtered_attention_reference,
)
from scaling_attn_compile.kernels.launch import block_sparse_attention_forward
from scaling_attn_compile.testing import assert_close_to_oracle, make_local_qkv, make_qkv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                  reason="needs the Triton interpreter or a GPU")


def random_tables(H, S, seed, p, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(S)
    masks = pack_blocks(torch.rand(H, 2, nb, nb, generator=g) < p)
    level_table = torch.randint(0, 2, (3, H), generator=g, dtype=torch.int32)
    bounds = torch.tensor([300.0, 700.0])
    return masks.to(device), level_table.to(device), bounds.to(device)


def sdpa_with_prefix_mask(q, k, v, lens, scale):
    """What diffusers runs for HunyuanVideo: SDPA with a boolean ``[B, 1, 1, S]`` key mask."""
    S = q.shape[2]
    mask = (torch.arange(S)[None, :] < lens[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@given(S=st.integers(1, 400), data=st.data(), seed=st.integers(0, 2**16))
def test_reference_dense_equals_sdpa_with_the_boolean_mask(S, data, seed):
    B, H, D = 2, 2, 16
    lens = torch.tensor([data.draw(st.integers(1, S)) for _ in range(B)], dtype=torch.int32)
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float64, seed=seed)
    masks, lt, bb = dense_tables(H, S)
    out = sparse_attention_reference(q, k, v, masks, lt, bb, torch.tensor(1.0), D**-0.5,
                                     kv_lens=lens)
    torch.testing.assert_close(out, sdpa_with_prefix_mask(q, k, v, lens.long(), D**-0.5))


def test_reference_without_lengths_or_with_full_lengths_is_unchanged():
    B, H, S, D = 2, 2, 300, 16
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float32)
    masks, lt, bb = random_tables(H, S, 0, 0.3)
    ts = torch.tensor([100.0, 900.0])
    base = sparse_attention_reference(q, k, v, masks, lt, bb, ts)
    for lens in ([S, S], [S + 5, 10**6]):  # clamped to S
        same = sparse_attention_reference(q, k, v, masks, lt, bb, ts,
                                          kv_lens=torch.tensor(lens, dtype=torch.int32))
        assert torch.equal(same, base)


def test_reference_rows_without_a_kept_key_are_zeros():
    """Query block 2 keeps only its diagonal; with kv_lens = 100 its keys (256..) are all
    dropped, so its rows have no key: zeros (SDPA with an all-False row would give NaN)."""
    B, H, S, D = 1, 1, 300, 16
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float64)
    masks = pack_blocks(torch.eye(3, dtype=torch.bool)[None, None])  # diagonal only
    lt, bb = torch.zeros(1, 1, dtype=torch.int32), torch.zeros(0)
    out = sparse_attention_reference(q, k, v, masks, lt, bb, torch.tensor(0.0),
                                     kv_lens=torch.tensor([100], dtype=torch.int32))
    assert torch.equal(out[0, 0, 128:], torch.zeros(S - 128, D, dtype=torch.float64))
    want = F.scaled_dot_product_attention(q[..., :100, :], k[..., :100, :], v[..., :100, :])
    torch.testing.assert_close(out[..., :100, :], want)
    zero = sparse_attention_reference(q, k, v, masks, lt, bb, torch.tensor(0.0),
                                      kv_lens=torch.tensor([-7], dtype=torch.int32))
    assert torch.equal(zero, torch.zeros_like(zero))  # clamped to 0: no key anywhere


def run_kernel(q, k, v, masks, lt, bb, ts, scale, config, kv_lens, **kw):
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    block_sparse_attention_forward(q, k, v, masks, lt, bb, ts, out, scale, config,
                                   kv_lens=kv_lens, **kw)
    assert not torch.isnan(out).any(), "kernel left NaN or unwritten output elements"
    return out


@needs_kernel
@given(
    S=st.sampled_from([128, 200, 256, 300, 520]), data=st.data(),
    dtype=st.sampled_from([torch.float16, torch.float32]), p=st.sampled_from([0.0, 0.3, 1.0]),
    config=st.sampled_from([(128, 4, 1), (64, 4, 1)]), seed=st.integers(0, 2**16),
)
def test_kernel_with_lengths_matches_reference(S, data, dtype, p, config, seed):
    """Lengths inside a block, on a block edge, 0, S, past S and negative (clamped)."""
    B, H, D = 2, 2, 64
    if dtype == torch.float32 and not INTERPRET:
        dtype = torch.bfloat16
    pick = st.one_of(st.integers(1, S), st.sampled_from([0, 128, 129, S, S + 50, -3]))
    lens = torch.tensor([data.draw(pick) for _ in range(B)], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(B, H, S, D, dtype=dtype, device=DEVICE, seed=seed)
    masks, lt, bb = random_tables(H, S, seed, p, DEVICE)
    ts = torch.tensor([50.0, 950.0], device=DEVICE)
    out = run_kernel(q, k, v, masks, lt, bb, ts, D**-0.5, config, lens)
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5,
                                        compute_dtype=torch.float64, kv_lens=lens)
    same = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5, kv_lens=lens)
    assert_close_to_oracle(out, golden, same, k=3.0, what=f"kernel, kv_lens={lens.tolist()}")


@needs_kernel
def test_kernel_dense_with_lengths_equals_sdpa_and_ignores_keys_past_the_length():
    B, H, S, D = 2, 2, 300, 64
    dtype = torch.float32 if INTERPRET else torch.float16
    q, k, v = make_qkv(B, H, S, D, dtype=dtype, device=DEVICE, seed=1)
    lens = torch.tensor([130, 256], dtype=torch.int32, device=DEVICE)
    masks, lt, bb = (t.to(DEVICE) for t in dense_tables(H, S))
    ts = torch.tensor(1.0, device=DEVICE)
    out = run_kernel(q, k, v, masks, lt, bb, ts, D**-0.5, (128, 4, 1), lens)
    want = sdpa_with_prefix_mask(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                 lens.long().cpu(), D**-0.5)
    torch.testing.assert_close(out.double().cpu(), want, atol=2e-3, rtol=2e-3)
    k2, v2 = k.clone(), v.clone()  # garbage past each length must not change anything
    k2[0, :, 130:], v2[0, :, 130:] = 1e4, float("nan")
    k2[1, :, 256:], v2[1, :, 256:] = 1e4, float("nan")
    assert torch.equal(run_kernel(q, k2, v2, masks, lt, bb, ts, D**-0.5, (128, 4, 1), lens), out)


@needs_kernel
@pytest.mark.parametrize("rule, threshold", [(1, 0.0), (2, -0.5)])
def test_kernel_energy_filter_with_lengths_matches_its_reference(rule, threshold):
    """The filter's visit order moves the last valid block to the end; the kernel's per-tile
    skip counts equal the reference's."""
    B, H, S, D = 2, 1, 600, 64
    q, k, v = make_local_qkv(B, H, S, D, seed=3, dtype=torch.float16, device=DEVICE)
    lens = torch.tensor([300, 512], dtype=torch.int32, device=DEVICE)
    masks, lt, bb = (t.to(DEVICE) for t in dense_tables(H, S))
    ts = torch.tensor(1.0, device=DEVICE)
    nb = num_blocks(S)
    skipped = torch.zeros(B * H * nb, dtype=torch.int32, device=DEVICE)
    out = run_kernel(q, k, v, masks, lt, bb, ts, D**-0.5, (128, 4, 1), lens,
                     energy_rule=rule, energy_threshold=threshold, skipped=skipped)
    blocks = block_masks_for(masks, lt, bb, ts, B, S)
    golden, ref_skipped = energy_filtered_attention_reference(
        q, k, v, blocks, D**-0.5, rule, threshold, return_skipped=True, kv_lens=lens)
    same = energy_filtered_attention_reference(q, k, v, blocks, D**-0.5, rule, threshold,
                                               compute_dtype=torch.float32, kv_lens=lens)
    assert ref_skipped.any(), "the threshold must make the filter skip something"
    assert_close_to_oracle(out, golden, same, k=3.0, what=f"kernel, energy rule {rule}")
    assert skipped.view(B, H, nb).cpu().tolist() == ref_skipped.sum(-1).cpu().tolist()


def test_op_cpu_and_fake_take_lengths():
    B, H, S, D = 2, 2, 200, 16
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float32)
    masks, lt, bb = random_tables(H, S, 4, 0.5)
    ts, lens = torch.tensor([100.0, 900.0]), torch.tensor([150, 7], dtype=torch.int32)
    out = sparse_attention(q, k, v, masks, lt, bb, ts, D**-0.5, kv_lens=lens)
    ref = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5, kv_lens=lens)
    torch.testing.assert_close(out, ref)  # the CPU path sums in another order
    assert not torch.equal(out, sparse_attention(q, k, v, masks, lt, bb, ts, D**-0.5))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv, fm, flt, fbb, fts, fl = (mode.from_tensor(t) for t in
                                             (q, k, v, masks, lt, bb, ts, lens))
        assert torch.ops.scaling_attn.sparse_attention(
            fq, fk, fv, fm, flt, fbb, fts, D**-0.5, kv_lens=fl).shape == q.shape


@pytest.mark.parametrize("lens, match", [
    (torch.tensor([1, 2], dtype=torch.int64), "kv_lens must be int32"),
    (torch.tensor([1, 2, 3], dtype=torch.int32), r"kv_lens must have shape \(2,\)"),
    (torch.tensor(3, dtype=torch.int32), r"kv_lens must have shape \(2,\)"),
])
def test_op_refuses_bad_lengths_in_one_line(lens, match):
    B, H, S, D = 2, 1, 128, 16
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float32)
    masks, lt, bb = dense_tables(H, S)
    with pytest.raises((TypeError, ValueError), match=match):
        sparse_attention(q, k, v, masks, lt, bb, torch.tensor(1.0), D**-0.5, kv_lens=lens)


# --------------------------------------------------------------------------------------------
# The compiled path: Inductor's lowering (CPU: extern call; the template rendered on the CPU)
# --------------------------------------------------------------------------------------------


def test_compiled_op_on_the_cpu_takes_lengths():
    B, H, S, D = 2, 2, 200, 16
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float32)
    masks, lt, bb = random_tables(H, S, 5, 0.4)
    ts, lens = torch.tensor([100.0, 900.0]), torch.tensor([131, 64], dtype=torch.int32)
    op = torch.ops.scaling_attn.sparse_attention
    f = torch.compile(lambda *a: op(*a[:7], D**-0.5, kv_lens=a[7]), backend="inductor",
                      fullgraph=True)
    ref = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5, kv_lens=lens)
    torch.testing.assert_close(f(q, k, v, masks, lt, bb, ts, lens), ref)


@pytest.mark.skipif(not INTERPRET, reason="needs the interpreter")
def test_rendered_template_with_lengths_runs_in_the_interpreter():
    """The kv_lens template variant, rendered by Inductor (def_kernel with KV_LENS,
    HAS_KV_LENS=True), run by the interpreter, equals the reference; the plain variant still
    renders without a KV_LENS input."""
    import importlib.util
    import sys

    import triton

    sys.path.insert(0, os.path.dirname(__file__))
    from test_lowering import capture_template_choices, lowering

    B, H, S, D = 2, 2, 200, 64
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float16)
    masks, lt, bb = random_tables(H, S, 6, 0.5)
    ts, lens = torch.tensor([100.0, 900.0]), torch.tensor([150, 100], dtype=torch.int32)
    op = torch.ops.scaling_attn.sparse_attention.default
    f = lambda *a: op(*a[:7], D**-0.5, 0, 0.0, a[7])
    with capture_template_choices() as choices:
        with pytest.raises(Exception, match="choices captured"):
            torch.compile(f, backend="inductor", fullgraph=True)(q, k, v, masks, lt, bb, ts, lens)
    assert len(choices) == len(lowering.template_configs())
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5,
                                        compute_dtype=torch.float64, kv_lens=lens)
    same = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5, kv_lens=lens)
    choice = next(c for c in choices if c.bmreq.module_path and "BLOCK_M : tl.constexpr = 64"
                  in open(c.bmreq.module_path).read())
    src = open(choice.bmreq.module_path).read()
    assert "HAS_KV_LENS : tl.constexpr = True" in src
    spec = importlib.util.spec_from_file_location("tmpl_kv", choice.bmreq.module_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernel = getattr(mod, choice.bmreq.kernel_name)
    out = torch.full_like(q, float("nan"))
    kernel.fn[(triton.cdiv(S, 64), B, H)](q, k, v, masks, lt, bb, ts, lens, out)
    assert_close_to_oracle(out, golden, same, k=3.0, what="template with kv_lens")


# --------------------------------------------------------------------------------------------
# GPU (-m gpu, on the device): bf16, every config (TMA too), the Inductor template
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("config_index", range(6))
def test_gpu_every_config_with_lengths(config_index):
    """HunyuanVideo-like: 4,680 video tokens + 256 text, batch element 1 with padded text; a
    length inside a block, one on a block edge."""
    from scaling_attn_compile.kernels.launch import CONFIGS

    B, H, S, D = 2, 3, 4936, 128
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda", seed=7)
    masks, lt, bb = random_tables(H, S, 7, 0.4, "cuda")
    ts = torch.tensor([100.0, 900.0], device="cuda")
    lens = torch.tensor([4680 + 77, 4608], dtype=torch.int32, device="cuda")
    out = run_kernel(q, k, v, masks, lt, bb, ts, D**-0.5, CONFIGS[config_index], lens)
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5,
                                        compute_dtype=torch.float64, kv_lens=lens)
    same = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5, kv_lens=lens)
    assert_close_to_oracle(out, golden, same, k=3.0, what=f"config {CONFIGS[config_index]}")


@pytest.mark.gpu
def test_gpu_template_with_lengths_matches_reference():
    """torch.compile of the op with kv_lens on CUDA runs the kv_lens template variant."""
    from torch._inductor.utils import run_and_get_code

    import scaling_attn_compile.compile.lowering  # noqa: F401  (registers the template lowering)

    B, H, S, D = 2, 2, 2300, 64
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda", seed=3)
    masks, lt, bb = random_tables(H, S, 8, 0.5, "cuda")
    ts = torch.tensor([100.0, 900.0], device="cuda")
    lens = torch.tensor([2000, 1100], dtype=torch.int32, device="cuda")
    op = torch.ops.scaling_attn.sparse_attention
    f = torch.compile(lambda *a: op(*a[:7], D**-0.5, kv_lens=a[7]), fullgraph=True)
    out, code = run_and_get_code(f, q, k, v, masks, lt, bb, ts, lens)
    assert "HAS_KV_LENS" in "\n".join(code)
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5,
                                        compute_dtype=torch.float64, kv_lens=lens)
    same = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5, kv_lens=lens)
    assert_close_to_oracle(out, golden, same, k=3.0, what="template with kv_lens")
