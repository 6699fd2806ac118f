"""Regional compilation (``compile_repeated_blocks``) with the backend: one compiled block runs
every layer sparse with that layer's tables (buffers attached by ``backend.attach``), the
density follows the timestep across steps, and nothing recompiles across layers or steps.

CPU: ``compiler="eager"`` runs the rewritten graph, whose op is the readable reference. The
two-level tables of test_backend.py differ per layer and per timestep bucket (t < 500 vs >= 500),
so binding the wrong layer's tables or ignoring the timestep changes the output.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.compile.regional import BUFFERS
from scaling_attn_compile.contract.tables import AttentionTables
from scaling_attn_compile.errors import PlanMismatchError
from scaling_attn_compile.models.wan import self_attention_modules
from scaling_attn_compile.ops.energy import EnergyFilter
from scaling_attn_compile.testing import assert_close_to_oracle

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers live in test_backend.py
from test_backend import (  # noqa: E402
    GPU,
    GRID,
    Oracle,
    _fresh_dynamo,  # noqa: F401  (autouse: a fresh Dynamo per test)
    compiled,
    device_setup,
    make_inputs,
    make_model,
    sharpen_self_attention,
    two_level_tables,
)

STEPS = (999, 800, 600, 400, 200, 0)  # crosses the tables' bucket bound at 500


def regional(model, tables, **options):
    be = scaling_attn_backend(tables, compiler="eager", **options)
    be.attach(model)
    model.compile_repeated_blocks(backend=be, fullgraph=True, dynamic=False)
    return be


def run_steps(model, inputs, steps=STEPS):
    outs = []
    with torch.no_grad():
        for t in steps:
            timestep = torch.tensor([t], device=inputs["hidden_states"].device)
            outs.append(model(timestep=timestep, return_dict=False, **inputs)[0])
    return outs


def test_regional_runs_sparse_equals_full_graph_and_compiles_once():
    model = sharpen_self_attention(make_model())
    inputs = make_inputs()
    tables = two_level_tables()
    oracle, dense = Oracle(model, tables), Oracle(model)
    # Layer 1 bound to layer 0's tables: what a pass that bound one table set to the one
    # compiled block would compute.
    same_tables = AttentionTables(grid=tables.grid, masks=[tables.masks[0]] * 2,
                                  level_tables=tables.level_tables,
                                  bucket_bounds=tables.bucket_bounds)
    wrong_layer = Oracle(model, same_tables)

    full_be = scaling_attn_backend(tables, compiler="eager")
    full = run_steps(compiled(model, full_be), inputs)
    assert full_be.reports[0].per_layer == {0: 1, 1: 1}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    be = regional(model, tables)
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = run_steps(model, inputs)
    (report,) = be.reports  # one backend call: one block graph for 2 layers x 6 steps
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert report.block_sites == 1 and report.per_layer == {}
    assert report.grid == GRID and report.seq_len == 320
    assert report.left_dense == {"cross-attention": 1}
    for t, out, ref in zip(STEPS, outs, full, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=f"t={t}: regional != full")
        ts = torch.tensor([t])
        same, golden = oracle(ts, **inputs)
        assert_close_to_oracle(out, golden, same, what=f"t={t}")
        for name, other in (("dense", dense), ("layer 0's tables in layer 1", wrong_layer)):
            with pytest.raises(AssertionError):
                assert_close_to_oracle(other(ts, **inputs)[0], golden, same, k=3.0, what=name)
    assert (outs[0] - outs[-1]).abs().max() > 1e-3  # the two buckets differ


def test_regional_recompiles_once_per_resolution():
    """A second resolution rebinds every block's buffers to its tables: one new block graph;
    back at the first, the first graph runs again. Each resolution runs its own tables."""
    model, small = make_model(), make_inputs()
    big = dict(small, hidden_states=torch.randn(1, 4, 2, 32, 16))  # grid (2, 16, 8)
    be = regional(model, lambda grid: two_level_tables(grid=grid))
    outs = []
    with torch.no_grad():
        for inputs in (small, big, small, big):
            outs.append(model(timestep=torch.tensor([100]), return_dict=False, **inputs)[0])
    assert [r.grid for r in be.reports] == [GRID, (2, 16, 8)]
    assert all(r.block_sites == 1 for r in be.reports)
    same, golden = Oracle(model, two_level_tables(grid=(2, 16, 8)))(torch.tensor([100]), **big)
    assert_close_to_oracle(outs[3], golden, same)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=0)


def test_without_attach_the_blocks_run_dense_with_a_warning():
    model, inputs = make_model(), make_inputs()
    be = scaling_attn_backend(two_level_tables(), compiler="eager")
    model.compile_repeated_blocks(backend=be, fullgraph=True, dynamic=False)
    with pytest.warns(UserWarning, match=r"backend\.attach\(transformer\)"):
        (out,) = run_steps(model, inputs, steps=(700,))
    (report,) = be.reports
    assert report.num_rewritten == 0
    assert report.left_dense["regional block without attached tables"] == 1
    same, golden = Oracle(model)(torch.tensor([700]), **inputs)
    assert_close_to_oracle(out, golden, same)


def test_attached_model_still_compiles_whole_and_detaches():
    model, inputs = make_model(), make_inputs()
    tables = two_level_tables()
    plain_be = scaling_attn_backend(tables, compiler="eager")
    (want,) = run_steps(compiled(model, plain_be), inputs, steps=(900,))
    torch._dynamo.reset()
    be = scaling_attn_backend(tables, compiler="eager")
    handle = be.attach(model)
    (got,) = run_steps(compiled(model, be), inputs, steps=(900,))
    assert be.reports[0].per_layer == {0: 1, 1: 1}
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not any(k.rsplit(".", 1)[-1] in BUFFERS for k in model.state_dict())
    handle.detach()
    mods = self_attention_modules(model)
    assert not any(name in m._buffers for m in mods for name in BUFFERS)
    assert not any(m._forward_pre_hooks for m in mods) and not model._forward_pre_hooks
    assert be.attached == []


@pytest.mark.parametrize("order", ["tile", "tile:2x8x8"])
def test_regional_in_tile_order_equals_the_full_graph(order):
    """A tile-order plan, regionally: hooks permute the tokens and RoPE tables before the
    compiled blocks and the output back after them; the result is the full-graph compile's
    (whose graph permutes by itself), and a raster-order reading of the same masks differs."""
    model = sharpen_self_attention(make_model())
    inputs = make_inputs()
    tile = dataclasses.replace(two_level_tables(), token_order=order)
    full_be = scaling_attn_backend(tile, compiler="eager")
    full = run_steps(compiled(model, full_be), inputs)
    assert full_be.reports[0].token_order == order
    torch._dynamo.reset()
    raster = run_steps(compiled(model, scaling_attn_backend(two_level_tables(),
                                                            compiler="eager")), inputs)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    be = regional(model, tile)
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = run_steps(model, inputs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for t, out, ref, other in zip(STEPS, outs, full, raster, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=f"t={t}: regional != full")
        assert (out - other).abs().max() > 1e-3, f"t={t}: tile order made no difference"
    be.attached[0].detach()  # hooks gone: the model runs raster and dense again
    torch._dynamo.reset()
    with torch.no_grad():
        plain = make_model()
        plain.load_state_dict(model.state_dict())
        ts = torch.tensor([STEPS[0]])
        torch.testing.assert_close(model(timestep=ts, return_dict=False, **inputs)[0],
                                   plain(timestep=ts, return_dict=False, **inputs)[0])


def test_regional_limits_are_clear_errors():
    model, inputs = make_model(), make_inputs()
    with pytest.raises(PlanMismatchError, match="parallel=/head_range="):
        scaling_attn_backend(two_level_tables(), head_range=(0, 2)).attach(model)
    ltx_like = make_model()
    ltx_like.rope = torch.nn.Identity()  # two RoPE sites: the hooks cannot pick one
    ltx_like.blocks[0].rope = torch.nn.Identity()
    tile = dataclasses.replace(two_level_tables(), token_order="tile")
    scaling_attn_backend(tile).attach(ltx_like)
    with pytest.raises(PlanMismatchError, match="tile order, which regional"):
        run_steps(ltx_like, inputs, steps=(1,))
    model = make_model()
    per_layer = EnergyFilter(threshold=-5.0, layers={1: None})
    regional(model, two_level_tables(), energy_filter=per_layer)
    with pytest.raises(BackendCompilerFailed, match="energy filter differs per layer"):
        run_steps(model, inputs, steps=(1,))


@GPU
def test_regional_inductor_on_cuda_equals_full_graph():
    """On the GPU both compiles lower the op to the Triton template (Inductor): regional and
    full-graph outputs both match the reference processor (float64 golden model) at both
    timestep buckets, with one block graph."""
    _, head_dim = device_setup("cuda")
    dtype = torch.float16  # see test_backend: bf16 rounding hides what the masks change
    model = sharpen_self_attention(make_model(head_dim=head_dim)).to("cuda", dtype)
    inputs = make_inputs(device="cuda", dtype=dtype)
    tables = two_level_tables()
    oracle = Oracle(model, tables)  # before attach and compile: a deep copy would copy them
    steps = (900, 100)
    full = run_steps(compiled(model, scaling_attn_backend(tables)), inputs, steps)
    torch._dynamo.reset()
    be = scaling_attn_backend(tables)
    be.attach(model)
    model.compile_repeated_blocks(backend=be, fullgraph=True, dynamic=False)
    outs = run_steps(model, inputs, steps)
    assert len(be.reports) == 1 and be.reports[0].block_sites == 1
    for t, out, ref in zip(steps, outs, full, strict=True):
        same, golden = oracle(torch.tensor([t], device="cuda"), **inputs)
        assert_close_to_oracle(out, golden, same, k=3.0, what=f"regional t={t}")
        assert_close_to_oracle(ref, golden, same, k=3.0, what=f"full graph t={t}")
    assert (outs[0] - outs[1]).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:materialize. mean kept-block density")  # a 2-block calib
def test_real_plan_is_checked_at_attach_and_remapped():
    """plan.Plan with a two-bucket FAST schedule (dense warm-up, then sparse): attach checks the
    model against the plan (no block graph holds every layer's weights, so the backend's graph
    check cannot); the plan calibrated at (4, 8, 8) runs at the model's grid (4, 8, 10), each
    step equals the reference bound to the same materialised tables, with one compile."""
    from scaling_attn_compile.errors import PlanModelMismatch
    from scaling_attn_compile.offline.fast_fit import dense_first_schedule
    from scaling_attn_compile.plan.plan import Plan

    model, inputs = sharpen_self_attention(make_model()), make_inputs()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (2, 2, 2, 2), generator=g, dtype=torch.uint8)
    plan = Plan.from_codes(codes, model, (4, 8, 8), num_calibration_inputs=1)
    steps = (999, 750, 500, 250)
    plan = plan.with_schedule(dense_first_schedule(plan, 0.3, steps, 0.25, match_global=False))
    with pytest.raises(PlanModelMismatch, match="other weights"):
        scaling_attn_backend(plan).attach(make_model(seed=5))
    tables = plan.materialize(GRID)
    assert tables.bucket_bounds.numel() == 1
    oracle = Oracle(model, tables)
    be = regional(model, plan)
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = run_steps(model, inputs, steps=steps)
    assert len(be.reports) == 1 and be.reports[0].block_sites == 1
    for t, out in zip(steps, outs, strict=True):
        same, golden = oracle(torch.tensor([t]), **inputs)
        assert_close_to_oracle(out, golden, same, what=f"t={t}")
    dense_same, _ = Oracle(model)(torch.tensor([250]), **inputs)
    assert (outs[-1] - dense_same).abs().max() > 1e-3  # the sparse bucket is not dense


def test_model_to_after_attach_rebinds_the_tables():
    """``model.to(...)`` after a call replaces every buffer per module (float ones cast too); the
    next call's hook binds the tables again, so the op still gets float32 bounds and one shared
    timestep (here float64: a new dtype, so one more block graph)."""
    model, inputs = make_model(), make_inputs()
    tables = two_level_tables()
    oracle = Oracle(model, tables)
    be = regional(model, tables)
    run_steps(model, inputs, steps=(900,))
    model.double()
    attn = self_attention_modules(model)
    assert attn[0].scaling_attn_bucket_bounds.dtype == torch.float64  # what .to() did
    (out,) = run_steps(model, {k: v.double() for k, v in inputs.items()}, steps=(100,))
    assert [m.scaling_attn_bucket_bounds.dtype for m in attn] == [torch.float32] * 2
    assert attn[0].scaling_attn_timestep is attn[1].scaling_attn_timestep
    assert len(be.reports) == 2 and be.reports[1].block_sites == 1
    _, golden = oracle(torch.tensor([100]), **inputs)
    torch.testing.assert_close(out, golden, rtol=1e-6, atol=1e-6)


def test_enable_sparse_attention_regional_equals_full_graph():
    """``enable_sparse_attention(model, plan, regional=True)``: attach + compile_repeated_blocks
    in one call; one block graph, and every step equals the full-graph compile of the same plan."""
    import copy

    from scaling_attn_compile.compile.pipeline import enable_sparse_attention
    from scaling_attn_compile.offline.fast_fit import dense_first_schedule
    from scaling_attn_compile.plan.plan import Plan

    model, inputs = sharpen_self_attention(make_model()), make_inputs()
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (2, 2, 3, 3), generator=g, dtype=torch.uint8)
    steps = (999, 750, 500, 250)
    plan = Plan.from_codes(codes, model, (4, 8, 10), num_calibration_inputs=1)  # the model's grid
    plan = plan.with_schedule(dense_first_schedule(plan, 0.3, steps, 0.25, match_global=False))
    whole = copy.deepcopy(model)
    be = enable_sparse_attention(model, plan, regional=True)["transformer"]
    enable_sparse_attention(whole, plan)
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = run_steps(model, inputs, steps=steps)
    assert len(be.reports) == 1 and be.reports[0].block_sites == 1
    for t, out, ref in zip(steps, outs, run_steps(whole, inputs, steps=steps), strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"t={t}")
    dense_same, _ = Oracle(model)(torch.tensor([250]), **inputs)
    assert (outs[-1] - dense_same).abs().max() > 1e-3  # the sparse bucket is not dense
