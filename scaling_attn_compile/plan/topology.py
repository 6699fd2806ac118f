"""WEST topology as the plan stores it: threshold codes, the mask at a density, the remap of
codes to another resolution. Extraction from calibration runs is :mod:`..offline.west`.

Threshold map and its quantisation
----------------------------------
For one input, block ``(u, v)`` has rank ``r`` (1 = largest mass) in row ``u`` of ``NB`` blocks.
The top-``p`` fraction of a row is its ``floor(p * NB)`` largest blocks, so the smallest
keep-density at which ``(u, v)`` is kept is ``r / NB``. Tied masses share the best rank of the
tie (a tie is kept or dropped together, never split arbitrarily). Over inputs,
``T = min_i r_i / NB``: the block is kept at ``p`` if it is in the top-``p`` of *any* input.

T is stored as ``code = ceil(255 * r / NB)`` in ``1..255`` (uint8, integer arithmetic, so no
float rounding), and the mask at density ``p`` is ``code <= ceil(255 * p)``. Because ``ceil`` is
monotone, ``T <= p`` implies ``code <= ceil(255 p)``: the quantised mask is a superset of the
exact one (conservative), and masks are nested in ``p``. The price is at most ``1/255`` of a
row's blocks kept beyond the exact mask (``0.4%`` density; 2 blocks of 591 at 720p). The min of
codes is the code of the min, so the union is taken on codes directly. Code 0 is never produced.

The diagonal block ``(u, u)`` keeps its measured code; :func:`mask_at` forces it on (the op does
too), so a remap to another grid does not spread an artificial "always kept" block around.

Resolution remap
----------------
Blocks are 128 consecutive tokens in the plan's token order (:mod:`.token_order`): in raster
order ``(f, h, w)`` a block is a run of rows, in tile order a 3D tile. :func:`remap_codes` maps
each target token to the base tokens whose cells overlap it in normalised ``[0, 1)^3``
coordinates, and each token to its block under its grid's order, which gives for each target
block the set of overlapping base blocks, and takes ``T_t(U, V) = min T_b(u, v)`` over
overlapping pairs. So a target block is kept at ``p`` exactly when some overlapping base block
pair is kept at ``p`` (conservative, and nested levels stay nested).
"""

from __future__ import annotations

import math

import torch

from ..contract.masks import BLOCK, num_blocks
from ..models.wan import WAN_VAE_STRIDE

CODE_MAX = 255  # uint8 codes 1..255; code c stands for T in ((c - 1) / 255, c / 255]


Grid = tuple[int, int, int]


def code_for(p: float) -> int:
    """The largest code kept at keep-density ``p`` in ``[0, 1]``: ``ceil(255 * p)``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"code_for: density p must be in [0, 1], got {p}; pass a fraction like 0.3")
    # round() first: 0.2 * 255 is 51.00000000000001 in floats and must give 51, not 52.
    return math.ceil(round(p * CODE_MAX, 6))


def codes_to_thresholds(codes: torch.Tensor) -> torch.Tensor:
    """Upper end of each code's interval, float32: ``code / 255`` (T is in ``((c-1)/255, c/255]``)."""
    return codes.to(torch.float32) / CODE_MAX


def mask_at(codes: torch.Tensor, p: float, *, diagonal: bool = True) -> torch.Tensor:
    """Boolean block mask ``(..., NB, NB)`` at keep-density ``p``: ``T <= p``, diagonal forced on."""
    keep = codes <= code_for(p)
    if diagonal:
        nb = codes.shape[-1]
        keep = keep | torch.eye(nb, dtype=torch.bool, device=codes.device)
    return keep


def density_by_code(codes: torch.Tensor) -> torch.Tensor:
    """Kept-block fraction of the mask at each code ``c = 0..255``, per leading index.

    Returns float32 ``(..., 256)``; entry ``c`` is the density of ``(codes <= c) | diagonal``.
    Non-decreasing in ``c`` (the levels are nested).
    """
    nb = codes.shape[-1]
    lead = codes.shape[:-2]
    flat = codes.reshape(-1, nb, nb).to(torch.int64)
    n = flat.shape[0]
    bins = CODE_MAX + 1
    offset = (torch.arange(n, device=codes.device) * bins)[:, None, None]
    # Histogram of codes per map, minus the diagonal's own codes (it is counted as always kept).
    counts = torch.bincount((flat + offset).reshape(-1), minlength=n * bins)
    diag = flat.diagonal(dim1=-2, dim2=-1) + offset[:, :, 0]
    counts = (counts - torch.bincount(diag.reshape(-1), minlength=n * bins)).view(n, bins)
    kept = counts.cumsum(-1) + nb  # the diagonal is always kept
    return (kept.to(torch.float32) / (nb * nb)).reshape(*lead, CODE_MAX + 1)


def codes_for_density(codes: torch.Tensor, density: float) -> torch.Tensor:
    """Smallest code per leading index whose mask keeps at least ``density`` of the blocks.

    ``codes (..., NB, NB)`` -> int64 ``(...)``. Use ``mask = codes <= c[..., None, None]`` (plus the
    diagonal). Lets a level hit a target *achieved* density per head, whatever its T looks like.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"codes_for_density: density must be in (0, 1], got {density}")
    curve = density_by_code(codes)
    # Float slack: a density of exactly k / NB^2 must count as reaching k / NB^2.
    reached = curve >= density - 1e-6
    return reached.to(torch.int64).argmax(-1)  # first True; code 255 always reaches 1.0


def _axis_overlap(n_to: int, n_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each target index ``i < n_to``, the base indices ``j < n_from`` whose cells
    ``[j/n_from, (j+1)/n_from)`` overlap ``[i/n_to, (i+1)/n_to)``: ``(idx (n_to, K), valid)``."""
    i = torch.arange(n_to)
    lo = (i * n_from) // n_to
    hi = ((i + 1) * n_from + n_to - 1) // n_to  # exclusive: ceil((i + 1) * n_from / n_to)
    k = int((hi - lo).max())
    idx = lo[:, None] + torch.arange(k)[None, :]
    valid = idx < hi[:, None]
    return idx.clamp(max=n_from - 1), valid


def block_overlap(from_grid: Grid, to_grid: Grid, from_order=None, to_order=None) -> torch.Tensor:
    """bool ``(NB_to, NB_from)``: target block U overlaps base block u in 3D token coordinates.

    Grids are latent token grids ``(F, H, W)`` after patching; blocks are 128 tokens of each
    grid's token order (``None``: raster, tokens flatten ``(f, h, w)``; see :mod:`.token_order`).
    """
    from ..contract.token_order import block_of_token

    (F0, H0, W0), (F1, H1, W1) = from_grid, to_grid
    fi, fv = _axis_overlap(F1, F0)
    hi, hv = _axis_overlap(H1, H0)
    wi, wv = _axis_overlap(W1, W0)
    # Base token ids overlapping each target token: (F1, H1, W1, Kf, Kh, Kw).
    base = (fi[:, None, None, :, None, None] * (H0 * W0)
            + hi[None, :, None, None, :, None] * W0
            + wi[None, None, :, None, None, :])
    valid = (fv[:, None, None, :, None, None] & hv[None, :, None, None, :, None]
             & wv[None, None, :, None, None, :])
    s1 = F1 * H1 * W1
    to_block = block_of_token(to_grid, to_order)
    from_block = block_of_token(from_grid, from_order)
    target_block = to_block.view(F1, H1, W1, 1, 1, 1).expand_as(base)
    overlap = torch.zeros(num_blocks(s1), num_blocks(F0 * H0 * W0), dtype=torch.bool)
    overlap[target_block[valid], from_block[base[valid]]] = True
    return overlap


# Peak bytes remap_codes may allocate. Wan2.1-14B from a 480p calibration to 720p needs
# ~0.6 GB (559 MB of output maps); a pixel size passed as the grid (81, 720, 1280) asked for
# 1.36 TB and spent 6 GB and 33 s before failing.
MAX_REMAP_BYTES = 4 * 10**9


def remap_nbytes(num_maps: int, from_grid: Grid, to_grid: Grid) -> int:
    """Upper bound of the bytes :func:`remap_codes` allocates for ``num_maps`` maps: the output
    ``(num_maps, NB1, NB1)`` uint8 plus the larger of the 3D overlap temporaries (int64 token
    ids, ``S1 x Kf x Kh x Kw``) and the per-map gather ``(NB1, K, NB0)``."""
    s1 = math.prod(to_grid)
    nb0, nb1 = num_blocks(math.prod(from_grid)), num_blocks(s1)
    k_axes = [min(a, -(-a // b) + 1) for a, b in zip(from_grid, to_grid, strict=True)]
    tokens = s1 * math.prod(k_axes) * 25  # base + target ids (int64) x 3 copies + valid (bool)
    k = min(nb0, math.prod(k_axes) * 2)  # base blocks touching one target block, bounded
    gather = nb1 * nb0 * (9 + k) + nb1 * k * 8  # the sort of the overlap, then t[idx]
    return num_maps * nb1 * nb1 + max(tokens, gather)


def _grid_hint(grid: Grid, patch_size) -> str:
    """What the grid would be if ``grid`` were a Wan video's pixels (frames, height, width)."""
    (f, h, w), (st, sh, sw) = grid, WAN_VAE_STRIDE
    pt, ph, pw = patch_size or (1, 2, 2)
    if (f - 1) % st or h % (sh * ph) or w % (sw * pw):
        return ""
    tok = (((f - 1) // st + 1) // pt, h // (sh * ph), w // (sw * pw))
    return (f"; if {grid} is a video's frames, height and width in pixels, its Wan token grid is "
            f"{tok} (VAE stride {WAN_VAE_STRIDE}, patch {tuple(patch_size or (1, 2, 2))})")


def check_remap_size(num_maps: int, from_grid: Grid, to_grid: Grid, *, patch_size=None,
                     max_bytes: int = MAX_REMAP_BYTES) -> None:
    """Raise ``ValueError`` before allocating when remapping to ``to_grid`` needs more than
    ``max_bytes``; the message says that grids are latent token grids, not pixels."""
    need = remap_nbytes(num_maps, from_grid, to_grid)
    if need <= max_bytes:
        return
    s1 = math.prod(to_grid)
    raise ValueError(
        f"grid: {tuple(to_grid)} is S = {s1:,} tokens ({num_blocks(s1):,} blocks of {BLOCK}); "
        f"remapping {num_maps} threshold maps to it needs ~{need / 1e9:,.1f} GB, over the "
        f"{max_bytes / 1e9:g} GB budget. Expected a latent token grid (F, H, W) after the VAE "
        f"and patching, not pixels{_grid_hint(tuple(to_grid), patch_size)}; pass a larger "
        f"max_bytes only if the grid is right")


def remap_codes(codes: torch.Tensor, from_grid: Grid, to_grid: Grid, *,
                progress: bool = False, patch_size=None,
                max_bytes: int = MAX_REMAP_BYTES, order=None, to_order=None) -> torch.Tensor:
    """Threshold codes ``(..., NB0, NB0)`` at ``from_grid`` -> ``(..., NB1, NB1)`` at ``to_grid``.

    ``T_to(U, V) = min T_from(u, v)`` over base blocks ``u`` overlapping ``U`` and ``v``
    overlapping ``V`` (see module doc): conservative, nests like the input. ``order``: the
    token order the codes are in (``None``: raster); ``to_order``: the target's (default the
    same order, applied at the target grid). Raises ``ValueError`` before allocating if that
    needs more than ``max_bytes`` (see :func:`check_remap_size`; ``patch_size`` only improves
    its message).
    """
    to_order = order if to_order is None else to_order
    from_grid, to_grid = tuple(from_grid), tuple(to_grid)
    for name, g in (("from_grid", from_grid), ("to_grid", to_grid)):
        if len(g) != 3 or not all(int(x) == x and x >= 1 for x in g):
            raise ValueError(f"remap_codes: {name} must be a latent token grid (F, H, W) of "
                             f"positive ints, got {g}")
    from_grid, to_grid = tuple(int(x) for x in from_grid), tuple(int(x) for x in to_grid)
    nb0 = num_blocks(math.prod(from_grid))
    if codes.shape[-1] != nb0 or codes.shape[-2] != nb0:
        raise ValueError(
            f"remap_codes: codes must be (..., {nb0}, {nb0}) for from_grid {from_grid} "
            f"(S={math.prod(from_grid)}), got {tuple(codes.shape)}; pass the grid they were "
            f"extracted at")
    if from_grid == to_grid and str(order) == str(to_order):
        return codes.clone()
    check_remap_size(math.prod(codes.shape[:-2]), from_grid, to_grid, patch_size=patch_size,
                     max_bytes=max_bytes)
    overlap = block_overlap(from_grid, to_grid, order, to_order).to(codes.device)  # (NB1, NB0)
    nb1 = overlap.shape[0]
    counts = overlap.sum(1)
    k = int(counts.max())
    # Overlapping base blocks per target block, padded by repeating the first (min is unchanged).
    order = overlap.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, :k]
    first = order[:, :1].expand(-1, k)
    idx = torch.where(torch.arange(k, device=codes.device)[None, :] < counts[:, None], order, first)
    lead = codes.shape[:-2]
    flat = codes.reshape(-1, nb0, nb0)
    out = torch.empty(flat.shape[0], nb1, nb1, dtype=codes.dtype, device=codes.device)
    rows = range(flat.shape[0])
    if progress:
        from tqdm.auto import tqdm
        rows = tqdm(rows, desc=f"remap {from_grid}->{to_grid}", unit="map")
    for i in rows:
        t = flat[i]
        r = t[idx].amin(1)            # (NB1, NB0): min over base query blocks overlapping U
        out[i] = r[:, idx].amin(-1)   # (NB1, NB1): min over base KV blocks overlapping V
    return out.reshape(*lead, nb1, nb1)
