"""WEST: the weight-encoded sparse topology of each self-attention head, as a threshold map.

Pipeline (the ScalingAttention paper, WEST)::

    q, k (B, H, S, D) of one layer, one calibration input, one step
      -> block_mass          (B, H, NB, NB) float32: mean softmax probability per 128x128 block
      -> threshold_codes     (B, H, NB, NB) uint8: each block's rank in its query-block row
      -> ThresholdAccumulator: elementwise min over inputs (the union), per layer
      -> codes T (layers, H, NB, NB) uint8, the plan's topology; mask at density p = T <= p

The threshold-code format (quantisation, :func:`mask_at`) and the resolution remap are the
plan's topology and live in :mod:`scaling_attn_compile.plan.topology`; this module
extracts codes from calibration runs and measures masks (recall, IoU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..contract.masks import BLOCK, num_blocks

# The code format and the remap are the plan's (plan/topology.py); they stay reachable as
# west.<name>, the WEST API that calibration, FAST, the quality study and the tests use.
from ..plan.topology import (  # noqa: F401
    CODE_MAX,
    MAX_REMAP_BYTES,
    Grid,
    block_overlap,
    check_remap_size,
    code_for,
    codes_for_density,
    codes_to_thresholds,
    density_by_code,
    mask_at,
    remap_codes,
    remap_nbytes,
)

# --------------------------------------------------------------------------------------------
# Block mass
# --------------------------------------------------------------------------------------------

def block_mass_torch(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, *,
                     compute_dtype: torch.dtype = torch.float32,
                     max_chunk_elements: int = 2**26) -> torch.Tensor:
    """Block-pooled softmax mass, chunked over query blocks (no ``S x S`` tensor).

    Args:
        q, k: ``(B, H, S, D)``, any float dtype and strides.
        scale: softmax scale, default ``1 / sqrt(D)``.
        compute_dtype: dtype of scores and softmax (float32 default; float64 for an oracle, the
            input dtype for a "same-dtype eager" reference).
        max_chunk_elements: bound on the score chunk ``B * H * rows * S`` (default 2**26 floats).

    Returns:
        float32 (float64 if ``compute_dtype`` is) ``(B, H, NB, NB)``: entry ``(u, v)`` is the mean of
        the softmax probability over the real tokens of query block ``u`` and KV block ``v``.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"block_mass_torch: q and k must both be (B, H, S, D) with the same shape, got "
            f"q {tuple(q.shape)} and k {tuple(k.shape)}; pass self-attention q/k (Sq == Sk)")
    B, H, S, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    nb = num_blocks(S)
    pad = nb * BLOCK - S
    out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    mass = torch.empty(B, H, nb, nb, dtype=out_dtype, device=q.device)
    sizes = torch.full((nb,), float(BLOCK), dtype=out_dtype, device=q.device)
    sizes[-1] = S - (nb - 1) * BLOCK  # the partial last block: mean over real tokens only
    kc = k.to(compute_dtype)
    rows = max(BLOCK, (max_chunk_elements // max(1, B * H * S)) // BLOCK * BLOCK)
    for start in range(0, S, rows):
        stop = min(S, start + rows)
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:stop].to(compute_dtype), kc) * scale
        p = scores.softmax(-1).to(out_dtype)
        del scores
        # Pad rows/keys with zeros to whole blocks, then sum 128 x 128 tiles.
        row_pad = (-(stop - start)) % BLOCK
        p = torch.nn.functional.pad(p, (0, pad, 0, row_pad))
        ub = p.shape[2] // BLOCK
        tiles = p.view(B, H, ub, BLOCK, nb, BLOCK).sum(dim=(3, 5))
        u0 = start // BLOCK
        mass[:, :, u0:u0 + ub] = tiles
    return mass / (sizes[:, None] * sizes[None, :])


def block_mass(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, *,
               impl: str = "auto") -> torch.Tensor:
    """Block-pooled softmax mass ``(B, H, NB, NB)`` float32 of ``(B, H, S, D)`` q, k.

    ``impl``: ``"triton"`` (the kernel in ``kernels/block_mass.py``; CUDA, or the CPU under
    ``TRITON_INTERPRET=1``), ``"torch"`` (:func:`block_mass_torch`), or ``"auto"`` (Triton on CUDA
    when the head dim is a power of two >= 16, else torch).
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"block_mass: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    D = q.shape[-1]
    if impl == "auto":
        impl = "triton" if q.is_cuda and D >= 16 and D & (D - 1) == 0 else "torch"
    if impl == "triton":
        from ..kernels.block_mass import block_mass_triton
        return block_mass_triton(q, k, scale)
    return block_mass_torch(q, k, scale)


# --------------------------------------------------------------------------------------------
# Threshold codes
# --------------------------------------------------------------------------------------------

def block_ranks(mass: torch.Tensor) -> torch.Tensor:
    """Rank of each block in its query-block row, int64, same shape as ``mass (..., NB, NB)``.

    Rank 1 is the largest mass; ties share the best rank of the tie (1 + number of strictly
    larger entries), so a tie is never split.
    """
    neg_sorted = (-mass).sort(dim=-1).values.contiguous()  # ascending -mass = descending mass
    # searchsorted(left) counts entries strictly smaller than -mass, i.e. strictly larger mass.
    return torch.searchsorted(neg_sorted, (-mass).contiguous(), right=False) + 1


def threshold_codes(mass: torch.Tensor) -> torch.Tensor:
    """uint8 threshold codes ``ceil(255 * rank / NB)`` of one input's ``mass (..., NB, NB)``."""
    nb = mass.shape[-1]
    ranks = block_ranks(mass)
    return ((ranks * CODE_MAX + nb - 1) // nb).to(torch.uint8)


class ThresholdAccumulator:
    """Running union of threshold codes over calibration inputs, for every layer.

    ``codes``: uint8 ``(num_layers, H, NB, NB)`` at the calibration grid, initialised to 255
    (kept only at ``p = 1``), lowered by each :meth:`update`. ``updates[l]`` counts the
    ``(input, step, batch element)`` maps folded into layer ``l``.
    """

    def __init__(self, num_layers: int, num_heads: int, seq_len: int, device="cpu"):
        self.seq_len = seq_len
        nb = num_blocks(seq_len)
        self.codes = torch.full((num_layers, num_heads, nb, nb), CODE_MAX, dtype=torch.uint8,
                                device=device)
        self.updates = [0] * num_layers

    def update(self, layer: int, mass: torch.Tensor) -> None:
        """Fold one layer's ``mass (B, H, NB, NB)`` (B maps, e.g. inputs or CFG branches) in."""
        if mass.dim() == 3:
            mass = mass[None]
        if tuple(mass.shape[1:]) != tuple(self.codes.shape[1:]):
            raise ValueError(
                f"ThresholdAccumulator.update: mass must be (B, H, NB, NB) = "
                f"(B, {', '.join(map(str, self.codes.shape[1:]))}) for S={self.seq_len}, got "
                f"{tuple(mass.shape)}; capture at the calibration grid")
        codes = threshold_codes(mass).amin(0).to(self.codes.device)
        torch.minimum(self.codes[layer], codes, out=self.codes[layer])
        self.updates[layer] += mass.shape[0]


# --------------------------------------------------------------------------------------------
# Resolution remap through 3D block coordinates
# --------------------------------------------------------------------------------------------




# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

def mask_recall(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of the blocks kept by ``ref`` that ``pred`` keeps too (1.0 when ``ref`` is empty)."""
    kept = ref.sum().item()
    return 1.0 if kept == 0 else (pred & ref).sum().item() / kept


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def mass_recall(mass: torch.Tensor, mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Softmax mass kept by ``mask``, averaged over query rows: float ``(...)`` per leading index.

    ``mass (..., NB, NB)`` is block-mean probability (from :func:`block_mass`); the kept mass of a
    row is ``sum_v mass[u, v] * n_v`` over kept ``v``, with ``n_v`` real tokens in block ``v``.
    """
    nb = mass.shape[-1]
    sizes = torch.full((nb,), float(BLOCK), dtype=mass.dtype, device=mass.device)
    sizes[-1] = seq_len - (nb - 1) * BLOCK
    row_mass = (mass * mask * sizes).sum(-1)             # (..., NB): kept mass per query row
    return (row_mass * sizes).sum(-1) / seq_len          # weight query blocks by their rows


def remap_recall(codes_small: torch.Tensor, small_grid: Grid, codes_large: torch.Tensor,
                 large_grid: Grid, densities: Sequence[float] = (0.1, 0.2, 0.3, 0.5), *,
                 order=None) -> dict:
    """Scale-invariance check: remap ``codes_small`` to ``large_grid`` and compare its masks with
    the masks of ``codes_large`` (extracted natively at ``large_grid``) at each density.

    Returns ``{p: {"recall", "iou", "density_remapped", "density_native"}}``; recall is the
    fraction of natively kept blocks that the remapped mask keeps (paper: > 96%, 480p -> 720p).
    ``order``: the token order both code maps are in (``None``: raster).
    """
    remapped = remap_codes(codes_small, small_grid, large_grid, order=order)
    out = {}
    for p in densities:
        pred, ref = mask_at(remapped, p), mask_at(codes_large, p)
        out[p] = {"recall": mask_recall(pred, ref), "iou": mask_iou(pred, ref),
                  "density_remapped": pred.float().mean().item(),
                  "density_native": ref.float().mean().item()}
    return out
