"""Launching the 8-bit block-sparse kernel: the quantize pre-pass (:mod:`.quantize_q8`),
configurations and the launcher. The math is :mod:`.block_sparse_attention_q8`; the spec
:func:`scaling_attn_compile.contract.quant.quantized_attention_reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import triton

from ..contract.quant import K_BLOCK, Q_BLOCK, check_precision, quantize_qkv
from .block_sparse_attention import LOG2E, MASK_BLOCK
from .block_sparse_attention_q8 import PV_DEFERRED, PV_RUNNING, PV_TWO_LEVEL, _bsa_q8_forward_kernel
from .launch import (
    KernelConfig,
    _ensure_tma_allocator,
    check_energy,
    check_launch,
    launch_meta,
    tuning_tables,
)
from .quantize_q8 import empty_vt8, quantize_qkv_fused

# Candidates: the bf16 kernel's plain configs. The autotuner picks per shape; which won is in
# the bench_attention record (tuned_configs_q8).
CONFIGS_Q8 = [KernelConfig(128, 8, 2), KernelConfig(128, 8, 3), KernelConfig(128, 4, 2),
              KernelConfig(64, 4, 2), KernelConfig(64, 4, 3)]
# K and V^T through TMA at 3 and 4 stages (an 8-bit stage is 32 KiB where bf16's is 64): on an
# H200 (commit 38c6b54, running accumulator) slower than the plain loads, 9.38-9.60 ms against
# 9.17 dense FP8 at Wan 1.3B, so not autotune candidates; a caller may pass one as ``config``.
CONFIGS_Q8_TMA = [KernelConfig(128, 8, 3, use_tma=True), KernelConfig(128, 8, 4, use_tma=True)]
DEFAULT_CONFIG_Q8 = KernelConfig(128, 8, 2)
# the kernel's PV_MODE by name
PV_MODES = {"two-level": PV_TWO_LEVEL.value, "deferred": PV_DEFERRED.value,
            "running": PV_RUNNING.value}
# The exact P.V forms, raced by the autotuner with each config: they add the same fp32 sums in
# the same order (bit-identical outputs: tests/test_kernel_q8.py, passed on an H100), and which
# is faster depends on the config. H100, commit 7b044a5, Wan 1.3B dense
# (benchmarks/results/q8-accumulation-nvidia-h100-80gb-hbm3.json): at 128/8/2 deferred took
# 10.72 / 9.93 ms (INT8 / FP8) where two-level took 11.94 / 11.19; at 64/4/3 8.92 / 9.28 where
# two-level took 9.32 / 8.94. "running" is never raced: it fails the accuracy bound.
PV_EXACT = ("two-level", "deferred")
# With the energy filter only two-level is raced: deferred's pending P.V (64 more fp32 registers
# a thread at 128 rows and 8 warps) on top of the filter's branch spills in sm_90 code (INT8, 3
# stages: 118 LDL / 194 STL, 855 loop instructions against two-level's 645 and no spill;
# Triton 3.6, benchmarks/kernel_sass.py).
PV_EXACT_ENERGY = ("two-level",)


class Q8Choice(NamedTuple):
    """What the 8-bit autotuner picks: a tile config and the P.V accumulation to run it with."""

    config: KernelConfig
    pv: str = "two-level"


def check_pv(pv: str) -> None:
    """``pv`` names a P.V accumulation of :data:`PV_MODES`."""
    if pv not in PV_MODES:
        raise ValueError(f"block-sparse 8-bit kernel: pv must be one of {tuple(PV_MODES)}, "
                         f"got {pv!r}")


def quantize_for_kernel(q, k, v, precision: str, *, smooth: bool = True, impl: str = "triton"):
    """The pre-pass: ``(q8, qs, k8, ks, v8, vs)`` as the kernel reads them. Scales float32,
    contiguous ``(B * H, nblocks)`` / ``(B * H, D)``; ``v8`` is a ``(B, H, S, D)`` view of
    ``(B, H, D, S)`` memory (K-major for the P.V wgmma) with its rows padded to 16 bytes (TMA
    needs 16-byte row pitches, and S = 32,760, Wan 1.3B, is not one).

    ``impl="triton"``: one launch after two torch reductions (:mod:`.quantize_q8`; the torch form
    took 3.6-4.0 ms on an H100 at the Wan 1.3B shape). ``"torch"``: the spec,
    :func:`..contract.quant.quantize_qkv`, laid out the same way. Both give the same codes, but
    for K's mean, summed in another order (a code may differ by one step)."""
    if impl == "triton":
        return quantize_qkv_fused(q, k, v, precision, smooth=smooth)
    if impl != "torch":
        raise ValueError(f"quantize_for_kernel: impl must be 'triton' or 'torch', got {impl!r}")
    B, H, S, D = q.shape
    q8, qs, k8, ks, v8, vs = quantize_qkv(q, k, v, precision, smooth=smooth, k_block=K_BLOCK)
    vt = empty_vt8(B, H, S, D, v8.device)[..., :S]
    vt.copy_(v8.transpose(-1, -2))
    v8 = vt.transpose(-1, -2)
    return (q8, qs.reshape(B * H, -1).contiguous(), k8, ks.reshape(B * H, -1).contiguous(),
            v8, vs.reshape(B * H, D).contiguous())


def block_sparse_attention_q8_forward(q, k, v, masks, level_table, bucket_bounds, timestep, out,
                                      scale: float, precision: str = "int8",
                                      config: tuple | None = None, *, smooth: bool = True,
                                      pv: str | None = None, energy_rule: int = 0,
                                      energy_threshold: float = float("-inf")):
    """8-bit attention into ``out`` (q's shape and dtype). ``precision``: ``"int8"`` or
    ``"fp8"`` (the Q.K^T format; P.V is FP8 either way). ``config`` pins a
    :class:`.launch.KernelConfig` (with ``pv``, default ``"two-level"``); ``None`` autotunes the
    config and the exact P.V form (:data:`PV_EXACT`; :data:`PV_EXACT_ENERGY` with the energy
    filter) on CUDA, or takes the pinned ``pv`` with
    each config (the interpreter takes the defaults). ``energy_rule`` / ``energy_threshold``
    (natural-log units): the energy filter, as :func:`.launch.block_sparse_attention_forward`
    takes it (128-row configs only).
    """
    if check_precision(precision, "block-sparse 8-bit kernel: precision") == "bf16":
        raise ValueError("block-sparse 8-bit kernel: precision must be 'int8' or 'fp8', got "
                         "'bf16'; the bf16 kernel is launch.block_sparse_attention_forward")
    check_launch(q, k, v, masks, level_table, bucket_bounds, timestep, out)
    if pv is not None:  # before the pre-pass, as the energy rule's id
        check_pv(pv)
    check_energy(energy_rule, MASK_BLOCK, "block-sparse 8-bit kernel")
    quant = quantize_for_kernel(q, k, v, precision, smooth=smooth)
    if config is None:
        races = PV_EXACT_ENERGY if energy_rule else PV_EXACT
        config, pv = pick_config_q8(quant, q, masks, level_table, bucket_bounds, timestep, out,
                                    scale, precision, pvs=races if pv is None else (pv,),
                                    energy_rule=energy_rule, energy_threshold=energy_threshold)
    return launch_quantized(quant, q.shape, masks, level_table, bucket_bounds, timestep, out,
                            scale, precision, KernelConfig(*config), pv=pv or "two-level",
                            energy_rule=energy_rule, energy_threshold=energy_threshold)


def launch_quantized(quant, shape, masks, level_table, bucket_bounds, timestep, out, scale,
                     precision, cfg: KernelConfig, *, pv: str = "two-level", energy_rule: int = 0,
                     energy_threshold: float = float("-inf")):
    """Launch on the pre-pass's output ``quant`` (:func:`quantize_for_kernel`) with ``cfg``:
    the kernel alone, as benchmarks time it. ``pv``, the P.V accumulation (:data:`PV_MODES`):
    ``"two-level"`` (each block's added in fp32 at once), ``"deferred"`` (the same sums, each
    added on the next trip so the wgmma stays in flight; bit-identical, faster at some configs:
    :data:`PV_EXACT`) or
    ``"running"`` (into the running accumulator: fails the accuracy bound on an H200, the
    kernel module's comment)."""
    check_pv(pv)
    check_energy(energy_rule, cfg.block_m, "block-sparse 8-bit kernel")
    q8, qs, k8, ks, v8, vs = quant
    B, H, S, D = shape
    ts = timestep.reshape(-1)
    meta = launch_meta(S, masks.shape[-1], bucket_bounds.numel(), D)
    grid = (triton.cdiv(S, cfg.block_m), B * H)
    assert Q_BLOCK == MASK_BLOCK == K_BLOCK  # the kernel indexes scales by 128-token block
    if cfg.use_tma:
        if k8.stride(-1) != 1 or v8.stride(-2) != 1 or (v8.stride(-1) % 16):
            raise ValueError("block-sparse 8-bit kernel: a TMA config needs k8 rows and v8's "
                             "(D, S) rows contiguous with 16-byte pitches (quantize_for_kernel)")
        _ensure_tma_allocator()
    _bsa_q8_forward_kernel[grid](
        q8, k8, v8, qs, ks, vs, masks, level_table, bucket_bounds, ts, out,
        *q8.stride(), *k8.stride(), *v8.stride(), *out.stride(), *masks.stride(),
        *level_table.stride(), 0 if ts.numel() == 1 else ts.stride(0),
        H, S, scale * LOG2E, masks.shape[1], qs.shape[1], ks.shape[1],
        BLOCK_M=cfg.block_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        QK_INT8=precision == "int8", USE_TMA=cfg.use_tma, PV_MODE=PV_MODES[pv],
        ENERGY_RULE=energy_rule, energy_thr=energy_threshold * LOG2E, **meta,
    )
    return out


_TUNED_Q8: dict[tuple, Q8Choice] = {}
TUNING_TIMES_Q8: dict[tuple, dict[Q8Choice, float]] = {}  # ms per choice, for the records


def tuned_configs_q8() -> dict[tuple, tuple[Q8Choice, dict]]:
    """The 8-bit kernel's autotune winners and every config's time, per key (as
    :func:`.launch.tuned_configs` for the bf16 kernel)."""
    return {key: (cfg, dict(TUNING_TIMES_Q8.get(key, {}))) for key, cfg in _TUNED_Q8.items()}


def pick_config_q8(quant, q, masks, level_table, bucket_bounds, timestep, out, scale, precision,
                   pvs: tuple[str, ...] = PV_EXACT, *, energy_rule: int = 0,
                   energy_threshold: float = float("-inf")) -> Q8Choice:
    """Time every :data:`CONFIGS_Q8` config with every P.V form of ``pvs`` once per (shape,
    table shape, precision, pvs, energy rule) on CUDA, on all-blocks tables
    (``launch.tuning_tables``: the choice does not depend on the first call), keep the best (a
    :class:`Q8Choice`). With the energy filter, only the 128-row configs (it decides per
    128-row tile)."""
    bad = [pv for pv in pvs if pv not in PV_MODES]
    if not pvs or bad:
        raise ValueError(f"block-sparse 8-bit kernel: pvs must name P.V forms of "
                         f"{tuple(PV_MODES)}, got {pvs!r}")
    key = (tuple(q.shape), tuple(masks.shape), bucket_bounds.numel(), str(q.device), precision,
           tuple(pvs), energy_rule)
    if q.device.type != "cuda":
        return Q8Choice(DEFAULT_CONFIG_Q8, pvs[0])
    if key not in _TUNED_Q8:
        from triton.testing import do_bench

        masks, level_table = tuning_tables(masks, level_table)
        times = {}
        configs = [c for c in CONFIGS_Q8 if not energy_rule or c.block_m == MASK_BLOCK]
        for choice in (Q8Choice(cfg, pv) for cfg in configs for pv in pvs):
            fn = lambda c=choice: launch_quantized(quant, q.shape, masks, level_table,
                                                   bucket_bounds, timestep, out, scale,
                                                   precision, c.config, pv=c.pv,
                                                   energy_rule=energy_rule,
                                                   energy_threshold=energy_threshold)
            try:
                times[choice] = do_bench(fn, warmup=5, rep=20, return_mode="median")
            except Exception:  # a config that does not fit (shared memory, registers)
                continue
        if not times:
            raise RuntimeError("block-sparse 8-bit kernel: no configuration compiled for shape "
                               f"{tuple(q.shape)} precision {precision}")
        TUNING_TIMES_Q8[key] = times
        _TUNED_Q8[key] = min(times, key=times.get)
    return _TUNED_Q8[key]
