"""The training-free anchors (``scaling_attn_compile.offline.anchors``): block geometry, densities near
their targets, the diagonal, nestedness, SVG's head choice, and a run through the op and the
backend at a tiny grid."""

from __future__ import annotations

import math

import pytest
import torch

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.contract.masks import unpack_blocks
from scaling_attn_compile.offline import anchors as A
from scaling_attn_compile.testing import assert_close_to_oracle, make_qkv

SMALL_WAN_TOKENS = (16, 32, 32)  # small-wan's native token grid: 128 blocks
DENSITIES = (0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75)


def test_block_coords_raster_and_partial_block():
    # 2 frames of 8 x 32 tokens: 4 blocks, each 4 whole rows of one frame.
    c = A.block_coords((2, 8, 32))
    torch.testing.assert_close(c, torch.tensor([[0, 1.5, 15.5], [0, 5.5, 15.5], [1, 1.5, 15.5],
                                                [1, 5.5, 15.5]], dtype=torch.float64))
    # S = 300: the last block holds tokens 256..299 = row 2, columns 56..99.
    c = A.block_coords((1, 3, 100))
    assert c.shape == (3, 3)
    torch.testing.assert_close(c[2], torch.tensor([0.0, 2.0, 77.5], dtype=torch.float64))
    # Another token order moves the blocks: reversed, block 0 holds the last 128 tokens.
    rev = A.block_coords((2, 8, 32), order=torch.arange(511, -1, -1))
    torch.testing.assert_close(rev[0], torch.tensor([1, 5.5, 15.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"order: expected a permutation of shape \(512,\)"):
        A.block_coords((2, 8, 32), order=torch.arange(10))


@pytest.mark.parametrize("kind", ["radial", "sta", "spatial", "temporal"])
def test_density_near_target_diagonal_kept_and_nested(kind):
    grid = SMALL_WAN_TOKENS
    if kind in ("radial", "sta"):
        score = A.radial_score(grid) if kind == "radial" else A.sta_score(grid)
    else:
        score = A.svg_scores(grid)[A.SPATIAL if kind == "spatial" else A.TEMPORAL]
    prev = None
    for d in DENSITIES:
        m = A.mask_from_score(score, d)
        assert m.diagonal().all()
        # 128 blocks: the largest step between reachable densities is 0.041 (STA), so the
        # nearest one is within half of it.
        assert abs(m.double().mean().item() - d) <= 0.025, (kind, d, m.double().mean().item())
        if prev is not None:
            assert not (prev & ~m).any(), f"{kind}: mask at {d} drops blocks kept below it"
        prev = m
    # A density below the diagonal's share still keeps the diagonal, and nothing else.
    m = A.mask_from_score(score, 1e-4)
    assert torch.equal(m, torch.eye(128, dtype=torch.bool))
    assert A.mask_from_score(score, 1.0).all()


def test_radial_density_decays_with_temporal_distance():
    grid = SMALL_WAN_TOKENS
    d = A._distances(grid)["dt"].round()
    for density in (0.1, 0.25, 0.5):
        m = A.mask_from_score(A.radial_score(grid), density)
        per_dt = [m[d == k].double().mean().item() for k in range(grid[0])]
        assert all(a >= b for a, b in zip(per_dt, per_dt[1:], strict=False)), per_dt
        assert per_dt[0] > per_dt[-1]


def test_sta_is_a_window_around_the_query():
    """Every kept block is at most as far (Chebyshev, normalised) as any dropped block, up to
    the tie break."""
    grid = SMALL_WAN_TOKENS
    F, H, W = grid
    dist = A._distances(grid)
    cheb = torch.stack([dist["dt"] / F, dist["dh"] / H, dist["dw"] / W]).amax(0)
    m = A.mask_from_score(A.sta_score(grid), 0.25)
    assert cheb[m].max() <= cheb[~m].min() + 1e-12
    assert torch.equal(m, m.T)


def test_svg_head_types_follow_the_profiled_mass():
    grid = (4, 16, 16)  # 4 frames of 2 strips: 8 blocks
    coords = A.block_coords(grid)
    same_frame = coords[:, None, 0] == coords[None, :, 0]
    same_pos = (coords[:, None, 1:] == coords[None, :, 1:]).all(-1)
    spatial_head = same_frame.double() + 0.01
    temporal_head = same_pos.double() + 0.01
    masses = [torch.stack([spatial_head, temporal_head]), torch.stack([temporal_head,
                                                                     spatial_head])]
    types, share = A.svg_head_types(masses, grid, 0.3)
    assert types.tolist() == [[A.SPATIAL, A.TEMPORAL], [A.TEMPORAL, A.SPATIAL]]
    assert share.shape == (2, 2, 2) and (share[0, 0, 0] > share[0, 0, 1])
    with pytest.raises(ValueError, match=r"masses\[0\]: expected \(H, 8, 8\)"):
        A.svg_head_types([torch.ones(2, 4, 4)], grid, 0.3)


def test_tables_and_plan_at_any_grid():
    types = torch.tensor([[0, 1], [1, 1]], dtype=torch.int32)
    for kind, kw in (("radial", {}), ("sta", {}), ("svg_split", {"head_types": types})):
        plan = A.AnchorPlan(kind, 0.3, num_layers=2, num_heads=2, **kw)
        for grid in ((4, 16, 16), (8, 16, 32)):
            t = plan.materialize(grid)
            nb = math.ceil(math.prod(grid) / 128)
            assert t.grid == grid and t.num_layers == 2 and t.num_heads == 2
            assert t.masks[0].shape == (2, 1, nb, math.ceil(nb / 32))
            blocks = unpack_blocks(t.masks[1], nb)[:, 0]
            assert blocks.diagonal(dim1=-2, dim2=-1).all()
            assert t.level_tables[0].tolist() == [[0, 0]] and t.bucket_bounds.numel() == 0
        if kind == "svg_split":  # layer 0 mixes the types, layer 1 does not
            m0 = unpack_blocks(plan.materialize((8, 16, 32)).masks[0], 16)[:, 0]
            assert not torch.equal(m0[0], m0[1])
    with pytest.raises(ValueError, match="head_types: svg_split needs"):
        A.anchor_tables("svg_split", (4, 16, 16), 0.3, 2, 2)
    with pytest.raises(ValueError, match="kind: expected one of"):
        A.AnchorPlan("bigbird", 0.3, 2, 2)
    with pytest.raises(ValueError, match=r"density: expected a kept-block fraction in \(0, 1\]"):
        A.AnchorPlan("sta", 0.0, 2, 2)


@pytest.mark.parametrize("kind", ["radial", "sta", "svg_split"])
def test_anchor_tables_through_the_op(kind):
    """The op with anchor tables == softmax over the anchor's kept blocks (float64 oracle)."""
    grid, H, D = (4, 16, 16), 2, 64  # S = 1024: 8 blocks
    types = torch.tensor([[A.SPATIAL, A.TEMPORAL]], dtype=torch.int32)
    t = A.anchor_tables(kind, grid, 0.3, 1, H, head_types=types if kind == "svg_split" else None)
    q, k, v = make_qkv(1, H, 1024, D, dtype=torch.float32, seed=3)
    out = torch.ops.scaling_attn.sparse_attention(q, k, v, *t.layer(0), torch.tensor(500.0),
                                                  D ** -0.5)
    blocks = unpack_blocks(t.masks[0], 8)[:, 0]  # (H, NB, NB)
    keep = blocks.repeat_interleave(128, -1).repeat_interleave(128, -2)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * D ** -0.5
    golden = torch.einsum("bhqk,bhkd->bhqd", s.masked_fill(~keep, -math.inf).softmax(-1),
                          v.double())
    dense = torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v.double())
    assert (golden - dense).abs().max() > 1e-3  # the mask matters at density 0.3
    s32 = torch.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
    same = torch.einsum("bhqk,bhkd->bhqd", s32.masked_fill(~keep, -math.inf).softmax(-1), v)
    assert_close_to_oracle(out, golden, same)


def test_anchor_plan_through_the_backend():
    """A tiny Wan compiled with an AnchorPlan: every self-attention is rewritten; density 1.0
    is the dense model, density 0.3 is not."""
    from scaling_attn_compile.tiny import tiny_wan as tw

    model = tw.make_tiny_wan(seed=0, num_layers=2, ffn_dim=256).eval().requires_grad_(False)
    x = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(hidden_states=x, timestep=torch.tensor([500.0]),
              encoder_hidden_states=tw.encode_captions(["red circle rotating"]), return_dict=False)
    with torch.no_grad():
        dense = model(**kw)[0]
        outs = {}
        for d in (1.0, 0.3):
            be = scaling_attn_backend(A.AnchorPlan("radial", d, 2, 4), compiler="eager")
            outs[d] = torch.compile(model, backend=be, fullgraph=True, dynamic=False)(**kw)[0]
            assert sum(r.num_rewritten for r in be.reports) == 2
            assert be.reports[0].grid == (4, 16, 16)
            torch._dynamo.reset()
    torch.testing.assert_close(outs[1.0], dense, atol=1e-4, rtol=1e-4)
    assert (outs[0.3] - dense).abs().max() > 1e-3
