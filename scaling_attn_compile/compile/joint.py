"""The FX rewrite for joint text-video attention (HunyuanVideo, :mod:`..models.hunyuan`).

Each joint-attention SDPA over ``[video | text]`` becomes ``torch.ops.scaling_attn.sparse_attention``
bound to its layer's *joint* tables (:func:`~..contract.tables.joint_tables`: video x video
blocks from the plan materialised for the video grid, text rows, text columns and the
straddling block dense) and to ``kv_lens``, the per-batch key length read off the model's
key-padding prefix mask on the device (no host sync). The text refiner's attention and any
SDPA whose mask is not the family's prefix mask stay dense (with a warning naming why).

Steps as in :mod:`.rewrite` (whose report, constant registration and op it shares): collect
the sites, check them against the plan, bind the timestep and the key lengths, rewrite.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..contract.tables import AttentionTables, joint_tables
from ..contract.validate import check_site_fits_kernel
from ..errors import DynamicShapeError, PlanMismatchError
from ..models import hunyuan
from ..models.graph import node_value as _val
from .rewrite import (
    BUFFER_PREFIX,
    OP,
    RewriteReport,
    _pad_bounds,
    _register_constant,
    _sdpa_args,
    launch_order_kwargs,
)

log = logging.getLogger("scaling_attn_compile")


def _device_tables(tables: AttentionTables, device) -> list:
    """Per layer ``(masks, level_table, bounds)`` on ``device``, bounds padded with +inf as the
    backend binds them (one shared bounds tensor)."""
    bounds = tables.bucket_bounds.to(device=device, dtype=torch.float32)
    out = []
    for m, lt in zip(tables.masks, tables.level_tables, strict=True):
        lt, b = _pad_bounds(lt.to(device).contiguous(), bounds)
        out.append((m.to(device).contiguous(), lt, out[0][2] if out else b))
    return out


def rewrite_joint_attention(
    gm: torch.fx.GraphModule,
    video_tables: Callable[[tuple[int, int, int]], AttentionTables],
    *,
    example_inputs: Sequence = (),
    patch_size: Sequence[int] | None = None,
    head_dim: int | None = None,
    energy: Callable[[int, int], tuple[int, float]] | None = None,
) -> RewriteReport:
    """Replace HunyuanVideo's joint-attention SDPA calls by the block-sparse op, in place.

    Args:
        gm: the Dynamo graph of the whole transformer (static shapes).
        video_tables: ``grid -> AttentionTables`` for the video grid (``plan.materialize``),
            one layer per joint attention (double-stream blocks first, then single-stream).
        patch_size: see :func:`..models.hunyuan.find_latent_grid`.
        head_dim: the plan's head_dim, checked when given.
        energy: ``(layer, seq_len) -> (rule, threshold)``, as in :mod:`.rewrite`.
    """
    report = RewriteReport()
    g = gm.graph
    whole = hunyuan.whole_model(gm)
    # Single-stream block j is layer num_double + j: the double count is read off the graph,
    # which is right only when the graph holds every double-stream block.
    num_double = hunyuan.count_double_blocks(gm)
    left, sites, seen = Counter(), [], set()
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not F.scaled_dot_product_attention:
            continue
        block, kind, path = hunyuan.attention_site(n)
        if kind != hunyuan.SELF_ATTENTION:
            left[hunyuan.LEFT_DENSE_REASONS.get(kind, f"not under {hunyuan.ATTENTION_PATH}")] += 1
            continue
        if block[0] != "transformer_blocks" and not whole:
            raise PlanMismatchError(
                f"scaling_attn_backend: {path} is a single-stream block in a graph without the "
                "whole transformer (a graph break), so its layer number is unknown; compile the "
                "whole transformer with fullgraph=True")
        layer = hunyuan.layer_index(block, num_double)
        seen.add(layer)
        a = _sdpa_args(n)
        q, k, v = _val(a["query"]), _val(a["key"]), _val(a["value"])
        reason, lens = None, None
        if not (isinstance(q, torch.Tensor) and q.dim() == 4 and tuple(q.shape) == tuple(
                getattr(k, "shape", ())) == tuple(getattr(v, "shape", ()))):
            reason = "q/k/v not one (B, H, S, D) shape"
        elif not hunyuan.static_ints(*q.shape):
            raise DynamicShapeError(
                f"scaling_attn_backend: {path}: shape {tuple(q.shape)} is symbolic; block "
                "masks exist per static resolution; compile with dynamic=False")
        elif a["dropout_p"] != 0 or a["is_causal"] is not False or a["enable_gqa"] is not False:
            reason = "dropout, is_causal or enable_gqa"
        elif a["scale"] is not None and not isinstance(a["scale"], (int, float)):
            reason = "scale is a tensor"
        elif a["attn_mask"] is not None:
            lens, why = hunyuan.prefix_mask_lengths(a["attn_mask"], q.shape[2])
            reason = why or None
        if reason:
            warnings.warn(f"scaling_attn_backend: {path} SDPA left dense: {reason}", stacklevel=3)
            left[reason] += 1
            continue
        scale = float(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        sites.append((n, layer, path, a["query"], a["key"], a["value"], scale, lens))
    report.left_dense = dict(left)
    if not sites:
        return report

    grid, where = hunyuan.find_latent_grid(gm, patch_size)
    if grid is None or not hunyuan.static_ints(*grid):
        raise PlanMismatchError(f"scaling_attn_backend: cannot find a static video grid "
                                f"({where}); compile the whole transformer with dynamic=False")
    grid = tuple(int(x) for x in grid)
    s_v = math.prod(grid)
    seq = {_val(qn).shape[2] for _n, _l, _p, qn, *_ in sites}
    if len(seq) != 1:
        raise PlanMismatchError(f"scaling_attn_backend: joint attention lengths {sorted(seq)} "
                                "differ within one graph; expected one [video | text] length")
    (s,) = seq
    text_len = hunyuan.check_text_len(sites[0][2], s, s_v)
    video = video_tables(grid)
    if str(getattr(video, "token_order", "raster")) != "raster":
        raise PlanMismatchError(
            f"scaling_attn_backend: the plan's blocks are in {video.token_order} order; joint "
            "text-video attention supports raster order only; extract a raster-order plan")
    tables = joint_tables(video, text_len)
    device = _val(sites[0][3]).device
    per_layer = _device_tables(tables, device)
    if whole and len(seen) != len(per_layer):
        raise PlanMismatchError(
            f"scaling_attn_backend: the model has {len(seen)} joint-attention layers, the plan "
            f"has {len(per_layer)}; use the plan made for this model")
    for _n, layer, path, qn, *_ in sites:
        if layer >= len(per_layer) or _val(qn).shape[1] != per_layer[layer][0].shape[0]:
            raise PlanMismatchError(
                f"scaling_attn_backend: {path} (layer {layer}, {_val(qn).shape[1]} heads) does "
                f"not fit the plan's {len(per_layer)} layers of "
                f"{per_layer[0][0].shape[0]} heads; use the plan made for this model")
        check_site_fits_kernel(path, _val(qn), head_dim)
    report.grid, report.seq_len = grid, s

    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(list(example_inputs)) if example_inputs else None
    ts = hunyuan.find_timestep(gm)
    batch = _val(sites[0][3]).shape[0]
    tv = _val(ts) if ts is not None else None
    if not (isinstance(tv, torch.Tensor) and (tv.dim() == 0 or (
            tv.dim() == 1 and tv.shape[0] in (1, batch)))):
        if tables.bucket_bounds.numel():
            raise PlanMismatchError(
                "scaling_attn_backend: the plan's density depends on the timestep but the graph "
                f"has no timestep tensor of shape ({batch},) or (); call the transformer with "
                "timestep=<tensor>")
        with g.inserting_before(sites[0][0]):
            ts = _register_constant(gm, BUFFER_PREFIX + "timestep",
                                    torch.zeros((), device=device), fake_mode)

    kv_nodes = {}  # one int32 cast per length node
    for n, layer, _path, qn, kn, vn, scale, lens in sites:
        masks, level_table, bounds = per_layer[layer]
        with g.inserting_before(n):
            if lens is not None and lens not in kv_nodes:
                cast = g.call_method("to", (lens, torch.int32))
                cast.meta["example_value"] = _val(lens).to(torch.int32)
                kv_nodes[lens] = cast
            args = (qn, kn, vn,
                    _register_constant(gm, f"{BUFFER_PREFIX}masks_{layer}", masks, fake_mode),
                    _register_constant(gm, f"{BUFFER_PREFIX}level_table_{layer}", level_table,
                                       fake_mode),
                    _register_constant(gm, BUFFER_PREFIX + "bucket_bounds", bounds, fake_mode),
                    ts, scale)
            rule, threshold = energy(layer, s) if energy is not None else (0, 0.0)
            if lens is not None or rule:
                args = (*args, rule, threshold)
            if lens is not None:
                args = (*args, kv_nodes[lens])
            new = g.call_function(OP, args, launch_order_kwargs(
                gm, f"{BUFFER_PREFIX}launch_order_{layer}", masks, level_table,
                _val(qn).shape[2], fake_mode))
        new.meta.update(n.meta)
        new.meta["example_value"] = torch.empty_like(_val(qn))
        n.replace_all_uses_with(new)
        g.erase_node(n)
        report.per_layer[layer] = report.per_layer.get(layer, 0) + 1
    g.lint()
    gm.recompile()
    log.info("joint attention, grid %s + %d text tokens (S=%d): rewrote %d calls; left dense %s",
             grid, text_len, s, report.num_rewritten, report.left_dense or "{}")
    return report
