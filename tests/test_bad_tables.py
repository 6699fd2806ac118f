"""Bad table values: one defined behaviour (``reference.py``), the same in the kernel (the
interpreter on the CPU; bf16 on the GPU with ``-m gpu``), the CPU reference and the Inductor
template, and no read out of bounds.

Before the fix, under the interpreter, a level outside ``[0, L)`` or a mask bit past the last
block gave NaN or an error of 2.7 (the kernel read past the tables or past K/V), while the CPU
path wrapped negative levels, raised on large ones and ignored the bits.

The defined behaviour, spelled out here independently of the reference (``sanitized``): levels
clamped to ``[0, L - 1]``; bits of KV blocks ``>= NB`` cleared (also in words past
``ceil(NB / 32)``); a NaN timestep in bucket 0, ``+inf`` in the last; a NaN bound never counts.
"""

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scaling_attn_compile import sparse_attention, sparse_attention_reference
from scaling_attn_compile.contract.masks import launch_order, num_blocks, num_words, pack_blocks
from scaling_attn_compile.contract.reference import (
    block_masks_for,
    energy_filtered_attention_reference,
)
from scaling_attn_compile.contract.validate import check_tables
from scaling_attn_compile.kernels.launch import CONFIGS, block_sparse_attention_forward
from scaling_attn_compile.ops.op import CHECK_TABLES_ENV
from scaling_attn_compile.testing import assert_close_to_oracle, make_local_qkv, make_qkv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                  reason="needs the Triton interpreter or a GPU")
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
ALL_ONES = -1  # int32 word with all 32 bits set


def good_tables(H, S, levels, buckets, seed, p=0.4):
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(S)
    masks = pack_blocks(torch.rand(H, levels, nb, nb, generator=g) < p)
    lt = torch.randint(0, levels, (buckets, H), generator=g, dtype=torch.int32)
    bounds = torch.sort(torch.rand(buckets - 1, generator=g) * 1000).values
    return masks, lt, bounds


def sanitized(masks, level_table, seq_len):
    """The defined behaviour as valid tables: words past ceil(NB / 32) dropped, bits of blocks
    >= NB cleared, levels clamped to [0, L - 1]."""
    nb, nw = num_blocks(seq_len), num_words(seq_len)
    words = masks[..., :nw].to(torch.int64) & 0xFFFFFFFF
    n_valid = (nb - 32 * torch.arange(nw, device=masks.device)).clamp(0, 32)
    words = words & ((1 << n_valid) - 1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.contiguous(), level_table.clamp(0, masks.shape[1] - 1)


def past_nb_bits(S):
    """The int32 word with every bit of blocks >= NB set (in the last word of a row)."""
    nb = num_blocks(S)
    assert nb % 32, "these tests use lengths whose last word has spare bits"
    return torch.tensor(-(1 << (nb % 32)), dtype=torch.int32)


def launch(q, k, v, masks, lt, bb, ts, config=(128, 4, 1), **kw):
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    block_sparse_attention_forward(q, k, v, masks, lt, bb, ts, out, q.shape[-1] ** -0.5, config,
                                   **kw)
    assert not torch.isnan(out).any(), "kernel left output elements unwritten (or read NaN)"
    return out


def check(out, q, k, v, masks, lt, bb, ts):
    """``out`` equals the reference on these (bad) tables, which equals the reference on the
    sanitized tables: the reference and the behaviour spelled out above agree."""
    S, scale = q.shape[2], q.shape[-1] ** -0.5
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale,
                                        compute_dtype=torch.float64)
    clean_masks, clean_lt = sanitized(masks, lt, S)
    assert torch.equal(golden, sparse_attention_reference(q, k, v, clean_masks, clean_lt, bb, ts,
                                                          scale, compute_dtype=torch.float64))
    same = sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale)
    assert_close_to_oracle(out, golden, same, k=3.0)


# -- the cases, one at a time ---------------------------------------------------------------------

def case(name, S=300, buckets=3):
    """(q, k, v, masks, level_table, bounds, timestep) for one bad-table case, on DEVICE."""
    B, H, D, L = 2, 2, 64, 3
    dtype = torch.float16
    q, k, v = make_qkv(B, H, S, D, dtype=dtype, device=DEVICE, seed=len(name))
    masks, lt, bb = good_tables(H, S, L, buckets, seed=len(name))
    ts = torch.tensor([100.0, 900.0])
    if name == "levels":
        lt = torch.tensor([[-1, L], [I32_MIN, I32_MAX], [L + 5, -7], [2, L]][:buckets],
                          dtype=torch.int32)
    elif name == "bits-past-NB":
        masks[..., -1] |= past_nb_bits(S)
    elif name == "extra-words":  # W larger than ceil(NB / 32), full of ones (direct launch)
        masks = torch.cat([masks, torch.full_like(masks, ALL_ONES)], -1)
    elif name == "timestep-inf":  # 3 bounds: padded to 4 lanes; +inf must not count the pad
        ts = torch.tensor([float("inf"), float("-inf")])
    elif name == "timestep-nan":
        ts = torch.tensor([float("nan"), 900.0])
    elif name == "nan-bound":
        bb = torch.tensor([200.0, float("nan"), 800.0][: buckets - 1])
        ts = torch.tensor([500.0, 900.0])
    else:
        raise ValueError(name)
    return tuple(t.to(DEVICE) for t in (q, k, v, masks, lt, bb, ts))


CASES = ["levels", "bits-past-NB", "extra-words", "timestep-inf", "timestep-nan", "nan-bound"]


@pytest.mark.parametrize("name", CASES)
def test_reference_follows_the_defined_behaviour(name):
    q, k, v, masks, lt, bb, ts = (t.cpu().float() if t.is_floating_point() and t.dim() == 4
                                  else t.cpu() for t in case(name, buckets=4))
    out = sparse_attention_reference(q, k, v, masks, lt, bb, ts, 0.125)
    clean_masks, clean_lt = sanitized(masks, lt, q.shape[2])
    assert torch.equal(out, sparse_attention_reference(q, k, v, clean_masks, clean_lt, bb, ts, 0.125))
    if name == "timestep-nan":  # NaN is in bucket 0, as a timestep below every bound
        below = torch.tensor([-1.0, 900.0])
        assert torch.equal(out, sparse_attention_reference(q, k, v, masks, lt, bb, below, 0.125))
    if name == "timestep-inf":  # +inf is in the last bucket, -inf in bucket 0
        edges = torch.tensor([1e30, -1e30])
        assert torch.equal(out, sparse_attention_reference(q, k, v, masks, lt, bb, edges, 0.125))


@needs_kernel
@pytest.mark.parametrize("S", [300, 256], ids=["partial-last-block", "even-S"])
@pytest.mark.parametrize("name", CASES)
def test_kernel_follows_the_defined_behaviour(name, S):
    q, k, v, masks, lt, bb, ts = case(name, S=S, buckets=4)  # 3 bounds: one padding lane
    out = launch(q, k, v, masks, lt, bb, ts)
    check(out, q, k, v, masks, lt, bb, ts)


@needs_kernel
@pytest.mark.parametrize("S", [384, 300], ids=["even-S", "partial-last-block"])
def test_energy_filter_ignores_bits_past_the_last_block(S):
    """With the filter on the kernel visits the diagonal's right neighbour first: for the last
    query block that is block NB, which a stray bit used to send it to (past K/V's end)."""
    B, H, D = 1, 2, 64
    q, k, v = make_local_qkv(B, H, S, D, seed=1, dtype=torch.float16, device=DEVICE)
    nb = num_blocks(S)
    masks = pack_blocks(torch.rand(H, 1, nb, nb, generator=torch.Generator().manual_seed(1)) < 0.5)
    masks[..., -1] |= past_nb_bits(S)
    lt, bb, ts = torch.zeros(1, H, dtype=torch.int32), torch.zeros(0), torch.tensor(500.0)
    masks, lt, bb, ts = (t.to(DEVICE) for t in (masks, lt, bb, ts))
    out = launch(q, k, v, masks, lt, bb, ts, energy_rule=1, energy_threshold=-3.0)
    blocks = block_masks_for(sanitized(masks, lt, S)[0], lt, bb, ts, B, S)
    golden = energy_filtered_attention_reference(q, k, v, blocks, D**-0.5, 1, -3.0)
    same = energy_filtered_attention_reference(q, k, v, blocks, D**-0.5, 1, -3.0,
                                               compute_dtype=torch.float32)
    assert_close_to_oracle(out, golden, same, k=3.0)


# -- fuzzing: any level values, any words, any timesteps -----------------------------------------

level_values = st.one_of(st.integers(-3, 5), st.sampled_from([I32_MIN, I32_MAX]))
word_values = st.one_of(st.integers(I32_MIN, I32_MAX), st.just(0), st.just(ALL_ONES))
timestep_values = st.one_of(st.floats(0, 1000), st.sampled_from([math.nan, math.inf, -math.inf]))


@needs_kernel
@given(S=st.sampled_from([128, 200, 256, 300, 520]), L=st.integers(1, 3),
       buckets=st.integers(1, 4), extra_words=st.integers(0, 1),
       dtype=st.sampled_from([torch.float16, torch.float32]), data=st.data())
def test_fuzzed_tables_kernel_equals_reference(S, L, buckets, extra_words, dtype, data):
    B, H, D = 2, 2, 64
    if dtype == torch.float32 and not INTERPRET:
        dtype = torch.bfloat16
    nb, W = num_blocks(S), num_words(S) + extra_words
    words = data.draw(st.lists(word_values, min_size=H * L * nb * W, max_size=H * L * nb * W))
    masks = torch.tensor(words, dtype=torch.int32).view(H, L, nb, W)
    levels = data.draw(st.lists(level_values, min_size=buckets * H, max_size=buckets * H))
    lt = torch.tensor(levels, dtype=torch.int32).view(buckets, H)
    bounds = sorted(data.draw(st.lists(st.floats(0, 1000), min_size=buckets - 1,
                                       max_size=buckets - 1)))
    ts = data.draw(st.lists(timestep_values, min_size=B, max_size=B))
    q, k, v = make_qkv(B, H, S, D, dtype=dtype, device=DEVICE, seed=S + L)
    masks, lt, bb, ts = (t.to(DEVICE) for t in (masks, lt, torch.tensor(bounds).float(),
                                                torch.tensor(ts)))
    config = data.draw(st.sampled_from([(128, 4, 1), (64, 4, 1)]))
    # The launch order the backend would build from these very tables (any levels, any bits):
    # a schedule, so the answer is the same with it or without.
    order = launch_order(masks, lt, S) if data.draw(st.booleans()) else None
    out = launch(q, k, v, masks, lt, bb, ts, config, launch_order=order)
    check(out, q, k, v, masks, lt, bb, ts)


# -- the Inductor template (rendered on the CPU, run by the interpreter) -------------------------

@pytest.mark.skipif(not INTERPRET, reason="needs the interpreter")
def test_rendered_template_follows_the_defined_behaviour():
    """The template pastes the kernel's jit functions; its stub binds num_levels. Bad levels,
    bits past NB and a +inf timestep give the reference's answer there too."""
    import importlib.util
    from unittest import mock

    import torch.utils._triton as triton_utils
    import triton

    from scaling_attn_compile.compile import lowering

    q, k, v, masks, lt, bb, _ = case("levels", S=300, buckets=4)
    masks[..., -1] |= past_nb_bits(300).to(DEVICE)
    ts = torch.tensor([float("inf"), 100.0])
    captured = []

    def select(name, choices, inputs, layout, **kwargs):
        captured.extend(choices)
        raise RuntimeError("choices captured")

    op = torch.ops.scaling_attn.sparse_attention.default
    with mock.patch.object(lowering, "_select", select), \
            mock.patch.object(lowering, "TEMPLATE_DEVICE_TYPES", {"cuda", "cpu"}), \
            mock.patch.object(triton_utils, "triton_hash_with_backend", lambda: "cpu-test"), \
            torch._inductor.config.patch(cpu_backend="triton", fx_graph_cache=False), \
            pytest.raises(Exception, match="choices captured"):
        torch.compile(lambda *a: op(*a, 0.125), backend="inductor", fullgraph=True)(
            q, k, v, masks, lt, bb, ts)
    choice = next(c for c in captured if "BLOCK_M : tl.constexpr = 128"
                  in open(c.bmreq.module_path).read())
    spec = importlib.util.spec_from_file_location("tmpl", choice.bmreq.module_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = torch.full_like(q, float("nan"))
    getattr(mod, choice.bmreq.kernel_name).fn[(triton.cdiv(300, 128), 2, 2)](
        q, k, v, masks, lt, bb, ts, out)
    check(out, q, k, v, masks, lt, bb, ts)


# -- the op: defined behaviour by default, opt-in checks ------------------------------------------

def test_op_on_bad_tables_is_the_defined_behaviour_not_an_error():
    q, k, v, masks, lt, bb, ts = (t.cpu() for t in case("levels", buckets=4))
    masks[..., -1] |= past_nb_bits(300)
    q, k, v = q.float(), k.float(), v.float()
    out = sparse_attention(q, k, v, masks, lt, bb, ts, 0.125)
    clean_masks, clean_lt = sanitized(masks, lt, 300)
    assert torch.equal(out, sparse_attention(q, k, v, clean_masks, clean_lt, bb, ts, 0.125))


@pytest.mark.parametrize("name, match", [
    ("levels", r"level_table\[0, 0\] = -1, but masks has L=3 levels: expected values in \[0, 2\]"),
    ("bits-past-NB", r"masks\[0, 0, 0\] sets bits of KV blocks >= NB=3"),
    ("timestep-nan", r"timestep is NaN; the op would use bucket 0"),
    ("nan-bound", r"bucket_bounds must not contain NaN"),
])
def test_check_tables_names_the_bad_value(name, match):
    _, _, _, masks, lt, bb, ts = (t.cpu() for t in case(name, buckets=4))
    with pytest.raises(ValueError, match=match):
        check_tables(masks, lt, bb, 300, ts)


def test_check_tables_passes_good_tables_and_catches_unsorted_bounds():
    masks, lt, bb = good_tables(2, 300, 3, 4, seed=0)
    check_tables(masks, lt, bb, 300, torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="bucket_bounds must be ascending"):
        check_tables(masks, lt, bb.flip(0), 300)


def test_check_tables_env_var_makes_the_eager_op_raise(monkeypatch):
    q, k, v, masks, lt, bb, ts = (t.cpu() for t in case("levels", buckets=4))
    q, k, v = q.float(), k.float(), v.float()
    sparse_attention(q, k, v, masks, lt, bb, ts, 0.125)  # off by default: clamps
    monkeypatch.setenv(CHECK_TABLES_ENV, "1")
    with pytest.raises(ValueError, match="check_tables: level_table"):
        sparse_attention(q, k, v, masks, lt, bb, ts, 0.125)


def test_backend_tables_are_valid_by_construction():
    """Tables a plan materialises (what the backend binds) pass check_tables, at a grid whose
    last word is partial (NB = 40: 24 spare bits) and with a FAST schedule."""
    from scaling_attn_compile.models.wan import load_transformer
    from scaling_attn_compile.offline import west
    from scaling_attn_compile.plan.plan import FastSchedule, Plan

    model = load_transformer("tiny-random", seed=0).transformer
    calib, grid = (3, 8, 20), (5, 32, 32)  # S = 480 (NB 4) -> S = 5120 (NB 40)
    g = torch.Generator().manual_seed(0)
    L, Hh = len(model.blocks), model.config.num_attention_heads
    codes = west.threshold_codes(torch.rand(2, L, Hh, 4, 4, generator=g)).amin(0)
    plan = Plan.from_codes(codes, model, calib, 2, {})
    lt = torch.randint(0, 3, (L, 3, Hh), generator=g, dtype=torch.int32)
    plan = plan.with_schedule(FastSchedule([0.25, 0.5, 1.0], lt, torch.tensor([300.0, 700.0])))
    tables = plan.materialize(grid)
    S = math.prod(grid)
    assert num_blocks(S) % 32 != 0
    for layer in range(L):
        check_tables(*tables.layer(layer), S)


# -- dtypes: float64, and bf16 in the interpreter -------------------------------------------------

def test_float64_on_the_cpu_is_computed_in_float64():
    B, H, S, D = 1, 2, 300, 64
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float64, seed=4)
    masks, lt, bb = good_tables(H, S, 2, 2, seed=4)
    ts = torch.tensor([600.0])
    out = sparse_attention(q, k, v, masks, lt, bb, ts, D**-0.5)
    assert out.dtype == torch.float64
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5,
                                        compute_dtype=torch.float64)
    in_fp32 = sparse_attention_reference(q, k, v, masks, lt, bb, ts, D**-0.5,
                                         compute_dtype=torch.float32)
    err = (out - golden).abs().max().item()
    assert err < 1e-12 < (in_fp32 - golden).abs().max().item(), err


@pytest.mark.skipif(not INTERPRET, reason="needs the interpreter")
def test_bf16_in_the_interpreter_is_refused_with_the_reason(capsys):
    q, k, v, masks, lt, bb, ts = case("levels")
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with pytest.raises(TypeError, match="bfloat16 in Triton's interpreter gives garbage"):
        block_sparse_attention_forward(q, k, v, masks, lt, bb, ts, torch.empty_like(q), 0.125)
    from scaling_attn_compile.ops.selfcheck import main

    assert main(["--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "not run: block-sparse kernel: bfloat16 in Triton's interpreter" in printed


# -- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("S", [1000, 1024], ids=["partial-last-block", "even-S"])
@pytest.mark.parametrize("config", CONFIGS)
def test_gpu_bad_tables_every_config(config, S):
    B, H, D, L = 2, 2, 128, 3
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda", seed=S)
    masks, _, _ = good_tables(H, S, L, 4, seed=S)
    masks[..., -1] |= past_nb_bits(S)
    masks = torch.cat([masks, torch.full_like(masks, ALL_ONES)], -1)  # and a spare word
    lt = torch.tensor([[-1, L], [I32_MIN, I32_MAX], [1, 2], [L + 5, -7]], dtype=torch.int32)
    bb = torch.tensor([200.0, 500.0, 800.0])
    ts = torch.tensor([float("inf"), float("nan")])
    masks, lt, bb, ts = (t.cuda() for t in (masks, lt, bb, ts))
    out = launch(q, k, v, masks, lt, bb, ts, config)
    check(out, q, k, v, masks, lt, bb, ts)


@pytest.mark.gpu
def test_gpu_compiled_template_bad_tables():
    """Through torch.compile: the Inductor template (autotuned) on bad tables."""
    B, H, S, D, L = 1, 2, 1000, 128, 3
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda", seed=5)
    masks, _, bb = good_tables(H, S, L, 3, seed=5)
    masks[..., -1] |= past_nb_bits(S)
    lt = torch.tensor([[-4, L], [I32_MAX, I32_MIN], [L, -1]], dtype=torch.int32)
    ts = torch.tensor([float("inf")])
    masks, lt, bb, ts = (t.cuda() for t in (masks, lt, bb, ts))
    op = torch.ops.scaling_attn.sparse_attention.default
    from scaling_attn_compile.compile import lowering  # noqa: F401  (registers the lowering)

    out = torch.compile(lambda *a: op(*a, D**-0.5), backend="inductor", fullgraph=True)(
        q, k, v, masks, lt, bb, ts)
    check(out, q, k, v, masks, lt, bb, ts)


@pytest.mark.gpu
def test_gpu_float64_is_refused_with_the_fix():
    q, k, v = make_qkv(1, 2, 256, 64, dtype=torch.float64, device="cuda")
    masks, lt, bb = (t.cuda() for t in good_tables(2, 256, 1, 1, seed=0))
    with pytest.raises(TypeError, match="float64 runs only on the CPU"):
        sparse_attention(q, k, v, masks, lt, bb, torch.tensor([1.0], device="cuda"), 0.125)
