"""The readable 8-bit reference: block-sparse attention with Q.K^T in INT8 or FP8 e4m3 and P.V in
FP8 e4m3 (SageAttention-style), the specification of the 8-bit kernel.

``precision`` is one of :data:`PRECISIONS`:

* ``"bf16"``: no quantization, exactly :func:`.reference.sparse_attention_reference`.
* ``"int8"``: Q.K^T in INT8 (exact integer dot, int32 accumulation), P.V in FP8 e4m3.
* ``"fp8"``: Q.K^T in FP8 e4m3 (fp32 accumulation), P.V in FP8 e4m3.

The steps, for one batch element and head (``S`` tokens, head dim ``D``):

1. **Smooth K** (``smooth=True``): ``k' = k - mean_j k_j``, the mean per channel over the ``S``
   tokens. It leaves the softmax unchanged: ``q_i . k'_j = q_i . k_j - q_i . mean(k)``, and the
   subtracted term is the same for every key ``j`` of query row ``i`` (kept or not), and softmax
   is invariant to a per-row shift. What it buys: DiT keys carry a large shared offset per channel
   (outlier channels); removed, the per-block scale no longer spends the 8-bit range on it.
2. **Quantize Q and K per block**: one float32 scale per 128 query rows and per ``k_block``
   key rows (default 128), ``scale = amax(|x_block|) / 127`` (INT8, round to nearest, clamp to
   +-127) or ``/ 448`` (FP8 e4m3, the cast rounds to nearest even). Why 128 for K: it is the mask
   block and the kernel's ``BLOCK_N``, so each visited KV block needs one scalar scale, one
   multiply on its score tile; 64 would need two scales per tile and measured no better (see
   "Error bound" below).
3. **Scores** ``s_ij = (q8_i . k8_j) * sq[i // 128] * sk[j // k_block] * scale``, masked exactly
   as :func:`.reference.block_masks_for` says (levels clamped, stray bits ignored, diagonal on).
4. **P.V in FP8**: ``p_ij = exp(s_ij - max_j s_ij)`` in [0, 1] is cast to e4m3 after multiplying
   by 448 (a static scale: the largest p uses the top of e4m3's range, SageAttention2's choice);
   V is cast per channel, ``sv[d] = amax_j |v_jd| / 448``. ``out_i = (sum_j p8_ij v8_jd) * sv[d] /
   (448 * l_i)`` with ``l_i = sum_j p_ij`` from the unrounded ``p`` (float32 accumulation).

The kernel rounds ``p`` against the running row max of its online softmax, not the final one;
the difference is one more rounding of the same size, covered by the kernel tests' tolerance rule
(kernel error vs float64 within k x this reference's error).

Error bound (tested against the float64 unquantized reference, ``tests/test_quant.py``): the
relative L2 error of the output, ``|out - gold| / |gold|``, is at most
``QUANT_ERROR_BOUND["int8"] = 0.06`` for INT8 Q.K^T (K smoothed) on every input family tested,
and ``QUANT_ERROR_BOUND["fp8"] = 0.08`` for FP8 Q.K^T on Gaussian and outlier-channel inputs
only. Where the numbers come from (``benchmarks/results/q8-accuracy-cpu.json``, made by
``python benchmarks/bench_quant_accuracy.py``; S = 1,024-2,048, head dim 64, dense and density
0.35 masks; max rel-L2 vs float64):

| input                                     | int8 | fp8  | note                                |
|-------------------------------------------|------|------|-------------------------------------|
| small-wan q/k/v, 8 layers x 3 steps       | 2.4% | 7.4% | trained weights, 2,048 tokens       |
| Gaussian N(0, 1)                          | 3.9% | 5.4% | diffuse: FP8 P.V's worst case       |
| outlier channels (small-wan-like offsets) | 0.6% | 0.6% | ``testing.make_outlier_qkv``        |
| outlier channels x3 ("stress")            | 3.1% | 11%  | without smoothing: 5.0% and 43%     |
| sharp attention (logits ~36)              | 4.1% | 15%  | ``make_local_qkv``: fp8 unbounded   |

Why those sizes: an e4m3 rounding has a relative error of at most 2^-4 and about 2.2% on average
(values spread over a binade; measured with torch's cast), so P.V, which sums independent
roundings of P and of V, costs ~1-3% wherever the output is an average of many values. INT8
Q.K^T with a per-block scale has an absolute step of ``amax / 127``, finer than e4m3's
relative step for the large elements that decide the scores (Gaussian: 1.3% vs 4.0% with P.V
unquantized), so INT8 is the more accurate Q.K^T
format at the same Hopper tensor-core rate (both 8-bit wgmma); FP8's score error grows with the
logits and has no bound for sharp attention. INT8 is therefore the recommended ``precision``.
Smoothing K changes little on small-wan (2.36% vs 2.34% for INT8) and much on strong offsets
(stress: 3.1% vs 5.0% INT8, 11% vs 43% FP8). K blocks of 64 instead of 128 and smoothing V
(``smooth_v``) moved small-wan's max by under 0.1 point.
"""

from __future__ import annotations

import torch

from .masks import BLOCK
from .reference import (
    block_masks_for,
    energy_filtered_attention_reference,
    sparse_attention_reference,
)

PRECISIONS = ("bf16", "fp8", "int8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
INT8_MAX = 127.0  # symmetric range: -128 is never produced
P_SCALE = FP8_MAX  # p in [0, 1] is stored as p * 448 in e4m3
Q_BLOCK = BLOCK  # query rows per scale: the kernel's 128-row tile
K_BLOCK = BLOCK  # key rows per scale: the mask block, one scalar per visited KV block
# rel-L2 vs the float64 unquantized output, per Q.K^T format (numbers in the module doc). FP8's
# holds only where the scores are moderate (Gaussian, outlier-channel inputs), not for sharp
# attention: on make_local_qkv (scores ~36 in logits) FP8 Q.K^T measured 13-15%, INT8 3.7-4.1%.
QUANT_ERROR_BOUND = {"int8": 0.06, "fp8": 0.08}


def check_precision(precision: str, where: str = "precision") -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else one clear ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"{where} must be one of {PRECISIONS}, got {precision!r}; "
                         "bf16 is the unquantized default, fp8/int8 the 8-bit attention")
    return precision


def true_div(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x / c`` rounded once, on every device: torch's CUDA division by a Python number
    multiplies by its reciprocal (two roundings; seen on an H200: scales 1 ulp off the CPU's and
    the kernel pre-pass's ``div_rn``), a division by a tensor does not."""
    return x / torch.full((), c, dtype=x.dtype, device=x.device)


def smooth_k(k: torch.Tensor) -> torch.Tensor:
    """``k`` minus its per-channel mean over the tokens: ``(B, H, S, D)`` -> float32, same shape.

    Leaves ``softmax(q k^T)`` unchanged (a per-row shift of the scores), see the module doc.
    """
    kf = k.float()
    return kf - kf.mean(dim=-2, keepdim=True)


def quantize_blocks(x: torch.Tensor, block: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block symmetric quantization of ``x`` ``(B, H, S, D)`` over groups of ``block`` rows.

    Returns ``(x8, scales)``: ``x8`` ``(B, H, S, D)`` int8 (``kind="int8"``) or float8_e4m3fn
    (``kind="fp8"``), ``scales`` float32 ``(B, H, ceil(S / block))`` with
    ``x ~= x8 * scales[..., row // block]``. An all-zero block gets scale 1 (its codes are 0).
    """
    B, H, S, D = x.shape
    nb = -(-S // block)
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block - S)).view(B, H, nb, block, D)
    amax = xf.abs().amax(dim=(-2, -1))
    top = INT8_MAX if kind == "int8" else FP8_MAX
    scales = torch.where(amax > 0, true_div(amax, top), torch.ones_like(amax))
    y = (xf / scales[..., None, None]).reshape(B, H, nb * block, D)[:, :, :S]
    if kind == "int8":
        return y.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scales
    if kind == "fp8":
        return y.clamp(-FP8_MAX, FP8_MAX).to(FP8), scales
    raise ValueError(f"quantize_blocks: kind must be 'int8' or 'fp8', got {kind!r}")


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 e4m3 quantization of ``v`` ``(B, H, S, D)``: ``(v8, scales)`` with
    ``scales`` float32 ``(B, H, D)`` = amax over the tokens / 448 (1 for an all-zero channel)."""
    amax = v.float().abs().amax(dim=-2)
    scales = torch.where(amax > 0, true_div(amax, FP8_MAX), torch.ones_like(amax))
    return (v.float() / scales[..., None, :]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def dequantize_blocks(x8: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """``x8 * scales[..., row // block]`` in float64: ``(B, H, S, D)``."""
    rows = torch.arange(x8.shape[-2], device=x8.device) // block
    return x8.double() * scales.double()[..., rows, None]


def quantize_qkv(q, k, v, precision: str, *, smooth: bool = True, k_block: int = K_BLOCK):
    """The kernel's inputs for ``precision`` ``"int8"``/``"fp8"``: ``(q8, sq, k8, sk, v8, sv)``,
    shapes as :func:`quantize_blocks` / :func:`quantize_v` say (K smoothed first if ``smooth``)."""
    kind = check_precision(precision)
    if kind == "bf16":
        raise ValueError("quantize_qkv: precision must be 'int8' or 'fp8' (bf16 is not quantized)")
    q8, sq = quantize_blocks(q, Q_BLOCK, kind)
    k8, sk = quantize_blocks(smooth_k(k) if smooth else k, k_block, kind)
    v8, sv = quantize_v(v)
    return q8, sq, k8, sk, v8, sv


def quantized_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  masks: torch.Tensor, level_table: torch.Tensor,
                                  bucket_bounds: torch.Tensor, timestep: torch.Tensor,
                                  scale: float | None = None, *, precision: str = "fp8",
                                  smooth: bool = True, smooth_v: bool = False,
                                  k_block: int = K_BLOCK, quantize_pv: bool = True,
                                  max_chunk_elements: int = 2**26, energy_rule: int = 0,
                                  energy_threshold: float = float("-inf")) -> torch.Tensor:
    """Block-sparse attention with 8-bit Q.K^T and P.V, written for clarity (see the module doc).

    Args:
        q, k, v: ``(B, H, S, D)``; tables as :func:`.reference.sparse_attention_reference`.
        precision: ``"bf16"`` (unquantized), ``"int8"`` or ``"fp8"`` (the Q.K^T format).
        smooth: subtract K's per-channel token mean first (does not change the softmax).
        k_block: key rows per K scale (128 or 64; 128 is the kernel's).
        quantize_pv: ``False`` keeps P.V unquantized (isolates the Q.K^T error; measurements).
        energy_rule, energy_threshold: the online energy filter
            (:func:`.reference.energy_filtered_attention_reference`'s rule and natural-log
            threshold), decided on the dequantized scores in its visit order; the blocks it
            skips are then dropped from the mask. ``precision="bf16"`` takes it too.

    Returns:
        ``(B, H, S, D)`` in ``q.dtype``. The quantized products are exact in float64 here; the
        kernel's float32 accumulation adds one float32 rounding.
    """
    B, H, S, D = q.shape
    scale = D**-0.5 if scale is None else scale
    if check_precision(precision) == "bf16":
        if energy_rule:
            blocks = block_masks_for(masks, level_table, bucket_bounds, timestep, B, S)
            return energy_filtered_attention_reference(q, k, v, blocks, scale, energy_rule,
                                                       energy_threshold).to(q.dtype)
        return sparse_attention_reference(q, k, v, masks, level_table, bucket_bounds, timestep,
                                          scale, max_chunk_elements=max_chunk_elements)
    v_mean = v.double().mean(-2, keepdim=True) if smooth_v else torch.zeros_like(v[..., :1, :],
                                                                                 dtype=torch.float64)
    q8, sq, k8, sk, v8, sv = quantize_qkv(q, k, (v.double() - v_mean).float(), precision,
                                          smooth=smooth, k_block=k_block)
    qd = dequantize_blocks(q8, sq, Q_BLOCK)
    kd = dequantize_blocks(k8, sk, k_block)
    blocks = block_masks_for(masks, level_table, bucket_bounds, timestep, B, S)  # (B,H,NB,NB)
    if energy_rule:
        blocks = blocks & ~energy_skips(qd, kd, blocks, scale, energy_rule, energy_threshold)
    if quantize_pv:
        vd = v8.double()
    else:
        vd, sv = v.double() - v_mean, torch.ones_like(sv)
    out = torch.empty(B, H, S, D, dtype=torch.float64, device=q.device)
    rows = max(BLOCK, (max_chunk_elements // max(1, B * H * S)) // BLOCK * BLOCK)
    kblk = torch.arange(S, device=q.device) // BLOCK
    for start in range(0, S, rows):
        stop = min(S, start + rows)
        scores = torch.einsum("bhqd,bhkd->bhqk", qd[:, :, start:stop], kd) * scale
        keep = blocks[:, :, torch.arange(start, stop, device=q.device) // BLOCK][..., kblk]
        scores = scores.masked_fill(~keep, float("-inf"))
        p = torch.exp(scores - scores.amax(-1, keepdim=True))  # (B, H, rows, S) in [0, 1]
        l_ = p.sum(-1, keepdim=True)
        if quantize_pv:
            p = (p.float() * P_SCALE).to(FP8).double() / P_SCALE
        out[:, :, start:stop] = torch.einsum("bhqk,bhkd->bhqd", p, vd) / l_
    return (out * sv.double()[..., None, :] + v_mean).to(q.dtype)


def energy_skips(qd: torch.Tensor, kd: torch.Tensor, blocks: torch.Tensor, scale: float,
                 rule: int, threshold: float) -> torch.Tensor:
    """The blocks the online energy filter skips, decided on the dequantized (and, as the kernel
    does, smoothed) ``qd`` / ``kd`` in float64: boolean ``(B, H, NB, NB)``. The decisions are
    :func:`.reference.energy_filtered_attention_reference`'s (its visit order and rule); V does
    not enter them."""
    _, skipped = energy_filtered_attention_reference(
        qd.double(), kd.double(), torch.zeros_like(qd, dtype=torch.float64), blocks, scale, rule,
        threshold, return_skipped=True)
    return skipped


def quantized_energy_skips(q: torch.Tensor, k: torch.Tensor, blocks: torch.Tensor,
                           precision: str, scale: float, rule: int, threshold: float, *,
                           smooth: bool = True, k_block: int = K_BLOCK) -> torch.Tensor:
    """:func:`energy_skips` on ``q`` / ``k`` quantized as :func:`quantized_attention_reference`
    quantizes them: the blocks its ``energy_rule`` drops (tests build their float64 oracle on
    the kept rest)."""
    kind = check_precision(precision)
    if kind == "bf16":
        raise ValueError("quantized_energy_skips: precision must be 'int8' or 'fp8'")
    q8, sq = quantize_blocks(q, Q_BLOCK, kind)
    k8, sk = quantize_blocks(smooth_k(k) if smooth else k, k_block, kind)
    return energy_skips(dequantize_blocks(q8, sq, Q_BLOCK), dequantize_blocks(k8, sk, k_block),
                        blocks, scale, rule, threshold)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``|x - ref| / |ref|`` over all elements, in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()
