"""8-bit bit-wise block-sparse FlashAttention forward (Triton): Q.K^T in INT8 or FP8 e4m3,
P.V in FP8 e4m3, fp32 softmax state and accumulation. The spec is
:func:`scaling_attn_compile.contract.quant.quantized_attention_reference`.

Same walk as :mod:`.block_sparse_attention` (its helpers are imported, not copied): one program
per (query tile, batch x head), the level picked on the device from the timestep, the mask row's
set bits walked with a known trip count, the partial last block done last with masking. What
differs is one KV block's step, :func:`bsa_q8_attend_block`:

* ``qk = dot(q8, k8)`` exact in int32 (INT8) or fp32 (FP8), scaled by
  ``s = sq * sk[block] * scale * log2(e)``: the Q scale is per 128-row block (a scalar per tile),
  the K scale per 128-key block (a scalar per visited block; ``contract/quant.py`` says why 128);
* ``p = exp2(qk * s - m)`` in [0, 1] is stored as ``p * 448`` in e4m3 (the static P scale),
  computed as ``exp2(qk * s - (m - log2 448))`` so the scale and the 448 cost no multiply of
  their own (one FFMA per score, as in the bf16 kernel);
* ``dot(p8, v8)`` starts from zero for each block and is added into the fp32 accumulator
  (two-level accumulation, the default), either at once or on the next trip (``PV_DEFERRED``,
  which keeps the wgmma in flight). Hopper's FP8 wgmma truncates its accumulator to about 13
  mantissa bits (SageAttention2's "FP22"). Adding into the running accumulator instead
  (``PV_RUNNING``) measured 1.31-1.35x the bf16 kernel on an H200, but failed the GPU accuracy
  tests there (the comment in the block step);
* the epilogue multiplies by the per-channel V scale and ``1 / l`` (``l`` carries the 448).

The 448 is ``contract/quant.py``'s ``P_SCALE``. The quantize pre-pass is one Triton launch
(:mod:`.quantize_q8`, via :func:`.launch_q8.quantize_for_kernel`): per-block amax, K smoothed
first; V is written
transposed (``(B, H, D, S)`` memory, rows padded to 16 bytes for TMA), because Hopper's FP8 and
INT8 wgmma need both operands K-major, and the reduction dim of P.V is the key index.
``USE_TMA`` reads K and V^T through device-side tensor descriptors.

The energy filter (``ENERGY_RULE``) is the bf16 kernel's rule on the dequantized scores, in
the same visit order (diagonal, its neighbours, the rest); the spec is
:func:`scaling_attn_compile.contract.quant.quantized_attention_reference` with
``energy_rule``. The Inductor template (``compile/template_source``) pastes
:func:`bsa_q8_forward_tile` and its callees; the eager kernel below calls the same tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .block_sparse_attention import (
    bsa_load_kv,
    bsa_next_block,
    bsa_popcount,
    bsa_row_words,
    bsa_select_level,
    bsa_split_last,
    bsa_take_block,
)

# P.V accumulation (the kernel's PV_MODE; launch_q8.PV_MODES names them)
PV_RUNNING = tl.constexpr(0)    # into the running accumulator: fast, inexact on Hopper
PV_TWO_LEVEL = tl.constexpr(1)  # each block's from zero, added in fp32 at once
PV_DEFERRED = tl.constexpr(2)   # each block's from zero, added in fp32 on the next trip


@triton.jit
def bsa_q8_attend_block(acc, pv_prev, alpha_prev, l_i, m_i, q, qk_mult, k_base, v_base, k_desc,
                        v_desc, KS, start_n, offs_n0, offs_d, SEQ_LEN, stride_ks, stride_kd,
                        stride_vs, stride_vd, PARTIAL: tl.constexpr, QK_INT8: tl.constexpr,
                        USE_TMA: tl.constexpr, PV_MODE: tl.constexpr,
                        ENERGY_RULE: tl.constexpr = 0, energy_thr=0.0, row_ok=None):
    """One online-softmax step over the 128 keys at ``start_n``, 8-bit operands. ``qk_mult`` is
    ``sq * scale * log2(e)`` for this tile; ``KS`` points at this (batch, head)'s K scales.
    ``pv_prev`` / ``alpha_prev``: the previous block's P.V and rescale, not yet in ``acc``
    (``PV_DEFERRED``; carried unchanged otherwise).

    The scale of the scores and the 448 of P are folded into the one FFMA before the exp2:
    ``p * 448 = exp2(qk * s - (m - log2(448)))``; the row sum ``l_i`` then carries the 448 too,
    and the epilogue's ``acc / l_i`` cancels it.

    ``ENERGY_RULE`` (0 off, 1 cumulative energy, 2 BLASST; threshold ``energy_thr`` in log2
    units) skips the block's exp and P.V when every row of ``row_ok`` agrees, as the bf16
    kernel's :func:`.block_sparse_attention.bsa_attend_block` does; the log-sum-exp takes the
    448 out of ``l_i``."""
    offs_n = start_n + offs_n0
    if USE_TMA:  # zero-fills keys past SEQ_LEN; V is (D, S) memory: its tile is (D, 128)
        k = k_desc.load([start_n, 0]).T
        v = v_desc.load([0, start_n]).T
    else:
        k, v = bsa_load_kv(k_base, v_base, offs_n, offs_d, SEQ_LEN, stride_ks, stride_kd,
                           stride_vs, stride_vd, PARTIAL)
    if QK_INT8:
        # I2F, not the exact integer-add trick (bits of i + 0x4B400000 minus 1.5 x 2^23): on an
        # H200 the add was 1.6-2.2% slower (commit 38c6b54, attention-q8-nvidia-h200.json), so
        # I2F does not share MUFU's 16-a-clock unit; the add's 128 extra instructions cost more.
        qk = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32)
    else:
        qk = tl.dot(q, k)
    if PV_MODE == PV_DEFERRED:  # after this block's Q.K^T is issued: the wait covers both
        acc = acc * alpha_prev[:, None] + pv_prev
    s = qk_mult * tl.load(KS + start_n // 128)  # > 0: scores in log2 units are qk * s
    if PARTIAL:
        qk = tl.where((offs_n < SEQ_LEN)[None, :], qk, float("-inf"))
    m_blk = tl.max(qk, axis=1) * s
    if ENERGY_RULE == 0:
        acc, pv_prev, alpha_prev, l_i, m_i = bsa_q8_softmax_update(
            acc, pv_prev, alpha_prev, l_i, m_i, qk, s, v, m_blk, PV_MODE)
    else:
        if ENERGY_RULE == 1:  # vs the running log-sum-exp; l_i carries 448 (l_i = 0: +inf)
            gap = m_blk - (m_i + tl.math.log2(l_i) - 8.807354922057604)
        else:
            gap = m_blk - m_i  # vs the running max
        gap = tl.where(row_ok, gap, float("-inf"))  # padding rows past SEQ_LEN have no vote
        if tl.max(gap, axis=0) < energy_thr:  # every row agrees: skip the exp and P.V
            if PV_MODE == PV_DEFERRED:  # nothing pending for the next trip's add
                pv_prev = tl.zeros(pv_prev.shape, tl.float32)
                alpha_prev = tl.full(alpha_prev.shape, 1.0, tl.float32)
        else:
            acc, pv_prev, alpha_prev, l_i, m_i = bsa_q8_softmax_update(
                acc, pv_prev, alpha_prev, l_i, m_i, qk, s, v, m_blk, PV_MODE)
    return acc, pv_prev, alpha_prev, l_i, m_i


@triton.jit
def bsa_q8_softmax_update(acc, pv_prev, alpha_prev, l_i, m_i, qk, s, v, m_blk,
                          PV_MODE: tl.constexpr):
    """Online softmax with 8-bit P: fold one block's scores ``qk`` (scaled by ``s`` into log2
    units; ``m_blk`` their row max) and FP8 values ``v`` into the state, P.V as ``PV_MODE``
    says."""
    m_new = tl.maximum(m_i, m_blk)
    p = tl.math.exp2(qk * s - (m_new - 8.807354922057604)[:, None])  # log2(448): p * 448
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)  # the row sum (x 448) from the unrounded p
    # Hopper's FP8 wgmma adds into its accumulator keeping about 13 mantissa bits (truncated;
    # SageAttention2's "FP22"). Into the running accumulator (PV_RUNNING) the wgmma stays in
    # flight, but the truncation is relative to the whole running sum: every `-m gpu
    # test_q8_kernel_gpu_every_config` case failed its bound (H200, 38c6b54), and rel-L2 against
    # the bf16 kernel was 2.6% at S = 3,000 and 7.8% at 8,192 where two-level gave 0.34% /
    # 0.31% (H200, 3bf582a, results/q8-accumulation-nvidia-h200.json). Two-level starts each
    # block's P.V from zero and adds it in fp32 at once, so its wgmma is waited on before the
    # next block: 8% slower at Wan 1.3B dense (FP8 10.91 vs 10.08 ms, config 128/8/2). Deferred
    # is two-level's arithmetic with the add moved to the next trip, after that block's Q.K^T
    # is issued: in the sm_90 code the P.V wgmma then stays in flight across the back-edge, as
    # the running accumulator's does (one wait a trip; 553 loop instructions FP8, 621 INT8).
    # Tried and removed: a running accumulator flushed into fp32 every N blocks (DESIGN.md).
    if PV_MODE == PV_DEFERRED:
        pv_prev = tl.dot(p.to(v.dtype), v)
        alpha_prev = alpha
    elif PV_MODE == PV_TWO_LEVEL:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, pv_prev, alpha_prev, l_i, m_new


@triton.jit
def bsa_q8_forward_tile(
    Q, K, V, QS, KS, VS, MASKS, LEVEL_TABLE, BOUNDS, TS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mh, stride_ml, stride_mu, stride_mw,
    stride_lt_t, stride_lt_h, stride_ts,
    off_b, off_h, pid_m, NUM_HEADS, SEQ_LEN, qk_scale, num_levels, NQB, NKB,
    NUM_WORDS: tl.constexpr, NUM_WORDS_P2: tl.constexpr,
    NUM_BOUNDS: tl.constexpr, BOUNDS_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    EVEN_S: tl.constexpr, QK_INT8: tl.constexpr, USE_TMA: tl.constexpr = False,
    PV_MODE: tl.constexpr = 1, ENERGY_RULE: tl.constexpr = 0, energy_thr=0.0,
):
    """One (BLOCK_M, HEAD_DIM) output tile in float32, V-scaled and normalised, with its row
    and column offsets: the body of :func:`_bsa_q8_forward_kernel` and of the Inductor
    template (``compile/template_source``), which store it.

    ``QS`` float32 ``(B * H, NQB)`` Q scales, ``KS`` ``(B * H, NKB)`` K scales, ``VS``
    ``(B * H, HEAD_DIM)`` V scales, all contiguous; ``qk_scale`` is the softmax scale x log2(e).
    ``PV_MODE``: the P.V accumulation (:data:`PV_TWO_LEVEL`, :data:`PV_DEFERRED`,
    :data:`PV_RUNNING`). ``ENERGY_RULE`` / ``energy_thr`` (log2 units): the energy filter, which
    visits the diagonal block and its two neighbours first, as the bf16 kernel does."""
    tl.static_assert(BLOCK_N == 128, "BLOCK_N must equal the 128-token mask block")
    tl.static_assert(128 % BLOCK_M == 0, "BLOCK_M must divide the 128-token mask block")
    off_bh = off_b * NUM_HEADS + off_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n0 = tl.arange(0, BLOCK_N)

    level = bsa_select_level(TS, stride_ts, BOUNDS, LEVEL_TABLE, stride_lt_t, stride_lt_h,
                             off_b, off_h, num_levels, NUM_BOUNDS, BOUNDS_P2)
    qblock = (pid_m * BLOCK_M) // 128
    offs_w = tl.arange(0, NUM_WORDS_P2)
    words = bsa_row_words(MASKS, stride_mh, stride_ml, stride_mu, stride_mw, off_h, level,
                          qblock, SEQ_LEN, NUM_WORDS, NUM_WORDS_P2)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs
                + offs_d[None, :] * stride_qd, mask=offs_m[:, None] < SEQ_LEN, other=0.0)
    qk_mult = tl.load(QS + off_bh * NQB + qblock) * qk_scale
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    ks = KS + off_bh * NKB
    k_desc = None
    v_desc = None
    if USE_TMA:  # K (S, D) rows; V stored (D, S): stride_vs = 1, stride_vd the row pitch
        k_desc = tl.make_tensor_descriptor(k_base, shape=[SEQ_LEN, HEAD_DIM],
                                           strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[HEAD_DIM, SEQ_LEN],
                                           strides=[stride_vd, 1], block_shape=[HEAD_DIM, BLOCK_N])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    pv_prev = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # PV_DEFERRED's pending P.V
    alpha_prev = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_ok = offs_m < SEQ_LEN
    if ENERGY_RULE != 0:  # the diagonal, then its left and right neighbours (where kept)
        for j in tl.static_range(3):
            blk = qblock + (j + 1) // 2 * (1 - 2 * (j % 2))  # j = 0, 1, 2: u, u - 1, u + 1
            words, kept = bsa_take_block(words, offs_w, blk, NUM_WORDS_P2)
            if kept:
                acc, pv_prev, alpha_prev, l_i, m_i = bsa_q8_attend_block(
                    acc, pv_prev, alpha_prev, l_i, m_i, q, qk_mult, k_base, v_base, k_desc,
                    v_desc, ks, blk * BLOCK_N, offs_n0, offs_d, SEQ_LEN, stride_ks, stride_kd,
                    stride_vs, stride_vd, not EVEN_S, QK_INT8, USE_TMA, PV_MODE, ENERGY_RULE,
                    energy_thr, row_ok)
    if not EVEN_S:  # the partial last block after the walk, with the key mask
        words, last, has_last = bsa_split_last(words, offs_w, SEQ_LEN, NUM_WORDS_P2)
    n_kept = tl.sum(bsa_popcount(words), axis=0)
    for _ in tl.range(0, n_kept):
        kv_block, words = bsa_next_block(words, offs_w, NUM_WORDS_P2)
        acc, pv_prev, alpha_prev, l_i, m_i = bsa_q8_attend_block(
            acc, pv_prev, alpha_prev, l_i, m_i, q, qk_mult, k_base, v_base, k_desc, v_desc, ks,
            kv_block * BLOCK_N, offs_n0, offs_d, SEQ_LEN, stride_ks, stride_kd, stride_vs,
            stride_vd, False, QK_INT8, USE_TMA, PV_MODE, ENERGY_RULE, energy_thr, row_ok)
    if not EVEN_S:
        if has_last:
            acc, pv_prev, alpha_prev, l_i, m_i = bsa_q8_attend_block(
                acc, pv_prev, alpha_prev, l_i, m_i, q, qk_mult, k_base, v_base, k_desc, v_desc,
                ks, last * BLOCK_N, offs_n0, offs_d, SEQ_LEN, stride_ks, stride_kd, stride_vs,
                stride_vd, True, QK_INT8, USE_TMA, PV_MODE, ENERGY_RULE, energy_thr, row_ok)
    if PV_MODE == PV_DEFERRED:  # the last block's P.V
        acc = acc * alpha_prev[:, None] + pv_prev
    v_scale = tl.load(VS + off_bh * HEAD_DIM + offs_d)
    return acc * v_scale[None, :] / l_i[:, None], offs_m, offs_d  # l_i carries P's 448


@triton.jit
def _bsa_q8_forward_kernel(
    Q, K, V, QS, KS, VS, MASKS, LEVEL_TABLE, BOUNDS, TS, OUT,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mh, stride_ml, stride_mu, stride_mw,
    stride_lt_t, stride_lt_h, stride_ts,
    NUM_HEADS, SEQ_LEN, qk_scale, num_levels, NQB, NKB,
    NUM_WORDS: tl.constexpr, NUM_WORDS_P2: tl.constexpr,
    NUM_BOUNDS: tl.constexpr, BOUNDS_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    EVEN_S: tl.constexpr, QK_INT8: tl.constexpr, USE_TMA: tl.constexpr = False,
    PV_MODE: tl.constexpr = 1, ENERGY_RULE: tl.constexpr = 0, energy_thr=0.0,
):
    """The eager launcher's kernel: one program per (query tile, batch x head), the tile from
    :func:`bsa_q8_forward_tile`, stored in ``OUT``'s dtype."""
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // NUM_HEADS
    off_h = off_bh % NUM_HEADS
    out_tile, offs_m, offs_d = bsa_q8_forward_tile(
        Q, K, V, QS, KS, VS, MASKS, LEVEL_TABLE, BOUNDS, TS,
        stride_qb, stride_qh, stride_qs, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_mh, stride_ml, stride_mu, stride_mw,
        stride_lt_t, stride_lt_h, stride_ts,
        off_b, off_h, pid_m, NUM_HEADS, SEQ_LEN, qk_scale, num_levels, NQB, NKB,
        NUM_WORDS, NUM_WORDS_P2, NUM_BOUNDS, BOUNDS_P2, BLOCK_M, BLOCK_N, HEAD_DIM, EVEN_S,
        QK_INT8, USE_TMA, PV_MODE, ENERGY_RULE, energy_thr,
    )
    out = OUT + off_b * stride_ob + off_h * stride_oh
    tl.store(out + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             out_tile.to(OUT.dtype.element_ty), mask=offs_m[:, None] < SEQ_LEN)
