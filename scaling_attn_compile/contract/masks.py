"""Bit-packed block masks: the table format the op and the kernel read.

Shape legend
------------
``S``    self-attention sequence length (tokens)
``NB``   number of 128-token blocks, ``ceil(S / 128)``; the last one is partial when ``S % 128``
``W``    int32 words per query-block row, ``ceil(NB / 32)``
``H``    heads, ``L`` density levels, ``NT`` timestep buckets

One layer's tables
------------------
``masks``          int32 ``(H, L, NB, W)``. Bit ``j % 32`` of word ``j // 32`` in row
                   ``(h, level, u)`` says whether query block ``u`` of head ``h`` attends to KV
                   block ``j`` at that density level. Bits past ``NB`` should be zero;
                   the op ignores them (``reference.py`` defines every value's behaviour).
``level_table``    int32 ``(NT, H)``: the level each head uses in each timestep bucket, in
                   ``[0, L)`` (the op clamps values outside).
``bucket_bounds``  float32 ``(NT - 1,)``, ascending, in timestep units (diffusers' scheduler
                   timesteps, 0..1000). ``bucket(t) = #{i : bucket_bounds[i] <= t}``, so bucket 0
                   holds the smallest (latest, least noisy) timesteps.
``launch_order``   optional int32 ``(NT, H * NB)``: in which order the kernel's programs take
                   the (head, query block) rows, per bucket (:func:`launch_order`). A schedule,
                   not semantics: any permutation of ``[0, H * NB)`` gives the same output.

Whatever the bits say, the diagonal block ``(u, u)`` is always attended (so no query row is
ever empty); the op adds it, the tables need not store it.
"""

from __future__ import annotations

import math

import torch

BLOCK = 128  # tokens per mask block, for queries and keys alike
WORD_BITS = 32


def num_blocks(seq_len: int) -> int:
    """Number of 128-token blocks covering ``seq_len`` tokens (last one may be partial)."""
    return math.ceil(seq_len / BLOCK)


def num_words(seq_len: int) -> int:
    """int32 words per query-block row for a sequence of ``seq_len`` tokens."""
    return math.ceil(num_blocks(seq_len) / WORD_BITS)


def pack_blocks(block_mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean block mask ``(..., NB)`` into int32 words ``(..., ceil(NB / 32))``.

    Bit ``j % 32`` of word ``j // 32`` is block ``j``. The inverse is :func:`unpack_blocks`.
    """
    if block_mask.dtype != torch.bool:
        raise TypeError(f"pack_blocks: block_mask must be bool, got {block_mask.dtype}")
    nb = block_mask.shape[-1]
    nw = math.ceil(nb / WORD_BITS)
    lead = block_mask.shape[:-1]
    bits = torch.zeros(*lead, nw * WORD_BITS, dtype=torch.uint8, device=block_mask.device)
    bits[..., :nb] = block_mask
    # Eight bits to a byte (little-endian bit order), then four bytes to a little-endian int32:
    # 8x less memory than summing int64 weights (0.5 s per 14B/720p layer-level before).
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=block_mask.device)
    packed = (bits.view(*lead, nw * 4, 8) * weights).sum(-1, dtype=torch.uint8)
    return packed.view(torch.int32).view(*lead, nw) if packed.numel() else \
        torch.zeros(*lead, nw, dtype=torch.int32, device=block_mask.device)


def unpack_blocks(words: torch.Tensor, nb: int) -> torch.Tensor:
    """Unpack int32 words ``(..., W)`` into a boolean block mask ``(..., nb)``."""
    if words.dtype != torch.int32:
        raise TypeError(f"unpack_blocks: words must be int32, got {words.dtype}")
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64)[..., None] >> shifts) & 1
    return bits.flatten(-2)[..., :nb].bool()


def add_diagonal(block_mask: torch.Tensor) -> torch.Tensor:
    """Return ``block_mask (..., NB, NB)`` with every diagonal block set."""
    nb = block_mask.shape[-1]
    return block_mask | torch.eye(nb, dtype=torch.bool, device=block_mask.device)


def timestep_bucket(timestep: torch.Tensor, bucket_bounds: torch.Tensor) -> torch.Tensor:
    """Bucket index of each timestep: ``#{i : bucket_bounds[i] <= t}``; same shape as ``timestep``."""
    t = timestep.to(torch.float32)
    return (bucket_bounds.to(torch.float32) <= t[..., None]).sum(-1)


def select_levels(level_table: torch.Tensor, bucket_bounds: torch.Tensor,
                  timestep: torch.Tensor, batch: int) -> torch.Tensor:
    """Level used by each (batch element, head): int64 ``(B, H)``.

    ``timestep`` is ``(B,)`` or ``()`` (one timestep for the whole batch).
    """
    bucket = timestep_bucket(timestep.reshape(-1), bucket_bounds).expand(batch)
    return level_table.to(torch.int64)[bucket]  # (B, H)


def dense_tables(num_heads: int, seq_len: int, device=None) -> tuple[torch.Tensor, ...]:
    """Tables of one layer with every block kept: ``(masks, level_table, bucket_bounds)``."""
    nb = num_blocks(seq_len)
    full = torch.ones(num_heads, 1, nb, nb, dtype=torch.bool, device=device)
    return (
        pack_blocks(full),
        torch.zeros(1, num_heads, dtype=torch.int32, device=device),
        torch.zeros(0, dtype=torch.float32, device=device),
    )


ENERGY_RULES = {"off": 0, "cumulative": 1, "blasst": 2}


# Set bits per byte value: a row's kept-block count from its words, 8x smaller than unpacking.
_BYTE_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def row_block_counts(masks: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Kept KV blocks per mask row, as the kernel visits them: int32 ``(H, L, NB)`` from
    ``masks (H, L, NB', W)`` (``NB' >= NB``): bits past ``NB`` not counted, the diagonal always."""
    nb = num_blocks(seq_len)
    m = masks[:, :, :nb]
    # Word w keeps its low clamp(NB - 32 w, 0, 32) bits, as the kernel's bsa_keep_blocks_below.
    n_valid = (nb - WORD_BITS * torch.arange(m.shape[-1], device=m.device)).clamp(0, WORD_BITS)
    keep = torch.where(n_valid >= WORD_BITS, -1, (1 << n_valid.clamp(max=31)) - 1)
    m = m & keep.to(torch.int32)
    table = _BYTE_POPCOUNT.to(m.device)
    counts = table[m.contiguous().view(torch.uint8).long()].view(*m.shape[:-1], -1).sum(-1)
    u = torch.arange(nb, device=m.device)
    diag = (m[..., u, u // WORD_BITS] >> (u % WORD_BITS)) & 1  # (H, L, NB): stored already?
    return (counts + 1 - diag).to(torch.int32)


def launch_order(masks: torch.Tensor, level_table: torch.Tensor, seq_len: int,
                 num_heads: int | None = None) -> torch.Tensor:
    """The kernel's program order for one layer's tables: int32 ``(NT, H * NB)``.

    Entry ``[t, j * NB + r]`` is ``h * NB + u``: in bucket ``t`` the ``r``-th program of the
    ``j``-th head slot computes query block ``u`` of head ``h``. Heads go by kept blocks at
    their bucket's level, most first; within a head, rows by kept blocks, most first (stable:
    ties keep block order). Why: the GPU hands programs out in launch order, so the rows started
    last set the tail where SMs sit idle. Natural order ends on whatever rows come last (a
    dense head, or the longest rows of a local window); longest-first ends on the shortest
    (list scheduling's LPT rule). Heads stay contiguous so the running programs share one
    head's K/V in L2 (16.8 MB per head at Wan 1.3B/480p, 38.7 MB at 14B/720p, against 50 MB
    of L2 on an H100/H200); a global sort would mix heads.
    """
    h = masks.shape[0] if num_heads is None else num_heads
    nb = num_blocks(seq_len)
    counts = row_block_counts(masks[:h], seq_len)  # (H, L, NB)
    levels = level_table[:, :h].long().clamp(0, masks.shape[1] - 1)  # (NT, H), as the kernel
    rows = counts[torch.arange(h, device=masks.device)[None, :], levels]  # (NT, H, NB)
    head_rank = torch.sort(rows.sum(-1), dim=-1, descending=True, stable=True).indices  # (NT, H)
    row_rank = torch.sort(rows, dim=-1, descending=True, stable=True).indices  # (NT, H, NB)
    rows_of = torch.gather(row_rank, 1, head_rank[..., None].expand(-1, -1, nb))
    return (head_rank[..., None] * nb + rows_of).reshape(level_table.shape[0], h * nb).to(
        torch.int32).contiguous()


def natural_order(num_buckets: int, num_heads: int, seq_len: int, device=None) -> torch.Tensor:
    """The launch order of a kernel without one: heads, then query blocks, in index order."""
    n = num_heads * num_blocks(seq_len)
    return torch.arange(n, dtype=torch.int32, device=device).expand(num_buckets, n).contiguous()
