"""FlashAttention-4 as an autotune choice of the op's lowering, and the template's TMA configs.

CPU: FA4's availability and the TMA device check are mocked (flash_attn is never imported);
the template is rendered through Inductor's triton cpu backend (``capture_template_choices``)
and the choice list is read. One test lets the autotuner "pick" FA4 and runs the generated code
with FA4's kernel replaced by the reference, so the extern call Inductor emits (op, arguments,
``scale``) is exercised. GPU (``-m gpu``, skipped without CUDA or ``flash_attn.cute``): compiled
output equals the reference with FA4 among the choices, and the pick is recorded.
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch

from scaling_attn_compile.compile import lowering
from scaling_attn_compile.contract.masks import add_diagonal, num_blocks, pack_blocks
from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.kernels.fa4 import fa4_available
from scaling_attn_compile.ops import fa4_op
from scaling_attn_compile.testing import assert_close_to_oracle, make_qkv, rendered_kernel

# Self-contained (no diffusers, unlike test_lowering.py's helpers): the device call that
# installs FA4 has no room left to carry diffusers' wheels too.
OP = torch.ops.scaling_attn.sparse_attention.default
B, H, S, D = 2, 2, 200, 64
SCALE = 0.1  # not 1/sqrt(D): the op's scale must reach the extern call


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def two_level_tables(h=H, s=S):
    """Level 0 a checkerboard of blocks (per head), level 1 dense; bucket 0 (t < 500) every head
    at level 0, bucket 1 head 0 dense; the last bound is +inf, as the backend binds it."""
    nb = num_blocks(s)
    u = torch.arange(nb)
    sparse = torch.stack([(u[:, None] + u[None, :] + i) % 2 == 0 for i in range(h)])
    levels = torch.stack([add_diagonal(sparse), torch.ones(h, nb, nb, dtype=torch.bool)], 1)
    lt = torch.zeros(3, h, dtype=torch.int32)
    lt[1:, 0] = 1
    return pack_blocks(levels), lt, torch.tensor([500.0, float("inf")])


def inputs(dtype=torch.float16, k_layout=None):
    q, k, v = make_qkv(B, H, S, D, dtype=dtype)
    if k_layout == "d-strided":  # last dim not contiguous: neither TMA nor FA4 can read it
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    return (q, k, v, *two_level_tables(), torch.tensor([900, 100]))


@contextlib.contextmanager
def capture_template_choices():
    """Render the template on the CPU (Inductor's triton cpu backend) and capture the choices
    instead of benchmarking them (there is no GPU to benchmark on). Here, not in test_lowering.py
    (which imports it, as test_kernel_compile.py does): this file imports no diffusers."""
    import torch.utils._triton as triton_utils

    captured = []

    def select(name, choices, inputs, layout, **kwargs):
        captured.extend(choices)
        raise RuntimeError("choices captured")

    with mock.patch.object(lowering, "_select", select), \
            mock.patch.object(lowering, "TEMPLATE_DEVICE_TYPES", {"cuda", "cpu"}), \
            mock.patch.object(triton_utils, "triton_hash_with_backend", lambda: "cpu-test"), \
            torch._inductor.config.patch(cpu_backend="triton", fx_graph_cache=False):
        yield captured


def offered(args, *, fa4=True, tma=False, extra=()):
    """The lowering's choices for ``OP(*args, SCALE, *extra)`` with FA4 / TMA mocked."""
    with mock.patch.object(lowering, "_fa4_device", lambda device: fa4), \
            mock.patch.object(lowering, "_tma_device", lambda device: tma), \
            capture_template_choices() as choices:
        with pytest.raises(Exception, match="choices captured"):
            torch.compile(lambda *a: OP(*a, SCALE, *extra), backend="inductor",
                          fullgraph=True, dynamic=False)(*args)
    return choices


def names(choices):
    return [c.name for c in choices]


def test_fa4_is_a_choice_only_where_it_is_available():
    args = inputs()
    with_fa4 = offered(args, fa4=True)
    without = offered(args, fa4=False)
    n = len(lowering.template_configs())
    assert names(with_fa4).count(lowering.FA4_CHOICE_NAME) == 1 and len(with_fa4) == n + 1
    assert lowering.FA4_CHOICE_NAME not in names(without) and len(without) == n
    fa4 = next(c for c in with_fa4 if c.name == lowering.FA4_CHOICE_NAME)
    assert fa4.kwargs == {"scale": SCALE} and fa4.choice.op_overload is fa4_op.FA4_OP
    assert len(fa4.input_nodes) == 7  # q, k, v, masks, level_table, bucket_bounds, timestep


@pytest.mark.parametrize("off", ["0", "false", "OFF", "no"])
def test_env_switch_leaves_fa4_out(monkeypatch, off):
    monkeypatch.setenv(lowering.FA4_ENV, off)
    assert not lowering.fa4_enabled()
    assert lowering.FA4_CHOICE_NAME not in names(offered(inputs(), fa4=True))
    monkeypatch.setenv(lowering.FA4_ENV, "1")
    assert lowering.fa4_enabled()


def test_fa4_choice_context_leaves_fa4_out_for_the_compiles_inside():
    """The hook a backend option ``fa4=False`` uses: off inside, on again after, and the cache
    key follows it."""
    from scaling_attn_compile.kernels import fa4 as fa4_kernels

    with lowering.fa4_choice(False):
        assert not lowering.fa4_enabled()
        assert lowering.FA4_CHOICE_NAME not in names(offered(inputs(), fa4=True))
        with mock.patch.object(torch.cuda, "is_available", lambda: True), \
                mock.patch.object(fa4_kernels, "_fa4_imports", lambda: True):
            off = lowering.KernelSourceHash().uuid()
            with lowering.fa4_choice(True):
                assert lowering.KernelSourceHash().uuid() != off
    assert lowering.fa4_enabled()
    assert lowering.FA4_CHOICE_NAME in names(offered(inputs(), fa4=True))


@pytest.mark.parametrize("case", ["energy-filter", "kv-lens", "float32", "d-strided"])
def test_fa4_not_offered_for_what_it_cannot_express(case):
    """Energy filter and kv_lens are no fixed full-block lists; FA4 takes fp16/bf16 only and
    q/k/v with a contiguous last dim. The template stays the only choice, silently."""
    args, extra = inputs(torch.float32 if case == "float32" else torch.float16,
                         "d-strided" if case == "d-strided" else None), ()
    if case == "energy-filter":
        extra = (1, -2.0)
    elif case == "kv-lens":
        extra = (0, 0.0, torch.tensor([S, S - 70], dtype=torch.int32))
    if case == "float32":  # the template itself takes fp16/bf16 only: the eager op is called
        with mock.patch.object(lowering, "_template_supported", lambda q: True):
            choices = offered(args, fa4=True)
    else:
        choices = offered(args, fa4=True, extra=extra)
    assert choices and lowering.FA4_CHOICE_NAME not in names(choices)


def test_fa4_refusal_reasons_name_the_cause(monkeypatch):
    class Node:  # the few IR methods fa4_refusal reads
        def __init__(self, dtype=torch.bfloat16, d=128, last_stride=1):
            self.dtype, self.d, self.last = dtype, d, last_stride

        def get_dtype(self):
            return self.dtype

        def get_size(self):
            return [1, 2, 256, self.d]

        def get_stride(self):
            return [512 * self.d, self.d, 2 * self.d, self.last]

    dev = torch.device("cuda", 0)
    ok = Node()
    with mock.patch.object(lowering, "_fa4_device", lambda device: True):
        assert lowering.fa4_refusal(dev, ok, ok, ok) is None
        assert lowering.fa4_refusal(dev, ok, ok, ok, energy_rule=2) == "energy filter"
        assert lowering.fa4_refusal(dev, ok, ok, ok, kv_lens=object()) == "kv_lens"
        assert "head_dim 192" in lowering.fa4_refusal(dev, *[Node(d=192)] * 3)
        assert "dtype" in lowering.fa4_refusal(dev, *[Node(torch.float32)] * 3)
        assert "contiguous" in lowering.fa4_refusal(dev, ok, Node(last_stride=2), ok)
        monkeypatch.setenv(lowering.FA4_ENV, "0")
        assert lowering.FA4_ENV in lowering.fa4_refusal(dev, ok, ok, ok)
    monkeypatch.delenv(lowering.FA4_ENV)
    with mock.patch.object(lowering, "_fa4_device", lambda device: False):
        assert "sm90" in lowering.fa4_refusal(dev, ok, ok, ok)


def test_cache_key_changes_with_the_fa4_state(monkeypatch):
    """A graph compiled with FA4 among its choices must not be reused with the switch off."""
    from scaling_attn_compile.kernels import fa4 as fa4_kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fa4_kernels, "_fa4_imports", lambda: True)
    on = lowering.KernelSourceHash().uuid()
    monkeypatch.setenv(lowering.FA4_ENV, "0")
    off = lowering.KernelSourceHash().uuid()
    assert on != off and off == lowering._SOURCE_HASH


@contextlib.contextmanager
def fa4_picked(fake_fa4, style: str = "node+choice"):
    """Compiles inside pick FA4 whatever the timings, with ``fake_fa4`` as its kernel, on the
    CPU (Inductor's triton cpu backend). ``style``: what the selector returns, ``"node+choice"``
    (torch >= 2.12) or ``"node"`` (torch 2.11)."""
    def pick_fa4(name, choices, input_nodes, layout, **kwargs):
        choice = next(c for c in choices if c.name == lowering.FA4_CHOICE_NAME)
        node = choice.output_node()
        return (node, choice) if style == "node+choice" else node

    with mock.patch.object(lowering, "_fa4_device", lambda device: True), \
            mock.patch.object(lowering, "autotune_select_algorithm", pick_fa4), \
            mock.patch.object(lowering, "TEMPLATE_DEVICE_TYPES", {"cuda", "cpu"}), \
            mock.patch.object(fa4_op, "fa4_block_sparse_attention", fake_fa4), \
            mock.patch("torch.utils._triton.triton_hash_with_backend", lambda: "cpu-test"), \
            torch._inductor.config.patch(cpu_backend="triton", fx_graph_cache=False):
        yield


def test_generated_code_calls_the_fa4_op_when_it_wins():
    """Let the autotuner pick FA4 and run what Inductor generates: the extern call is
    ``torch.ops.scaling_attn.sparse_attention_fa4`` with the op's inputs and scale, it equals the
    reference, and :data:`lowering.PICKS` says FA4 won. FA4's kernel is replaced by the
    reference (there is no GPU); both torch return conventions of the selector are tried."""
    from torch._inductor.utils import run_and_get_code

    args = inputs()
    calls = []

    def fake_fa4(q, k, v, masks, lt, bb, ts, scale):
        calls.append(scale)
        return sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale)

    for style in ("node+choice", "node"):  # torch >= 2.12, torch 2.11
        torch._dynamo.reset()
        del lowering.PICKS[:]
        with fa4_picked(fake_fa4, style):
            f = torch.compile(lambda *a: OP(*a, SCALE), backend="inductor", fullgraph=True,
                              dynamic=False)
            out, codes = run_and_get_code(f, *args)
        code = "\n".join(codes)
        assert "torch.ops.scaling_attn.sparse_attention_fa4.default" in code, style
        assert calls and calls[-1] == SCALE
        assert out.stride() == args[0].stride()
        torch.testing.assert_close(out, sparse_attention_reference(*args, SCALE))
        assert lowering.PICKS[-1]["picked"] == "fa4", (style, lowering.PICKS)
        assert lowering.PICKS[-1]["fa4"] is None
        assert lowering.FA4_CHOICE_NAME in lowering.PICKS[-1]["choices"]


def test_fa4_op_keeps_q_fill_order():
    """FA4 writes (B, S, H, D) memory; the op hands it back as is when that is q's fill order
    (diffusers' layout) and copies it into q's order otherwise, as its fake promises."""
    def fake_fa4(q, k, v, masks, lt, bb, ts, scale):  # FA4's output layout
        out = sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale)
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    q, k, v, masks, lt, bb, ts = inputs(torch.float32)
    bshd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    with mock.patch.object(fa4_op, "fa4_block_sparse_attention", fake_fa4):
        for qkv in ((q, k, v), bshd):
            out = fa4_op.FA4_OP(*qkv, masks, lt, bb, ts, scale=SCALE)
            assert out.stride() == torch.empty_like(qkv[0]).stride()
            torch.testing.assert_close(out, sparse_attention_reference(*qkv, masks, lt, bb, ts,
                                                                       SCALE))


# -- the template's TMA configs ------------------------------------------------------------------


def test_tma_configs_join_the_template_where_tma_can_read_k_and_v():
    args = inputs()
    n_tma = sum(bool(c.get("use_tma")) for c in lowering.template_configs(tma=True))
    assert n_tma >= 1
    tma = offered(args, fa4=False, tma=True)
    assert len(tma) == len(lowering.template_configs(tma=True))
    assert sum(rendered_kernel(c).inductor_meta["config_args"]["USE_TMA"] for c in tma) == n_tma
    no_device = offered(args, fa4=False, tma=False)  # before sm90: none
    assert len(no_device) == len(lowering.template_configs())
    strided = offered(inputs(k_layout="d-strided"), fa4=False, tma=True)
    assert not any(rendered_kernel(c).inductor_meta["config_args"]["USE_TMA"] for c in strided)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
def test_rendered_tma_template_runs_in_the_interpreter():
    """The template's TMA variant (K/V through tensor descriptors), as Inductor renders it,
    equals the reference in the Triton interpreter."""
    import triton

    args = inputs()
    choices = offered(args, fa4=False, tma=True)
    kernel = next(rendered_kernel(c) for c in choices
                  if rendered_kernel(c).inductor_meta["config_args"]["USE_TMA"])
    q = args[0]
    out = torch.full_like(q, float("nan"))
    block_m = kernel.inductor_meta["config_args"]["BLOCK_M"]
    kernel.fn[(triton.cdiv(S, block_m), B, H)](*args, out)
    golden = sparse_attention_reference(*args, SCALE, compute_dtype=torch.float64)
    same = sparse_attention_reference(*args, SCALE)
    assert_close_to_oracle(out, golden, same, k=3.0, what="template, TMA")


# -- GPU ----------------------------------------------------------------------------------------

needs_fa4 = pytest.mark.skipif(not fa4_available(), reason="needs flash_attn.cute on an sm90 GPU")


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("density", [1.0, 0.25, 0.1])
def test_gpu_compiled_op_with_fa4_choice_matches_reference(density):
    """The lowering offers FA4 and the template; whichever the autotuner keeps (recorded in
    PICKS and visible in the generated code) equals the reference at this density."""
    from torch._inductor.utils import run_and_get_code

    from scaling_attn_compile.contract.tables import uniform_tables

    b, h, s, d = 1, 4, 128 * 24 + 37, 128
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)  # diffusers' (B, S, H, D) memory
               for t in make_qkv(b, h, s, d, dtype=torch.bfloat16, device="cuda", seed=7))
    masks, lt, bb = uniform_tables(1, h, (1, 1, s), density, seed=1).to("cuda").layer(0)
    ts = torch.tensor([500.0], device="cuda")
    torch._dynamo.reset()
    del lowering.PICKS[:]
    f = torch.compile(lambda *a: OP(*a, d**-0.5), fullgraph=True, dynamic=False)
    # The densities share one graph (the tables are inputs): without this, the FX graph cache
    # serves the 2nd and 3rd compile and the lowering (which fills PICKS) never runs.
    with torch._inductor.config.patch(fx_graph_cache=False):
        out, codes = run_and_get_code(f, q, k, v, masks, lt, bb, ts)
    pick = lowering.PICKS[-1]
    assert pick["fa4"] is None and lowering.FA4_CHOICE_NAME in pick["choices"], pick
    assert pick["choices"].count(lowering.FA4_CHOICE_NAME) == 1
    code = "\n".join(line for c in codes for line in c.splitlines()
                     if not line.lstrip().startswith("#"))
    ran_fa4 = "sparse_attention_fa4" in code
    assert ran_fa4 != ("def bsa_forward_tile(" in code)  # exactly one of the two ran
    if pick["picked"] is not None:
        assert (pick["picked"] == "fa4") == ran_fa4
    print(f"density {density}: picked {'fa4' if ran_fa4 else 'template'}")
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, d**-0.5,
                                        compute_dtype=torch.float64)
    same = sparse_attention_reference(q, k, v, masks, lt, bb, ts, d**-0.5)
    assert_close_to_oracle(out, golden, same, k=3.0, what=f"compiled, density {density}")


@pytest.mark.gpu
@needs_fa4
def test_gpu_fa4_choice_and_template_agree_and_switch_works(monkeypatch):
    """Both choices forced in turn (FA4 alone by handing the autotuner only the FA4 choice; the
    template alone with SCALING_ATTN_FA4=0) give outputs within the oracle tolerance."""
    from scaling_attn_compile.contract.tables import uniform_tables

    b, h, s, d = 1, 2, 128 * 16, 128
    q, k, v = make_qkv(b, h, s, d, dtype=torch.bfloat16, device="cuda", seed=2)
    masks, lt, bb = uniform_tables(1, h, (1, 1, s), 0.3, seed=2).to("cuda").layer(0)
    ts = torch.tensor([500.0], device="cuda")
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, d**-0.5,
                                        compute_dtype=torch.float64)
    same = sparse_attention_reference(q, k, v, masks, lt, bb, ts, d**-0.5)
    outs = {}
    select = lowering.autotune_select_algorithm
    for name in ("fa4", "template"):
        torch._dynamo.reset()
        del lowering.PICKS[:]
        if name == "template":
            monkeypatch.setenv(lowering.FA4_ENV, "0")
            choose = select
        else:
            def choose(n, choices, *a, **kw):
                return select(n, [c for c in choices if c.name == lowering.FA4_CHOICE_NAME],
                              *a, **kw)
        with mock.patch.object(lowering, "autotune_select_algorithm", choose), \
                torch._inductor.config.patch(fx_graph_cache=False):  # else a cache hit skips the lowering
            outs[name] = torch.compile(lambda *a: OP(*a, d**-0.5), fullgraph=True,
                                       dynamic=False)(q, k, v, masks, lt, bb, ts)
        expect_fa4 = name == "fa4"
        assert (lowering.FA4_CHOICE_NAME in lowering.PICKS[-1]["choices"]) == expect_fa4
        assert lowering.PICKS[-1]["picked"] in (name, None), lowering.PICKS[-1]
        assert_close_to_oracle(outs[name], golden, same, k=3.0, what=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs an sm90+ GPU")
@pytest.mark.parametrize("s", [128 * 24, 128 * 24 + 37])
def test_gpu_compiled_tma_template_matches_reference(monkeypatch, s):
    """The template's TMA config alone, run by Inductor's generated code (its launcher sets the
    Triton allocator the tensor descriptors need), equals the reference."""
    from torch._inductor.utils import run_and_get_code

    from scaling_attn_compile.contract.tables import uniform_tables

    monkeypatch.setenv(lowering.FA4_ENV, "0")
    b, h, d = 2, 3, 128
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)
               for t in make_qkv(b, h, s, d, dtype=torch.bfloat16, device="cuda", seed=s))
    masks, lt, bb = uniform_tables(1, h, (1, 1, s), 0.3, seed=4).to("cuda").layer(0)
    ts = torch.tensor([500.0, 20.0], device="cuda")

    select = lowering.autotune_select_algorithm

    def only_tma(name, choices, *a, **kw):
        tma = [c for c in choices
               if "USE_TMA : tl.constexpr = True" in open(c.bmreq.module_path).read()]
        assert tma, "no TMA config offered on an sm90+ GPU for (B, S, H, D) memory"
        return select(name, tma, *a, **kw)

    with mock.patch.object(lowering, "autotune_select_algorithm", only_tma):
        out, codes = run_and_get_code(
            torch.compile(lambda *a: OP(*a, d**-0.5), fullgraph=True, dynamic=False),
            q, k, v, masks, lt, bb, ts)
    assert "USE_TMA : tl.constexpr = True" in "\n".join(codes)
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, d**-0.5,
                                        compute_dtype=torch.float64)
    same = sparse_attention_reference(q, k, v, masks, lt, bb, ts, d**-0.5)
    assert_close_to_oracle(out, golden, same, k=3.0, what="compiled template, TMA")
