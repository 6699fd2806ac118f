"""The kernel's launch order (``contract/masks.launch_order``): which (head, query block) each
program takes, longest rows first. A schedule, not semantics: with any permutation the kernel's
output is bit-identical to index order; the backend builds one per layer; an order that is no
permutation is caught by ``check_tables`` and never reads out of bounds.

CPU (CI): the builder, the checks, the kernel and the rendered template in the Triton
interpreter, the backend's graph. GPU (``-m gpu``): bit-identity on the device, both paths.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.contract.masks import (
    add_diagonal,
    launch_order,
    natural_order,
    num_blocks,
    num_words,
    pack_blocks,
    row_block_counts,
    unpack_blocks,
)
from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.contract.tables import uniform_tables
from scaling_attn_compile.contract.validate import check_tables
from scaling_attn_compile.kernels.launch import (
    LAUNCH_ORDER_ENV,
    block_sparse_attention_forward,
    program_rows,
)
from scaling_attn_compile.testing import make_local_qkv, make_qkv

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers live in test_backend.py
from test_backend import (  # noqa: E402
    GRID,
    HEADS,
    LAYERS,
    OP,
    _fresh_dynamo,  # noqa: F401  (autouse: a fresh Dynamo per test)
    make_inputs,
    make_model,
    two_level_tables,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_kernel = pytest.mark.skipif(not (INTERPRET or CUDA),
                                  reason="needs the Triton interpreter or a GPU")


def ragged_tables(H, S, seed=0, levels=2, buckets=3):
    """Rows with very unequal kept-block counts (per-head density 0.05..0.9), several levels and
    buckets: what a WEST plan looks like, and where the order matters."""
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(S)
    p = torch.linspace(0.05, 0.9, H * levels).view(H, levels, 1, 1)
    masks = pack_blocks(torch.rand(H, levels, nb, nb, generator=g) < p)
    lt = torch.randint(0, levels, (buckets, H), generator=g, dtype=torch.int32)
    bounds = torch.linspace(200.0, 800.0, buckets - 1)
    return masks, lt, bounds


# -- the builder --------------------------------------------------------------------------------

@pytest.mark.parametrize("S", [200, 128 * 32, 128 * 33 + 5])
def test_row_counts_are_what_the_kernel_visits(S):
    """Diagonal always counted once, bits past NB (stray bits, a spare word) never."""
    nb = num_blocks(S)
    b = torch.rand(3, 2, nb, nb, generator=torch.Generator().manual_seed(S)) < 0.3
    masks = pack_blocks(b)
    masks = torch.cat([masks, torch.full_like(masks[..., :1], -1)], -1)  # a spare all-ones word
    if nb % 32:
        masks[..., num_words(S) - 1] |= -(1 << 31)  # a stray bit past NB in the last real word
    assert torch.equal(row_block_counts(masks, S), add_diagonal(b).sum(-1).int())


def test_order_is_longest_first_per_head_and_heads_by_work():
    H, S = 4, 1000
    masks, lt, _ = ragged_tables(H, S)
    nb = num_blocks(S)
    order = launch_order(masks, lt, S)
    assert order.dtype == torch.int32 and order.shape == (lt.shape[0], H * nb)
    counts = add_diagonal(unpack_blocks(masks, nb)).sum(-1)  # (H, L, NB)
    for t in range(lt.shape[0]):
        assert sorted(order[t].tolist()) == list(range(H * nb))  # a permutation
        rows = counts[torch.arange(H), lt[t].long()]  # (H, NB) at this bucket's levels
        heads = (order[t].view(H, nb) // nb)
        assert (heads == heads[:, :1]).all(), "each head slot holds one head's rows"
        work = rows.sum(-1)[heads[:, 0]]
        assert (work[:-1] >= work[1:]).all(), "heads by kept blocks, most first"
        for j in range(H):
            h, u = heads[j, 0], order[t].view(H, nb)[j] % nb
            n = rows[h, u]
            assert (n[:-1] >= n[1:]).all(), "rows by kept blocks, most first"
            ties = n[:-1] == n[1:]
            assert (u[:-1][ties] < u[1:][ties]).all(), "stable: ties keep block order"


def test_order_clamps_levels_as_the_kernel_does():
    H, S = 2, 300
    masks, _, _ = ragged_tables(H, S, levels=2)
    wild = torch.tensor([[-7, 99]], dtype=torch.int32)
    clamped = torch.tensor([[0, 1]], dtype=torch.int32)
    assert torch.equal(launch_order(masks, wild, S), launch_order(masks, clamped, S))


def test_natural_order_is_index_order():
    assert natural_order(2, 3, 300).tolist() == [list(range(9))] * 2


# -- the checks ---------------------------------------------------------------------------------

def test_check_tables_refuses_an_order_that_is_no_permutation():
    H, S = 2, 300
    masks, lt, bb = ragged_tables(H, S)
    order = launch_order(masks, lt, S)
    check_tables(masks, lt, bb, S, launch_order=order)  # good: passes
    bad = order.clone()
    bad[1, 0] = bad[1, 1]  # one row twice, another never
    with pytest.raises(ValueError, match=r"launch_order\[1\] is not a permutation"):
        check_tables(masks, lt, bb, S, launch_order=bad)
    with pytest.raises(ValueError, match="launch_order must be"):
        check_tables(masks, lt, bb, S, launch_order=order[:, :-1])


@pytest.mark.parametrize("bad, match", [
    (lambda o: o.long(), "launch_order must be int32"),
    (lambda o: o[:, :-1], r"launch_order must have shape \(NT>=3, H\*NB=6\)"),
    (lambda o: o[:1], r"launch_order must have shape \(NT>=3"),
])
def test_op_names_a_bad_launch_order(bad, match):
    H, S, D = 2, 300, 16
    masks, lt, bb = ragged_tables(H, S)
    q, k, v = make_qkv(1, H, S, D, dtype=torch.float32)
    order = launch_order(masks, lt, S)
    with pytest.raises((TypeError, ValueError), match=match):
        OP(q, k, v, masks, lt, bb, torch.tensor([500.0]), D**-0.5, launch_order=bad(order))


def test_cpu_op_ignores_the_order():
    H, S, D = 2, 300, 16
    masks, lt, bb = ragged_tables(H, S)
    q, k, v = make_qkv(2, H, S, D, dtype=torch.float32)
    ts = torch.tensor([100.0, 900.0])
    order = launch_order(masks, lt, S)
    assert torch.equal(OP(q, k, v, masks, lt, bb, ts, D**-0.5, launch_order=order),
                       OP(q, k, v, masks, lt, bb, ts, D**-0.5))


# -- the kernel (interpreter on the CPU, the GPU on the device) ---------------------------------

def _launch(q, k, v, masks, lt, bb, ts, config, **kw):
    out = torch.full_like(q, float("nan"))
    return block_sparse_attention_forward(q, k, v, masks, lt, bb, ts, out, q.shape[-1] ** -0.5,
                                          config, **kw)


@needs_kernel
@pytest.mark.parametrize("S, config", [
    (300, (128, 4, 1)),  # partial last block
    (256, (128, 4, 1)),  # even S
    (200, (64, 4, 1)),   # S % 128 = 72 > 64: both 64-row tiles of the last block are real
    (320, (64, 4, 1)),   # S % 128 = 64: the last block's second tile is all padding
])
def test_kernel_with_the_order_is_bit_identical(S, config):
    """Each (head, query tile) is computed by the same code on the same inputs, whichever slot
    runs it: bit-identical outputs. Per-batch timesteps in different buckets, so each batch
    element reads its own bucket's row of the order."""
    B, H, D = 2, 3, 64
    dtype = torch.float16
    masks, lt, bb = (t.to(DEVICE) for t in ragged_tables(H, S))
    q, k, v = make_qkv(B, H, S, D, dtype=dtype, device=DEVICE, seed=S)
    ts = torch.tensor([100.0, 900.0], device=DEVICE)
    base = _launch(q, k, v, masks, lt, bb, ts, config)
    assert not base.isnan().any()
    order = launch_order(masks, lt, S)
    assert not torch.equal(order, natural_order(*order.shape[:1], H, S, DEVICE)), \
        "the test needs an order that differs from index order"
    assert torch.equal(_launch(q, k, v, masks, lt, bb, ts, config, launch_order=order), base)
    shuffled = torch.stack([torch.randperm(H * num_blocks(S), generator=torch.Generator()
                                           .manual_seed(t)) for t in range(order.shape[0])])
    assert torch.equal(_launch(q, k, v, masks, lt, bb, ts, config,
                               launch_order=shuffled.int().to(DEVICE)), base)


@needs_kernel
def test_kernel_with_the_order_and_kv_lens_and_energy_filter():
    """The two optional paths beside it: key lengths (HunyuanVideo) and the energy filter, whose
    per-(b, h, tile) skip counts land where the index-order launch puts them."""
    B, H, S, D = 2, 2, 600, 64
    masks, lt, bb = (t.to(DEVICE) for t in ragged_tables(H, S))
    q, k, v = make_local_qkv(B, H, S, D, seed=3, dtype=torch.float16, device=DEVICE)
    ts = torch.tensor([100.0, 900.0], device=DEVICE)
    order = launch_order(masks, lt, S)
    lens = torch.tensor([170, 600], dtype=torch.int32, device=DEVICE)
    cfg = (128, 4, 1)
    assert torch.equal(_launch(q, k, v, masks, lt, bb, ts, cfg, kv_lens=lens, launch_order=order),
                       _launch(q, k, v, masks, lt, bb, ts, cfg, kv_lens=lens))
    n = B * H * program_rows(S, 128)
    skipped = [torch.zeros(n, dtype=torch.int32, device=DEVICE) for _ in range(2)]
    a = _launch(q, k, v, masks, lt, bb, ts, cfg, energy_rule=2, energy_threshold=-1.0,
                skipped=skipped[0])
    b = _launch(q, k, v, masks, lt, bb, ts, cfg, energy_rule=2, energy_threshold=-1.0,
                skipped=skipped[1], launch_order=order)
    assert torch.equal(a, b) and torch.equal(skipped[0], skipped[1])
    assert skipped[0].sum() > 0, "the threshold must make the filter skip something"


@needs_kernel
def test_out_of_range_entries_are_clamped_and_compute_exactly_those_rows():
    """An order with values outside [0, H*NB) reads nothing out of bounds: each entry is clamped,
    and exactly the clamped (head, block) rows are written, equal to index order's."""
    B, H, S, D = 1, 2, 300, 64
    nb = num_blocks(S)
    masks, lt, bb = (t.to(DEVICE) for t in ragged_tables(H, S, buckets=1))
    bb = torch.tensor([float("inf")], device=DEVICE)
    lt = torch.cat([lt, lt])
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float16, device=DEVICE, seed=7)
    ts = torch.tensor([500.0], device=DEVICE)
    base = _launch(q, k, v, masks, lt, bb, ts, (128, 4, 1))
    wild = torch.tensor([[-5, 2**31 - 1, 3, 3, 0, -1]] * 2, dtype=torch.int32, device=DEVICE)
    out = _launch(q, k, v, masks, lt, bb, ts, (128, 4, 1), launch_order=wild)
    written = set(wild[0].clamp(0, H * nb - 1).tolist())  # {0, 5, 3}
    for idx in range(H * nb):
        h, u = divmod(idx, nb)
        rows = slice(u * 128, min(S, (u + 1) * 128))
        if idx in written:
            assert torch.equal(out[0, h, rows], base[0, h, rows])
        else:
            assert out[0, h, rows].isnan().all()


# -- the rendered Inductor template (CPU render, interpreter run) -------------------------------

@pytest.mark.skipif(not INTERPRET, reason="needs the interpreter")
def test_rendered_template_with_the_order_equals_the_reference():
    from test_lowering import capture_template_choices

    from scaling_attn_compile.compile import lowering
    from scaling_attn_compile.testing import assert_close_to_oracle, rendered_kernel

    B, H, S, D = 2, 2, 200, 64
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float16)
    masks, lt, bb = ragged_tables(H, S, buckets=2)
    bb = torch.cat([bb, torch.tensor([float("inf")])])
    lt = torch.cat([lt, lt[-1:]])  # as the backend binds them
    ts = torch.tensor([900.0, 100.0])
    order = launch_order(masks, lt, S)
    scale = D**-0.5
    f = lambda *a: OP(*a[:7], scale, launch_order=a[7])
    with capture_template_choices() as choices:
        with pytest.raises(Exception, match="choices captured"):
            torch.compile(f, backend="inductor", fullgraph=True)(q, k, v, masks, lt, bb, ts,
                                                                 order)
    assert len(choices) == len(lowering.template_configs())
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale,
                                        compute_dtype=torch.float64)
    same = sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale)
    by_block_m = {}
    for choice in choices:
        assert "off_h, pid_m = bsa_launch_slot(" in open(choice.bmreq.module_path).read()
        kernel = rendered_kernel(choice)
        by_block_m.setdefault(kernel.inductor_meta["config_args"]["BLOCK_M"], kernel)
    assert set(by_block_m) == {64, 128}
    for block_m, kernel in by_block_m.items():
        out = torch.full_like(q, float("nan"))
        kernel.fn[(program_rows(S, block_m), B, H)](q, k, v, masks, lt, bb, ts, order, out)
        assert_close_to_oracle(out, golden, same, k=3.0, what=f"template BLOCK_M={block_m}")


# -- the backend --------------------------------------------------------------------------------

def _graph_ops(backend_kwargs, monkeypatch=None):
    graphs = []
    backend = scaling_attn_backend(two_level_tables(), compiler=lambda gm, ex: (
        graphs.append(gm), gm.forward)[1], **backend_kwargs)
    with torch.no_grad():
        torch.compile(make_model(), backend=backend, fullgraph=True, dynamic=False)(
            **make_inputs(), timestep=torch.tensor([500]), return_dict=False)
    (gm,) = graphs
    return gm, [n for n in gm.graph.nodes if n.target is OP]


def test_backend_binds_each_layer_its_launch_order(monkeypatch):
    """Off by default (not yet shown to pay on a GPU); ``SCALING_ATTN_LAUNCH_ORDER=1`` binds
    each layer the order built from its own tables."""
    monkeypatch.delenv(LAUNCH_ORDER_ENV, raising=False)
    _, ops = _graph_ops({})
    assert ops and all("launch_order" not in n.kwargs for n in ops)
    torch._dynamo.reset()
    monkeypatch.setenv(LAUNCH_ORDER_ENV, "1")
    gm, ops = _graph_ops({})
    assert len(ops) == LAYERS
    buffers = dict(gm.named_buffers())
    s = GRID[0] * GRID[1] * GRID[2]
    tables = two_level_tables()
    for layer, node in enumerate(ops):
        order = buffers[node.kwargs["launch_order"].target]
        _, lt = buffers[f"scaling_attn_masks_{layer}"], buffers[f"scaling_attn_level_table_{layer}"]
        assert order.shape == (lt.shape[0], HEADS * num_blocks(s))
        assert torch.equal(order, launch_order(tables.masks[layer], lt, s))
    monkeypatch.setenv(LAUNCH_ORDER_ENV, "0")
    torch._dynamo.reset()
    _, ops = _graph_ops({})
    assert all("launch_order" not in n.kwargs for n in ops)


def test_regional_blocks_bind_the_launch_order(monkeypatch):
    """Regional compilation: the order is a block buffer like the masks, bound through
    ``bind_tables`` and passed to the op."""
    monkeypatch.setenv(LAUNCH_ORDER_ENV, "1")
    model = make_model()
    graphs = []
    backend = scaling_attn_backend(two_level_tables(), compiler=lambda gm, ex: (
        graphs.append(gm), gm.forward)[1])
    backend.attach(model)
    model.compile_repeated_blocks(backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        model(**make_inputs(), timestep=torch.tensor([500]), return_dict=False)
    ops = [n for gm in graphs for n in gm.graph.nodes if n.target is OP]
    assert ops and all(n.kwargs.get("launch_order") is not None for n in ops)
    attn = backend.attached[0].modules[0]
    assert attn.scaling_attn_launch_order.dtype == torch.int32
    backend.attached[0].detach()


# -- the GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device)")
def test_gpu_compiled_model_with_and_without_the_order_is_bit_identical(monkeypatch):
    model = make_model(head_dim=64).to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda")
              for k, v in make_inputs().items()}
    outs = []
    for env in ("1", "0"):  # the order on, then off (the default)
        monkeypatch.setenv(LAUNCH_ORDER_ENV, env)
        torch._dynamo.reset()
        backend = scaling_attn_backend(two_level_tables())
        with torch.no_grad():
            outs.append(torch.compile(copy.deepcopy(model), backend=backend, fullgraph=True,
                                      dynamic=False)(**inputs, timestep=torch.tensor(
                                          [500], device="cuda"), return_dict=False)[0])
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device)")
@pytest.mark.parametrize("config", [(128, 8, 3, True), (128, 8, 2), (64, 4, 2)])
def test_gpu_every_config_with_the_order_is_bit_identical(config):
    B, H, S, D = 1, 4, 32 * 128 + 40, 128
    masks, lt, bb = (t.to("cuda") for t in ragged_tables(H, S, seed=1))
    q, k, v = make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda")
    ts = torch.tensor([500.0], device="cuda")
    base = _launch(q, k, v, masks, lt, bb, ts, config)
    assert torch.equal(_launch(q, k, v, masks, lt, bb, ts, config,
                               launch_order=launch_order(masks, lt, S)), base)


def test_uniform_tables_order_is_a_permutation():
    """Balanced masks (the benchmark's ``random``): every row has the same count, so the order
    is index order within heads (stable)."""
    t = uniform_tables(1, 2, (1, 1, 1000), 0.25)
    order = launch_order(t.masks[0], t.level_tables[0], 1000)
    assert torch.equal(order, natural_order(1, 2, 1000))


def test_simulation_predicts_from_the_backend_order():
    """``benchmarks/launch_order_sim.py``: list scheduling is what it says, and on ragged rows
    the backend's order never ends later than index order."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location("launch_order_sim", root / "launch_order_sim.py")
        sim = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sim)
    finally:
        sys.path.remove(str(root))
    assert sim.makespan([1, 1, 1, 4], 2) == 5  # the long job last: 1+1 | 1+4
    assert sim.makespan([4, 1, 1, 1], 2) == 4  # longest first: 4 | 1+1+1
    (rec,) = sim.simulate("1.3b", "local", 0.1, [2.0], 132)
    assert rec["makespan_lpt"] <= rec["makespan_index"] and rec["lpt_over_ideal"] >= 1.0


def test_fa4_choice_takes_the_same_inputs_as_the_template():
    """Inductor's autotuner gives every choice the same example inputs and asserts equal counts
    (``select_algorithm.get_inputs``): with a launch order the FA4 extern choice takes it too
    (and ignores it). Then the generated call, with FA4 picked, runs and equals the reference."""
    from unittest import mock

    from test_fa4_choice import fa4_picked
    from test_lowering import capture_template_choices
    from torch._inductor.utils import run_and_get_code

    from scaling_attn_compile.compile import lowering

    B, H, S, D = 1, 2, 300, 64
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float16)
    masks, lt, bb = ragged_tables(H, S, buckets=2)
    ts = torch.tensor([700.0])
    order = launch_order(masks, lt, S)
    scale = D**-0.5
    f = lambda *a: OP(*a[:7], scale, launch_order=a[7])
    torch._dynamo.reset()
    with mock.patch.object(lowering, "_fa4_device", lambda device: True), \
            capture_template_choices() as choices:
        with pytest.raises(Exception, match="choices captured"):
            torch.compile(f, backend="inductor", fullgraph=True, dynamic=False)(
                q, k, v, masks, lt, bb, ts, order)
    fa4 = [c for c in choices if c.name == lowering.FA4_CHOICE_NAME]
    assert len(fa4) == 1 and len(fa4[0].input_nodes) == 8
    assert all(len(c.input_nodes) == 8 for c in choices)

    torch._dynamo.reset()
    with fa4_picked(sparse_attention_reference):
        out, codes = run_and_get_code(torch.compile(f, backend="inductor", fullgraph=True,
                                                    dynamic=False), q, k, v, masks, lt, bb, ts,
                                      order)
    assert "torch.ops.scaling_attn.sparse_attention_fa4.default" in "\n".join(codes)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale))


def test_autotune_inputs_give_the_order_its_own_slot():
    """The lowering's autotune inputs: the order follows kv_lens when both are inputs, and is
    index order (with every block kept, any order is the same work)."""
    from types import SimpleNamespace

    from scaling_attn_compile.compile import lowering

    node = SimpleNamespace(get_size=lambda: [2, 6], get_stride=lambda: [6, 1],
                           get_dtype=lambda: torch.int32, get_device=lambda: torch.device("cpu"))
    assert sorted(lowering._input_gen_fns(300, False, True)) == [3, 4, 5, 6, 7]
    fns = lowering._input_gen_fns(300, True, True)
    assert sorted(fns) == [3, 4, 5, 6, 7, 8]
    assert torch.equal(fns[8](node), natural_order(2, 2, 300))  # 2 heads x 3 blocks
