"""Tile token order (issue 20): the rule, the permutation, and the model run in tile order.

Model tests use a 2-layer, 2-head diffusers Wan with latents ``[1, 4, 4, 16, 20]`` -> grid
``(4, 8, 10)``, S = 320: two full 4x4x8 tiles (blocks 0 and 1) and a remainder block of the
last two columns (64 tokens, partial), so both kinds of block and a partial one are exercised.
"""

from __future__ import annotations

import copy
import json
import math
from unittest import mock

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers import transformer_wan
from hypothesis import given
from hypothesis import strategies as st

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.contract import token_order as to
from scaling_attn_compile.contract.masks import BLOCK, num_blocks
from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.offline import west
from scaling_attn_compile.plan.io import load_plan
from scaling_attn_compile.plan.plan import Plan
from scaling_attn_compile.testing import assert_close_to_oracle

LATENT = (1, 4, 4, 16, 20)
GRID = (4, 8, 10)
HEADS, LAYERS = 2, 2
REAL_GRIDS = {  # grid: (top tile, coverage) by the rule; the single best shape alone covers less
    (21, 30, 52): ((4, 4, 8), 32384 / 32760),   # Wan 1.3B, 480x832x81 (single shape: 87.9%)
    (21, 45, 80): ((4, 4, 8), 75392 / 75600),   # Wan 14B, 720x1280x81 (single shape: 93.1%)
    (8, 32, 32): ((4, 4, 8), 1.0),              # tiny Wan at 8x64x64 pixels
    (16, 32, 32): ((4, 4, 8), 1.0),
}

grids = st.tuples(st.integers(1, 9), st.integers(1, 24), st.integers(1, 40))


# --------------------------------------------------------------------------------------------
# The rule and the permutation
# --------------------------------------------------------------------------------------------

@given(grids, st.sampled_from(["raster", "tile", "tile:2x8x8", "tile:1x8x16"]))
def test_permutation_is_a_bijection_with_its_inverse(grid, spec):
    S = math.prod(grid)
    perm, inv = to.permutation(grid, spec), to.inverse_permutation(grid, spec)
    assert torch.equal(perm.sort().values, torch.arange(S))
    assert torch.equal(perm[inv], torch.arange(S)) and torch.equal(inv[perm], torch.arange(S))
    if spec == "raster":
        assert torch.equal(perm, torch.arange(S))


@given(grids, st.sampled_from(["tile", "tile:4x4x8", "tile:1x2x64"]))
def test_full_tiles_come_first_and_each_is_exactly_one_block(grid, spec):
    order = to.TokenOrder.parse(spec)
    tiles, covered = to.tile_layout(grid, order.tile)
    perm = to.permutation(grid, spec)
    F, H, W = grid
    ids = torch.arange(F * H * W).view(F, H, W)
    assert covered == len(tiles) * BLOCK
    for b, ((f, h, w), (a, c, d)) in enumerate(tiles):
        assert a * c * d == BLOCK
        box = ids[f:f + a, h:h + c, w:w + d].reshape(-1)
        assert box.numel() == BLOCK  # the tile lies inside the grid
        assert torch.equal(perm[b * BLOCK:(b + 1) * BLOCK].sort().values, box.sort().values)
    boxes = to.block_boxes(grid, spec)  # full-tile blocks span exactly the tile's extent
    extent = (boxes[:len(tiles), 3:] - boxes[:len(tiles), :3]) * torch.tensor(grid)
    want = torch.tensor([s for _, s in tiles], dtype=torch.float64).reshape(-1, 3)
    assert torch.allclose(extent, want)


@pytest.mark.parametrize("grid", list(REAL_GRIDS))
def test_rule_on_real_grids(grid):
    shape, cov = REAL_GRIDS[grid]
    assert to.tile_shape_for(grid) == shape
    assert to.coverage(grid) == pytest.approx(cov, abs=1e-12)
    single = max(math.prod(g // s for g, s in zip(grid, t, strict=True)) for t in to.TILE_SHAPES)
    assert to.coverage(grid) >= single * BLOCK / math.prod(grid)  # the recursion only adds


def test_rule_prefers_coverage_then_the_most_cubic_tile():
    # 1 x 16 x 128: tf = 1; 1x8x16 and 1x16x8 cover all with the least surface (152), fewer rows wins
    assert to.tile_shape_for((1, 16, 128)) == (1, 8, 16)
    # 2 x 64 x 1: no tile fits the 1-column grid except 2x64x1
    assert to.tile_shape_for((2, 64, 1)) == (2, 64, 1)
    assert to.tile_shape_for((1, 10, 10)) is None and to.coverage((1, 10, 10)) == 0.0


def test_specs_parse_and_bad_specs_are_clear_errors():
    assert str(to.TokenOrder.parse(None)) == "raster"
    assert str(to.TokenOrder.parse("tile:2x8x8")) == "tile:2x8x8"
    assert to.TokenOrder.parse("tile:2x8x8").tile_shape((9, 9, 9)) == (2, 8, 8)
    with pytest.raises(ValueError, match="token_order: expected 'raster', 'tile'"):
        to.TokenOrder.parse("morton")
    with pytest.raises(ValueError, match="tf \\* th \\* tw = 128"):
        to.TokenOrder.parse("tile:2x8x4")
    # "auto" (the CLI's default) picks for a new plan by what the model's family can permute.
    assert to.NEW_PLAN_ORDER == "auto"
    assert str(to.TokenOrder.for_new_plan("auto", can_permute=True)) == "tile"
    assert str(to.TokenOrder.for_new_plan("AUTO", can_permute=False)) == "raster"
    assert str(to.TokenOrder.for_new_plan("tile:2x8x8", can_permute=False)) == "tile:2x8x8"
    assert str(to.TokenOrder.for_new_plan(None, can_permute=True)) == "raster"
    with pytest.raises(ValueError, match="'auto' chooses the order of a new plan only"):
        to.TokenOrder.parse("auto")


def test_block_overlap_at_the_same_grid_follows_both_orders():
    blk_r, blk_t = to.block_of_token(GRID, "raster"), to.block_of_token(GRID, "tile")
    ov = west.block_overlap(GRID, GRID, "raster", "tile")  # (NB tile, NB raster)
    want = torch.zeros_like(ov)
    want[blk_t, blk_r] = True
    assert torch.equal(ov, want)
    assert torch.equal(west.block_overlap(GRID, GRID, "tile", "tile"),
                       torch.eye(num_blocks(320), dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# WEST in tile order
# --------------------------------------------------------------------------------------------

def local_qk(grid, heads=2, sharp=0.5):
    """q, k with logits ``-sharp * |p_i - p_j|^2`` (p a token's (f, h, w) in token units, plus a
    per-row constant): attention falls off with 3D distance, like a video DiT's local heads."""
    F, H, W = grid
    f, h, w = torch.meshgrid(torch.arange(F), torch.arange(H), torch.arange(W), indexing="ij")
    p = torch.stack([f, h, w], -1).reshape(-1, 3).double()
    one = torch.ones(p.shape[0], 1, dtype=torch.float64)
    q = torch.cat([2 * sharp * p, -sharp * one], -1)      # q_i . k_j = -sharp |p_i - p_j|^2
    k = torch.cat([p, (p * p).sum(-1, keepdim=True)], -1)  # + sharp |p_i|^2 (same for the row)
    q, k = (torch.nn.functional.pad(x, (0, 4)) for x in (q, k))  # D = 8
    return (x.expand(1, heads, -1, -1).float().contiguous() for x in (q * 8 ** 0.5, k))


def test_west_in_tile_order_keeps_neighbouring_tiles():
    grid = (4, 16, 32)  # 16 tiles of 4x4x8 (4 x 4 in (rows, columns)), 100% coverage
    q, k = local_qk(grid)
    perm = to.permutation(grid, "tile")
    codes = west.threshold_codes(west.block_mass(q[:, :, perm], k[:, :, perm], impl="torch"))[0]
    keep = west.mask_at(codes, 0.25)  # 4 of 16 blocks per row + the diagonal
    boxes = to.block_boxes(grid, "tile")
    for u in range(keep.shape[-1]):
        for v in keep[0, u].nonzero().flatten().tolist():
            # kept tiles touch the query tile (their boxes meet or overlap): local tiles
            gap = torch.maximum(boxes[v, :3] - boxes[u, 3:], boxes[u, :3] - boxes[v, 3:])
            assert bool((gap <= 1e-9).all()), (u, v, boxes[u], boxes[v])


def test_plan_remap_in_tile_order_is_conservative():
    # Kept at p on the base grid => every overlapping target block pair is kept at p.
    q, k = local_qk((4, 16, 32))
    base, target = (4, 16, 32), (4, 8, 16)
    codes = west.threshold_codes(west.block_mass(
        *(x[:, :, to.permutation(base, "tile")] for x in (q, k)), impl="torch"))
    remapped = west.remap_codes(codes, base, target, order="tile")
    ov = west.block_overlap(base, target, "tile", "tile").float()  # (NB1, NB0)
    keep0 = west.mask_at(codes[0], 0.3, diagonal=False).float()
    implied = (ov @ keep0 @ ov.T) > 0  # target pairs overlapping some kept base pair
    keep1 = west.mask_at(remapped[0], 0.3, diagonal=False)
    assert torch.equal(keep1, implied)


# --------------------------------------------------------------------------------------------
# The model in tile order
# --------------------------------------------------------------------------------------------

def make_model(seed=0, head_dim=16):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=head_dim,
        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
        num_layers=LAYERS, rope_max_seq_len=64).eval()
    with torch.no_grad():  # peaked attention, so a mask applied in the wrong order shows
        for block in model.blocks:
            for norm in (block.attn1.norm_q, block.attn1.norm_k):
                norm.weight.mul_(4.0)
    return model


def make_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(*LATENT, generator=g),
                encoder_hidden_states=torch.randn(1, 24, 32, generator=g))


def make_plan(model, order, seed=0):
    nb = num_blocks(math.prod(GRID))
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(1, 256, (LAYERS, HEADS, nb, nb), generator=g, dtype=torch.uint8)
    return Plan.from_codes(codes, model, GRID, 1, token_order=order)


class TiledReference(transformer_wan.WanAttnProcessor):
    """Wan's processor with self-attention done by hand in ``order``: permute q/k/v (after RoPE,
    in raster order), apply the block mask with the readable reference, un-permute."""

    def __init__(self, tables, layer, order, compute_dtype):
        super().__init__()
        self.tables, self.layer, self.compute_dtype = tables, layer, compute_dtype
        self.perm = to.permutation(tables.grid, order)
        self.inv = to.inverse_permutation(tables.grid, order)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        masks, lt, bounds = self.tables.layer(self.layer)

        def sparse(query, key, value, **_):  # (B, S, H, D)
            q, k, v = (t[:, self.perm].transpose(1, 2) for t in (query, key, value))
            out = sparse_attention_reference(q, k, v, masks, lt, bounds, torch.tensor([500.0]),
                                             None, compute_dtype=self.compute_dtype)
            return out.transpose(1, 2)[:, self.inv]

        with mock.patch.object(transformer_wan, "dispatch_attention_fn", sparse):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                    rotary_emb)


def hand_reference(model, tables, order, inputs, timestep):
    """(same-dtype, float64) outputs of the eager model with :class:`TiledReference`."""
    outs = []
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(model).to(dtype)
        for i, block in enumerate(m.blocks):
            block.attn1.set_processor(TiledReference(tables, i, order, dtype))
        with torch.no_grad():
            outs.append(m(timestep=timestep, return_dict=False,
                          **{k: v.to(dtype) for k, v in inputs.items()})[0])
    return outs


def run_compiled(model, plan, inputs, timestep, compiler="eager", **materialize):
    torch._dynamo.reset()
    backend = scaling_attn_backend(plan, compiler=compiler, materialize_kwargs=materialize)
    c = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        out = c(timestep=timestep, return_dict=False, **inputs)[0]
    return out, backend.reports[-1]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("compiler,device", [
    ("eager", "cpu"), ("inductor", "cpu"),
    pytest.param("inductor", "cuda", marks=pytest.mark.gpu)])  # the Triton template, bf16
def test_tile_order_at_density_1_equals_the_raster_model(compiler, device):
    dtype, head_dim = (torch.float32, 16) if device == "cpu" else (torch.bfloat16, 64)
    model = make_model(head_dim=head_dim)
    golden_model = copy.deepcopy(model).double()
    model = model.to(device, dtype)
    inputs, ts = make_inputs(), torch.tensor([500.0])
    dev_inputs = {k: v.to(device, dtype) for k, v in inputs.items()}
    out, report = run_compiled(model, make_plan(model, "tile"), dev_inputs, ts.to(device),
                               compiler, density=1.0)
    assert report.token_order == "tile" and report.num_rewritten == LAYERS
    with torch.no_grad():
        same = model(timestep=ts.to(device), return_dict=False, **dev_inputs)[0]
        golden = golden_model(timestep=ts, return_dict=False,
                              **{k: v.double() for k, v in inputs.items()})[0]
    assert_close_to_oracle(out.cpu(), golden, same.cpu(), k=2.0 if device == "cpu" else 3.0,
                           what=f"tile order, density 1, {compiler}, {device}")


def test_sparse_tile_order_applies_the_mask_in_tile_coordinates():
    model, inputs, ts = make_model(), make_inputs(), torch.tensor([500.0])
    plan = make_plan(model, "tile")
    out, _ = run_compiled(model, plan, inputs, ts, density=0.5)
    tables = plan.materialize(GRID, density=0.5)
    assert tables.token_order == "tile"
    same, golden = hand_reference(model, tables, "tile", inputs, ts)
    assert_close_to_oracle(out, golden, same, what="tile order, density 0.5")
    # The same tables read in raster coordinates give another model: the test can fail.
    wrong, _ = hand_reference(model, tables, "raster", inputs, ts)
    assert (wrong - golden).abs().max() > 20 * (same - golden).abs().max()


def test_i2v_model_in_tile_order_equals_eager():
    # I2V: CLIP image tokens join the text as cross-attention keys (never permuted).
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=LAYERS,
        rope_max_seq_len=64, image_dim=24, added_kv_proj_dim=HEADS * 16).eval()
    g = torch.Generator().manual_seed(3)
    inputs = dict(make_inputs(), encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                  encoder_hidden_states_image=torch.randn(1, 16, 24, generator=g))
    ts = torch.tensor([500.0])
    out, report = run_compiled(model, make_plan(model, "tile"), inputs, ts, density=1.0)
    assert report.token_order == "tile"
    with torch.no_grad():
        same = model(timestep=ts, return_dict=False, **inputs)[0]
        golden = copy.deepcopy(model).double()(timestep=ts, return_dict=False,
                                               **{k: v.double() for k, v in inputs.items()})[0]
    assert_close_to_oracle(out, golden, same, what="I2V, tile order")


def test_per_token_timestep_is_permuted_with_the_tokens():
    # Wan2.2 TI2V's timestep [B, S]: per-token modulation, here different on every token.
    model, inputs = make_model(), make_inputs()
    ts = torch.linspace(100.0, 900.0, math.prod(GRID))[None]
    out, report = run_compiled(model, make_plan(model, "tile"), inputs, ts, density=1.0)
    assert report.token_order == "tile"
    with torch.no_grad():
        same = model(timestep=ts, return_dict=False, **inputs)[0]
        golden = copy.deepcopy(model).double()(timestep=ts.double(), return_dict=False,
                                               **{k: v.double() for k, v in inputs.items()})[0]
    assert_close_to_oracle(out, golden, same, what="per-token timestep, tile order")


def test_old_plan_file_without_token_order_loads_as_raster(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from scaling_attn_compile.plan.schema import CHECKSUM_KEY

    model, inputs, ts = make_model(), make_inputs(), torch.tensor([500.0])
    plan = make_plan(model, "raster")
    path = plan.save(tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:  # rewrite it as a pre-issue-20 file
        meta = json.loads(f.metadata()["scaling_attn_plan"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["token_order"]
    meta.pop(CHECKSUM_KEY)  # files from before issue 20 predate the metadata checksum too
    save_file(tensors, str(tmp_path / "old.safetensors"),
              metadata={"scaling_attn_plan": json.dumps(meta)})
    old = load_plan(tmp_path / "old.safetensors")
    assert old.token_order.is_raster and old.meta.token_order == "raster"
    got, report = run_compiled(model, old, inputs, ts, density=0.5)
    assert report.token_order is None
    tables = plan.materialize(GRID, density=0.5)
    same, golden = hand_reference(model, tables, "raster", inputs, ts)
    assert_close_to_oracle(got, golden, same, what="old plan file")
    tiled = load_plan(make_plan(model, "tile:2x8x8").save(tmp_path / "tiled.safetensors"))
    assert str(tiled.token_order) == "tile:2x8x8"


def test_tile_order_with_sequence_parallelism_is_a_clear_error():
    from torch._dynamo.exc import BackendCompilerFailed

    model, inputs, ts = make_model(), make_inputs(), torch.tensor([500.0])
    backend = scaling_attn_backend(make_plan(model, "tile"), compiler="eager", head_range=(0, 2),
                                   materialize_kwargs={"density": 1.0})
    c = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with pytest.raises(BackendCompilerFailed, match="not yet supported with sequence parallel"):
        with torch.no_grad():
            c(timestep=ts, return_dict=False, **inputs)
