"""The readable PyTorch reference: the specification of the block-sparse attention op.

Semantics, for one batch element ``b`` and head ``h``:

1. ``level = level_table[bucket(timestep[b]), h]`` with ``bucket(t) = #{i : bucket_bounds[i] <= t}``.
2. The block mask is ``masks[h, level]`` unpacked to ``(NB, NB)`` booleans, with the diagonal block
   forced on. Token ``(i, j)`` is kept when block ``(i // 128, j // 128)`` is kept; tokens past
   ``S`` in the partial last block do not exist.
3. ``out[i] = sum_j softmax_j(scale * q_i . k_j  over kept j) * v_j``: the softmax is renormalised
   over the kept keys only, exactly what a FlashAttention loop that skips blocks computes.

Defined behaviour for any table values (the kernel, this reference and the Inductor template
agree on it, and none of them reads out of bounds; ``tests/test_bad_tables.py`` fuzzes it):

* **Levels** outside ``[0, L)`` are clamped to ``[0, L - 1]`` (``L = masks.shape[1]``): -3 uses
  level 0, 99 uses level ``L - 1``.
* **Mask bits** of KV blocks ``>= NB`` are ignored: the high bits of the last word, and whole
  words past ``ceil(NB / 32)`` if a table has more.
* **Timestep** ``t`` is compared in float32. ``bucket(t) = #{i : bucket_bounds[i] <= t}``, so a
  NaN timestep is in bucket 0 (every comparison with NaN is false), ``+inf`` in the last bucket,
  and a NaN bound is never counted. Raising instead would need a host sync in compiled code;
  :func:`scaling_attn_compile.ops.op.check_tables` (opt-in) raises on NaN timesteps and bad tables.
* **Key lengths** (``kv_lens``, optional int32 ``(B,)``): keys at index ``>= kv_lens[b]`` are
  dropped for every query row of batch element ``b`` (a key-padding prefix mask, as
  HunyuanVideo's text padding); query rows are still computed. Values are clamped to ``[0, S]``.
  A row left with no kept key (its kept blocks all lie past ``kv_lens[b]``) outputs **zeros**,
  not NaN: SDPA with an all-False boolean row gives NaN, and no model we support produces such
  a row (HunyuanVideo's mask always keeps the video tokens), so zeros cost nothing and keep a
  padded row from poisoning a later reduction.
* **Float64** q/k/v are computed in float64 (the default ``compute_dtype`` follows them), so the
  op's CPU path returns float64 computed in float64; the kernel refuses float64 (fp16/bf16).

It never builds an ``S x S`` tensor in one piece: queries are processed in chunks so that the
score chunk stays under ``max_chunk_elements`` (default 2**26 floats, 256 MB in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import BLOCK, add_diagonal, num_blocks, select_levels, unpack_blocks


def block_masks_for(masks: torch.Tensor, level_table: torch.Tensor, bucket_bounds: torch.Tensor,
                    timestep: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Boolean block mask each (batch element, head) uses: ``(B, H, NB, NB)``, diagonal on.

    Levels are clamped to ``[0, L - 1]`` and bits past ``NB`` dropped (see the module docstring).
    """
    nb = num_blocks(seq_len)
    levels = select_levels(level_table, bucket_bounds, timestep.to(masks.device), batch)  # (B, H)
    levels = levels.clamp(0, masks.shape[1] - 1)
    heads = torch.arange(masks.shape[0], device=masks.device)
    words = masks[heads[None, :], levels]  # (B, H, NB, W)
    return add_diagonal(unpack_blocks(words, nb))


def clamped_kv_lens(kv_lens: torch.Tensor | None, batch: int, seq_len: int,
                    device) -> torch.Tensor:
    """``kv_lens`` as int64 ``(B,)`` clamped to ``[0, S]``; ``None`` means ``S`` for all."""
    if kv_lens is None:
        return torch.full((batch,), seq_len, dtype=torch.int64, device=device)
    return kv_lens.reshape(-1).to(device=device, dtype=torch.int64).expand(batch).clamp(0, seq_len)


def kv_block_mask(kv_lens: torch.Tensor | None, batch: int, seq_len: int, device) -> torch.Tensor:
    """Boolean ``(B, 1, 1, NB)``: KV block ``j`` holds at least one key ``< kv_lens[b]``."""
    lens = clamped_kv_lens(kv_lens, batch, seq_len, device)
    starts = torch.arange(num_blocks(seq_len), device=device) * BLOCK
    return (starts[None, :] < lens[:, None])[:, None, None, :]


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               masks: torch.Tensor, level_table: torch.Tensor,
                               bucket_bounds: torch.Tensor, timestep: torch.Tensor,
                               scale: float | None = None, *,
                               compute_dtype: torch.dtype | None = None,
                               max_chunk_elements: int = 2**26,
                               kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse attention, written for clarity.

    Args:
        q, k, v: ``(B, H, S, D)``.
        masks: int32 ``(H, L, NB, W)`` bit-packed block masks (see :mod:`.masks`).
        level_table: int32 ``(NT, H)``.
        bucket_bounds: float32 ``(NT - 1,)``, ascending.
        timestep: ``(B,)`` or ``()``.
        scale: softmax scale; ``None`` means ``1 / sqrt(D)``.
        compute_dtype: float32 or float64 (an oracle); ``None``: float64 for float64 inputs,
            else float32.
        kv_lens: optional int32 ``(B,)``: keys ``>= kv_lens[b]`` are dropped for batch element
            ``b`` (clamped to ``[0, S]``; a row with no kept key outputs zeros). ``None``: all.

    Returns:
        ``(B, H, S, D)`` in ``q.dtype``.
    """
    B, H, S, D = q.shape
    scale = D**-0.5 if scale is None else scale
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    blocks = block_masks_for(masks, level_table, bucket_bounds, timestep, B, S)  # (B,H,NB,NB)
    key_ok = (torch.arange(S, device=q.device)[None, :]
              < clamped_kv_lens(kv_lens, B, S, q.device)[:, None])[:, None, None, :]  # (B,1,1,S)
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
        keep = blocks[:, :, qblk][..., kblk] & key_ok  # (B, H, rows, S)
        scores = scores.masked_fill(~keep, float("-inf"))
        # A row with no kept key (only possible with kv_lens) is defined as zeros, not NaN.
        probs = scores.softmax(-1).masked_fill(~keep.any(-1, keepdim=True), 0.0)
        out[:, :, start:stop] = torch.einsum("bhqk,bhkd->bhqd", probs, vc)
    return out.to(q.dtype)


def visit_order(blocks: torch.Tensor, seq_len: int,
                kv_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The order in which the kernel visits each query tile's kept KV blocks when the energy
    filter is on: the diagonal block, then its left and right neighbours (where kept), then the
    rest ascending, with the partial last block (``S % 128 != 0``) moved to the end. With
    ``kv_lens`` the last block holding a valid key (``ceil(kv_lens[b] / 128) - 1``, partial or
    not) is the one moved to the end: the kernel masks that one block, whatever its fill.

    Args:
        blocks: boolean ``(B, H, NB, NB)`` block mask (diagonal on; blocks past ``kv_lens``
            already dropped).
    Returns:
        ``order`` int64 ``(B, H, NB, NB)`` KV block indices in visit order (padding past the
        kept count is arbitrary), and ``count`` int64 ``(B, H, NB)`` kept blocks per tile.
    """
    nb = blocks.shape[-1]
    u = torch.arange(nb, device=blocks.device)[:, None]
    j = torch.arange(nb, device=blocks.device)[None, :]
    key = (3 + j).expand(nb, nb).clone()
    if kv_lens is not None:
        lens = clamped_kv_lens(kv_lens, blocks.shape[0], seq_len, blocks.device)
        last = (lens + BLOCK - 1) // BLOCK - 1  # (B,); -1 when nothing is valid
        key = torch.where(j == last[:, None, None, None], 3 * nb, key)  # (B, 1, NB, NB)
    elif seq_len % BLOCK:
        key[:, nb - 1] = 3 * nb  # the partial last block after the walk
    key = torch.where(j == u, 0, torch.where(j == u - 1, 1, torch.where(j == u + 1, 2, key)))
    key = torch.where(blocks, key, 4 * nb)  # dropped blocks sort last
    return key.argsort(dim=-1, stable=True), blocks.sum(-1)


def energy_filtered_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                        blocks: torch.Tensor, scale: float, rule: int,
                                        threshold: float, *,
                                        compute_dtype: torch.dtype = torch.float64,
                                        return_skipped: bool = False,
                                        kv_lens: torch.Tensor | None = None):
    """Block-sparse attention with the online energy filter, the spec of the kernel's option.

    A FlashAttention loop over each 128-row query tile's kept KV blocks, in :func:`visit_order`.
    Before folding in a block, with ``m_blk`` its row-wise max score and the running state
    ``(m, l)`` over the blocks kept so far, the tile skips the block when every (real) row agrees:

    * ``rule=1`` (cumulative energy, DynSparse): ``m_blk - (m + ln l) < threshold``
    * ``rule=2`` (BLASST): ``m_blk - m < threshold`` (``threshold = ln(lambda_B)``)

    ``rule=0`` never skips. The first block visited is never skipped (``l = 0`` there).
    ``kv_lens`` drops keys as in :func:`sparse_attention_reference` (and blocks with no valid
    key); a row with no kept key outputs zeros.

    Args:
        q, k, v: ``(B, H, S, D)``. blocks: boolean ``(B, H, NB, NB)``, diagonal on.
    Returns:
        ``(B, H, S, D)`` in ``q.dtype``; with ``return_skipped``, also a boolean
        ``(B, H, NB, NB)`` of the blocks the filter skipped.
    """
    B, H, S, D = q.shape
    nb = blocks.shape[-1]
    pad = nb * BLOCK - S

    def tiles(x):  # (B, H, S, D) -> (B, H, NB, 128, D), zero rows past S
        return F.pad(x.to(compute_dtype), (0, 0, 0, pad)).view(B, H, nb, BLOCK, D)

    qt, kt, vt = tiles(q), tiles(k), tiles(v)
    row_ok = (torch.arange(nb * BLOCK, device=q.device) < S).view(nb, BLOCK)
    lens = clamped_kv_lens(kv_lens, B, S, q.device)
    if kv_lens is not None:
        blocks = blocks & kv_block_mask(kv_lens, B, S, q.device)
    order, count = visit_order(blocks, S, kv_lens)
    m = torch.full((B, H, nb, BLOCK), float("-inf"), dtype=compute_dtype, device=q.device)
    l_ = torch.zeros_like(m)
    acc = torch.zeros(B, H, nb, BLOCK, D, dtype=compute_dtype, device=q.device)
    skipped = torch.zeros_like(blocks)
    for step in range(int(count.max())):
        active = step < count  # (B, H, NB)
        blk = order[..., step]  # (B, H, NB)
        kb = torch.gather(kt, 2, blk[..., None, None].expand(B, H, nb, BLOCK, D))
        vb = torch.gather(vt, 2, blk[..., None, None].expand(B, H, nb, BLOCK, D))
        s = torch.einsum("bhumd,bhund->bhumn", qt, kb) * scale
        key_ok = ((blk[..., None] * BLOCK + torch.arange(BLOCK, device=q.device))
                  < lens[:, None, None, None])
        s = s.masked_fill(~key_ok[..., None, :], float("-inf"))
        m_blk = s.amax(-1)
        if rule == 0:
            skip = torch.zeros_like(active)
        else:
            gap = m_blk - (m + l_.log()) if rule == 1 else m_blk - m
            gap = gap.masked_fill(~row_ok, float("-inf"))
            skip = gap.amax(-1) < threshold
        take = active & ~skip
        skipped |= torch.zeros_like(blocks).scatter_(-1, blk[..., None], (active & skip)[..., None])
        m_new = torch.where(take[..., None], torch.maximum(m, m_blk), m)
        p = torch.exp(s - m_new[..., None]).masked_fill(~take[..., None, None], 0.0)
        alpha = torch.exp(m - m_new).nan_to_num(1.0)  # -inf - -inf: an untouched row keeps 0
        l_ = l_ * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bhumn,bhund->bhumd", p, vb)
        m = m_new
    l_ = torch.where(l_ > 0, l_, 1.0)  # a row with no kept key (kv_lens): zeros, not 0 / 0
    out = (acc / l_[..., None]).view(B, H, nb * BLOCK, D)[:, :, :S].to(q.dtype)
    return (out, skipped) if return_skipped else out
