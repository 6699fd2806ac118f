"""Inductor lowering of ``torch.ops.scaling_attn.sparse_attention_q8`` (8-bit attention, issue
15): on CUDA the quantize pre-pass, an extern call of ``torch.ops.scaling_attn.quantize_q8`` (one
Triton launch), then an 8-bit Triton template over its outputs, whose source is the stub
``template_source._STUB_Q8`` plus ``bsa_q8_forward_tile`` and its callees (the eager kernel calls
the same tile). The choices are the eager autotuner's: ``launch_q8.CONFIGS_Q8`` x the exact P.V
forms. Everywhere else the eager op.

The bf16 lowering (:mod:`.lowering`) owns what both share: the device list, the autotune call,
``PICKS`` and the cache key (which hashes this file and the 8-bit template). Importing this
module registers the lowering (the backend does; without it Inductor calls the eager op).
"""

from __future__ import annotations

import torch
from torch._inductor.lowering import fallback_handler, register_lowering
from torch._inductor.select_algorithm import realize_inputs

from ..kernels import block_sparse_attention as _kernel
from ..kernels import launch as _launch
from ..kernels import launch_q8 as _launch_q8
from . import lowering as _lowering
from .lowering import (
    _input_gen_fns,
    _like,
    _output_layout,
    _shape,
    _static,
    _timestep_stride,
    log,
)
from .template_source import _TILE_FN_Q8, template_source_q8

OP_Q8 = torch.ops.scaling_attn.sparse_attention_q8.default
QUANTIZE_Q8 = torch.ops.scaling_attn.quantize_q8.default
TEMPLATE_NAME_Q8 = "scaling_attn_bsa_q8"
_TEMPLATE_Q8 = _lowering._make_template(TEMPLATE_NAME_Q8, template_source_q8())


def _input_gen_fns_q8(seq_len: int, precision: str):
    """Autotuning inputs for the 8-bit template: the pre-pass's outputs as codes in a realistic
    range and unit scales, then the bf16 template's all-blocks tables (shifted by the six
    quantized inputs)."""
    def codes(node):
        x = torch.randn(_shape(node)) * (32.0 if precision == "int8" else 64.0)
        return _like(node, x.clamp(-127, 127).round() if precision == "int8" else x)

    def vt(node):  # FP8 V^T, padding columns as the pre-pass leaves them: zeros
        x = torch.randn(_shape(node)) * 64.0
        x[..., seq_len:] = 0
        return _like(node, x)

    def scales(node):
        return _like(node, torch.full(_shape(node), 1.0 / 64.0))

    tables = _input_gen_fns(seq_len)
    fns = {0: codes, 1: codes, 2: vt, 3: scales, 4: scales, 5: scales}
    fns.update({i + 3: fn for i, fn in tables.items()})  # masks, level_table, bounds, timestep
    return fns


def template_configs_q8(energy_rule: int = 0) -> list[tuple[dict, str]]:
    """The 8-bit template's choices: every plain config of ``launch_q8.CONFIGS_Q8`` with every
    exact P.V form the eager autotuner races (``PV_EXACT``; with the energy filter
    ``PV_EXACT_ENERGY`` and 128-row configs only). The TMA configs stay out, as in the eager
    autotuner (slower on an H200: ``launch_q8.CONFIGS_Q8_TMA``)."""
    pvs = _launch_q8.PV_EXACT_ENERGY if energy_rule else _launch_q8.PV_EXACT
    out = []
    for c in _launch_q8.CONFIGS_Q8:
        if energy_rule and c.block_m != _kernel.MASK_BLOCK:
            continue
        out += [({"block_m": c.block_m, "num_warps": c.num_warps, "num_stages": c.num_stages},
                 pv) for pv in pvs]
    return out


@register_lowering(OP_Q8, type_promotion_kind=None)
def _lower_sparse_attention_q8(q, k, v, masks, level_table, bucket_bounds, timestep, scale,
                               precision, energy_rule=0, energy_threshold=0.0):
    """On CUDA: the pre-pass (``quantize_q8``, an extern call: one Triton launch) and the 8-bit
    template over its outputs, its configs and exact P.V forms autotuned; elsewhere the eager
    op."""
    device = q.get_device()
    eager_args = (q, k, v, masks, level_table, bucket_bounds, timestep, scale, precision,
                  energy_rule, energy_threshold)
    if _lowering._eager_only(device, q, energy_rule, energy_threshold):
        return fallback_handler(OP_Q8, add_to_fallback_set=False)(*eager_args)
    # Realized first: a permuted view of a computed buffer (the (B, H, S, D) view of q after
    # RoPE, as diffusers makes it) has no strides to read until it is (H100 run of 549ef1f).
    q, k, v = (realize_inputs(x) for x in (q, k, v))
    quant = fallback_handler(QUANTIZE_Q8, add_to_fallback_set=False)(q, k, v, precision)
    q8, qs, k8, ks, vt8, vs = quant
    inputs = [realize_inputs(x) for x in (q8, k8, vt8, qs, ks, vs, masks, level_table,
                                          bucket_bounds, timestep)]
    size, layout = _output_layout(q, device)
    b, h, s, d = (_static(x) for x in size)
    stride_ts = _timestep_stride(inputs[9])
    meta = _launch.launch_meta(s, _shape(inputs[6])[-1], _shape(inputs[8])[0], d)
    meta.update(QK_INT8=precision == "int8", USE_TMA=False)
    if energy_rule:
        meta.update(ENERGY_RULE=int(energy_rule), energy_thr=float(energy_threshold) * _kernel.LOG2E)
    choices: list = []
    for config, pv in template_configs_q8(energy_rule):
        err = _TEMPLATE_Q8.maybe_append_choice(
            choices, input_nodes=inputs, layout=layout, num_stages=config["num_stages"],
            num_warps=config["num_warps"], call_sizes=size,
            QK_SCALE=float(scale) * _kernel.LOG2E, STRIDE_TS=stride_ts,
            **_lowering._tile_constexprs({**meta, "PV_MODE": _launch_q8.PV_MODES[pv]}, config,
                                         _TILE_FN_Q8))
        if err is not None:
            log.debug("sparse_attention_q8 template config %s %s skipped: %s", config, pv, err)
    if not choices:
        log.warning("sparse_attention_q8: no template choice for q %s %s; using the eager op",
                    (b, h, s, d), q.get_dtype())
        return fallback_handler(OP_Q8, add_to_fallback_set=False)(*eager_args)
    node, picked = _lowering._select(_TEMPLATE_Q8.name, choices, inputs, layout,
                                     input_gen_fns=_input_gen_fns_q8(s, precision))
    _lowering.PICKS.append({"shape": (b, h, s, d), "choices": [c.name for c in choices],
                            "fa4": "8-bit", "picked": picked, "precision": precision})
    log.info("sparse_attention_q8 %s %s: %d choices, picked %s", (b, h, s, d), precision,
             len(choices), picked)
    return node
