"""Launching the block-sparse kernel: tile configurations, host-side checks, the launcher and
the autotune cache. The kernel's math is :mod:`.block_sparse_attention`.

:func:`pick_config` benchmarks :data:`CONFIGS` once per (shape, dtype, table shape, filter) key
on all-blocks tables (:func:`tuning_tables`), so the choice does not depend on the first call;
:func:`tuned_configs` hands the winners (and their timings) to benchmark records.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton

from ..contract.masks import ENERGY_RULES  # the rule ids the kernel's ENERGY_RULE constexpr takes
from ..contract.validate import validate_kernel_inputs
from .block_sparse_attention import LOG2E, MASK_BLOCK, _bsa_forward_kernel


class KernelConfig(NamedTuple):
    """One tile configuration of the kernel."""

    block_m: int
    num_warps: int
    num_stages: int
    use_tma: bool = False  # K/V through device-side tensor descriptors (Hopper TMA)
    warp_specialize: bool = False


# Tile configurations tried by the eager launcher's autotuner and by the Inductor template's
# (the template takes the TMA ones where K/V suit TMA on sm90+, none with warp specialisation:
# compile/lowering.py, template_configs). K/V through TMA at 3 stages was the fastest variant
# on the H100 (benchmarks/results/variants-nvidia-h100-80gb-hbm3.json: 520 vs 491 TFLOP/s dense,
# 503 vs 451 at density 0.25, bit-identical output); 4 stages need 288 KiB of shared memory.
CONFIGS = [KernelConfig(128, 8, 2), KernelConfig(128, 8, 3), KernelConfig(128, 4, 2),
           KernelConfig(64, 4, 2), KernelConfig(64, 4, 3), KernelConfig(128, 8, 3, use_tma=True)]


# A single config for the interpreter and for tests that should not autotune.
DEFAULT_CONFIG = KernelConfig(128, 8, 2)


# "1" / "true" / "on" / "yes": the backend binds each layer a longest-first launch order
# (contract/masks.launch_order). Off by default until a GPU shows it pays: a CPU model of the
# scheduler (benchmarks/launch_order_sim.py) predicts at most 2-3% at Wan 1.3B, <0.5% at 14B.
LAUNCH_ORDER_ENV = "SCALING_ATTN_LAUNCH_ORDER"


def launch_order_enabled() -> bool:
    """Whether the backend builds a launch order for the op (``SCALING_ATTN_LAUNCH_ORDER=1``)."""
    return os.environ.get(LAUNCH_ORDER_ENV, "0").strip().lower() in ("1", "true", "on", "yes")


def _pow2(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(n)


# The mask row's word vector is padded to 32 words, one per lane of a warp. Measured on an H200
# (benchmarks/kernel_shapes.py --words-only, triton 3.6, S = 32,760, 8 words, dense): padded to
# 8 / 16 / 32 / 64 words the TMA config ran at 513 / 509 / 575 / 519 TFLOP/s, the plain config at
# 480 / 475 / 503 / 473, output bit-identical. Only 32 is fast; why is not established (the
# local sm_90 compile shows the same loop structure). Above 1,024 blocks (S > 131,072) the
# vector needs 64 words, which was slow at S = 32,760: measure before relying on such lengths.
MIN_WORDS_P2 = 32


def launch_meta(seq_len: int, num_words: int, num_bounds: int, head_dim: int) -> dict:
    """Compile-time constants shared by the eager launch and the Inductor template."""
    return dict(NUM_WORDS=num_words, NUM_WORDS_P2=max(MIN_WORDS_P2, _pow2(num_words)),
                NUM_BOUNDS=num_bounds,
                BOUNDS_P2=_pow2(num_bounds), BLOCK_N=MASK_BLOCK, HEAD_DIM=head_dim,
                EVEN_S=seq_len % MASK_BLOCK == 0)


def check_energy(energy_rule: int, block_m: int, where: str) -> None:
    """The energy filter's rule id is one the kernels know, and the config's query tile is the
    128-row mask block it decides for (both kernels: bf16 and 8-bit)."""
    if energy_rule not in ENERGY_RULES.values():
        raise ValueError(f"{where}: energy_rule must be one of {ENERGY_RULES}, got {energy_rule}")
    if energy_rule and block_m != MASK_BLOCK:
        raise ValueError(f"{where}: the energy filter decides per 128-row query tile; config "
                         f"block_m must be 128, got {block_m}")


def block_sparse_attention_forward(q, k, v, masks, level_table, bucket_bounds, timestep, out,
                                   scale: float, config: tuple | None = None, *,
                                   energy_rule: int = 0, energy_threshold: float = float("-inf"),
                                   skipped=None, kv_lens=None, launch_order=None):
    """Launch the kernel, writing into ``out`` (same shape as ``q``). Inputs are validated by the op.

    ``config`` pins a :class:`KernelConfig` (or a tuple of its fields); ``None`` autotunes.
    ``energy_rule`` (0 off, 1 cumulative energy, 2 BLASST) with ``energy_threshold`` in natural-log
    units turns on the online filter; it decides per 128-row query tile, so it needs BLOCK_M 128.
    ``skipped``, an int32 tensor of ``B * H * ceil(S / BLOCK_M)`` elements, receives the number
    of blocks each program skipped. ``kv_lens`` (int32 ``(B,)``, optional): keys at index
    ``>= kv_lens[b]`` are masked for batch element ``b`` (see ``contract/reference.py``).
    ``launch_order`` (int32 ``(NT, H * NB)``, optional, ``contract/masks.launch_order``): which
    (head, query block) each program takes, per bucket; the output does not depend on it.
    """
    check_launch(q, k, v, masks, level_table, bucket_bounds, timestep, out, kv_lens,
                 launch_order)
    B, H, S, D = q.shape
    ts = timestep.reshape(-1)
    stride_ts = 0 if ts.numel() == 1 else ts.stride(0)
    meta = launch_meta(S, masks.shape[-1], bucket_bounds.numel(), D)
    cfg = KernelConfig(*(config or pick_config(q, k, v, masks, level_table, bucket_bounds, ts,
                                               out, scale, energy_rule, kv_lens, launch_order)))
    check_energy(energy_rule, cfg.block_m, "block-sparse kernel")
    if cfg.use_tma:
        if k.stride(-1) != 1 or v.stride(-1) != 1:
            raise ValueError("block-sparse kernel: a TMA config reads K/V rows as contiguous; "
                             f"k and v need a last-dim stride of 1, got {k.stride(-1)} and "
                             f"{v.stride(-1)}; pass .contiguous() tensors or a non-TMA config")
        _ensure_tma_allocator()
    grid = (program_rows(S, cfg.block_m), B * H)
    if skipped is not None and skipped.numel() != grid[0] * grid[1]:
        raise ValueError(f"block-sparse kernel: skipped must have {grid[0] * grid[1]} elements "
                         f"(B * H * program_rows(S, {cfg.block_m})), got {skipped.numel()}")
    _bsa_forward_kernel[grid](
        q, k, v, masks, level_table, bucket_bounds, ts, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *masks.stride(),
        *level_table.stride(), stride_ts,
        H, S, scale * LOG2E, masks.shape[1],
        BLOCK_M=cfg.block_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        USE_TMA=cfg.use_tma, WARP_SPECIALIZE=cfg.warp_specialize,
        ENERGY_RULE=energy_rule, energy_thr=energy_threshold * LOG2E,
        SKIPPED=skipped, WRITE_SKIPPED=skipped is not None,
        KV_LENS=kv_lens, HAS_KV_LENS=kv_lens is not None,
        LAUNCH_ORDER=launch_order, HAS_LAUNCH_ORDER=launch_order is not None,
        stride_lo_t=0 if launch_order is None else launch_order.stride(0), **meta,
    )
    return out


def program_rows(seq_len: int, block_m: int) -> int:
    """Programs per (batch, head): whole 128-row mask blocks of ``block_m``-row tiles. With
    ``block_m`` 64 and ``S % 128`` in (0, 64] the last one is all padding (stores nothing); it
    is there because a launch order may hand any query block's second tile to any slot."""
    return triton.cdiv(seq_len, MASK_BLOCK) * (MASK_BLOCK // block_m)


def check_launch(q, k, v, masks, level_table, bucket_bounds, timestep, out,
                 kv_lens=None, launch_order=None) -> None:
    """Host-side checks of what the kernel indexes with (shapes, dtypes, devices; no values, so
    no device sync): with these, no table *value* can make the kernel read out of bounds (levels
    are clamped, bits past the last block ignored, the bucket is at most ``NT - 1``)."""
    def need(cond, msg):
        if not cond:
            raise ValueError(f"block-sparse kernel: {msg}")

    need(q.dim() == 4, f"q must be (B, H, S, D), got shape {tuple(q.shape)}")
    B, H, S, D = q.shape
    for name, t in (("k", k), ("v", v), ("out", out)):
        need(t.shape == q.shape, f"{name} must have q's shape {tuple(q.shape)}, got "
                                 f"{tuple(t.shape)}")
    validate_kernel_inputs(q, interpret=not q.is_cuda)  # dtype (no bf16 interpreted), head dim
    nb = triton.cdiv(S, MASK_BLOCK)
    need(masks.dtype == torch.int32 and masks.dim() == 4 and masks.shape[0] >= H
         and masks.shape[1] >= 1 and masks.shape[2] >= nb and masks.shape[3] >= triton.cdiv(nb, 32),
         f"masks must be int32 (H>={H}, L>=1, NB>={nb}, W>={triton.cdiv(nb, 32)}) for S={S}, got "
         f"{masks.dtype} {tuple(masks.shape)}; materialise the tables for this sequence length")
    need(bucket_bounds.dtype == torch.float32 and bucket_bounds.dim() == 1,
         f"bucket_bounds must be float32 (NT - 1,), got {bucket_bounds.dtype} "
         f"{tuple(bucket_bounds.shape)}; cast it with .float()")
    nt = bucket_bounds.numel() + 1
    need(level_table.dtype == torch.int32 and level_table.dim() == 2
         and level_table.shape[0] >= nt and level_table.shape[1] >= H,
         f"level_table must be int32 (NT>={nt}, H>={H}), got {level_table.dtype} "
         f"{tuple(level_table.shape)}; one row per timestep bucket, one column per head")
    need(timestep.numel() in (1, B), f"timestep must hold 1 or B={B} values, got "
                                     f"{timestep.numel()}; pass shape ({B},) or ()")
    if kv_lens is not None:  # read at KV_LENS + b: one int32 per batch element, contiguous
        need(kv_lens.dtype == torch.int32 and kv_lens.dim() == 1 and kv_lens.shape[0] == B
             and kv_lens.stride(0) == 1,
             f"kv_lens must be a contiguous int32 ({B},) tensor, got {kv_lens.dtype} "
             f"{tuple(kv_lens.shape)}; pass lengths.to(torch.int32).contiguous()")
    if launch_order is not None:  # read at LAUNCH_ORDER + bucket * stride + slot, slot < H * NB
        need(launch_order.dtype == torch.int32 and launch_order.dim() == 2
             and launch_order.shape[0] >= nt and launch_order.shape[1] == H * nb
             and launch_order.stride(1) == 1,
             f"launch_order must be int32 (NT>={nt}, H*NB={H * nb}) with a contiguous last dim, "
             f"got {launch_order.dtype} {tuple(launch_order.shape)}; build it with "
             "contract.masks.launch_order(masks, level_table, S)")
    for name, t in (("k", k), ("v", v), ("out", out), ("masks", masks),
                    ("level_table", level_table), ("bucket_bounds", bucket_bounds),
                    ("timestep", timestep), ("kv_lens", kv_lens if kv_lens is not None else q),
                    ("launch_order", launch_order if launch_order is not None else q)):
        need(t.device == q.device, f"{name} must be on q's device {q.device}, got {t.device}")


def _ensure_tma_allocator():
    """Device-side tensor descriptors need a global scratch allocation per program."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                 device="cuda"))


_TUNED: dict[tuple, KernelConfig] = {}


TUNING_TIMES: dict[tuple, dict] = {}  # key -> {config: median ms}, kept for benchmark records


def tuning_tables(masks: torch.Tensor, level_table: torch.Tensor):
    """What the autotuner times: tables of the same shapes with every block kept (all bits set:
    bits past the last block are ignored by definition) and level 0 everywhere.

    Why not the call's own tables: the choice is cached per shape, so timing the first call's
    masks let whichever density came first decide for every later one (issue 14: the same
    masks at density 0.1 ran 1.35 ms in one run and 1.60 ms in another). All-blocks masks make
    the choice the same run after run, and the same as the Inductor template's
    (``compile/lowering._input_gen_fns``)."""
    return torch.full_like(masks, -1), torch.zeros_like(level_table)


def pick_config(q, k, v, masks, level_table, bucket_bounds, ts, out, scale, energy_rule=0,
                kv_lens=None, launch_order=None):
    """Benchmark CONFIGS once per (shape, dtype, table shape, filter, key lengths, launch order)
    key, on :func:`tuning_tables` (every block kept), and cache the winner."""
    key = (tuple(q.shape), q.dtype, tuple(masks.shape), bucket_bounds.numel(), str(q.device),
           energy_rule) + (("kv_lens",) if kv_lens is not None else ()) + (
               ("launch_order",) if launch_order is not None else ())
    if key in _TUNED:
        return _TUNED[key]
    if q.device.type != "cuda":  # the interpreter: nothing to tune
        return DEFAULT_CONFIG
    from triton.testing import do_bench

    masks, level_table = tuning_tables(masks, level_table)
    if kv_lens is not None:
        kv_lens = torch.full_like(kv_lens, q.shape[2])  # every key, as every block
    times = {}
    for cfg in CONFIGS:
        if energy_rule and cfg.block_m != MASK_BLOCK:
            continue
        fn = lambda c=cfg: block_sparse_attention_forward(q, k, v, masks, level_table,
                                                           bucket_bounds, ts, out, scale, c,
                                                           energy_rule=energy_rule,
                                                           kv_lens=kv_lens,
                                                           launch_order=launch_order)
        try:
            times[cfg] = do_bench(fn, warmup=5, rep=20, return_mode="median")
        except Exception:  # a config that does not fit (shared memory, registers) is skipped
            continue
    if not times:
        raise RuntimeError("block_sparse_attention: no kernel configuration compiled for "
                           f"shape {tuple(q.shape)} {q.dtype}")
    TUNING_TIMES[key] = times
    _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]


def tuned_configs() -> dict[tuple, tuple[KernelConfig, dict]]:
    """What :func:`pick_config` chose so far: key -> (winning config, {config: median ms})."""
    return {key: (cfg, dict(TUNING_TIMES.get(key, {}))) for key, cfg in _TUNED.items()}
