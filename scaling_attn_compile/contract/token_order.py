"""Token orders: which latent-grid tokens share a 128-token mask block.

The op's masks speak of blocks of 128 consecutive tokens. In diffusers' raster order
``(frame, row, column)`` a block is a strip of whole token rows of one frame (4 rows at 32
tokens per row, 2.5 at Wan 1.3B/480p's 52, 1.6 at 14B/720p's 80), so a mask keeps or drops
whole strips and sparse videos show horizontal stripes. In **tile order** every block (but a
few at the edges, see below) is a 3D box of the latent grid, e.g. 2x8x8 or 1x8x16 tokens
(frames x rows x columns), so a mask keeps or drops compact neighbourhoods.

This module is the one place that knows orders. Everything else asks it for

* :func:`permutation` ``(grid, order) -> LongTensor (S,)``: position ``i`` of the new order holds
  raster token ``perm[i]`` (so ``x_tiled = x.index_select(seq_dim, perm)``), and
  :func:`inverse_permutation` (``x = x_tiled.index_select(seq_dim, inv)``);
* :func:`block_of_token` ``(grid, order) -> LongTensor (S,)``: the block of each raster token;
* :func:`block_boxes` ``(grid, order)``: each block's bounding box, normalised, for the
  resolution remap and pictures.

The tiling rule (``tile`` order, tile shape ``"auto"``)
-------------------------------------------------------
A tile has 128 tokens: ``(tf, th, tw) = (2^a, 2^b, 2^c)`` with ``a + b + c = 7`` (36 shapes).
:func:`tile_layout` tiles a box ``(F, H, W)`` thus:

1. Pick the shape that covers the most tokens *counting the recursion of step 3*, ties to the
   most cubic (smallest surface ``tf*th + th*tw + tf*tw``), then to the fewest frames, then
   the fewest rows (a latent frame of Wan is 4 video frames: time is the coarsest axis).
2. Lay out its ``(F//tf) x (H//th) x (W//tw)`` full tiles, tile-major in raster order of the
   tile grid, each tile's tokens in raster order.
3. The uncovered part is three boxes, ``frames [Ff, F)`` (all rows and columns), ``rows
   [Hf, H)`` of frames ``[0, Ff)``, ``columns [Wf, W)`` of frames ``[0, Ff)`` and rows
   ``[0, Hf)`` (``Ff = tf * (F // tf)`` etc.); tile each by the same rule.
4. After every full tile of every box come the tokens no tile covers, in raster order.

Nothing is padded or wasted: every token appears once, every full tile is exactly one block
(full tiles come first, so they stay 128-aligned), and only the trailing blocks are edge
remainders (strips of the leftover boxes, which are at most a few tokens thick). Coverage on the
real grids (share of tokens in full tiles; :func:`coverage`):

=============== ================== ========= ============================================
grid (F, H, W)   model               top tile  coverage (the best single shape alone)
=============== ================== ========= ============================================
21 x 30 x 52     Wan 1.3B, 480p      4x4x8     98.9% = 32,384 / 32,760 (4x2x16: 87.9%)
21 x 45 x 80     Wan 14B, 720p       4x4x8     99.7% = 75,392 / 75,600 (4x4x8: 93.1%)
8 x 32 x 32      tiny Wan, 8x64x64   4x4x8     100%
16 x 32 x 32                         4x4x8     100%
=============== ================== ========= ============================================

Which shape is best for attention is a property of the model, not of the rule: on the bundled
tiny Wan at 8x32x32 tokens the best block mask of density 0.35 keeps 68.3% of the softmax mass
with raster blocks, 68.5% with 4x4x8 tiles and 68.9% with 2x8x8 (``bench_tile_order.py
--recall``); the rule picks by coverage and shape, not by a model's attention.

A fixed tile shape (``"tile:2x8x8"``) uses that shape at the top level (the auto rule where it
does not fit the grid) and the auto rule for the leftover boxes.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

from .masks import BLOCK, num_blocks

Grid = tuple[int, int, int]
RASTER = "raster"
TILE = "tile"
DEFAULT_ORDER = RASTER  # for plans and tables that say nothing (files written before issue 20)
AUTO = "auto"
# What `scaling-attn west` and the demo extract in by default: "auto" is tile order where the
# model family's adapter can permute its tokens (Wan: ``ORDER_SITES``), raster elsewhere (LTX,
# HunyuanVideo). Why tile: on small-wan (128 blocks, H200; benchmarks/results/
# quality-nvidia-h200-small-wan{,-tile}.json) WEST+FAST gained +2.0 to +2.3 dB over raster at
# densities 0.15-0.35, the CPU demo +1.0 dB, and a 14B/720p step cost +0.15%.
NEW_PLAN_ORDER = AUTO
_BITS = BLOCK.bit_length() - 1  # 128 = 2^7
TILE_SHAPES: tuple[Grid, ...] = tuple(
    (1 << a, 1 << b, 1 << (_BITS - a - b)) for a in range(_BITS + 1) for b in range(_BITS + 1 - a))
_SPEC_RE = re.compile(r"^tile(?::(\d+)x(\d+)x(\d+))?$")


@dataclass(frozen=True)
class TokenOrder:
    """A token order: ``kind`` ``"raster"`` or ``"tile"``; ``tile``: a fixed top-level tile shape
    ``(tf, th, tw)`` (volume 128), or ``None`` for the per-grid rule (:func:`tile_shape_for`).

    ``str(order)`` is its spec: ``"raster"``, ``"tile"`` or ``"tile:2x8x8"`` (what plans store).
    """

    kind: str = RASTER
    tile: Grid | None = None

    def __post_init__(self):
        if self.kind not in (RASTER, TILE):
            raise ValueError(f"TokenOrder.kind: expected 'raster' or 'tile', got {self.kind!r}")
        if self.tile is not None:
            if self.kind != TILE:
                raise ValueError(f"TokenOrder.tile: only tile order takes a tile shape, got "
                                 f"kind {self.kind!r} with tile {self.tile}")
            t = tuple(int(x) for x in self.tile)
            if t not in TILE_SHAPES:
                raise ValueError(f"TokenOrder.tile: expected (tf, th, tw), powers of two with "
                                 f"tf * th * tw = {BLOCK}, got {self.tile}; e.g. (2, 8, 8)")
            object.__setattr__(self, "tile", t)

    @classmethod
    def for_new_plan(cls, spec, *, can_permute: bool) -> TokenOrder:
        """The order a new plan is extracted in: ``spec`` as :meth:`parse` reads it, except
        ``"auto"`` (:data:`NEW_PLAN_ORDER`): tile where the model can be permuted
        (``can_permute``: its adapter has ``ORDER_SITES``), raster where it cannot."""
        if spec is not None and str(spec).strip().lower() == AUTO:
            return cls(TILE if can_permute else RASTER)
        return cls.parse(spec)

    @classmethod
    def parse(cls, spec) -> TokenOrder:
        """``None`` (raster), a :class:`TokenOrder`, or a spec string (see the class doc)."""
        if spec is None:
            return cls(DEFAULT_ORDER)
        if isinstance(spec, TokenOrder):
            return spec
        s = str(spec).strip().lower()
        if s == RASTER:
            return cls(RASTER)
        m = _SPEC_RE.match(s)
        if m is None:
            hint = (" ('auto' chooses the order of a new plan only: pass it to calibrate_west "
                    "or `scaling-attn west`)") if s == AUTO else ""
            raise ValueError(f"token_order: expected 'raster', 'tile' or 'tile:FxHxW' (e.g. "
                             f"'tile:2x8x8'), got {spec!r}{hint}")
        return cls(TILE, None if m.group(1) is None else tuple(int(x) for x in m.groups()))

    def __str__(self) -> str:
        if self.kind == RASTER:
            return RASTER
        return TILE if self.tile is None else f"{TILE}:{'x'.join(map(str, self.tile))}"

    @property
    def is_raster(self) -> bool:
        return self.kind == RASTER

    def tile_shape(self, grid: Grid) -> Grid | None:
        """The top-level tile shape at ``grid`` (None for raster or when no tile fits)."""
        if self.is_raster:
            return None
        if self.tile is not None and all(g >= t for g, t in zip(grid, self.tile, strict=True)):
            return self.tile
        return tile_shape_for(grid)


# --------------------------------------------------------------------------------------------
# The tiling rule
# --------------------------------------------------------------------------------------------

def _surface(t: Grid) -> int:
    return t[0] * t[1] + t[1] * t[2] + t[0] * t[2]


def _leftover_boxes(dims: Grid, t: Grid) -> list[tuple[Grid, Grid]]:
    """``(origin, dims)`` of the three boxes a tiling by ``t`` leaves (empty ones dropped)."""
    F, H, W = dims
    Ff, Hf, Wf = (d - d % s for d, s in zip(dims, t, strict=True))
    boxes = [((Ff, 0, 0), (F - Ff, H, W)), ((0, Hf, 0), (Ff, H - Hf, W)),
             ((0, 0, Wf), (Ff, Hf, W - Wf))]
    return [(o, d) for o, d in boxes if min(d) > 0]


@functools.lru_cache(maxsize=4096)
def _best(dims: Grid) -> tuple[int, Grid | None]:
    """(tokens covered by full tiles, best top-level shape) of a box, by the module's rule."""
    best_key, best = None, (0, None)
    for t in TILE_SHAPES:
        n = math.prod(d // s for d, s in zip(dims, t, strict=True))
        if n == 0:
            continue
        covered = n * BLOCK + sum(_best(d)[0] for _o, d in _leftover_boxes(dims, t))
        key = (-covered, _surface(t), t[0], t[1])
        if best_key is None or key < best_key:
            best_key, best = key, (covered, t)
    return best


def tile_shape_for(grid: Grid) -> Grid | None:
    """The top-level tile shape the rule picks for ``grid (F, H, W)``; None if none fits."""
    return _best(check_grid(grid))[1]


def check_grid(grid) -> Grid:
    g = tuple(int(x) for x in grid)
    if len(g) != 3 or min(g) < 1:
        raise ValueError(f"grid: expected a latent token grid (F, H, W) of positive ints, got "
                         f"{tuple(grid)}")
    return g


def tile_layout(grid: Grid, tile: Grid | None = None) -> tuple[list[tuple[Grid, Grid]], int]:
    """Full tiles of ``grid`` by the rule: ``([(origin (f, h, w), shape), ...], covered)``.

    ``tile`` fixes the top-level shape where it fits (the leftover boxes use the auto rule)."""
    grid = check_grid(grid)
    tiles: list[tuple[Grid, Grid]] = []

    def lay(origin: Grid, dims: Grid, shape: Grid | None) -> None:
        if shape is None or any(d < s for d, s in zip(dims, shape, strict=True)):
            shape = _best(dims)[1]  # auto, or a fixed shape that does not fit this grid
        if shape is None:
            return
        counts = [d // s for d, s in zip(dims, shape, strict=True)]
        for i in range(counts[0]):
            for j in range(counts[1]):
                for k in range(counts[2]):
                    tiles.append(((origin[0] + i * shape[0], origin[1] + j * shape[1],
                                   origin[2] + k * shape[2]), shape))
        for o, d in _leftover_boxes(dims, shape):
            lay(tuple(a + b for a, b in zip(origin, o, strict=True)), d, None)

    lay((0, 0, 0), grid, tile)
    return tiles, len(tiles) * BLOCK


# --------------------------------------------------------------------------------------------
# Permutations and block geometry
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _perm_cached(grid: Grid, spec: str) -> torch.Tensor:
    order = TokenOrder.parse(spec)
    F, H, W = grid
    S = F * H * W
    if order.is_raster:
        return torch.arange(S)
    ids = torch.arange(S).view(F, H, W)
    tiles, _ = tile_layout(grid, order.tile)
    parts = [ids[f:f + a, h:h + b, w:w + c].reshape(-1) for (f, h, w), (a, b, c) in tiles]
    covered = torch.zeros(S, dtype=torch.bool)
    if parts:
        covered[torch.cat(parts)] = True
    parts.append(torch.arange(S)[~covered])  # the remainder, raster order
    return torch.cat(parts)


def permutation(grid: Grid, order=TILE) -> torch.Tensor:
    """int64 ``(S,)``: position ``i`` of ``order`` holds raster token ``perm[i]``
    (``x_ordered = x.index_select(seq_dim, perm)``). Cached; do not modify the result."""
    return _perm_cached(check_grid(grid), str(TokenOrder.parse(order)))


def inverse_permutation(grid: Grid, order=TILE) -> torch.Tensor:
    """int64 ``(S,)``: ``inv[raster token] = its position in order``
    (``x = x_ordered.index_select(seq_dim, inv)``)."""
    perm = permutation(grid, order)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


def block_of_token(grid: Grid, order=TILE) -> torch.Tensor:
    """int64 ``(S,)``: the 128-token block each raster token belongs to under ``order``."""
    return inverse_permutation(grid, order) // BLOCK


def coverage(grid: Grid, order=TILE) -> float:
    """Share of tokens in full tiles (blocks that are 3D boxes of exactly one tile); 0 for raster."""
    order = TokenOrder.parse(order)
    if order.is_raster:
        return 0.0
    return tile_layout(grid, order.tile)[1] / math.prod(check_grid(grid))


def block_boxes(grid: Grid, order=TILE) -> torch.Tensor:
    """float64 ``(NB, 6)``: each block's bounding box ``(f0, h0, w0, f1, h1, w1)`` in normalised
    grid coordinates ``[0, 1]`` (a token ``(f, h, w)`` is the cell ``[f/F, (f+1)/F) x ...``).

    A full tile's box holds exactly its 128 tokens; a raster strip's or an edge remainder's box
    may hold more than its own tokens (it is their bounding box)."""
    grid = check_grid(grid)
    F, H, W = grid
    perm = permutation(grid, order)
    S = perm.numel()
    nb = num_blocks(S)
    f, h, w = perm // (H * W), (perm // W) % H, perm % W
    blk = torch.arange(S) // BLOCK
    lo = torch.full((nb, 3), S, dtype=torch.int64)
    hi = torch.full((nb, 3), -1, dtype=torch.int64)
    coords = torch.stack([f, h, w], 1)
    lo.scatter_reduce_(0, blk[:, None].expand(-1, 3), coords, "amin")
    hi.scatter_reduce_(0, blk[:, None].expand(-1, 3), coords, "amax")
    size = torch.tensor([F, H, W], dtype=torch.float64)
    return torch.cat([lo / size, (hi + 1) / size], 1)


def describe(grid: Grid, order=TILE) -> str:
    """One line: order, top tile shape, coverage, blocks."""
    order = TokenOrder.parse(order)
    S = math.prod(check_grid(grid))
    if order.is_raster:
        return f"raster order: {num_blocks(S)} blocks of {BLOCK} tokens, rows of {grid[2]}"
    t = order.tile_shape(grid)
    shape = "none fits" if t is None else "x".join(map(str, t))
    return (f"tile order: top tile {shape} (frames x rows x columns), "
            f"{coverage(grid, order):.1%} of {S} tokens in full tiles, {num_blocks(S)} blocks")


def in_token_order(on_layer, order):
    """Wrap a capture callback (``calibrate.capture_qk``'s ``on_layer``) so it receives q/k/v
    ``(B, H, S, D)`` with the sequence in ``order`` at the capture's grid: WEST block pooling and
    FAST fidelities then see the blocks the op will. Raster order returns ``on_layer`` itself."""
    import dataclasses

    order = TokenOrder.parse(order)
    if order.is_raster:
        return on_layer

    def reordered(cap):
        if cap.grid is None:
            raise ValueError("in_token_order: the capture has no grid (F, H, W); run the model "
                             "through calibrate.capture_qk, which reads it from hidden_states")
        perm = permutation(cap.grid, order).to(cap.q.device)
        v = None if cap.v is None else cap.v.index_select(2, perm)
        return on_layer(dataclasses.replace(cap, q=cap.q.index_select(2, perm),
                                            k=cap.k.index_select(2, perm), v=v))

    return reordered
