"""Counting what is computed: the study's attention path, and the energy-threshold calibration.

:class:`MeasuredAttention` replaces every self-attention processor (``wan.self_attention_modules``): q/k/v exactly as
diffusers' ``WanAttnProcessor`` computes them, then the op's semantics bound to a method's tables
and the step's ``timestep``, counting per batch element the blocks computed: the blocks the mask
visits (``reference.block_masks_for``, diagonal on) minus those the energy filter skipped.

* CPU: no filter -> ``torch.ops.scaling_attn.sparse_attention`` (the reference); filter -> the
  function the op's CPU energy path calls (``energy_filtered_attention_reference``, float32) with
  ``return_skipped=True``.
* CUDA: the Triton kernel (``block_sparse_attention_forward``), with its per-tile skip counters
  when the filter is on (they equal the reference's, ``tests/test_energy.py``). The reference
  at small-wan's 128 blocks would loop 128 block steps per layer call in float32: minutes per
  video instead of a fraction of a second.

``tests/test_bench_quality.py`` checks that this path makes the same videos as the model compiled
with ``scaling_attn_backend`` (with and without ``energy_filter``).
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..contract.masks import BLOCK, dense_tables
from ..contract.reference import block_masks_for, energy_filtered_attention_reference
from ..contract.tables import AttentionTables
from ..models.wan import self_attention_modules
from ..models.wan_capture import _apply_rotary_emb
from ..offline import west
from ..offline.calibrate import capture_self_attention

LAMBDA_RANGE = (-30.0, 5.0)  # natural-log energy thresholds searched by bisect_threshold


def attend_counted(q, k, v, masks, level_table, bucket_bounds, timestep, rule: int,
                   threshold: float, *, kernel: bool | None = None, perm=None,
                   precision: str | None = None):
    """Block-sparse attention ``(B, H, S, D)``, the computed blocks per batch element (float64
    ``(B,)``, on the CPU) and all blocks per element (``H * NB * NB``). ``kernel``: launch the
    Triton kernel (default: on CUDA; on the CPU it needs ``TRITON_INTERPRET=1``). ``perm``
    (int64 ``(S,)``): the tables' token order (``token_order.permutation``) for raster q/k/v:
    they are permuted into it and the output back, as the backend's order pass does.
    ``precision``: ``"int8"`` / ``"fp8"`` run the 8-bit op (``scaling_attn::sparse_attention_q8``,
    without the energy filter here: its skips are not counted), as the backend's ``precision=``
    does."""
    if perm is not None:
        perm = perm.to(q.device)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=q.device)
        out, c, n = attend_counted(q.index_select(2, perm), k.index_select(2, perm),
                                   v.index_select(2, perm), masks, level_table, bucket_bounds,
                                   timestep, rule, threshold, kernel=kernel,
                                   precision=precision)
        return out.index_select(2, inv), c, n
    B, H, S, D = q.shape
    scale = D ** -0.5
    ts = timestep.to(torch.float32)
    blocks = block_masks_for(masks, level_table, bucket_bounds, ts, B, S)  # (B, H, NB, NB)
    visited = blocks.sum(dim=(1, 2, 3)).double()
    if precision not in (None, "bf16"):
        if rule:
            raise ValueError(f"attend_counted: precision={precision!r} with the energy filter "
                             "cannot count skipped blocks (the 8-bit kernel does not report "
                             "them); count with bf16")
        out = torch.ops.scaling_attn.sparse_attention_q8(q, k, v, masks, level_table,
                                                         bucket_bounds, ts, scale, precision)
        return out, visited.cpu(), float(blocks[0].numel())
    if q.is_cuda if kernel is None else kernel:
        from ..kernels.launch import block_sparse_attention_forward

        out = torch.empty_like(q)
        skipped = torch.zeros(B * H * blocks.shape[-1], dtype=torch.int32, device=q.device) \
            if rule else None
        block_sparse_attention_forward(q, k, v, masks, level_table, bucket_bounds, ts, out,
                                       scale, energy_rule=rule,
                                       energy_threshold=threshold if rule else float("-inf"),
                                       skipped=skipped)
        computed = visited if skipped is None else \
            visited - skipped.view(B, -1).sum(-1).double()
    elif rule:
        out, skipped = energy_filtered_attention_reference(
            q, k, v, blocks, scale, rule, threshold, compute_dtype=torch.float32,
            return_skipped=True)
        computed = (blocks & ~skipped).sum(dim=(1, 2, 3)).double()
    else:
        out = torch.ops.scaling_attn.sparse_attention(q, k, v, masks, level_table,
                                                      bucket_bounds, ts, scale)
        computed = visited
    return out, computed.cpu(), float(blocks[0].numel())


class MeasuredAttention:
    """Every self-attention layer through the op's semantics, counting blocks.

    ``configure(tables, rule, threshold)`` binds an :class:`AttentionTables` (the method's masks
    at the generation grid) and an energy rule (0 off, 1 cumulative, 2 BLASST). Inside
    ``installed()`` each self-attention call runs :func:`attend_counted`. Counters: ``computed``
    / ``total`` blocks per batch element, summed over layers, heads, tiles and calls.
    """

    def __init__(self, model):
        self.model = model
        self.tables: AttentionTables | None = None
        self.rule, self.threshold = 0, 0.0
        self.precision: str | None = None
        self.timestep = None
        self._device_tables = None
        self.reset()

    def configure(self, tables: AttentionTables, rule: int = 0, threshold: float = 0.0,
                  precision: str | None = None):
        self.tables, self.rule, self.threshold = tables, int(rule), float(threshold)
        self.precision = precision
        self._device_tables = None
        self.reset()

    def reset(self):
        self.computed: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.calls = 0

    def density_per_sample(self) -> list[float]:
        return (self.computed / self.total).tolist()

    def density(self) -> float:
        return float(self.computed.sum() / self.total.sum())

    def _layer_tables(self, layer: int, device):
        if self._device_tables is None or self._device_tables[0] != device:
            t = self.tables.to(device)
            perm = table_perm(t)
            self._device_tables = (device, t, None if perm is None else perm.to(device))
        return self._device_tables[1].layer(layer), self._device_tables[2]

    def attend(self, layer: int, q, k, v):
        (masks, lt, bb), perm = self._layer_tables(layer, q.device)
        out, c, per = attend_counted(q, k, v, masks, lt, bb, self.timestep, self.rule,
                                     self.threshold, perm=perm, precision=self.precision)
        n = torch.full((q.shape[0],), per, dtype=torch.float64)
        self.computed = c if self.computed is None else self.computed + c
        self.total = n if self.total is None else self.total + n
        self.calls += 1
        return out

    def processor(self, original, layer: int):
        runner = self

        def proc(attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
            if encoder_hidden_states is not None or runner.tables is None:
                return original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                rotary_emb, **kwargs)
            from diffusers.models.transformers.transformer_wan import _get_qkv_projections

            q, k, v = _get_qkv_projections(attn, hidden_states, None)
            q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
            k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
            v = v.unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                q, k = _apply_rotary_emb(q, *rotary_emb), _apply_rotary_emb(k, *rotary_emb)
            out = runner.attend(layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2).flatten(2, 3).type_as(q)
            return attn.to_out[1](attn.to_out[0](out))

        return proc

    @contextlib.contextmanager
    def installed(self):
        model = self.model

        def hook(module, args, kwargs):
            self.timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        attention = self_attention_modules(model)
        originals = {}
        try:
            for i, attn in enumerate(attention):
                originals[i] = attn.processor
                attn.processor = self.processor(originals[i], i)
            yield self
        finally:
            handle.remove()
            for i, proc in originals.items():
                attention[i].processor = proc


def table_perm(tables: AttentionTables):
    """The tables' token permutation, ``None`` in raster order."""
    from ..contract.token_order import TokenOrder, permutation

    order = getattr(tables, "token_order", "raster")
    return None if TokenOrder.parse(order).is_raster else permutation(tables.grid, order)


def all_blocks_tables(num_layers: int, num_heads: int, grid) -> AttentionTables:
    """Every block visited (for the energy filter alone, and the dense reference)."""
    S = math.prod(grid)
    per = [dense_tables(num_heads, S) for _ in range(num_layers)]
    return AttentionTables(tuple(grid), [m for m, _, _ in per], [lt for _, lt, _ in per],
                           per[0][2])


# ---- captures of a dense run: energy calibration and the SVG head profile ----------------------

def capture_qk_at(model, cal_input, timesteps, latent, capture_steps) -> list[tuple]:
    """(layer, timestep, q, k) of a dense run at ``capture_steps``: q/k cloned contiguous, in
    float32 on the CPU path and in the model's dtype on CUDA (the kernel's input there)."""
    caps = []

    def on_layer(cap):
        dt = cap.q.dtype if cap.q.is_cuda else torch.float32
        caps.append((cap.layer, float(cap.timestep), cap.q.to(dt).contiguous(),
                     cap.k.to(dt).contiguous()))

    capture_self_attention(model, [cal_input], timesteps, on_layer, latent_shape=latent,
                           capture_steps=capture_steps, guidance_scale=1.0, progress=False)
    return caps


def profiled_block_mass(captures, num_layers: int) -> list[torch.Tensor]:
    """Per layer, float32 ``(H, NB, NB)`` block-pooled softmax mass summed over the captured
    steps (``west.block_mass``): what :func:`anchors.svg_head_types` reads."""
    out: list[torch.Tensor | None] = [None] * num_layers
    for layer, _t, q, k in captures:
        m = west.block_mass(q, k)[0].float().cpu()
        out[layer] = m if out[layer] is None else out[layer] + m
    missing = [i for i, m in enumerate(out) if m is None]
    if missing:
        raise RuntimeError(f"profiled_block_mass: layers {missing} were never captured")
    return out


def filtered_density(captures, tables: AttentionTables, rule: int, lam: float) -> float:
    """Computed / all blocks when ``tables`` + filter ``(rule, lam)`` run on captured q/k (v does
    not change the skip decisions, so k stands in for it)."""
    comp = tot = 0.0
    dev = None
    perm = table_perm(tables)
    for layer, t, q, k in captures:
        if dev != q.device:
            dev, dt = q.device, tables.to(q.device)
        masks, lt, bb = dt.layer(layer)
        _, c, per = attend_counted(q, k, k, masks, lt, bb, torch.tensor([t], device=q.device),
                                   rule, lam, perm=perm)
        comp += float(c.sum())
        tot += per * q.shape[0]
    return comp / tot


def bisect_threshold(captures, tables, rule: int, target: float, *, iters: int = 10,
                     lo: float = LAMBDA_RANGE[0], hi: float = LAMBDA_RANGE[1]) -> dict:
    """Bisect ``lambda`` (density falls as it rises) so the calibration density is nearest
    ``target``; returns lambda, its calibration density and every evaluation."""
    evals: dict[float, float] = {}

    def d(lam):
        if lam not in evals:
            evals[lam] = filtered_density(captures, tables, rule, lam)
        return evals[lam]

    if d(lo) < target:  # the mask alone is below the target: no filtering
        return {"threshold": lo, "calibration_density": d(lo), "evals": evals,
                "note": "mask alone below target; filter at the bottom of the range"}
    if d(hi) > target:
        return {"threshold": hi, "calibration_density": d(hi), "evals": evals,
                "note": "target below what the filter reaches at the top of the range"}
    a, b = lo, hi
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if d(mid) >= target:
            a = mid
        else:
            b = mid
    lam = min((a, b), key=lambda x: abs(d(x) - target))
    return {"threshold": lam, "calibration_density": d(lam),
            "evals": {f"{k:.4f}": v for k, v in sorted(evals.items())}}


__all__ = ["BLOCK", "LAMBDA_RANGE", "MeasuredAttention", "all_blocks_tables", "attend_counted",
           "bisect_threshold", "capture_qk_at", "filtered_density", "profiled_block_mass"]
