"""Bit-wise block-sparse FlashAttention forward (Triton).

How is this kernel parallelized? One program per (query tile of BLOCK_M rows, batch x head).
With a launch order (``HAS_LAUNCH_ORDER``, a table from ``contract/masks.launch_order``) the
program at launch slot ``(tile, head slot)`` looks up which (head, query block) it computes,
longest rows first, so the last programs the GPU starts are short ones (``bsa_launch_slot``).
Its KV loop walks the set bits of the query block's mask row: find the lowest set bit, process
that 128-token KV block, clear the bit, repeat. Skipped blocks cost nothing: not their loads,
not their QK^T. The row's words are held in registers as a small vector, so the walk is a
``for`` loop with a trip count known up front (the popcount), which Triton can software-pipeline.

What if a table holds a bad value? The kernel reads nothing out of bounds for any values:
the level is clamped to ``[0, L)``, mask bits of KV blocks past the last are cleared and the
bucket never passes the table's last row; the reference defines the same behaviour
(``reference.py``) and ``tests/test_bad_tables.py`` fuzzes it. Shapes are checked on the host
(``launch.check_launch``), so a direct launch is as safe as the op. Configurations, the
launcher and the autotune cache are :mod:`.launch`; this file is the math alone.

The math lives in ``bsa_forward_tile``. The eager kernel below calls it; the Inductor template
(``scaling_attn_compile.compile.lowering``) pastes its source, so the two never drift apart.
"""

from __future__ import annotations

import triton
import triton.language as tl

MASK_BLOCK = 128  # tokens per mask block (queries and keys); BLOCK_N == MASK_BLOCK
LOG2E = 1.4426950408889634


@triton.jit
def bsa_popcount(x):
    """Set bits of each uint32 lane (SWAR; no intrinsic needed, so it also runs interpreted)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def bsa_bucket(TS, stride_ts, BOUNDS, off_b, NUM_BOUNDS: tl.constexpr, BOUNDS_P2: tl.constexpr):
    """The timestep bucket of batch element ``off_b``: #{bounds <= t}, in [0, NUM_BOUNDS] (padding
    lanes never count, even for t = +inf; a NaN t counts no bound, bucket 0). On device, no sync."""
    t = tl.load(TS + off_b * stride_ts).to(tl.float32)
    offs = tl.arange(0, BOUNDS_P2)
    real = offs < NUM_BOUNDS
    bounds = tl.load(BOUNDS + offs, mask=real, other=float("inf"))
    return tl.sum(((bounds <= t) & real).to(tl.int32), axis=0)


@triton.jit
def bsa_select_level(TS, stride_ts, BOUNDS, LEVEL_TABLE, stride_lt_t, stride_lt_h, off_b, off_h,
                     num_levels, NUM_BOUNDS: tl.constexpr, BOUNDS_P2: tl.constexpr):
    """The level this (batch element, head) uses: level_table[bucket, h], clamped to
    [0, num_levels - 1] (one min/max on a scalar per program), so whatever the tables hold,
    nothing is read out of bounds."""
    bucket = bsa_bucket(TS, stride_ts, BOUNDS, off_b, NUM_BOUNDS, BOUNDS_P2)
    level = tl.load(LEVEL_TABLE + bucket * stride_lt_t + off_h * stride_lt_h)
    return tl.minimum(tl.maximum(level, 0), num_levels - 1)


@triton.jit
def bsa_launch_slot(LAUNCH_ORDER, stride_lo_t, TS, stride_ts, BOUNDS, off_b, head_slot, pid_m,
                    NUM_HEADS, SEQ_LEN, NUM_BOUNDS: tl.constexpr, BOUNDS_P2: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """``(head, query tile)`` of the program launched at ``(pid_m, head_slot)``: entry
    ``head_slot * NB + pid_m // (128 // BLOCK_M)`` of the bucket's row of ``LAUNCH_ORDER``
    (``contract/masks.launch_order``: longest rows first), clamped to ``[0, H * NB)`` so that
    no value reads out of bounds. The grid has ``NB * (128 // BLOCK_M)`` programs per head, so
    every query block's sub-tiles exist whatever block the order puts last."""
    nb = tl.cdiv(SEQ_LEN, 128)
    bucket = bsa_bucket(TS, stride_ts, BOUNDS, off_b, NUM_BOUNDS, BOUNDS_P2)
    idx = tl.load(LAUNCH_ORDER + bucket * stride_lo_t + head_slot * nb + pid_m // (128 // BLOCK_M))
    idx = tl.minimum(tl.maximum(idx, 0), NUM_HEADS * nb - 1)
    return idx // nb, (idx % nb) * (128 // BLOCK_M) + pid_m % (128 // BLOCK_M)


@triton.jit
def bsa_row_words(MASKS, stride_mh, stride_ml, stride_mu, stride_mw, off_h, level, qblock,
                  SEQ_LEN, NUM_WORDS: tl.constexpr, NUM_WORDS_P2: tl.constexpr):
    """The mask row of query block ``qblock`` as uint32 words ``(NUM_WORDS_P2,)``, with the bits
    of KV blocks past the last one (``NB = ceil(S / 128)``) cleared and the diagonal bit set.

    A stray bit past NB (a hand-made table, or W larger than ``ceil(NB / 32)``) would otherwise
    load K/V rows past the end of the tensors: word ``w`` keeps only its low
    ``clamp(NB - 32 w, 0, 32)`` bits. The shift amount stays <= 31 (a shift by 32 is undefined).
    """
    offs_w = tl.arange(0, NUM_WORDS_P2)
    row = MASKS + off_h * stride_mh + level * stride_ml + qblock * stride_mu
    words = tl.load(row + offs_w * stride_mw, mask=offs_w < NUM_WORDS, other=0)
    words = words.to(tl.uint32, bitcast=True)
    one = tl.full([NUM_WORDS_P2], 1, tl.uint32)
    words = bsa_keep_blocks_below(words, offs_w, tl.cdiv(SEQ_LEN, 128), NUM_WORDS_P2)
    # The diagonal block is always kept, so no query row is ever empty (without key lengths).
    return words | tl.where(offs_w == qblock // 32, one << (qblock % 32).to(tl.uint32), 0)


@triton.jit
def bsa_keep_blocks_below(words, offs_w, n_blocks, NUM_WORDS_P2: tl.constexpr):
    """``words`` with the bits of KV blocks ``>= n_blocks`` cleared: word ``w`` keeps its low
    ``clamp(n_blocks - 32 w, 0, 32)`` bits (the shift stays <= 31; a shift by 32 is undefined)."""
    one = tl.full([NUM_WORDS_P2], 1, tl.uint32)
    n_valid = tl.minimum(tl.maximum(n_blocks - offs_w * 32, 0), 32)
    valid = tl.where(n_valid >= 32, tl.full([NUM_WORDS_P2], 0xFFFFFFFF, tl.uint32),
                     (one << tl.minimum(n_valid, 31).to(tl.uint32)) - 1)
    return words & valid


@triton.jit
def bsa_split_last(words, offs_w, kv_len, NUM_WORDS_P2: tl.constexpr):
    """Take the block holding key ``kv_len - 1`` (a partial last block) out of a row's walk:
    ``(words without its bit, its index, whether the row kept it)``, so the loop runs unmasked
    and the caller does that block last, with the key mask. ``kv_len = 0`` gives index 0, whose
    block the caller has cleared anyway (``bsa_keep_blocks_below``)."""
    one = tl.full([NUM_WORDS_P2], 1, tl.uint32)
    last = tl.maximum(tl.cdiv(kv_len, 128) - 1, 0)
    last_bit = tl.where(offs_w == last // 32, one << (last % 32).to(tl.uint32), 0)
    has_last = tl.sum((words & last_bit) != 0, axis=0) > 0
    return words & ~last_bit, last, has_last


@triton.jit
def bsa_take_block(words, offs_w, blk, NUM_WORDS_P2: tl.constexpr):
    """Take KV block ``blk`` out of a row's walk, if the row keeps it: ``(words without its
    bit, whether it was kept)``. ``blk`` may be -1 or past the row (the diagonal's neighbours
    at the edges): not kept, words unchanged (its bit is never computed from a negative shift)."""
    one = tl.full([NUM_WORDS_P2], 1, tl.uint32)
    word_bit = tl.where(offs_w == blk // 32, one << (blk % 32).to(tl.uint32), 0)
    kept = (blk >= 0) & (tl.sum((words & word_bit) != 0, axis=0) > 0)
    return tl.where(kept, words & ~word_bit, words), kept


@triton.jit
def bsa_next_block(words, offs_w, NUM_WORDS_P2: tl.constexpr):
    """Find-first-set over a row's words: returns (KV block index of the lowest set bit, words
    with that bit cleared)."""
    wi = tl.min(tl.where(words != 0, offs_w, NUM_WORDS_P2), axis=0)
    w = tl.sum(tl.where(offs_w == wi, words, 0), axis=0)
    low = w & (~w + 1)
    # log2 of a power of two is its float32 exponent: exact, and needs no clz intrinsic.
    bit = ((low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    return wi * 32 + bit, tl.where(offs_w == wi, words ^ low, words)


@triton.jit
def bsa_load_kv(k_base, v_base, offs_n, offs_d, SEQ_LEN, stride_ks, stride_kd, stride_vs,
                stride_vd, PARTIAL: tl.constexpr):
    """K^T ``(D, 128)`` and V ``(128, D)`` of the keys ``offs_n`` through pointers (the kernels'
    non-TMA path, bf16 and 8-bit alike); ``PARTIAL``: keys past ``SEQ_LEN`` read as 0."""
    if PARTIAL:
        in_seq = offs_n < SEQ_LEN
        k = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=in_seq[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=in_seq[:, None], other=0.0)
    else:
        k = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd)
    return k, v


@triton.jit
def bsa_attend_block(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, start_n, offs_n0, offs_d,
                     SEQ_LEN, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, n_skipped,
                     energy_thr, row_ok, PARTIAL: tl.constexpr, USE_TMA: tl.constexpr,
                     ENERGY_RULE: tl.constexpr):
    """One online-softmax step over the 128 keys starting at ``start_n``. ``PARTIAL`` masks keys
    past ``SEQ_LEN`` (the caller passes the batch element's key length when it has one); only
    the last block needs it, so the hot loop runs without it.

    ``ENERGY_RULE`` (0 off, 1 cumulative energy, 2 BLASST) skips the exp and P*V work of the
    block when every row of the tile agrees it is negligible: ``m_blk - LSE < energy_thr``
    (cumulative energy) or ``m_blk - m < energy_thr`` (BLASST), all in log2 units. QK^T and the
    loads are done anyway (the decision needs QK^T; V stays in the pipeline).
    """
    offs_n = start_n + offs_n0
    if USE_TMA:
        # The tensor-memory accelerator zero-fills rows past SEQ_LEN; the -inf mask is still ours.
        k = k_desc.load([start_n, 0]).T
        v = v_desc.load([start_n, 0])
    else:
        k, v = bsa_load_kv(k_base, v_base, offs_n, offs_d, SEQ_LEN, stride_ks, stride_kd,
                           stride_vs, stride_vd, PARTIAL)
    qk = tl.dot(q, k)
    if PARTIAL:
        qk = tl.where((offs_n < SEQ_LEN)[None, :], qk, float("-inf"))
    # Scale folded into one FMA with the max subtraction, in exp2 (the Triton tutorial's trick).
    m_blk = tl.max(qk, axis=1) * qk_scale
    if ENERGY_RULE == 0:
        acc, l_i, m_i = bsa_softmax_update(acc, l_i, m_i, qk, v, m_blk, qk_scale)
    else:
        if ENERGY_RULE == 1:
            gap = m_blk - (m_i + tl.math.log2(l_i))  # vs the running log-sum-exp (l_i=0: +inf)
        else:
            gap = m_blk - m_i  # vs the running max
        gap = tl.where(row_ok, gap, float("-inf"))  # padding rows past SEQ_LEN have no vote
        if tl.max(gap, axis=0) < energy_thr:  # every row of the tile agrees: skip
            n_skipped += 1
        else:
            acc, l_i, m_i = bsa_softmax_update(acc, l_i, m_i, qk, v, m_blk, qk_scale)
    return acc, l_i, m_i, n_skipped


@triton.jit
def bsa_softmax_update(acc, l_i, m_i, qk, v, m_blk, qk_scale):
    """Online softmax: fold one block's scores ``qk`` (unscaled) and values ``v`` into the state."""
    m_new = tl.maximum(m_i, m_blk)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def bsa_forward_tile(
    Q, K, V, MASKS, LEVEL_TABLE, BOUNDS, TS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mh, stride_ml, stride_mu, stride_mw,
    stride_lt_t, stride_lt_h, stride_ts,
    off_b, off_h, pid_m, SEQ_LEN, qk_scale, num_levels,
    NUM_WORDS: tl.constexpr, NUM_WORDS_P2: tl.constexpr,
    NUM_BOUNDS: tl.constexpr, BOUNDS_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    EVEN_S: tl.constexpr, USE_TMA: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,
    ENERGY_RULE: tl.constexpr = 0, energy_thr=0.0, KV_LENS=None, HAS_KV_LENS: tl.constexpr = False,
):
    """One (BLOCK_M, HEAD_DIM) output tile, normalised, in float32, and the number of visited
    blocks the energy filter skipped.

    ``qk_scale`` is the softmax scale times log2(e): the loop works in exp2. ``EVEN_S`` says
    ``SEQ_LEN % 128 == 0`` (no partial last block). With the energy filter on (``ENERGY_RULE``
    1 or 2, threshold ``energy_thr`` in log2 units) the diagonal block and its two neighbours are
    visited first, so the running log-sum-exp is large early; then the rest in ascending order.

    ``HAS_KV_LENS``: ``KV_LENS[off_b]`` (int32, clamped to ``[0, SEQ_LEN]``) is the batch
    element's key length. Blocks past it are cleared from the row (the diagonal too), and the
    last block holding a valid key is taken out of the walk and done last with the key mask,
    like the partial last block of an uneven ``SEQ_LEN``. A row left with no block outputs zeros.
    """
    tl.static_assert(BLOCK_N == 128, "BLOCK_N must equal the 128-token mask block")
    tl.static_assert(128 % BLOCK_M == 0, "BLOCK_M must divide the 128-token mask block")

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n0 = tl.arange(0, BLOCK_N)

    # -- this tile's mask row: level from the timestep, words into registers ------------------
    level = bsa_select_level(TS, stride_ts, BOUNDS, LEVEL_TABLE, stride_lt_t, stride_lt_h,
                             off_b, off_h, num_levels, NUM_BOUNDS, BOUNDS_P2)
    qblock = (pid_m * BLOCK_M) // 128
    offs_w = tl.arange(0, NUM_WORDS_P2)
    words = bsa_row_words(MASKS, stride_mh, stride_ml, stride_mu, stride_mw, off_h, level,
                          qblock, SEQ_LEN, NUM_WORDS, NUM_WORDS_P2)
    kv_len = SEQ_LEN  # keys at index >= kv_len are masked
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.maximum(tl.load(KV_LENS + off_b).to(tl.int32), 0), SEQ_LEN)
        words = bsa_keep_blocks_below(words, offs_w, tl.cdiv(kv_len, BLOCK_N), NUM_WORDS_P2)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs
                + offs_d[None, :] * stride_qd, mask=offs_m[:, None] < SEQ_LEN, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    k_desc = None
    v_desc = None
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[SEQ_LEN, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[SEQ_LEN, HEAD_DIM], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_skipped = tl.zeros([], dtype=tl.int32)
    row_ok = offs_m < SEQ_LEN

    if ENERGY_RULE != 0:
        # Diagonal, then its left and right neighbours (where kept), before everything else.
        for j in tl.static_range(3):
            blk = qblock + (j + 1) // 2 * (1 - 2 * (j % 2))  # j = 0, 1, 2: u, u - 1, u + 1
            words, kept = bsa_take_block(words, offs_w, blk, NUM_WORDS_P2)
            if kept:
                acc, l_i, m_i, n_skipped = bsa_attend_block(
                    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, blk * BLOCK_N, offs_n0,
                    offs_d, kv_len, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                    n_skipped, energy_thr, row_ok, (not EVEN_S) or HAS_KV_LENS, USE_TMA,
                    ENERGY_RULE)
    if (not EVEN_S) or HAS_KV_LENS:
        # The partial last block is taken out of the walk and done after it, with masking.
        words, last, has_last = bsa_split_last(words, offs_w, kv_len, NUM_WORDS_P2)
    n_kept = tl.sum(bsa_popcount(words), axis=0)

    for _ in tl.range(0, n_kept, warp_specialize=WARP_SPECIALIZE):
        kv_block, words = bsa_next_block(words, offs_w, NUM_WORDS_P2)
        acc, l_i, m_i, n_skipped = bsa_attend_block(
            acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kv_block * BLOCK_N, offs_n0, offs_d,
            kv_len, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, n_skipped, energy_thr,
            row_ok, False, USE_TMA, ENERGY_RULE)
    if (not EVEN_S) or HAS_KV_LENS:
        if has_last:
            acc, l_i, m_i, n_skipped = bsa_attend_block(
                acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, last * BLOCK_N, offs_n0,
                offs_d, kv_len, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, n_skipped,
                energy_thr, row_ok, True, USE_TMA, ENERGY_RULE)
    if HAS_KV_LENS:  # a row with no kept key: l_i = 0 and acc = 0, defined as zeros
        l_i = tl.where(l_i > 0, l_i, 1.0)
    return acc / l_i[:, None], offs_m, offs_d, n_skipped


@triton.jit
def _bsa_forward_kernel(
    Q, K, V, MASKS, LEVEL_TABLE, BOUNDS, TS, OUT,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mh, stride_ml, stride_mu, stride_mw,
    stride_lt_t, stride_lt_h, stride_ts,
    NUM_HEADS, SEQ_LEN, qk_scale, num_levels,
    NUM_WORDS: tl.constexpr, NUM_WORDS_P2: tl.constexpr,
    NUM_BOUNDS: tl.constexpr, BOUNDS_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    EVEN_S: tl.constexpr, USE_TMA: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,
    ENERGY_RULE: tl.constexpr = 0, energy_thr=0.0, SKIPPED=None, WRITE_SKIPPED: tl.constexpr = False,
    KV_LENS=None, HAS_KV_LENS: tl.constexpr = False,
    LAUNCH_ORDER=None, stride_lo_t=0, HAS_LAUNCH_ORDER: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // NUM_HEADS
    off_h = off_bh % NUM_HEADS
    if HAS_LAUNCH_ORDER:  # the (head, tile) this launch slot runs: long rows first
        off_h, pid_m = bsa_launch_slot(LAUNCH_ORDER, stride_lo_t, TS, stride_ts, BOUNDS, off_b,
                                       off_h, pid_m, NUM_HEADS, SEQ_LEN, NUM_BOUNDS, BOUNDS_P2,
                                       BLOCK_M)
    acc, offs_m, offs_d, n_skipped = bsa_forward_tile(
        Q, K, V, MASKS, LEVEL_TABLE, BOUNDS, TS,
        stride_qb, stride_qh, stride_qs, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_mh, stride_ml, stride_mu, stride_mw,
        stride_lt_t, stride_lt_h, stride_ts,
        off_b, off_h, pid_m, SEQ_LEN, qk_scale, num_levels,
        NUM_WORDS, NUM_WORDS_P2, NUM_BOUNDS, BOUNDS_P2, BLOCK_M, BLOCK_N, HEAD_DIM, EVEN_S,
        USE_TMA, WARP_SPECIALIZE, ENERGY_RULE, energy_thr, KV_LENS, HAS_KV_LENS,
    )
    if WRITE_SKIPPED:  # blocks the energy filter skipped, per (b, h, query tile)
        tl.store(SKIPPED + (off_b * NUM_HEADS + off_h) * tl.num_programs(0) + pid_m, n_skipped)
    out = OUT + off_b * stride_ob + off_h * stride_oh
    tl.store(out + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             acc.to(OUT.dtype.element_ty), mask=offs_m[:, None] < SEQ_LEN)


