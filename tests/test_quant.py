"""The 8-bit reference (contract/quant.py): smoothing, quantizers, mask paths, the error bound."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scaling_attn_compile.contract.masks import dense_tables, num_blocks, pack_blocks
from scaling_attn_compile.contract.quant import (
    FP8,
    FP8_MAX,
    PRECISIONS,
    QUANT_ERROR_BOUND,
    check_precision,
    dequantize_blocks,
    quantize_blocks,
    quantize_v,
    quantized_attention_reference,
    rel_l2,
    smooth_k,
)
from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.testing import make_local_qkv, make_outlier_qkv, make_qkv


def random_tables(H, S, levels, buckets, seed, p):
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(S)
    masks = pack_blocks(torch.rand(H, levels, nb, nb, generator=g) < p)
    # Levels past [0, L) on purpose: the clamp is part of the mask path.
    level_table = torch.randint(-1, levels + 1, (buckets, H), generator=g, dtype=torch.int32)
    bounds = torch.sort(torch.rand(buckets - 1, generator=g) * 1000).values
    return masks, level_table, bounds


def test_precision_names_and_error():
    assert PRECISIONS == ("bf16", "fp8", "int8")
    with pytest.raises(ValueError, match=r"precision must be one of .*got 'fp16'"):
        check_precision("fp16")


def test_bf16_precision_is_the_reference():
    q, k, v = make_qkv(1, 2, 300, 64, dtype=torch.float32, seed=1)
    m, lt, bb = dense_tables(2, 300)
    ts = torch.tensor(1.0)
    out = quantized_attention_reference(q, k, v, m, lt, bb, ts, precision="bf16")
    assert torch.equal(out, sparse_attention_reference(q, k, v, m, lt, bb, ts))


def test_smoothing_k_leaves_attention_unchanged():
    # A per-row shift of the scores: float64 outputs agree to rounding, even for keys whose
    # channels carry offsets 30x their noise.
    q, k, v = make_outlier_qkv(1, 2, 384, 64, seed=3, stress=3.0, dtype=torch.float64)
    masks, lt, bb = random_tables(2, 384, 2, 3, seed=3, p=0.4)
    ts = torch.tensor([500.0])
    plain = sparse_attention_reference(q, k, v, masks, lt, bb, ts)
    smoothed = sparse_attention_reference(q, smooth_k(k).double(), v, masks, lt, bb, ts)
    assert rel_l2(smoothed, plain) < 1e-5  # smooth_k returns float32: its rounding, no more
    assert smooth_k(k).mean(-2).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_block_quantizer_error_is_one_rounding(kind):
    x = make_outlier_qkv(2, 2, 300, 64, seed=0)[1]
    x8, scales = quantize_blocks(x, 128, kind)
    assert x8.dtype == (torch.int8 if kind == "int8" else FP8)
    assert scales.shape == (2, 2, 3)
    err = (dequantize_blocks(x8, scales, 128) - x.double()).abs()
    step = scales.double()[..., torch.arange(300) // 128, None]
    if kind == "int8":  # half a code step, at most
        assert (err <= step / 2 * (1 + 1e-6)).all()
    else:  # e4m3: 3 mantissa bits, half an ulp is 2^-4 relative; subnormals 2^-10 absolute
        assert (err <= torch.maximum(x.double().abs() * 2**-4, step * 2**-10)).all()


def test_v_quantizer_is_per_channel():
    v = torch.randn(1, 2, 256, 8) * torch.tensor([1e-3, 1, 10, 100, 1, 1, 1, 1])
    v8, sv = quantize_v(v)
    assert sv.shape == (1, 2, 8) and v8.dtype == FP8
    assert torch.allclose(sv, v.abs().amax(-2) / FP8_MAX)
    rel = ((v8.double() * sv.double()[..., None, :] - v) / v.abs().amax(-2, keepdim=True)).abs()
    assert rel.max() <= 2**-4  # the small channel keeps its precision: its own scale


def exactly_representable(B, H, S, D, kind, seed):
    """q/k/v the quantizers represent exactly: per block (Q/K) or channel (V) the amax is the top
    code, every value a code. Then only P's rounding is left, and none with P.V unquantized."""
    g = torch.Generator().manual_seed(seed)

    def codes(rows_per_scale, top, per_channel=False):
        if kind == "int8" and not per_channel:
            x = torch.randint(-127, 128, (B, H, S, D), generator=g).double()
        else:
            x = (torch.randn(B, H, S, D, generator=g) * 60).clamp(-448, 448).to(FP8).double()
        if per_channel:
            x[:, :, 0, :] = top
        else:
            x[:, :, ::rows_per_scale, 0] = top
        return x * 0.01  # an overall scale the quantizer must undo exactly (a power of 2 it's not)

    top = 127.0 if kind == "int8" else 448.0
    return codes(128, top), codes(128, top), codes(None, 448.0, per_channel=True)


@given(S=st.sampled_from([128, 200, 300, 520]), kind=st.sampled_from(["int8", "fp8"]),
       p=st.sampled_from([0.0, 0.3, 1.0]), levels=st.integers(1, 3), buckets=st.integers(1, 4),
       nan_t=st.booleans(), seed=st.integers(0, 2**16))
def test_mask_level_timestep_paths_are_the_references(S, kind, p, levels, buckets, nan_t, seed):
    # With inputs the quantizers represent exactly and P.V unquantized, the 8-bit reference is
    # the float64 reference: same level clamp, bucket rule (NaN timestep: bucket 0), stray bits,
    # diagonal, renormalised softmax over kept keys.
    B, H, D = 2, 2, 64
    q, k, v = exactly_representable(B, H, S, D, kind, seed)
    masks, lt, bb = random_tables(H, S, levels, buckets, seed, p)
    masks |= torch.where(torch.rand(masks.shape) < 0.2, -1, 0).to(torch.int32)  # stray bits
    ts = torch.tensor([float("nan") if nan_t else 10.0, 990.0])
    gold = sparse_attention_reference(q, k, v, masks, lt, bb, ts)
    ours = quantized_attention_reference(q.float(), k.float(), v.float(), masks, lt, bb, ts,
                                         precision=kind, smooth=False, quantize_pv=False)
    assert rel_l2(ours, gold) < 1e-6  # float32 output of a float64 computation
    # P.V in FP8 on the same paths: within the tested bound.
    ours8 = quantized_attention_reference(q.float(), k.float(), v.float(), masks, lt, bb, ts,
                                          precision=kind, smooth=False)
    assert rel_l2(ours8, gold) < QUANT_ERROR_BOUND[kind]


INPUTS = {
    "gaussian": lambda S, seed: make_qkv(1, 2, S, 64, dtype=torch.float32, seed=seed),
    "local": lambda S, seed: make_local_qkv(1, 2, S, 64, seed),
    "outlier": lambda S, seed: make_outlier_qkv(1, 2, S, 64, seed),
}


@given(inputs=st.sampled_from(sorted(INPUTS)), precision=st.sampled_from(["int8", "fp8"]),
       S=st.sampled_from([256, 300, 640]), p=st.sampled_from([0.3, 1.0]),
       seed=st.integers(0, 2**16))
def test_error_bound_against_float64(inputs, precision, S, p, seed):
    q, k, v = INPUTS[inputs](S, seed)
    masks, lt, bb = random_tables(2, S, 2, 2, seed, p)
    ts = torch.tensor(300.0)
    gold = sparse_attention_reference(q.double(), k.double(), v.double(), masks, lt, bb, ts)
    out = quantized_attention_reference(q, k, v, masks, lt, bb, ts, precision=precision)
    if precision == "fp8" and inputs == "local":
        # Sharp attention (logits ~36): FP8 Q.K^T has no bound there, INT8 stays inside its own.
        int8 = quantized_attention_reference(q, k, v, masks, lt, bb, ts, precision="int8")
        assert rel_l2(int8, gold) <= QUANT_ERROR_BOUND["int8"] < rel_l2(out, gold)
    else:
        assert rel_l2(out, gold) <= QUANT_ERROR_BOUND[precision]


def errors_vs_bf16(q, k, v, **kw):
    m, lt, bb = dense_tables(q.shape[1], q.shape[2])
    ts = torch.tensor(0.0)
    bf16 = sparse_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), m, lt, bb, ts)
    return rel_l2(quantized_attention_reference(q, k, v, m, lt, bb, ts, **kw), bf16)


@pytest.mark.parametrize("seed", [0, 1])
def test_issue_bar_on_outlier_channels(seed):
    # Issue 15's bar: per-layer attention output within 3% rel-L2 of the bf16 result on
    # outlier-channel inputs, for the recommended INT8 Q.K^T (smoothed) + FP8 P.V. Measured
    # (q8-accuracy-cpu.json, max vs bf16): 0.61% at these offsets, 2.4% on small-wan's own
    # q/k/v; 3.6% at 3x these offsets ("outlier-stress"), which misses the bar.
    q, k, v = make_outlier_qkv(1, 2, 512, 64, seed)
    assert errors_vs_bf16(q, k, v, precision="int8") <= 0.03


def test_int8_beats_fp8_and_smoothing_helps_on_strong_outliers():
    # Why INT8 is the recommended Q.K^T format and smoothing is on by default: at offsets 3x
    # small-wan's, INT8 with smoothing errs less than FP8 with it, and smoothing cuts both
    # (q8-accuracy-cpu.json, max vs bf16: 3.6% / 5.4% / 11% / 43% for int8+s / int8 / fp8+s /
    # fp8).
    q, k, v = make_outlier_qkv(1, 2, 512, 64, 0, stress=3.0)
    e = {(prec, sm): errors_vs_bf16(q, k, v, precision=prec, smooth=sm)
         for prec in ("int8", "fp8") for sm in (True, False)}
    assert e["int8", True] < e["fp8", True] < e["fp8", False]
    assert e["int8", True] < e["int8", False]
    assert math.isfinite(max(e.values()))
