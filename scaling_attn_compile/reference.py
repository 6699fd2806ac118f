"""The readable PyTorch reference: the specification of the block-sparse attention op.

Semantics, for one batch element ``b`` and head ``h``:

1. ``level = level_table[bucket(timestep[b]), h]`` with ``bucket(t) = #{i : bucket_bounds[i] <= t}``.
2. The block mask is ``masks[h, level]`` unpacked to ``(NB, NB)`` booleans, with the diagonal block
   forced on. Token ``(i, j)`` is kept when block ``(i // 128, j // 128)`` is kept; tokens past
   ``S`` in the partial last block do not exist.
3. ``out[i] = sum_j softmax_j(scale * q_i . k_j  over kept j) * v_j``: the softmax is renormalised
   over the kept keys only, exactly what a FlashAttention loop that skips blocks computes.

It never builds an ``S x S`` tensor in one piece: queries are processed in chunks so that the
score chunk stays under ``max_chunk_elements`` (default 2**26 floats, 256 MB in float32).
"""

from __future__ import annotations

import torch

from .masks import BLOCK, add_diagonal, num_blocks, select_levels, unpack_blocks


def block_masks_for(masks: torch.Tensor, level_table: torch.Tensor, bucket_bounds: torch.Tensor,
                    timestep: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Boolean block mask each (batch element, head) uses: ``(B, H, NB, NB)``, diagonal on."""
    nb = num_blocks(seq_len)
    levels = select_levels(level_table, bucket_bounds, timestep.to(masks.device), batch)  # (B, H)
    heads = torch.arange(masks.shape[0], device=masks.device)
    words = masks[heads[None, :], levels]  # (B, H, NB, W)
    return add_diagonal(unpack_blocks(words, nb))


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               masks: torch.Tensor, level_table: torch.Tensor,
                               bucket_bounds: torch.Tensor, timestep: torch.Tensor,
                               scale: float | None = None, *,
                               compute_dtype: torch.dtype = torch.float32,
                               max_chunk_elements: int = 2**26) -> torch.Tensor:
    """Block-sparse attention, written for clarity.

    Args:
        q, k, v: ``(B, H, S, D)``.
        masks: int32 ``(H, L, NB, W)`` bit-packed block masks (see :mod:`.masks`).
        level_table: int32 ``(NT, H)``.
        bucket_bounds: float32 ``(NT - 1,)``, ascending.
        timestep: ``(B,)`` or ``()``.
        scale: softmax scale; ``None`` means ``1 / sqrt(D)``.
        compute_dtype: float32 (default) or float64 for an oracle.

    Returns:
        ``(B, H, S, D)`` in ``q.dtype``.
    """
    B, H, S, D = q.shape
    scale = D**-0.5 if scale is None else scale
    blocks = block_masks_for(masks, level_table, bucket_bounds, timestep, B, S)  # (B,H,NB,NB)
    kc, vc = k.to(compute_dtype), v.to(compute_dtype)
    out = torch.empty(B, H, S, D, dtype=compute_dtype, device=q.device)
    # Query rows per chunk: whole 128-blocks, bounded by the score-chunk size.
    rows = max(BLOCK, (max_chunk_elements // max(1, B * H * S)) // BLOCK * BLOCK)
    for start in range(0, S, rows):
        stop = min(S, start + rows)
        qc = q[:, :, start:stop].to(compute_dtype)
        scores = torch.einsum("bhqd,bhkd->bhqk", qc, kc) * scale
        qblk = torch.arange(start, stop, device=q.device) // BLOCK
        kblk = torch.arange(S, device=q.device) // BLOCK
        keep = blocks[:, :, qblk][..., kblk]  # (B, H, rows, S)
        scores = scores.masked_fill(~keep, float("-inf"))
        out[:, :, start:stop] = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), vc)
    return out.to(q.dtype)
