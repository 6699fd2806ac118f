"""``benchmarks/mask_families.py``: the benchmark's block-mask families hit their density, keep
the diagonal, and are ragged where they promise to be (CPU, small grids and the 1.3B grid)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scaling_attn_compile.contract.masks import num_blocks, unpack_blocks
from scaling_attn_compile.testing import load_module

ROOT = Path(__file__).resolve().parent.parent


MF = load_module(ROOT / "benchmarks" / "mask_families.py", "mask_families")
SMALL = (5, 16, 24)  # 1,920 tokens, 15 blocks: small enough to check every row by hand


@pytest.mark.parametrize("family", MF.FAMILIES)
@pytest.mark.parametrize("grid,heads,tol", [(MF.GRIDS["1.3b"], 12, 0.01), ((9, 20, 32), 6, 0.03)])
@pytest.mark.parametrize("density", MF.DENSITIES)
def test_density_diagonal_and_shape(family, grid, heads, tol, density):
    block = MF.block_mask(family, heads, grid, density, seed=3)
    nb = num_blocks(grid[0] * grid[1] * grid[2])
    assert block.shape == (heads, nb, nb) and block.dtype == torch.bool
    assert block.diagonal(dim1=-2, dim2=-1).all(), "the diagonal block must always be kept"
    achieved = block.double().mean().item()
    # Bernoulli's sampling noise and the local window's discrete steps: a few blocks in 10^4.
    assert abs(achieved - density) <= tol, (family, density, achieved)
    if density == 1.0:
        assert block.all()


@pytest.mark.parametrize("density", [0.05, 0.1, 0.25, 0.5])
def test_raggedness(density):
    grid = MF.GRIDS["1.3b"]
    assert MF.row_raggedness(MF.block_mask("balanced", 12, grid, density)) == 0.0
    for family in ("bernoulli", "local"):
        assert MF.row_raggedness(MF.block_mask(family, 12, grid, density)) > 0.03, family


def test_local_is_local_and_radius_grows_with_the_head():
    grid = MF.GRIDS["1.3b"]
    block = MF.block_mask("local", 12, grid, 0.1)
    per_head = block.double().mean((1, 2))
    assert (per_head[1:] >= per_head[:-1]).all() and per_head[-1] > 2 * per_head[0]
    c = MF.block_centres(grid)
    dist = (c[:, None] - c[None]).abs().amax(-1)
    for h in range(12):  # every kept block is nearer than every dropped one, per head
        assert dist[block[h]].max() <= dist[~block[h]].min()


def test_block_centres_partial_tail():
    grid = SMALL
    s = grid[0] * grid[1] * grid[2]
    c = MF.block_centres((1, 1, 200))  # 200 tokens: blocks of 128 and 72
    assert torch.allclose(c[:, 2], torch.tensor([63.5, 163.5], dtype=torch.float64) / 200)
    assert MF.block_centres(grid).shape == (num_blocks(s), 3)


def test_bernoulli_differs_by_seed_and_repeats_with_it():
    a = MF.block_mask("bernoulli", 4, SMALL, 0.25, seed=1)
    assert torch.equal(a, MF.block_mask("bernoulli", 4, SMALL, 0.25, seed=1))
    assert not torch.equal(a, MF.block_mask("bernoulli", 4, SMALL, 0.25, seed=2))


def test_mask_tables_round_trip():
    block = MF.block_mask("local", 4, SMALL, 0.25)
    tables = MF.mask_tables(block, SMALL)
    masks, lt, bb = tables.layer(0)
    nb = block.shape[-1]
    assert masks.shape == (4, 1, nb, (nb + 31) // 32) and lt.shape == (1, 4) and bb.numel() == 0
    assert torch.equal(unpack_blocks(masks[:, 0], nb), block)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="family"):
        MF.block_mask("stripes", 2, SMALL, 0.5)
    with pytest.raises(ValueError, match="density"):
        MF.block_mask("local", 2, SMALL, 0.0)
