"""The 8-bit kernel's quantize pre-pass as one Triton launch: Q and (smoothed) K per 128-row block,
V per channel into a transposed, padded FP8 copy. The spec is
:func:`scaling_attn_compile.contract.quant.quantize_qkv`; :func:`.launch_q8.quantize_for_kernel`
calls this.

Why a kernel: the torch form (``quantize_qkv``, written for clarity) makes float32 copies, pads,
divides, rounds and casts in about 20 passes over (B, H, S, D) tensors. On an H100 it took
3.6-4.0 ms per call at the Wan 1.3B shape (``ours-int8-op`` minus ``ours-int8`` in
``benchmarks/results/attention-q8-nvidia-h100-80gb-hbm3.json``), as long as the 8-bit kernel
itself at density 0.25. Here two torch reductions over the tokens (K's per-channel mean, V's
per-channel amax) read K and V once each, and one launch reads Q, K, V once and writes the codes
and scales: about 0.4 GB of traffic at that shape, about 0.15 ms at 3 TB/s predicted; 0.43 ms
measured on an H200 (commit 38c6b54: the op 9.59 ms against the kernel's 9.16 dense; with the
torch pre-pass 12.50; ``benchmarks/results/attention-q8-nvidia-h200.json``).

The codes equal the torch form's wherever K's mean does: both divide with IEEE round-to-nearest
(``div_rn``; Triton's ``/`` on sm_90 is approximate) and round half to even (INT8: the 1.5 x 2^23
trick, exact for the |y| <= 127 here; FP8: the e4m3 cast, ``cvt.rn.satfinite``, after the same
clamp). K's mean comes from ``torch.mean(dtype=float32)`` rather than from a float32 copy, which
may sum in another order: a code can then differ by one step (``tests/test_quantize_q8.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract.quant import FP8, FP8_MAX, INT8_MAX, K_BLOCK, Q_BLOCK, true_div

RNE_SHIFT = tl.constexpr(12582912.0)  # 1.5 x 2^23: (y + c) - c rounds fp32 y to the nearest integer, ties even


@triton.jit
def _quantize_block(x, TOP: tl.constexpr, INT8: tl.constexpr):
    """One 128-row block (float32, invalid rows 0): ``(codes, scale)`` as ``quantize_blocks``."""
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, TOP), 1.0)
    y = tl.math.div_rn(x, scale)
    if INT8:
        codes = tl.minimum(tl.maximum((y + RNE_SHIFT) - RNE_SHIFT, -TOP), TOP).to(tl.int8)
    else:
        codes = tl.minimum(tl.maximum(y, -TOP), TOP).to(tl.float8e4nv)
    return codes, scale


@triton.jit
def _quantize_qkv_kernel(Q, K, V, KMEAN, VSCALE, Q8, K8, VT8, QS, KS,
                         sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                         H, S, NB, VT_PITCH,
                         D: tl.constexpr, BLOCK: tl.constexpr, INT8: tl.constexpr,
                         TOP: tl.constexpr, SMOOTH: tl.constexpr):
    """Program (block, batch x head): Q's and K's codes and scale for 128 rows, V's codes for
    the same rows written transposed (``VT8`` is (B, H, D, VT_PITCH))."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    valid = rows < S
    inside = valid[:, None]
    out_rows = bh.to(tl.int64) * S + rows  # Q8 / K8 are contiguous (B, H, S, D)

    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqs + cols[None, :] * sqd,
                mask=inside, other=0.0).to(tl.float32)
    q8, qs = _quantize_block(q, TOP, INT8)
    tl.store(Q8 + out_rows[:, None] * D + cols[None, :], q8, mask=inside)
    tl.store(QS + bh * NB + blk, qs)

    k = tl.load(K + b.to(tl.int64) * skb + h * skh + rows[:, None] * sks + cols[None, :] * skd,
                mask=inside, other=0.0).to(tl.float32)
    if SMOOTH:  # padded rows stay 0 after smoothing, as the torch form pads after it
        k = tl.where(inside, k - tl.load(KMEAN + bh * D + cols)[None, :], 0.0)
    k8, ks = _quantize_block(k, TOP, INT8)
    tl.store(K8 + out_rows[:, None] * D + cols[None, :], k8, mask=inside)
    tl.store(KS + bh * NB + blk, ks)

    v = tl.load(V + b.to(tl.int64) * svb + h * svh + rows[:, None] * svs + cols[None, :] * svd,
                mask=inside, other=0.0).to(tl.float32)
    y = tl.math.div_rn(v, tl.load(VSCALE + bh * D + cols)[None, :])
    v8 = tl.minimum(tl.maximum(y, -448.0), 448.0).to(tl.float8e4nv)  # FP8_MAX
    tl.store(VT8 + (bh.to(tl.int64) * D + cols[None, :]) * VT_PITCH + rows[:, None], v8,
             mask=inside)


def vt8_shape(B: int, H: int, S: int, D: int) -> tuple[int, int, int, int]:
    """The FP8 V^T buffer's ``(B, H, D, pitch)``: pitch = S rounded up to 16 bytes."""
    return (B, H, D, -(-S // 16) * 16)


def empty_vt8(B: int, H: int, S: int, D: int, device) -> torch.Tensor:
    """The FP8 V^T buffer the kernel reads: ``(B, H, D, pitch)``, pitch = S rounded up to 16
    bytes (TMA needs 16-byte row pitches; S = 32,760, Wan 1.3B, is not one). The padding
    columns are zeros, never read by the kernel: defined values for ``ops.op.quantize_q8``,
    which returns the whole buffer."""
    vt8 = torch.empty(vt8_shape(B, H, S, D), dtype=FP8, device=device)
    vt8[..., S:].zero_()
    return vt8


def quantize_qkv_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, precision: str, *,
                       smooth: bool = True):
    """``(q8, qs, k8, ks, v8, vs)`` as :func:`.launch_q8.quantize_for_kernel` returns them:
    ``q8`` / ``k8`` contiguous ``(B, H, S, D)``, ``v8`` a ``(B, H, S, D)`` view of ``(B, H, D,
    pitch)`` memory (pitch = S rounded up to 16 bytes, for TMA), scales float32 ``(B * H,
    nblocks)`` and ``(B * H, D)``. Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``."""
    if precision not in ("int8", "fp8"):
        raise ValueError(f"quantize_qkv_fused: precision must be 'int8' or 'fp8', got {precision!r}")
    assert Q_BLOCK == K_BLOCK
    B, H, S, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"quantize_qkv_fused: q, k, v must share one (B, H, S, D) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    nb = triton.cdiv(S, Q_BLOCK)
    dev = q.device
    code = torch.int8 if precision == "int8" else FP8
    k_mean = (k.mean(dim=-2, dtype=torch.float32) if smooth
              else torch.zeros(B, H, D, dtype=torch.float32, device=dev))
    # inf-norm over the tokens = amax |v|, in v's dtype: exact, one pass, no |v| copy.
    v_amax = torch.linalg.vector_norm(v, float("inf"), dim=-2).float()
    v_scale = torch.where(v_amax > 0, true_div(v_amax, FP8_MAX), torch.ones_like(v_amax))
    q8 = torch.empty(B, H, S, D, dtype=code, device=dev)
    k8 = torch.empty(B, H, S, D, dtype=code, device=dev)
    vt8 = empty_vt8(B, H, S, D, dev)
    qs = torch.empty(B * H, nb, dtype=torch.float32, device=dev)
    ks = torch.empty(B * H, nb, dtype=torch.float32, device=dev)
    k_mean = k_mean.reshape(B * H, D).contiguous()
    v_scale = v_scale.reshape(B * H, D).contiguous()
    _quantize_qkv_kernel[(nb, B * H)](
        q, k, v, k_mean, v_scale, q8, k8, vt8, qs, ks, *q.stride(), *k.stride(), *v.stride(),
        H, S, nb, vt8.shape[-1], D=D, BLOCK=Q_BLOCK, INT8=precision == "int8",
        TOP=INT8_MAX if precision == "int8" else FP8_MAX, SMOOTH=smooth, num_warps=8)
    return q8, qs, k8, ks, vt8[..., :S].transpose(-1, -2), v_scale
