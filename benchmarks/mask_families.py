"""The block-mask families ``bench_attention.py`` times, in one importable function.

    block_mask(family, heads, grid, density, seed=0) -> bool (H, NB, NB), diagonal kept

* ``balanced``: every query-block row keeps ``round(density * NB)`` blocks (random ones, the
  diagonal among them), as :func:`scaling_attn_compile.contract.tables.uniform_tables` builds:
  all rows equal, the kernel's easiest case.
* ``bernoulli``: each off-diagonal block kept independently with probability
  ``p = (density * NB - 1) / (NB - 1)`` (so the expected density, diagonal included, is the
  target); row lengths are binomial, so rows are ragged.
* ``local``: 3D windows on the latent grid ``(F, H, W)``. Block ``j`` sits at the mean
  (frame, row, column) of its 128 raster tokens; query block ``u`` keeps key block ``j`` when
  every axis' distance, divided by that axis' length, is at most the head's radius. Heads get
  radii ``r * s_h`` with ``s_h`` spread evenly over [0.5, 1.5] (WEST masks differ per head), and
  ``r`` is bisected so the kept fraction over all heads is the target. Rows are ragged twice:
  between heads (radius) and within a head (blocks near the grid's edges have fewer
  neighbours).

Density 1.0 is every block for every family. :func:`row_raggedness` is the coefficient of
variation of the kept blocks per row (0 for ``balanced``).
"""

from __future__ import annotations

import math

import torch

from scaling_attn_compile.contract.masks import BLOCK, add_diagonal, num_blocks, pack_blocks
from scaling_attn_compile.contract.tables import AttentionTables

FAMILIES = ("balanced", "bernoulli", "local")
DENSITIES = (0.05, 0.1, 0.25, 0.5, 1.0)
# The Wan2.1 latent grids (frames, rows, columns after the 1x2x2 patch): 81 frames -> 21,
# 480x832 -> 30x52 (1.3B), 720x1280 -> 45x80 (14B).
GRIDS = {"1.3b": (21, 30, 52), "14b": (21, 45, 80)}
HEAD_SPREAD = (0.5, 1.5)  # per-head radius multipliers for ``local``


def block_mask(family: str, heads: int, grid: tuple[int, int, int], density: float,
               seed: int = 0) -> torch.Tensor:
    """A boolean block mask ``(heads, NB, NB)`` of ``family`` near ``density`` kept blocks
    (diagonal included and always kept), NB = ceil(F * H * W / 128)."""
    if family not in FAMILIES:
        raise ValueError(f"block_mask: family must be one of {FAMILIES}, got {family!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"block_mask: density must be in (0, 1], got {density}")
    nb = num_blocks(math.prod(grid))
    if density >= 1.0:
        return torch.ones(heads, nb, nb, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(nb, dtype=torch.bool)
    if family == "balanced":
        keep = max(1, round(density * nb))
        score = torch.rand(heads, nb, nb, generator=g) + 2.0 * eye  # diagonal ranks first
        top = score.topk(keep, dim=-1).indices
        block = torch.zeros(heads, nb, nb, dtype=torch.bool).scatter_(-1, top, True)
    elif family == "bernoulli":
        p = min(1.0, max(0.0, (density * nb - 1) / max(nb - 1, 1)))
        block = torch.rand(heads, nb, nb, generator=g) < p
    else:
        block = _local(heads, grid, density)
    return add_diagonal(block)


def block_centres(grid: tuple[int, int, int]) -> torch.Tensor:
    """float64 ``(NB, 3)``: each 128-token raster block's mean (frame, row, column) divided by
    the grid's size along that axis (a partial last block averages the tokens it has)."""
    f, h, w = grid
    s = f * h * w
    t = torch.arange(s, dtype=torch.int64)
    coords = torch.stack([t // (h * w), (t // w) % h, t % w], -1).double()
    coords = coords / torch.tensor([f, h, w], dtype=torch.float64)
    nb = num_blocks(s)
    sums = torch.zeros(nb, 3, dtype=torch.float64).index_add_(0, t // BLOCK, coords)
    counts = torch.bincount(t // BLOCK, minlength=nb).double()[:, None]
    return sums / counts


def _local(heads: int, grid, density: float) -> torch.Tensor:
    c = block_centres(grid)
    dist = (c[:, None, :] - c[None, :, :]).abs().amax(-1)  # (NB, NB) normalised L-inf distance
    lo, hi = HEAD_SPREAD
    spread = torch.linspace(lo, hi, heads, dtype=torch.float64) if heads > 1 else \
        torch.ones(1, dtype=torch.float64)

    flat = dist.flatten().sort().values

    def kept(r):  # kept fraction over all heads at radius r, from the sorted distances
        t = (r * spread).contiguous()
        return (torch.searchsorted(flat, t, right=True).double().mean() / flat.numel()).item()

    # The kept fraction only grows with r; 60 halvings of [0, 2 / lo] pin r below any step.
    a, b = 0.0, 2.0 / lo
    for _ in range(60):
        mid = (a + b) / 2
        if kept(mid) < density:
            a = mid
        else:
            b = mid
    # b reaches the target, a falls short: take whichever kept fraction is nearer.
    r = a if abs(kept(a) - density) < abs(kept(b) - density) else b
    return dist[None] <= r * spread[:, None, None]


def row_raggedness(block: torch.Tensor) -> float:
    """Coefficient of variation (std / mean) of kept blocks per query-block row, over all heads."""
    rows = block.sum(-1).double().flatten()
    return (rows.std(unbiased=False) / rows.mean()).item()


def mask_tables(block: torch.Tensor, grid: tuple[int, int, int]) -> AttentionTables:
    """One layer, one level, one timestep bucket: the op's tables for ``block (H, NB, NB)``."""
    heads = block.shape[0]
    return AttentionTables(grid=tuple(grid), masks=[pack_blocks(block)[:, None]],
                           level_tables=[torch.zeros(1, heads, dtype=torch.int32)],
                           bucket_bounds=torch.zeros(0, dtype=torch.float32))
