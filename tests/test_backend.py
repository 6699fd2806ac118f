"""The torch.compile backend on small diffusers Wan transformers (random weights).

CPU (CI): Inductor compiles the model, the op lowers to an extern call of the eager op (the
reference). Compiled output is checked against eager diffusers, with a reference sparse
attention processor on ``attn1`` for sparse plans, by the one tolerance rule
(``assert_close_to_oracle``: float64 golden model). The Triton template is rendered on the CPU
through Inductor's triton cpu backend and the rendered kernel is run in the Triton interpreter.

GPU (``-m gpu``, on the device): the same model in bf16 compiles to our template kernel.

Sizes: 2 layers, 2 heads; latents ``[1, 4, 4, 16, 20]`` -> grid ``(4, 8, 10)``, S = 320:
three 128-blocks, the last one partial.
"""

from __future__ import annotations

import copy
import logging
import warnings
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.transformers import transformer_wan
from torch._dynamo.exc import BackendCompilerFailed

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.compile.rewrite import rewrite_self_attention
from scaling_attn_compile.contract.masks import add_diagonal, num_blocks, pack_blocks
from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.contract.tables import AttentionTables, uniform_tables
from scaling_attn_compile.contract.token_order import inverse_permutation, permutation
from scaling_attn_compile.errors import DynamicShapeError, PlanMismatchError
from scaling_attn_compile.testing import assert_close_to_oracle

OP = torch.ops.scaling_attn.sparse_attention.default
LAYERS, HEADS = 2, 2
LATENT = (1, 4, 4, 16, 20)  # [B, C, F, H, W]
GRID = (4, 8, 10)  # after patch (1, 2, 2)
TEXT_LEN = 512  # Wan's I2V processor splits image tokens off as "all but the last 512"
IMAGE_LEN = 16
GPU = pytest.mark.gpu
CUDA = torch.cuda.is_available()


def device_setup(device):
    """(dtype, head_dim) per device: fp32/16 on the CPU (the reference runs any head_dim), the
    kernel's bf16/64 on CUDA."""
    return (torch.float32, 16) if device == "cpu" else (torch.bfloat16, 64)


DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def make_model(i2v=False, head_dim=16, seed=0):
    torch.manual_seed(seed)
    inner = HEADS * head_dim
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=head_dim,
        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
        num_layers=LAYERS, rope_max_seq_len=64,
        image_dim=24 if i2v else None, added_kv_proj_dim=inner if i2v else None,
    ).eval()


def sharpen_self_attention(model, gain: float = 4.0):
    """Scale self-attention's q and k (their RMS-norm weights; logits x gain^2): random-init attention is so
    diffuse, and its gated residual so small, that dropping blocks moves a bf16 output by about
    one rounding step; peaked attention makes a wrong mask visible far above the tolerance."""
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.attn1.norm_q, block.attn1.norm_k):  # q, k are RMS-normed
                norm.weight.mul_(gain)
    return model


def make_inputs(i2v=False, device="cpu", dtype=torch.float32, seed=1, text_len=24):
    g = torch.Generator().manual_seed(seed)
    text_len = TEXT_LEN if i2v else text_len
    out = dict(hidden_states=torch.randn(*LATENT, generator=g),
               encoder_hidden_states=torch.randn(1, text_len, 32, generator=g))
    if i2v:
        out["encoder_hidden_states_image"] = torch.randn(1, IMAGE_LEN, 24, generator=g)
    return {k: v.to(device, dtype) for k, v in out.items()}


def two_level_tables(num_layers=LAYERS, heads=HEADS, grid=GRID) -> AttentionTables:
    """Level 0 sparse (a checkerboard of blocks, different per head and layer), level 1 dense.
    Bucket 0 (t < 500): every head at level 0. Bucket 1 (t >= 500): head 0 dense, the others
    sparse. So the density follows the timestep."""
    nb = num_blocks(grid[0] * grid[1] * grid[2])
    u = torch.arange(nb)
    masks = []
    for layer in range(num_layers):
        sparse = torch.stack([(u[:, None] + u[None, :] + h + layer) % 2 == 0 for h in range(heads)])
        levels = torch.stack([add_diagonal(sparse), torch.ones(heads, nb, nb, dtype=torch.bool)], 1)
        masks.append(pack_blocks(levels))  # (H, 2, NB, W)
    table = torch.zeros(2, heads, dtype=torch.int32)
    table[1, 0] = 1
    return AttentionTables(grid=tuple(grid), masks=masks,
                           level_tables=[table.clone() for _ in range(num_layers)],
                           bucket_bounds=torch.tensor([500.0]))


class ReferenceSparseProcessor(transformer_wan.WanAttnProcessor):
    """Wan's attention processor with the self-attention call replaced by the readable
    reference of the op: the eager model the compiled one must equal."""

    def __init__(self, tables: AttentionTables, layer: int, clock: dict, compute_dtype):
        super().__init__()
        self.tables, self.layer, self.clock, self.compute_dtype = tables, layer, clock, compute_dtype

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        masks, level_table, bounds = (t.to(hidden_states.device) for t in self.tables.layer(
            self.layer))

        # The tables' token order (a tile plan): q/k/v permuted after RoPE, the output back.
        order = str(getattr(self.tables, "token_order", "raster"))
        perm = inv = slice(None)
        if order != "raster":
            perm = permutation(self.tables.grid, order).to(hidden_states.device)
            inv = inverse_permutation(self.tables.grid, order).to(hidden_states.device)

        def sparse(query, key, value, **_):  # (B, S, H, D) in and out, as diffusers' dispatch
            q, k, v = (t[:, perm].transpose(1, 2) for t in (query, key, value))
            out = sparse_attention_reference(q, k, v, masks, level_table, bounds,
                                             self.clock["t"].to(q.device), None,
                                             compute_dtype=self.compute_dtype)
            return out.transpose(1, 2)[:, inv]

        with mock.patch.object(transformer_wan, "dispatch_attention_fn", sparse):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                    rotary_emb)


def with_reference_processors(model, tables, clock, compute_dtype=torch.float32):
    for i, block in enumerate(model.blocks):
        block.attn1.set_processor(ReferenceSparseProcessor(tables, i, clock, compute_dtype))
    return model


class Oracle:
    """Eager references of one model: same dtype (the model itself) and float64 (a copy).
    ``tables=None`` gives dense diffusers attention."""

    def __init__(self, model, tables=None):
        self.clock = {"t": torch.tensor([0])}
        self.same = copy.deepcopy(model)
        self.golden = copy.deepcopy(model).double()
        if tables is not None:
            with_reference_processors(self.same, tables, self.clock)
            with_reference_processors(self.golden, tables, self.clock, torch.float64)

    @torch.no_grad()
    def __call__(self, timestep, **inputs):
        self.clock["t"] = timestep
        same = self.same(timestep=timestep, return_dict=False, **inputs)[0]
        golden = self.golden(timestep=timestep, return_dict=False,
                             **{k: v.double() for k, v in inputs.items()})[0]
        return same, golden


def compiled(model, backend):
    return torch.compile(model, backend=backend, fullgraph=True, dynamic=False)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# Compiled == eager
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_dense_plan_matches_eager(device):
    dtype, head_dim = device_setup(device)
    model = make_model(head_dim=head_dim).to(device, dtype)
    inputs = make_inputs(device=device, dtype=dtype)
    ts = torch.tensor([700], device=device)
    oracle = Oracle(model)
    be = scaling_attn_backend(uniform_tables(LAYERS, HEADS, GRID, 1.0))
    with torch.no_grad():
        out = compiled(model, be)(timestep=ts, return_dict=False, **inputs)[0]
    same, golden = oracle(ts, **inputs)
    assert_close_to_oracle(out, golden, same, k=2.0 if device == "cpu" else 3.0)
    (report,) = be.reports
    assert report.grid == GRID and report.seq_len == 320
    assert report.per_layer == {0: 1, 1: 1}
    assert report.left_dense == {"cross-attention": LAYERS}


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_plan_matches_reference_processor_at_both_timestep_buckets(device):
    """One compile; t=900 (head 0 dense) and t=100 (all sparse) both match the eager model with
    the reference sparse processor, and differ from each other and from dense attention by far
    more than the tolerance, so the test fails if the op or the timestep were ignored."""
    dtype, head_dim = device_setup(device)
    # fp16 on CUDA: a bf16 output's rounding (3 x 2^-8 x |out|) is as large as what the masks
    # change in this small model's output, so no tolerance could tell sparse from dense.
    dtype = torch.float16 if device == "cuda" else dtype
    model = sharpen_self_attention(make_model(head_dim=head_dim)).to(device, dtype)
    inputs = make_inputs(device=device, dtype=dtype)
    tables = two_level_tables()
    oracle, dense = Oracle(model, tables), Oracle(model)
    be = scaling_attn_backend(tables)
    cm = compiled(model, be)
    outs = {}
    with torch.no_grad():
        for t in (900, 100):
            ts = torch.tensor([t], device=device)
            outs[t] = cm(timestep=ts, return_dict=False, **inputs)[0]
            same, golden = oracle(ts, **inputs)
            assert_close_to_oracle(outs[t], golden, same, k=2.0 if device == "cpu" else 3.0,
                                   what=f"t={t}")
            dense_same, _ = dense(ts, **inputs)
            with pytest.raises(AssertionError):  # dense attention would fail this test
                assert_close_to_oracle(dense_same, golden, same, k=3.0, what="dense")
    assert (outs[900] - outs[100]).abs().max() > 1e-3
    assert len(be.reports) == 1, "the second timestep recompiled"


def test_denoising_loop_with_cfg_compiles_once():
    """10 timesteps x 2 calls (cond / uncond, as Wan's pipeline does for CFG): one graph, no
    recompile, and every step matches the reference processor at its own timestep."""
    model = make_model()
    cond = make_inputs(seed=1)
    uncond = dict(cond, encoder_hidden_states=torch.zeros_like(cond["encoder_hidden_states"]))
    tables = two_level_tables()
    oracle = Oracle(model, tables)
    be = scaling_attn_backend(tables)
    cm = compiled(model, be)
    latents = cond["hidden_states"]
    with torch.no_grad():
        cm(timestep=torch.tensor([999]), return_dict=False, **cond)  # compile
        with torch._dynamo.config.patch(error_on_recompile=True):
            for t in torch.linspace(999, 0, 10).long():
                ts = t.reshape(1)  # int64 (B,), as the scheduler gives it
                step = {}
                for name, inp in (("cond", cond), ("uncond", uncond)):
                    inp = dict(inp, hidden_states=latents)
                    out = cm(timestep=ts, return_dict=False, **inp)[0]
                    same, golden = oracle(ts, **inp)
                    assert_close_to_oracle(out, golden, same, what=f"t={int(t)} {name}")
                    step[name] = out
                latents = latents - 0.05 * (step["uncond"] + 2.0 * (step["cond"] - step["uncond"]))
    assert len(be.reports) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_i2v_cross_attention_untouched():
    """I2V: attn2 makes two SDPA calls per layer (text, image). Both stay SDPA; only attn1 is
    the op. Compiled == eager with the reference processor."""
    model = make_model(i2v=True)
    inputs = make_inputs(i2v=True)
    tables = two_level_tables()
    oracle = Oracle(model, tables)
    graphs = []

    def inductor(gm, example_inputs):
        graphs.append(copy.deepcopy(gm.graph))
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=be.config_patches())

    be = scaling_attn_backend(tables, compiler=inductor)
    ts = torch.tensor([900])
    with torch.no_grad():
        out = compiled(model, be)(timestep=ts, return_dict=False, **inputs)[0]
    same, golden = oracle(ts, **inputs)
    assert_close_to_oracle(out, golden, same)
    (report,) = be.reports
    assert report.per_layer == {0: 1, 1: 1}
    assert report.left_dense == {"cross-attention": 2 * LAYERS}
    (graph,) = graphs
    ops = [n for n in graph.nodes if n.target is OP]
    sdpa = [n for n in graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(ops) == LAYERS and len(sdpa) == 2 * LAYERS
    for n in sdpa:
        assert "attn2" in list(n.meta["nn_module_stack"].values())[-1][0]
        q, k = n.kwargs["query"].meta["example_value"], n.kwargs["key"].meta["example_value"]
        assert k.shape[2] in (TEXT_LEN, IMAGE_LEN) and q.shape[2] == 320
    for n in ops:
        assert "attn1" in list(n.meta["nn_module_stack"].values())[-1][0]
        assert n.args[6].op == "placeholder" and "timestep" in n.args[6].name
        assert n.args[7] == pytest.approx(16**-0.5)


# --------------------------------------------------------------------------------------------
# Plans, errors, fallbacks (the FX pass only: compiler="eager" runs the rewritten graph as is)
# --------------------------------------------------------------------------------------------


def run_eager_backend(plan, model=None, inputs=None, timestep=700, dynamic=False, **options):
    model = model or make_model()
    inputs = inputs or make_inputs()
    be = scaling_attn_backend(plan, compiler="eager", **options)
    cm = torch.compile(model, backend=be, fullgraph=True, dynamic=dynamic)
    with torch.no_grad():
        out = cm(timestep=torch.tensor([timestep]), return_dict=False, **inputs)[0]
    return be, out


class FakePlan:
    """Stands in for plan.Plan: ``.materialize(grid)`` and ``meta.head_dim``."""

    def __init__(self, head_dim=16, layers=LAYERS, heads=HEADS):
        self.calls = []
        self.layers, self.heads = layers, heads
        self.meta = type("Meta", (), {"head_dim": head_dim})()

    def materialize(self, grid, density=1.0):
        self.calls.append((tuple(grid), density))
        return uniform_tables(self.layers, self.heads, grid, density)


def test_plan_object_materialised_per_resolution():
    plan = FakePlan()
    model = make_model()
    be = scaling_attn_backend(plan, compiler="eager", materialize_kwargs={"density": 0.5})
    cm = torch.compile(model, backend=be, fullgraph=True, dynamic=False)
    small = make_inputs()
    big = dict(small, hidden_states=torch.randn(1, 4, 2, 32, 16))  # grid (2, 16, 8)
    with torch.no_grad():
        for inputs in (small, big, small):
            cm(timestep=torch.tensor([10]), return_dict=False, **inputs)
    assert plan.calls == [(GRID, 0.5), ((2, 16, 8), 0.5)]
    assert [r.grid for r in be.reports] == [GRID, (2, 16, 8)]


def test_positional_call_finds_the_timestep():
    """Called positionally, the timestep placeholder has no telling name (L['args'][1]); the
    pass finds it through Wan's timestep embedding, so the density still follows it."""
    model, inputs = make_model(), make_inputs()
    tables = two_level_tables()
    oracle = Oracle(model, tables)
    be = scaling_attn_backend(tables, compiler="eager")
    cm = compiled(model, be)
    with torch.no_grad():
        for t in (900, 100):
            ts = torch.tensor([t])
            out = cm(inputs["hidden_states"], ts, inputs["encoder_hidden_states"],
                     return_dict=False)[0]
            same, golden = oracle(ts, **inputs)
            assert_close_to_oracle(out, golden, same, what=f"t={t}")
    assert len(be.reports) == 1


def test_backend_by_name_with_options():
    """What the entry point gives: torch.compile(backend="scaling_attn", options={"plan": ...})."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    from scaling_attn_compile.compile.backend import _NAMED, dynamo_backend

    if "scaling_attn_test" not in _BACKENDS:
        register_backend(dynamo_backend, name="scaling_attn_test")
    model, inputs = make_model(), make_inputs()
    tables = two_level_tables()
    oracle = Oracle(model, tables)
    cm = torch.compile(model, backend="scaling_attn_test", fullgraph=True, dynamic=False,
                       options={"plan": tables, "compiler": "eager"})
    with torch.no_grad():
        for t in (900, 100):
            ts = torch.tensor([t])
            out = cm(timestep=ts, return_dict=False, **inputs)[0]
            same, golden = oracle(ts, **inputs)
            assert_close_to_oracle(out, golden, same, what=f"t={t}")
    (be,) = [b for p, b in _NAMED.values() if p is tables]
    assert len(be.reports) == 1 and be.reports[0].per_layer == {0: 1, 1: 1}
    with pytest.raises(BackendCompilerFailed, match="options must hold the plan"):
        torch._dynamo.reset()
        torch.compile(model, backend="scaling_attn_test", options={"compiler": "eager"})(
            timestep=torch.tensor([1]), return_dict=False, **inputs)


def test_real_plan_is_remapped_to_the_compile_grid():
    """plan.Plan end to end: a topology calibrated at grid (4, 8, 8) is materialised by the
    backend for the grid the model runs, (4, 8, 10), and the compiled model equals the eager
    reference bound to the same materialised tables."""
    from scaling_attn_compile.plan.plan import Plan

    model, inputs = make_model(), make_inputs()
    g = torch.Generator().manual_seed(0)
    nb0 = num_blocks(4 * 8 * 8)
    codes = torch.randint(0, 256, (LAYERS, HEADS, nb0, nb0), generator=g, dtype=torch.uint8)
    plan = Plan.from_codes(codes, model, (4, 8, 8), num_calibration_inputs=1)
    be, out = run_eager_backend(plan, model, inputs, materialize_kwargs={"density": 0.5})
    assert be.reports[0].grid == GRID
    tables = plan.materialize(GRID, density=0.5)
    same, golden = Oracle(model, tables)(torch.tensor([700]), **inputs)
    assert_close_to_oracle(out, golden, same)


def test_callable_plan():
    grids = []

    def plan(grid):
        grids.append(grid)
        return uniform_tables(LAYERS, HEADS, grid, 1.0)

    be, _ = run_eager_backend(plan)
    assert grids == [GRID]
    assert be.reports[0].per_layer == {0: 1, 1: 1}


@pytest.mark.parametrize("plan, match", [
    (uniform_tables(3, HEADS, GRID, 1.0), "the model has 2 self-attention layers, the plan has 3"),
    (uniform_tables(1, HEADS, GRID, 1.0), "the model has 2 self-attention layers, the plan has 1"),
    (uniform_tables(LAYERS, 3, GRID, 1.0), "has 2 heads, the plan's layer 0 has 3"),
    (uniform_tables(LAYERS, HEADS, (4, 8, 8), 1.0), r"tables are for latent grid \(4, 8, 8\)"),
    (FakePlan(head_dim=128), "head_dim 16, the plan was made for head_dim 128"),
])
def test_plan_mismatch_is_a_clear_compile_error(plan, match):
    with pytest.raises(BackendCompilerFailed, match=match) as info:
        run_eager_backend(plan)
    assert isinstance(info.value.inner_exception, PlanMismatchError)


def test_bad_level_table_is_rejected():
    tables = two_level_tables()
    tables.level_tables[1][0, 1] = 2  # only levels 0 and 1 exist
    with pytest.raises(BackendCompilerFailed, match="holds levels"):
        run_eager_backend(tables)


def test_patch_size_option_and_wrong_patch_size():
    be, _ = run_eager_backend(uniform_tables(LAYERS, HEADS, GRID, 1.0), patch_size=(1, 2, 2))
    assert be.reports[0].grid == GRID
    with pytest.raises(BackendCompilerFailed, match="is not F\\*H\\*W"):
        run_eager_backend(uniform_tables(LAYERS, HEADS, (4, 16, 20), 1.0), patch_size=(1, 1, 1))


def test_symbolic_sequence_length_errors_or_falls_back_dense(caplog):
    tables = uniform_tables(LAYERS, HEADS, GRID, 0.4)
    with pytest.raises(BackendCompilerFailed, match="dynamic=False") as info:
        run_eager_backend(tables, dynamic=True, on_dynamic_shapes="error")
    assert isinstance(info.value.inner_exception, DynamicShapeError)

    torch._dynamo.reset()
    model, inputs = make_model(), make_inputs()
    with caplog.at_level(logging.WARNING, logger="scaling_attn_compile"):
        be, out = run_eager_backend(tables, model, inputs, dynamic=True,
                                    on_dynamic_shapes="dense")
    assert "runs dense attention" in caplog.text
    assert be.reports[0].dense_fallback and not be.reports[0].per_layer
    same, golden = Oracle(model)(torch.tensor([700]), **inputs)
    assert_close_to_oracle(out, golden, same)


def test_no_self_attention_warns_and_compiles_dense():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    be = scaling_attn_backend(uniform_tables(LAYERS, HEADS, GRID, 1.0))
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="no self-attention SDPA"):
        out = torch.compile(mlp, backend=be, fullgraph=True)(x)
    assert_close_to_oracle(out, copy.deepcopy(mlp).double()(x.double()), mlp(x))
    assert be.reports[0].num_rewritten == 0


def test_rewrite_counts_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="scaling_attn_compile"):
        run_eager_backend(uniform_tables(LAYERS, HEADS, GRID, 1.0))
    assert "rewrote 2 self-attention calls (layer:count 0:1, 1:1)" in caplog.text


def test_autograd_on_is_a_clear_error():
    model, inputs = make_model(), make_inputs()
    be = scaling_attn_backend(uniform_tables(LAYERS, HEADS, GRID, 1.0), compiler="eager")
    with pytest.raises(BackendCompilerFailed, match="inference-only.*torch.no_grad"):
        compiled(model, be)(timestep=torch.tensor([1]), return_dict=False, **inputs)


def test_bad_options_fail_at_construction():
    with pytest.raises(TypeError, match="plan must be AttentionTables"):
        scaling_attn_backend(42)
    with pytest.raises(ValueError, match="on_dynamic_shapes"):
        scaling_attn_backend(uniform_tables(1, 1, GRID, 1.0), on_dynamic_shapes="maybe")
    with pytest.raises(ValueError, match="materialize_kwargs"):
        scaling_attn_backend(uniform_tables(1, 1, GRID, 1.0), materialize_kwargs={"density": .5})


# -- the SDPA argument rules, on a toy with the diffusers layout (kwargs-free positional call) --


class ToyAttention(nn.Module):
    def __init__(self, heads, head_dim, **sdpa_kwargs):
        super().__init__()
        self.heads, self.sdpa_kwargs = heads, sdpa_kwargs
        self.qkv = nn.Linear(heads * head_dim, 3 * heads * head_dim)

    def forward(self, x):  # (B, S, H*D)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, **self.sdpa_kwargs)
        return out.transpose(1, 2).flatten(2)


class ToyModel(nn.Module):
    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Module() for _ in range(2))
        for b in self.blocks:
            b.attn1 = ToyAttention(2, 16, **sdpa_kwargs)

    def forward(self, x, timestep):
        x = x * (1 + 0 * timestep.float())[:, None, None]
        for b in self.blocks:
            x = x + b.attn1(x)
        return x


@pytest.mark.parametrize("sdpa_kwargs, rewritten", [
    ({}, True), ({"scale": 0.3}, True), ({"is_causal": True}, False),
    ({"attn_mask": torch.ones(200, 200, dtype=torch.bool)}, False),
])
def test_sdpa_argument_rules(sdpa_kwargs, rewritten):
    torch.manual_seed(0)
    toy = ToyModel(**sdpa_kwargs)
    x, ts = torch.randn(1, 200, 32), torch.tensor([3])
    tables = uniform_tables(2, 2, (1, 1, 200), 1.0)  # dense: the op must equal SDPA exactly
    be = scaling_attn_backend(tables, compiler="eager", grid=(1, 1, 200))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = torch.compile(toy, backend=be, fullgraph=True)(x, ts)
    report = be.reports[0]
    assert report.num_rewritten == (2 if rewritten else 0)
    if not rewritten:
        assert any("left dense" in str(w.message) for w in caught)
    with torch.no_grad():
        golden = copy.deepcopy(toy).double()(x.double(), ts)
        assert_close_to_oracle(out, golden, toy(x, ts))


def test_rewrite_self_attention_is_usable_alone():
    """The pass on a traced graph, without torch.compile: buffers with a ConstantSource."""
    toy = ToyModel()
    x, ts = torch.randn(1, 200, 32), torch.tensor([3])
    gms = []
    torch.compile(toy, backend=lambda gm, ex: gms.append(gm) or gm.forward, fullgraph=True)(x, ts)
    (gm,) = gms
    tables = two_level_tables(2, 2, (1, 1, 200))
    per_layer = [(*tables.layer(i)[:2], tables.bucket_bounds) for i in range(2)]
    report = rewrite_self_attention(gm, lambda grid, dev: (tables, per_layer), grid=(1, 1, 200))
    assert report.per_layer == {0: 1, 1: 1}
    names = {n for n, _ in gm.named_buffers()}
    assert {"scaling_attn_masks_0", "scaling_attn_masks_1", "scaling_attn_bucket_bounds"} <= names
    assert type(gm._param_name_to_source["scaling_attn_masks_0"]).__name__ == "ConstantSource"


# -- the online energy filter as a backend / plan option (issue 6) -------------------------------

def _run_compiled(model, inputs, backend, t=500):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(
            **inputs, timestep=torch.tensor([t]), return_dict=False)[0]


def test_energy_filter_option_reaches_the_op_per_layer():
    from scaling_attn_compile.ops.energy import EnergyFilter

    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ef = EnergyFilter("blasst", threshold=-2.0, layers={1: None})  # layer 1: filter off
    backend = scaling_attn_backend(uniform_tables(LAYERS, HEADS, GRID, 1.0), compiler=keep_graph,
                                   energy_filter=ef)
    _run_compiled(make_model(), make_inputs(), backend)
    ops = [n for n in graphs[0].graph.nodes if n.target is OP]
    assert [len(n.args) for n in ops] == [10, 8]
    assert tuple(ops[0].args[8:]) == (2, -2.0)


def test_energy_filter_compiled_equals_rewritten_graph_and_filters():
    from scaling_attn_compile.ops.energy import EnergyFilter

    model, inputs = make_model(), make_inputs()
    tables = uniform_tables(LAYERS, HEADS, GRID, 1.0)
    ef = EnergyFilter("cumulative", threshold=-1.0)
    compiled = _run_compiled(model, inputs, scaling_attn_backend(tables, energy_filter=ef))
    eager_graph = _run_compiled(model, inputs, scaling_attn_backend(tables, energy_filter=ef,
                                                                    compiler="eager"))
    torch.testing.assert_close(compiled, eager_graph, rtol=1e-5, atol=1e-5)
    dense = _run_compiled(model, inputs, scaling_attn_backend(tables))
    assert (compiled - dense).abs().max() > 1e-3, "a -1.0 threshold should skip far blocks here"
    never = _run_compiled(model, inputs, scaling_attn_backend(
        tables, energy_filter=EnergyFilter("cumulative", threshold=-1e30)))
    torch.testing.assert_close(never, dense, rtol=1e-4, atol=1e-4)


def test_plan_carries_the_energy_filter_through_save_and_load(tmp_path):
    from scaling_attn_compile.ops.energy import EnergyFilter
    from scaling_attn_compile.plan.io import load_plan
    from scaling_attn_compile.plan.plan import Plan

    model = make_model()
    nb = num_blocks(GRID[0] * GRID[1] * GRID[2])
    codes = torch.randint(0, 256, (LAYERS, HEADS, nb, nb), dtype=torch.uint8)
    plan = Plan.from_codes(codes, model, GRID, num_calibration_inputs=1)
    assert plan.energy_filter is None
    ef = EnergyFilter("cumulative", recall_budget=1.46, layers={0: -4.0})
    loaded = load_plan(plan.with_energy_filter(ef).save(tmp_path / "p.safetensors"))
    assert loaded.energy_filter == ef
    assert loaded.energy_filter.for_layer(0, 75600) == (1, -4.0)
    assert loaded.energy_filter.for_layer(1, 75600)[1] == pytest.approx(-6.0, abs=0.01)
    graphs = []
    backend = scaling_attn_backend(loaded, materialize_kwargs={"density": 1.0},
                                   compiler=lambda gm, ex: (graphs.append(gm), gm.forward)[1])
    _run_compiled(model, make_inputs(), backend)
    assert [len(n.args) for n in graphs[0].graph.nodes if n.target is OP] == [10, 10]


def test_energy_filter_validation():
    from scaling_attn_compile.ops.energy import EnergyFilter

    with pytest.raises(ValueError, match="rule"):
        EnergyFilter("topk", threshold=-3.0)
    with pytest.raises(ValueError, match="exactly one"):
        EnergyFilter("cumulative")
    with pytest.raises(ValueError, match="recall_budget"):
        EnergyFilter("cumulative", recall_budget=-1.0)
    with pytest.raises(TypeError, match="energy_filter"):
        scaling_attn_backend(uniform_tables(LAYERS, HEADS, GRID, 1.0), energy_filter=3.0)


@pytest.mark.parametrize("fa4", [True, False])
def test_fa4_option_reaches_the_lowering(fa4, monkeypatch):
    """``scaling_attn_backend(plan, fa4=False)`` runs Inductor under ``fa4_choice(False)`` (the
    lowering then leaves FlashAttention-4 out; tests/test_fa4_choice.py checks that part), and
    the switch is back on after the compile."""
    from torch._inductor import compile_fx as compile_fx_module

    from scaling_attn_compile.compile import lowering

    seen = []

    def fake_compile_fx(gm, example_inputs, **kwargs):
        seen.append(lowering.fa4_enabled())
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    backend = scaling_attn_backend(two_level_tables(), check_model=False, fa4=fa4)
    with torch.no_grad():
        torch.compile(make_model(), backend=backend, fullgraph=True, dynamic=False)(
            **make_inputs(), timestep=torch.tensor([900.0]), return_dict=False)
    assert seen == [fa4]
    assert lowering.fa4_enabled()
    with pytest.raises(TypeError, match="fa4 must be True or False"):
        scaling_attn_backend(two_level_tables(), fa4="no")
