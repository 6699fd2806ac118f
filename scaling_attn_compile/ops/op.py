"""The block-sparse attention op: ``torch.ops.scaling_attn.sparse_attention``.

``sparse_attention(q, k, v, masks, level_table, bucket_bounds, timestep, scale) -> out``

* ``q, k, v``: ``(B, H, S, D)``, fp16/bf16 (fp32 too on the CPU reference and the interpreter);
  any strides with a contiguous last dim, e.g. the ``(B, H, S, D)`` views of ``(B, S, H, D)``
  memory that diffusers passes to SDPA.
* ``masks`` int32 ``(H, L, NB, W)``, ``level_table`` int32 ``(NT, H)``, ``bucket_bounds`` float32
  ``(NT - 1,)``: one layer's tables, format in :mod:`scaling_attn_compile.contract.masks`.
* ``timestep``: ``(B,)`` or ``()``; picks each batch element's density level on the device
  (no ``.item()``, no host sync, so CUDA graphs can capture it).
* ``scale``: the softmax scale (``1 / sqrt(D)`` for SDPA's default).
* ``energy_rule``, ``energy_threshold``: the online filter inside the kernel, off by default
  (0 off, 1 cumulative energy / DynSparse, 2 BLASST; threshold in natural-log units, see
  :func:`scaling_attn_compile.contract.reference.energy_filtered_attention_reference`).
* ``kv_lens``: optional int32 ``(B,)``: keys at index ``>= kv_lens[b]`` are dropped for every
  query row of batch element ``b`` (a key-padding prefix mask, e.g. HunyuanVideo's padded text;
  clamped to ``[0, S]``; a row with no kept key gives zeros). ``None``: every key.
* ``launch_order``: optional int32 ``(NT, H * NB)``: the order in which the kernel's programs
  take the (head, query block) rows, per bucket, longest first
  (:func:`scaling_attn_compile.contract.masks.launch_order`; the backend builds it). A schedule:
  the output is the same for any permutation; the CPU path ignores it.
* ``out``: same shape, dtype and strides as ``q``.

Semantics: :func:`scaling_attn_compile.contract.reference.sparse_attention_reference`. On CUDA the op
runs FlashAttention-4's block-sparse forward where it is installed and can express the call
(``ops/fa4_op.fa4_eager_refusal``: sm90, fp16/bf16, D <= 128, no energy filter, key lengths or
launch order; ``SCALING_ATTN_FA4=0`` turns it off), else the Triton kernel in ``kernels/``; on
the CPU it runs
:func:`scaling_attn_compile.kernels.block_gather_cpu.block_sparse_attention_cpu` (the reference's
semantics, computing only the kept blocks; the energy filter runs its reference).

Table *values* are not checked per call (that would need a host sync in compiled code); every
value has a defined behaviour instead (``reference.py``): levels are clamped to ``[0, L)``,
mask bits past the last block are ignored, a NaN timestep falls in bucket 0. Tables the backend
builds are valid by construction (checked when the plan is bound). For hand-made tables, call
:func:`check_tables` once, or set ``SCALING_ATTN_CHECK_TABLES=1`` to make every eager call of
the op run it (a host sync per call on CUDA: for debugging).

Float64 q/k/v run on the CPU only (the reference, computed in float64); the kernel takes fp16
and bf16, and fp32 in Triton's interpreter.
"""

from __future__ import annotations

import math
import os

import torch

from ..contract.quant import Q_BLOCK, check_precision, quantized_attention_reference
from ..contract.reference import (
    block_masks_for,
    energy_filtered_attention_reference,
)
from ..contract.validate import (
    check_tables,
    validate_energy,
    validate_inputs,
    validate_kernel_inputs,
    validate_kv_lens,
    validate_launch_order,
)
from ..kernels.block_gather_cpu import block_sparse_attention_cpu
from .fa4_op import fa4_attention, fa4_eager_refusal

CHECK_TABLES_ENV = "SCALING_ATTN_CHECK_TABLES"  # "1": every eager op call runs check_tables


@torch.library.custom_op("scaling_attn::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor,
                     level_table: torch.Tensor, bucket_bounds: torch.Tensor,
                     timestep: torch.Tensor, scale: float, energy_rule: int = 0,
                     energy_threshold: float = 0.0,
                     kv_lens: torch.Tensor | None = None,
                     launch_order: torch.Tensor | None = None) -> torch.Tensor:
    validate_inputs(q, k, v, masks, level_table, bucket_bounds, timestep)
    validate_energy(energy_rule, energy_threshold)
    validate_kv_lens(kv_lens, q)
    validate_launch_order(launch_order, q, bucket_bounds)
    if os.environ.get(CHECK_TABLES_ENV) == "1":
        check_tables(masks, level_table, bucket_bounds, q.shape[2], timestep,
                     launch_order=launch_order)
    if fa4_eager_refusal(q, k, v, energy_rule, kv_lens, launch_order) is None:  # never on CPU
        return fa4_attention(q, k, v, masks, level_table, bucket_bounds, timestep, scale)
    out = torch.empty_like(q)  # same strides as q, as the fake promises
    if q.is_cuda:
        validate_kernel_inputs(q)
        from ..kernels.launch import block_sparse_attention_forward

        return block_sparse_attention_forward(q, k, v, masks, level_table, bucket_bounds,
                                              timestep, out, scale, energy_rule=energy_rule,
                                              energy_threshold=energy_threshold,
                                              kv_lens=kv_lens, launch_order=launch_order)
    if energy_rule:
        blocks = block_masks_for(masks, level_table, bucket_bounds, timestep, q.shape[0],
                                 q.shape[2])
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        return out.copy_(energy_filtered_attention_reference(
            q, k, v, blocks, scale, energy_rule, energy_threshold, compute_dtype=compute,
            kv_lens=kv_lens))
    blocks = block_masks_for(masks, level_table, bucket_bounds, timestep, q.shape[0], q.shape[2])
    return out.copy_(block_sparse_attention_cpu(q, k, v, blocks, scale, kv_lens=kv_lens))


@sparse_attention.register_fake
def _(q, k, v, masks, level_table, bucket_bounds, timestep, scale, energy_rule=0,
      energy_threshold=0.0, kv_lens=None, launch_order=None):
    validate_inputs(q, k, v, masks, level_table, bucket_bounds, timestep)
    validate_energy(energy_rule, energy_threshold)
    validate_kv_lens(kv_lens, q)
    validate_launch_order(launch_order, q, bucket_bounds)
    return torch.empty_like(q)


@torch.library.custom_op("scaling_attn::sparse_attention_q8", mutates_args=())
def sparse_attention_q8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor,
                        level_table: torch.Tensor, bucket_bounds: torch.Tensor,
                        timestep: torch.Tensor, scale: float, precision: str,
                        energy_rule: int = 0, energy_threshold: float = 0.0) -> torch.Tensor:
    """8-bit block-sparse attention (``precision`` ``"int8"`` or ``"fp8"``: the Q.K^T format;
    P.V in FP8), spec :func:`scaling_attn_compile.contract.quant.quantized_attention_reference`,
    with the energy filter as :func:`sparse_attention` takes it. CUDA launches the 8-bit kernel,
    the CPU runs the reference. Compiled on CUDA, Inductor lowers it to :func:`quantize_q8` (an
    extern call) and the 8-bit Triton template (``compile/lowering``)."""
    _check_q8(q, k, v, masks, level_table, bucket_bounds, timestep, precision, energy_rule,
              energy_threshold)
    out = torch.empty_like(q)
    if q.is_cuda:
        validate_kernel_inputs(q)
        from ..kernels.launch_q8 import block_sparse_attention_q8_forward

        return block_sparse_attention_q8_forward(q, k, v, masks, level_table, bucket_bounds,
                                                 timestep, out, scale, precision,
                                                 energy_rule=energy_rule,
                                                 energy_threshold=energy_threshold)
    return out.copy_(quantized_attention_reference(q, k, v, masks, level_table, bucket_bounds,
                                                   timestep, scale, precision=precision,
                                                   energy_rule=energy_rule,
                                                   energy_threshold=energy_threshold))


@sparse_attention_q8.register_fake
def _(q, k, v, masks, level_table, bucket_bounds, timestep, scale, precision, energy_rule=0,
      energy_threshold=0.0):
    _check_q8(q, k, v, masks, level_table, bucket_bounds, timestep, precision, energy_rule,
              energy_threshold)
    return torch.empty_like(q)


@torch.library.custom_op("scaling_attn::quantize_q8", mutates_args=())
def quantize_q8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor, torch.Tensor]:
    """The 8-bit kernel's quantize pre-pass as a compiled graph runs it before the 8-bit
    template: ``(q8, qs, k8, ks, vt8, vs)``. ``q8`` / ``k8`` ``(B, H, S, D)`` codes (K smoothed
    by its per-channel mean), ``qs`` / ``ks`` float32 ``(B * H, ceil(S / 128))`` block scales,
    ``vt8`` FP8 V^T in ``(B, H, D, pitch)`` memory (pitch = S rounded up to 16 bytes, for TMA),
    ``vs`` float32 ``(B * H, D)`` V scales. CUDA: one Triton launch
    (``kernels/quantize_q8``); the CPU: the spec (``contract/quant.quantize_qkv``)."""
    _check_quantize_precision(precision)
    from ..kernels.launch_q8 import quantize_for_kernel
    from ..kernels.quantize_q8 import vt8_shape

    q8, qs, k8, ks, v8, vs = quantize_for_kernel(q, k, v, precision,
                                                 impl="triton" if q.is_cuda else "torch")
    # v8 is a (B, H, S, D) view of (B, H, D, pitch) memory (kernels/quantize_q8.empty_vt8):
    # return that whole buffer, which is what the template reads
    shape = vt8_shape(*q.shape)
    vt8 = v8.as_strided(shape, (shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1),
                        v8.storage_offset())
    return q8, qs, k8, ks, vt8, vs


def _check_quantize_precision(precision: str) -> None:
    if check_precision(precision, "quantize_q8: precision") == "bf16":
        raise ValueError("quantize_q8: precision must be 'int8' or 'fp8', got 'bf16'")


@quantize_q8.register_fake
def _(q, k, v, precision):
    from ..kernels.quantize_q8 import vt8_shape

    _check_quantize_precision(precision)
    B, H, S, D = q.shape
    nb = -(-S // Q_BLOCK)
    code = torch.int8 if precision == "int8" else torch.float8_e4m3fn
    f32 = dict(dtype=torch.float32, device=q.device)
    return (q.new_empty(q.shape, dtype=code), q.new_empty((B * H, nb), **f32),
            q.new_empty(q.shape, dtype=code), q.new_empty((B * H, nb), **f32),
            q.new_empty(vt8_shape(B, H, S, D), dtype=torch.float8_e4m3fn),
            q.new_empty((B * H, D), **f32))


def _check_q8(q, k, v, masks, level_table, bucket_bounds, timestep, precision, energy_rule,
              energy_threshold):
    validate_inputs(q, k, v, masks, level_table, bucket_bounds, timestep)
    validate_energy(energy_rule, energy_threshold)
    if check_precision(precision, "sparse_attention_q8: precision") == "bf16":
        raise ValueError("sparse_attention_q8: precision must be 'int8' or 'fp8', got 'bf16'; "
                         "bf16 is torch.ops.scaling_attn.sparse_attention")


def lambda_from_recall(recall_budget: float, seq_len: int, block: int = 128) -> float:
    """DynSparse's threshold from a recall target: ``ln(P_real) + ln(Bc / L)``.

    A skipped block's mass is at most ``Bc * exp(lambda)`` times the kept mass, so over the
    ``L / Bc`` blocks of a row the dropped-to-kept ratio stays under ``Bc * P_real``
    (``P_real`` is the paper's tuned knob, not a probability: it used 1.46 on Wan2.2-14B).
    """
    if not recall_budget > 0:
        raise ValueError(f"lambda_from_recall: recall_budget (P_real) must be > 0, got {recall_budget}")
    return math.log(recall_budget) + math.log(block / seq_len)
