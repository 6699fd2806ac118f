"""The backend's ``precision`` option (issue 15): 8-bit attention, opt-in, eager op only.

CPU: the small diffusers Wan of ``test_backend.py``; the 8-bit op runs its reference
(``contract/quant.py``) as an extern call in Inductor's code (no template lowering yet)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.contract.masks import num_blocks
from scaling_attn_compile.contract.quant import rel_l2

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers live in test_backend.py
from test_backend import (  # noqa: E402
    GRID,
    HEADS,
    LAYERS,
    _fresh_dynamo,  # noqa: F401  (autouse: a fresh Dynamo per test)
    make_inputs,
    make_model,
    sharpen_self_attention,
    two_level_tables,
)

OP = torch.ops.scaling_attn.sparse_attention.default
OP_Q8 = torch.ops.scaling_attn.sparse_attention_q8.default


def run(model, inputs, backend, t=700):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(
            **inputs, timestep=torch.tensor([t]), return_dict=False)[0]


def graph_ops(precision=None, **options):
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    run(make_model(), make_inputs(), scaling_attn_backend(
        two_level_tables(), compiler=keep_graph, precision=precision, **options))
    return [n for n in graphs[0].graph.nodes if n.target in (OP, OP_Q8)]


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_precision_routes_every_layer_to_the_8bit_op(precision):
    ops = graph_ops(precision)
    assert [n.target for n in ops] == [OP_Q8] * LAYERS
    assert all(n.args[-1] == precision and len(n.args) == 9 for n in ops)


def test_bf16_stays_the_default():
    assert [n.target for n in graph_ops()] == [OP] * LAYERS
    assert [n.target for n in graph_ops("bf16")] == [OP] * LAYERS


def test_int8_compiled_equals_its_eager_graph_and_stays_near_bf16():
    model, inputs = sharpen_self_attention(make_model()), make_inputs()
    tables = two_level_tables()
    q8 = run(model, inputs, scaling_attn_backend(tables, precision="int8"))
    q8_eager = run(model, inputs, scaling_attn_backend(tables, precision="int8",
                                                       compiler="eager"))
    torch.testing.assert_close(q8, q8_eager, rtol=1e-5, atol=1e-5)
    bf16 = run(model, inputs, scaling_attn_backend(tables))
    err = rel_l2(q8, bf16)
    assert 0 < err < 0.03, f"int8 attention moved the model output by {err:.2e} (rel-L2)"


@pytest.mark.parametrize("precision", ["fp8"])
def test_regional_8bit_equals_the_whole_graph_and_runs_the_8bit_op(precision):
    """Regional compilation (one block graph for every layer) binds the 8-bit op to each layer's
    attached tables: the same output as the whole-graph compile, at both timestep buckets."""
    model, inputs = sharpen_self_attention(make_model()), make_inputs()
    tables = two_level_tables()
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    outs = {}
    for t in (700, 300):  # the tables' bucket bound is 500
        outs[t] = run(model, inputs, scaling_attn_backend(tables, precision=precision), t=t)
    torch._dynamo.reset()
    be = scaling_attn_backend(tables, precision=precision, compiler=keep_graph)
    be.attach(model)
    model.compile_repeated_blocks(backend=be, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for t, whole in outs.items():
            out = model(**inputs, timestep=torch.tensor([t]), return_dict=False)[0]
            torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5, msg=f"t={t}")
    assert len(graphs) == 1  # one block graph for both layers and both timesteps
    (op,) = [n for n in graphs[0].graph.nodes if n.target in (OP, OP_Q8)]
    assert op.target == OP_Q8 and op.args[-1] == precision and not op.kwargs
    assert (outs[700] - outs[300]).abs().max() > 1e-3  # the buckets differ


def test_unknown_precision_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"precision must be one of \('bf16', 'fp8', 'int8'\), "
                                         r"got 'fp16'"):
        scaling_attn_backend(two_level_tables(), precision="fp16")


def test_8bit_takes_the_energy_filter_whole_graph_and_regional():
    """``precision="int8"`` with an energy filter: every layer's 8-bit op carries the rule and
    threshold (whole graph and regional), and the compiled model equals the same graph run
    eagerly, whose op is the 8-bit reference with the filter."""
    from scaling_attn_compile.ops.energy import EnergyFilter

    energy = EnergyFilter("blasst", threshold=-2.0)
    ops = graph_ops("int8", energy_filter=energy)
    assert [n.target for n in ops] == [OP_Q8] * LAYERS
    assert all(n.args[8:] == ("int8", 2, -2.0) for n in ops), [n.args[8:] for n in ops]
    model, inputs = sharpen_self_attention(make_model()), make_inputs()
    tables = two_level_tables()
    out = run(model, inputs, scaling_attn_backend(tables, precision="int8", energy_filter=energy))
    eager = run(model, inputs, scaling_attn_backend(tables, precision="int8",
                                                    energy_filter=energy, compiler="eager"))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    be = scaling_attn_backend(tables, precision="int8", energy_filter=energy,
                              compiler=keep_graph)
    be.attach(model)
    model.compile_repeated_blocks(backend=be, fullgraph=True, dynamic=False)
    with torch.no_grad():
        regional = model(**inputs, timestep=torch.tensor([700]), return_dict=False)[0]
    torch.testing.assert_close(regional, out, rtol=1e-5, atol=1e-5)
    (op,) = [n for n in graphs[0].graph.nodes if n.target in (OP, OP_Q8)]
    assert op.target == OP_Q8 and op.args[8:] == ("int8", 2, -2.0)


def test_plan_carries_precision_through_save_and_load(tmp_path):
    from scaling_attn_compile.plan.io import load_plan
    from scaling_attn_compile.plan.plan import Plan

    model = make_model()
    nb = num_blocks(GRID[0] * GRID[1] * GRID[2])
    codes = torch.randint(0, 256, (LAYERS, HEADS, nb, nb), dtype=torch.uint8)
    plan = Plan.from_codes(codes, model, GRID, num_calibration_inputs=1)
    assert plan.meta.precision == "bf16"
    loaded = load_plan(plan.with_precision("fp8").save(tmp_path / "p.safetensors"))
    assert loaded.meta.precision == "fp8"
    assert scaling_attn_backend(loaded).precision == "fp8"
    assert scaling_attn_backend(loaded, precision="bf16").precision == "bf16"  # explicit wins
    with pytest.raises(ValueError, match="with_precision must be one of"):
        plan.with_precision("e5m2")


@pytest.mark.gpu
def test_int8_on_cuda_runs_the_8bit_kernel_inside_the_compiled_graph():
    # bf16 model, head_dim 64: Inductor lowers the 8-bit op to its pre-pass and the 8-bit template.
    model = sharpen_self_attention(make_model(head_dim=64)).to("cuda", torch.bfloat16)
    inputs = make_inputs(device="cuda", dtype=torch.bfloat16)
    tables = two_level_tables()

    def run_cuda(backend):
        torch._dynamo.reset()
        with torch.no_grad():
            return torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(
                **inputs, timestep=torch.tensor([700], device="cuda"), return_dict=False)[0]

    q8 = run_cuda(scaling_attn_backend(tables, precision="int8"))
    q8_eager = run_cuda(scaling_attn_backend(tables, precision="int8", compiler="eager"))
    assert rel_l2(q8, q8_eager) < 1e-2  # same kernel; Inductor's fusions round differently
    assert 0 < rel_l2(q8, run_cuda(scaling_attn_backend(tables))) < 0.03
