"""Block-pooled softmax mass of dense self-attention (Triton), for WEST calibration.

For one (batch element, head) with ``P = softmax(scale * q k^T)`` (``S x S``), the output is

    mass[b, h, u, v] = mean of P[i, j] over the real tokens i in query block u, j in KV block v

with 128-token blocks; the last block is partial when ``S % 128 != 0`` and its mean is over the
tokens that exist. ``P`` is never stored: two passes over the keys instead.

1. ``_row_lse_kernel``: each row's log-sum-exp (base 2, scale folded in), an online max/sum over
   KV tiles exactly like a FlashAttention forward without the ``P @ V``.
2. ``_block_mass_kernel``: one program per (query block u, batch x head); it walks every KV block
   v, recomputes the 128 x 128 scores, turns them into probabilities with the row LSE from pass
   1, and sums them. The sum is exact softmax mass, not an estimate.

Cost: two QK^T passes (4 * B * H * S^2 * D FLOPs in all), the same FLOPs as one dense attention
forward. At Wan2.1-14B 720p (H = 40, S = 75,600) that is ~117 TFLOP per layer.

Shapes: ``q, k`` are ``(B, H, S, D)`` with any strides (diffusers passes ``(B, H, S, D)`` views of
``(B, S, H, D)`` memory); ``D`` a power of two >= 16. Output float32 ``(B, H, NB, NB)``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MASK_BLOCK = 128  # tokens per pooling block, queries and keys alike (the mask block size)
LOG2E = 1.4426950408889634


@triton.jit
def _scores(q, k, IEEE: tl.constexpr):
    # fp32 inputs: ask for IEEE products so the GPU does not silently use TF32 (10-bit mantissa).
    if IEEE:
        return tl.dot(q, k, input_precision="ieee")
    else:
        return tl.dot(q, k)


@triton.jit
def _row_lse_kernel(Q, K, LSE,
                    stride_qb, stride_qh, stride_qs, stride_qd,
                    stride_kb, stride_kh, stride_ks, stride_kd,
                    stride_lb, stride_lh, stride_ls,
                    NUM_HEADS, SEQ_LEN, qk_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    IEEE: tl.constexpr):
    """LSE[b, h, i] = log2(sum_j 2^(qk_scale * q_i . k_j)), qk_scale = scale * log2(e)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 batch/head offsets: B * S * H * D passes 2**31 at 14B/720p with B >= 6.
    off_b = (pid_bh // NUM_HEADS).to(tl.int64)
    off_h = (pid_bh % NUM_HEADS).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < SEQ_LEN
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, SEQ_LEN, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < SEQ_LEN
        k = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=col_ok[None, :], other=0.0)
        qk = _scores(q, k, IEEE) * qk_scale
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.math.log2(l_i)
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ls, lse, mask=row_ok)


@triton.jit
def _block_mass_kernel(Q, K, LSE, OUT,
                       stride_qb, stride_qh, stride_qs, stride_qd,
                       stride_kb, stride_kh, stride_ks, stride_kd,
                       stride_lb, stride_lh, stride_ls,
                       stride_ob, stride_oh, stride_ou, stride_ov,
                       NUM_HEADS, SEQ_LEN, NUM_BLOCKS, qk_scale,
                       BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr):
    """OUT[b, h, u, v] = mean over real (i in u, j in v) of 2^(qk_scale * q_i . k_j - LSE[i])."""
    pid_u = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 batch/head offsets: B * S * H * D passes 2**31 at 14B/720p with B >= 6.
    off_b = (pid_bh // NUM_HEADS).to(tl.int64)
    off_h = (pid_bh % NUM_HEADS).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = pid_u * BLOCK + offs
    row_ok = offs_m < SEQ_LEN
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ls,
                  mask=row_ok, other=0.0)
    n_rows = tl.minimum(SEQ_LEN - pid_u * BLOCK, BLOCK).to(tl.float32)
    out_row = OUT + off_b * stride_ob + off_h * stride_oh + pid_u * stride_ou
    for v in range(0, NUM_BLOCKS):
        offs_n = v * BLOCK + offs
        col_ok = offs_n < SEQ_LEN
        k = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=col_ok[None, :], other=0.0)
        qk = _scores(q, k, IEEE) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        # Padding rows/columns were loaded as zeros: drop them before the sum, not after.
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        total = tl.sum(tl.sum(p, axis=1), axis=0)
        n_cols = tl.minimum(SEQ_LEN - v * BLOCK, BLOCK).to(tl.float32)
        tl.store(out_row + v * stride_ov, total / (n_rows * n_cols))


def _check_inputs(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"block_mass_triton: q and k must both be (B, H, S, D) with the same shape, got "
            f"q {tuple(q.shape)} and k {tuple(k.shape)}; pass self-attention q/k (Sq == Sk)")
    if q.dtype != k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"block_mass_triton: q and k must share one dtype among float16/bfloat16/float32, got "
            f"{q.dtype} and {k.dtype}; cast them first")
    if not q.is_cuda and q.dtype == torch.bfloat16:
        raise TypeError(
            "block_mass_triton: bfloat16 in Triton's interpreter (a CPU tensor) gives garbage "
            "(its bf16 tl.dot is broken: errors of 1e8-1e10); use float16/float32 on the CPU, or "
            "west.block_mass_torch")
    D = q.shape[-1]
    if D < 16 or D & (D - 1):
        raise ValueError(
            f"block_mass_triton: head_dim D must be a power of two >= 16 (tl.arange/tl.dot), got "
            f"{D}; use scaling_attn_compile.offline.west.block_mass_torch for other head sizes")


def block_mass_triton(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, *,
                      return_lse: bool = False, num_warps: int | None = None):
    """Block-pooled softmax mass ``(B, H, NB, NB)`` float32 of ``softmax(scale * q k^T)``.

    Args:
        q, k: ``(B, H, S, D)``, float16/bfloat16/float32, on a CUDA device (or the CPU under
            ``TRITON_INTERPRET=1``).
        scale: softmax scale, default ``1 / sqrt(D)`` (SDPA's).
        return_lse: also return the natural-log row log-sum-exp, float32 ``(B, H, S)``.

    ``NB = ceil(S / 128)``; ``mass[b, h, u, :] * (#real keys per block)`` sums to 1 over ``v``.
    """
    _check_inputs(q, k)
    B, H, S, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    nb = math.ceil(S / MASK_BLOCK)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    mass = torch.empty(B, H, nb, nb, dtype=torch.float32, device=q.device)
    ieee = q.dtype == torch.float32
    qk_scale = scale * LOG2E
    # 8 warps for the 128 x 128 fp32 score tile (64 KB of registers per program).
    warps = num_warps or (8 if q.is_cuda else 4)
    block_m = 128 if D <= 128 else 64
    _row_lse_kernel[(triton.cdiv(S, block_m), B * H)](
        q, k, lse, *q.stride(), *k.stride(), *lse.stride(), H, S, qk_scale,
        BLOCK_M=block_m, BLOCK_N=MASK_BLOCK, HEAD_DIM=D, IEEE=ieee, num_warps=warps)
    _block_mass_kernel[(nb, B * H)](
        q, k, lse, mass, *q.stride(), *k.stride(), *lse.stride(), *mass.stride(),
        H, S, nb, qk_scale, BLOCK=MASK_BLOCK, HEAD_DIM=D, IEEE=ieee, num_warps=warps)
    if return_lse:
        return mass, lse / LOG2E  # base 2 -> natural log
    return mass
