"""Training-free anchors as plans: three published static sparsity patterns in our mask format,
so the quality study runs them through the same op and kernel as WEST+FAST.

    tables = radial_tables(grid, 0.25, num_layers=8, num_heads=4)       # AttentionTables
    plan = AnchorPlan("sta", 0.25, num_layers=8, num_heads=4)           # .materialize(grid)
    backend = scaling_attn_backend(plan)                                # any grid the model runs

``grid`` is the latent token grid ``(F, H, W)`` after patching. Each anchor is a *score* per
(query block, KV block) pair: lower scores are kept first. The mask at a target density keeps
every pair whose score is at most a threshold, chosen among the score's distinct values so the
kept fraction (diagonal included, as the op counts it) is nearest the target. One threshold per
head, so the masks of one anchor are nested in the density (a larger target keeps a superset).

Block geometry comes from :func:`block_coords` alone: block ``j`` holds tokens
``[128 j, 128 j + 128)`` of the sequence, token ``i`` of the sequence is raster token
``order[i]`` (``(frame, row, column)`` raster order by default), and a block's position is the
mean ``(f, h, w)`` of its tokens. In raster order a block is a strip of whole token rows, so its
mean column is the frame's middle; another token order (3D tiles) changes only ``order``.

The anchors (distances between block positions; ``dt`` in frames, ``ds`` in tokens within a
frame, ``df, dh, dw`` the per-axis distances):

``radial``     Radial Attention (Li et al. 2025): full attention near the query's frame, a
               spatial window that halves each time the temporal distance doubles. Score
               ``(ds + 1) * 2 ** bitlen(floor(dt))``: ``bitlen`` is 0 at ``dt = 0``, 1 at 1, 2 at
               2-3, 3 at 4-7, as in Radial's Wan rule (frame 0 full, frame 1 half the window,
               then a window halving per doubling). The ``+ 1`` token makes the same position
               of far frames cost more with distance too, so their density decays instead of
               being kept at every density (Radial keeps it only in every ``k``-th far frame).
``sta``        Sliding Tile Attention (Zhang et al. 2025): a 3D window around the query block,
               every axis covering the same fraction of the video. Score
               ``max(df / F, dh / H, dw / W)`` (Chebyshev in normalised coordinates).
``svg_split``  Sparse VideoGen (Xi et al. 2025): each head is *spatial* (blocks of the query's
               own frame first, then the nearest frames) or *temporal* (blocks at the query's
               spatial position in every frame first, then the nearest positions). Scores
               ``dt`` and ``ds``. SVG picks the type online per step from sampled rows; here it is
               picked once per (layer, head) from a profiling run's block-pooled attention mass
               (:func:`svg_head_types`): the type whose mask keeps more of it at the target.

Every score adds ``1e-3 x`` a secondary distance (``dt / F + ds / hypot(H, W)`` for radial,
``df / F + dh / H + dw / W`` for STA, the other type's distance for SVG) to break ties, so the
last shell is filled nearest-first: at 16x32x32 tokens (128 blocks) the largest step between reachable densities
falls from 0.14 to 0.04 for STA and from 0.07 to 0.03 for radial. Pairs at the same offset
still tie, so at 8x16x16 (16 blocks) the steps stay up to 0.11-0.13.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..contract.masks import BLOCK, num_blocks, pack_blocks
from ..contract.tables import AttentionTables
from ..contract.token_order import TokenOrder, check_grid, permutation

KINDS = ("radial", "sta", "svg_split")
SPATIAL, TEMPORAL = 0, 1  # svg_split head types
TIE_BREAK = 1e-3  # weight of the secondary distance; primary gaps are >= 1 frame / 1 token / 1/F

Grid = tuple[int, int, int]


def _check_density(density: float) -> float:
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density: expected a kept-block fraction in (0, 1], got {density}; "
                         "pass e.g. 0.25")
    return float(density)


# --------------------------------------------------------------------------------------------
# Block geometry: the ONE place that knows which tokens a block holds
# --------------------------------------------------------------------------------------------

def block_coords(grid: Grid, order: torch.Tensor | None = None) -> torch.Tensor:
    """Mean ``(f, h, w)`` token coordinates of each 128-token block: float64 ``(NB, 3)``.

    ``order`` (int64 ``(S,)``): sequence position ``i`` holds raster token ``order[i]``; default
    raster order. The partial last block (``S % 128``) averages its real tokens only.
    """
    F, H, W = check_grid(grid)
    S = F * H * W
    ids = torch.arange(S) if order is None else torch.as_tensor(order, dtype=torch.int64)
    if ids.shape != (S,):
        raise ValueError(f"order: expected a permutation of shape ({S},) for grid {(F, H, W)}, "
                         f"got {tuple(ids.shape)}")
    xyz = torch.stack([ids // (H * W), (ids // W) % H, ids % W], dim=1).to(torch.float64)
    nb = num_blocks(S)
    blk = torch.arange(S) // BLOCK
    sums = torch.zeros(nb, 3, dtype=torch.float64).index_add_(0, blk, xyz)
    counts = torch.bincount(blk, minlength=nb).to(torch.float64)
    return sums / counts[:, None]


def _distances(grid: Grid, order=None) -> dict[str, torch.Tensor]:
    """Pairwise block distances ``(NB, NB)``: ``dt`` (frames), ``dh``, ``dw``, ``ds`` (tokens)."""
    c = block_coords(grid, order)
    d = (c[:, None, :] - c[None, :, :]).abs()
    dt, dh, dw = d.unbind(-1)
    return {"dt": dt, "dh": dh, "dw": dw, "ds": torch.sqrt(dh * dh + dw * dw)}


def _bitlen(x: torch.Tensor) -> torch.Tensor:
    """``int(x).bit_length()`` elementwise for ``x >= 0`` (0 -> 0, 1 -> 1, 2..3 -> 2, ...)."""
    n = x.floor()
    return torch.where(n >= 1, torch.floor(torch.log2(n.clamp_min(1))) + 1, torch.zeros_like(n))


# --------------------------------------------------------------------------------------------
# Scores (lower = kept first)
# --------------------------------------------------------------------------------------------

def radial_score(grid: Grid, order=None) -> torch.Tensor:
    """float64 ``(NB, NB)``: ``(ds + 1) * 2 ** bitlen(dt)`` plus the nearest-first tie break."""
    F, H, W = check_grid(grid)
    d = _distances(grid, order)
    diag = math.hypot(H, W)
    return (d["ds"] + 1.0) * torch.pow(2.0, _bitlen(d["dt"])) + TIE_BREAK * (
        d["dt"] / F + d["ds"] / diag)


def sta_score(grid: Grid, order=None) -> torch.Tensor:
    """float64 ``(NB, NB)``: ``max(df / F, dh / H, dw / W)`` plus the nearest-first tie break."""
    F, H, W = check_grid(grid)
    d = _distances(grid, order)
    n = torch.stack([d["dt"] / F, d["dh"] / H, d["dw"] / W])
    return n.amax(0) + TIE_BREAK * n.sum(0)


def svg_scores(grid: Grid, order=None) -> torch.Tensor:
    """float64 ``(2, NB, NB)``: the spatial head's score (frame distance first) and the temporal
    head's (spatial distance first), each with the other distance as tie break."""
    F, H, W = check_grid(grid)
    d = _distances(grid, order)
    diag = math.hypot(H, W)
    spatial = d["dt"] + TIE_BREAK * d["ds"] / diag
    temporal = d["ds"] + TIE_BREAK * d["dt"] / F
    return torch.stack([spatial, temporal])


# --------------------------------------------------------------------------------------------
# Score -> mask at a density
# --------------------------------------------------------------------------------------------

def mask_from_score(score: torch.Tensor, density: float) -> torch.Tensor:
    """bool ``(NB, NB)``: the diagonal plus every pair with score <= t, the threshold ``t``
    among the distinct off-diagonal scores whose kept fraction is nearest ``density`` (ties go
    to the sparser mask). Masks of one score are nested in ``density``."""
    density = _check_density(density)
    nb = score.shape[-1]
    eye = torch.eye(nb, dtype=torch.bool, device=score.device)
    # Rounded so equal offsets computed along different float paths tie exactly.
    s = torch.round(score.to(torch.float64) * 1e9) / 1e9
    off = s[~eye]
    if off.numel() == 0:
        return eye.clone()
    values, counts = torch.unique(off, sorted=True, return_counts=True)
    kept = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]) + nb  # 0: diag only
    err = (kept.double() / (nb * nb) - density).abs()
    best = int(torch.argmin(err))  # argmin returns the first (sparser) of equal errors
    if best == 0:
        return eye.clone()
    return (s <= values[best - 1]) | eye


def svg_head_types(masses: list[torch.Tensor], grid: Grid, density: float,
                   order=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial or temporal per (layer, head), from a profiling run's attention mass.

    ``masses``: per layer, float ``(H, NB, NB)`` block-pooled softmax mass at ``grid`` (e.g.
    ``west.block_mass`` summed over a dense run's captured steps). Returns int32 ``(L, H)``
    types (:data:`SPATIAL` 0 / :data:`TEMPORAL` 1) and float64 ``(L, H, 2)``: the share of each
    head's mass that the spatial and the temporal mask at ``density`` keep.
    """
    grid = check_grid(grid)
    scores = svg_scores(grid, order)
    masks = torch.stack([mask_from_score(scores[i], density) for i in range(2)])  # (2, NB, NB)
    nb = masks.shape[-1]
    kept = []
    for layer, m in enumerate(masses):
        if m.dim() != 3 or tuple(m.shape[1:]) != (nb, nb):
            raise ValueError(f"masses[{layer}]: expected (H, {nb}, {nb}) block mass at grid "
                             f"{grid}, got {tuple(m.shape)}")
        m = m.double().cpu()
        kept.append((m[:, None] * masks[None]).sum((-1, -2)) / m.sum((-1, -2))[:, None])
    share = torch.stack(kept)  # (L, H, 2)
    return share.argmax(-1).to(torch.int32), share


# --------------------------------------------------------------------------------------------
# Tables and the plan-like object
# --------------------------------------------------------------------------------------------

def _order_perm(grid: Grid, token_order) -> torch.Tensor | None:
    """The permutation of a ``token_order`` spec (``"raster"``, ``"tile"``, ``"tile:FxHxW"``),
    ``None`` for raster."""
    return None if TokenOrder.parse(token_order).is_raster else permutation(grid, token_order)


def anchor_masks(kind: str, grid: Grid, density: float, num_heads: int, *,
                 head_types: torch.Tensor | None = None, order=None) -> torch.Tensor:
    """bool ``(H, NB, NB)`` block masks of one layer. ``head_types`` (int ``(H,)``) only for
    ``svg_split``; ``order``: the sequence's token permutation (:func:`block_coords`)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    grid = check_grid(grid)
    if kind == "svg_split":
        if head_types is None or tuple(head_types.shape) != (num_heads,):
            raise ValueError(f"head_types: svg_split needs one type per head, shape "
                             f"({num_heads},), got {None if head_types is None else tuple(head_types.shape)}; "
                             "make them with svg_head_types")
        scores = svg_scores(grid, order)
        by_type = [mask_from_score(scores[i], density) for i in (SPATIAL, TEMPORAL)]
        return torch.stack([by_type[int(t)] for t in head_types])
    score = radial_score(grid, order) if kind == "radial" else sta_score(grid, order)
    return mask_from_score(score, density)[None].expand(num_heads, -1, -1).clone()


def anchor_tables(kind: str, grid: Grid, density: float, num_layers: int, num_heads: int, *,
                  head_types: torch.Tensor | None = None,
                  token_order: str = "raster") -> AttentionTables:
    """:class:`AttentionTables` of an anchor at ``grid``: one level per layer, one timestep
    bucket. ``head_types`` int ``(L, H)`` for ``svg_split``. ``token_order``: which tokens share
    a block (``token_order.py``); the tables say it, so the backend permutes the model to it."""
    order = _order_perm(check_grid(grid), token_order)
    if kind == "svg_split" and (head_types is None
                                or tuple(head_types.shape) != (num_layers, num_heads)):
        raise ValueError(f"head_types: svg_split needs (num_layers={num_layers}, "
                         f"num_heads={num_heads}) types, got "
                         f"{None if head_types is None else tuple(head_types.shape)}; make them "
                         "with svg_head_types")
    masks, dens = [], []
    shared = None
    for layer in range(num_layers):
        if kind == "svg_split":
            blocks = anchor_masks(kind, grid, density, num_heads, head_types=head_types[layer],
                                  order=order)
        else:  # the same mask in every layer: build it once
            shared = shared if shared is not None else anchor_masks(kind, grid, density,
                                                                    num_heads, order=order)
            blocks = shared
        dens.append(blocks.float().mean(dim=(-1, -2))[:, None])  # (H, 1)
        masks.append(pack_blocks(blocks)[:, None])  # (H, 1, NB, W)
    return AttentionTables(tuple(grid), masks,
                           [torch.zeros(1, num_heads, dtype=torch.int32) for _ in masks],
                           torch.zeros(0, dtype=torch.float32), dens, str(token_order))


def radial_tables(grid, density, num_layers, num_heads, **kw) -> AttentionTables:
    return anchor_tables("radial", grid, density, num_layers, num_heads, **kw)


def sta_tables(grid, density, num_layers, num_heads, **kw) -> AttentionTables:
    return anchor_tables("sta", grid, density, num_layers, num_heads, **kw)


def svg_split_tables(grid, density, head_types, **kw) -> AttentionTables:
    L, H = head_types.shape
    return anchor_tables("svg_split", grid, density, L, H, head_types=head_types, **kw)


@dataclass
class AnchorPlan:
    """An anchor the backend can materialise at any grid: ``scaling_attn_backend(AnchorPlan(...))``.

    ``head_types`` (int ``(num_layers, num_heads)``) is required for ``svg_split``; ``info``
    holds how they were chosen (JSON-able), for records. ``token_order``: see
    :func:`anchor_tables`.
    """

    kind: str
    density: float
    num_layers: int
    num_heads: int
    head_types: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    token_order: str = "raster"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"AnchorPlan.kind: expected one of {KINDS}, got {self.kind!r}")
        self.density = _check_density(self.density)

    def materialize(self, grid: Grid) -> AttentionTables:
        grid = check_grid(grid)
        if grid not in self._cache:
            self._cache[grid] = anchor_tables(self.kind, grid, self.density, self.num_layers,
                                              self.num_heads, head_types=self.head_types,
                                              token_order=self.token_order)
        return self._cache[grid]
