"""The FX rewrite: self-attention SDPA calls of a Dynamo graph -> the block-sparse op.

:func:`rewrite_self_attention` runs four steps, each its own function:

1. :func:`collect_sites`: the SDPA calls the graph's model adapter
   (:func:`..models.registry.adapter_for_graph`) calls
   self-attention, with the reason for each call left dense;
2. :func:`check_against_plan`: the latent grid, the plan's tables for it, and layers, heads and
   head_dim against the plan;
3. :func:`bind_timestep`: the graph's timestep input (or a constant when the plan has one bucket);
4. :func:`rewrite_sites`: each site becomes ``torch.ops.scaling_attn.sparse_attention`` bound to
   its layer's tables (graph buffers with a ``ConstantSource``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch._dynamo.source import ConstantSource

from ..contract.masks import launch_order
from ..contract.tables import AttentionTables
from ..contract.validate import check_site_fits_kernel
from ..errors import DynamicShapeError, PlanMismatchError
from ..kernels.launch import launch_order_enabled
from ..models.graph import is_static as _is_static
from ..models.graph import node_value as _val
from ..models.registry import adapter_for_graph
from .regional import drop_bind_calls, rewrite_block_sites

log = logging.getLogger("scaling_attn_compile")


@dataclass
class RewriteReport:
    """What the FX pass did to one Dynamo graph.

    Attributes:
        grid: latent grid ``(F, H, W)`` after patching, or None if no self-attention was seen.
        seq_len: self-attention length ``S = F * H * W``.
        per_layer: layer index -> number of SDPA calls replaced by the sparse op.
        left_dense: reason -> number of SDPA calls left as they were (cross-attention etc.).
        dense_fallback: why the whole graph was left dense (symbolic shapes), else None.
        head_range: ``(h0, h1)``, the plan's heads bound to this graph's self-attention when the
            model holds a slice of them (Ulysses sequence parallelism), else None.
        token_order: the order the graph's tokens run in (``token_order.py``), when not raster.
        block_sites: self-attention calls replaced in a graph of one block (regional
            compilation, :mod:`.regional`): bound to the block's attached tables, any layer.
    """

    grid: tuple[int, int, int] | None = None
    seq_len: int | None = None
    per_layer: dict[int, int] = field(default_factory=dict)
    left_dense: dict[str, int] = field(default_factory=dict)
    dense_fallback: str | None = None
    head_range: tuple[int, int] | None = None
    token_order: str | None = None
    block_sites: int = 0

    @property
    def num_rewritten(self) -> int:
        return sum(self.per_layer.values()) + self.block_sites


def _sdpa_args(node: torch.fx.Node) -> dict[str, Any]:
    """SDPA arguments by name, whether Dynamo recorded them as args or kwargs."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
           "enable_gqa": False}
    out.update(dict(zip(names, node.args, strict=False)))
    out.update(node.kwargs)
    return out


def _pad_bounds(level_table: torch.Tensor, bounds: torch.Tensor):
    """Append a +inf bound and repeat the last level row: the same bucket for every finite t
    (``#{bounds <= t}`` never counts +inf), and no zero-element graph input for Inductor or the
    Triton launcher (a single-bucket plan has an empty ``bucket_bounds``)."""
    inf = torch.full((1,), float("inf"), dtype=bounds.dtype, device=bounds.device)
    return torch.cat([level_table, level_table[-1:]]), torch.cat([bounds, inf])


def _register_constant(gm: torch.fx.GraphModule, name: str, value: torch.Tensor,
                       fake_mode) -> torch.fx.Node:
    """A graph buffer AOT lifts as an input. Without the ConstantSource, AOT asserts
    "``name`` not found in param_name_to_source"; a plain tensor attribute would reach the fake
    kernel as a real tensor."""
    if name not in dict(gm.named_buffers()):
        gm.register_buffer(name, value)
        if hasattr(gm, "_param_name_to_source"):
            gm._param_name_to_source[name] = ConstantSource(name)
    node = gm.graph.get_attr(name)
    if fake_mode is not None:
        node.meta["example_value"] = fake_mode.from_tensor(value, static_shapes=True)
    return node


def rewrite_self_attention(
    gm: torch.fx.GraphModule,
    tables_for: Callable[[tuple[int, int, int], torch.device], tuple[AttentionTables, list]],
    *,
    example_inputs: Sequence[Any] = (),
    patch_size: Sequence[int] | None = None,
    grid: Sequence[int] | None = None,
    head_dim: int | None = None,
    on_dynamic_shapes: str = "error",
    energy: Callable[[int, int], tuple[int, float]] | None = None,
    head_range: Sequence[int] | Callable[[int], tuple[int, int] | None] | None = None,
    attached=None,
    precision: str = "bf16",
) -> RewriteReport:
    """Replace self-attention SDPA calls of a Dynamo graph by the block-sparse op, in place.

    Args:
        gm: the Dynamo ``GraphModule`` (torch-level IR, SDPA is one ``call_function`` node).
        tables_for: ``(grid, device) -> (tables, per-layer device tensors)``: the plan
            materialised and moved; per-layer entries are ``(masks, level_table, bucket_bounds)``.
        patch_size / grid: overrides for finding the latent grid (see :func:`find_latent_grid`).
        head_dim: the plan's head_dim, checked against the model's when given.
        on_dynamic_shapes: ``"error"`` (raise :class:`DynamicShapeError`) or ``"dense"`` (log a
            warning and leave the graph dense) when a self-attention length is symbolic.
        energy: ``(layer, seq_len) -> (energy_rule, energy_threshold)``, the online filter's op
            arguments per layer (``EnergyFilter.for_layer``); ``None`` leaves the filter off.
        head_range: ``(h0, h1)``, or ``plan_heads -> (h0, h1) | None``: the plan's heads the
            graph's self-attention runs (Ulysses sequence parallelism: ``H/N`` heads per rank).
            Each layer is bound to ``masks[h0:h1]`` and ``level_table[:, h0:h1]``. ``None``:
            the model must have the plan's head count (a mismatch is an error, never a guess).
        attached: the :class:`~.regional.RegionalTables` of the transformer being run, for a
            graph of one block (regional compilation); its sites bind the block's buffers.
        precision: ``"bf16"`` (the op Inductor lowers to the template) or ``"int8"``/``"fp8"``:
            ``torch.ops.scaling_attn.sparse_attention_q8`` (lowered to its pre-pass and the 8-bit
            template on CUDA).

    Returns:
        A :class:`RewriteReport`.
    """
    if on_dynamic_shapes not in ("error", "dense"):
        raise ValueError("scaling_attn_backend: on_dynamic_shapes must be 'error' or 'dense', "
                         f"got {on_dynamic_shapes!r}")
    report = RewriteReport()
    ad = adapter_for_graph(gm)
    sites, self_layers = collect_sites(gm, report, on_dynamic_shapes)
    block = [site for site in sites or () if site[1] is None]  # no layer index: one block
    if block and len(block) != len(sites):
        raise PlanMismatchError(
            "scaling_attn_backend: a graph holds self-attention with and without a layer index "
            f"({ad.SELF_ATTENTION_PATH}); compile the whole transformer or its blocks, not a mix")
    if block:
        rewrite_block_sites(gm, block, report, attached=attached, head_dim=head_dim,
                            energy=energy, op=OP if precision == "bf16" else OP_Q8,
                            precision=precision)
    if drop_bind_calls(gm) or block:  # the regional markers go; a whole graph binds constants
        gm.graph.lint()
        gm.recompile()
    if block or not sites:  # None: symbolic shapes, left dense; []: no self-attention here
        return report
    bound = check_against_plan(gm, sites, self_layers, report, tables_for, patch_size=patch_size,
                               grid=grid, head_dim=head_dim,
                               on_dynamic_shapes=on_dynamic_shapes, head_range=head_range)
    if bound is None:  # a symbolic latent grid, left dense
        return report
    tables, per_layer, head_slices = bound
    ts, fake_mode = bind_timestep(gm, sites, tables, example_inputs)
    rewrite_sites(gm, sites, per_layer, head_slices, ts, fake_mode, energy, report, precision)
    return report


def collect_sites(gm: torch.fx.GraphModule, report: RewriteReport, on_dynamic_shapes: str
                  ) -> tuple[list[tuple] | None, set[int]]:
    """Step 1: the SDPA calls the model adapter calls self-attention, as
    ``(node, layer, module path, q node, k node, v node, scale)``; the others are counted in
    ``report.left_dense`` by reason. ``None`` when a self-attention shape is symbolic and
    ``on_dynamic_shapes="dense"`` (``report.dense_fallback`` says why). Also returns the layers
    whose self-attention was seen, rewritable or not."""
    g = gm.graph
    ad = adapter_for_graph(gm)
    left = Counter()
    sites = []  # (node, layer, module path, q node, k node, v node, scale)
    seen_self_layers = set()
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not F.scaled_dot_product_attention:
            continue
        layer, which, path = ad.attention_site(n)
        if which != ad.SELF_ATTENTION:
            left[ad.LEFT_DENSE_REASONS.get(which, "cross-attention") if which
                 else f"not under {ad.ATTENTION_PATH}"] += 1
            continue
        seen_self_layers.add(layer)
        a = _sdpa_args(n)
        q, k, v = _val(a["query"]), _val(a["key"]), _val(a["value"])
        reason = None
        if a["attn_mask"] is not None:
            reason = "attn_mask given"
        elif not isinstance(a["dropout_p"], (int, float)) or a["dropout_p"] != 0:
            reason = "dropout_p != 0"
        elif a["is_causal"] is not False:
            reason = "is_causal"
        elif a["enable_gqa"] is not False:
            reason = "enable_gqa"
        elif q is None or k is None or v is None or q.dim() != 4:
            reason = "q/k/v not 4-D (B, H, S, D)"
        elif a["scale"] is not None and not isinstance(a["scale"], (int, float)):
            reason = "scale is a tensor"
        if reason:
            warnings.warn(f"scaling_attn_backend: {path} SDPA left dense: {reason}", stacklevel=3)
            left[reason] += 1
            continue
        dims = (q.shape[1], q.shape[2], q.shape[3], k.shape[2], v.shape[2])
        if not all(_is_static(d) for d in dims):
            msg = (f"{path}: self-attention shape q {tuple(q.shape)}, k {tuple(k.shape)} is "
                   "symbolic; block masks exist per static resolution")
            if on_dynamic_shapes == "error":
                raise DynamicShapeError(
                    f"scaling_attn_backend: {msg}. Compile with torch.compile(..., "
                    "dynamic=False) (a new resolution then recompiles with its own masks), or "
                    "pass on_dynamic_shapes='dense' to run such graphs dense")
            log.warning("%s; this graph runs dense attention", msg)
            report.dense_fallback = msg
            return None, seen_self_layers
        if q.shape[2] != k.shape[2] or tuple(k.shape) != tuple(v.shape) or (
                tuple(q.shape) != tuple(k.shape)):
            left["Sq != Sk"] += 1
            continue
        scale = float(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        sites.append((n, layer, path, a["query"], a["key"], a["value"], scale))

    report.left_dense = dict(left)
    if not sites:
        n_sdpa = sum(left.values())
        warnings.warn(
            f"scaling_attn_backend: no self-attention SDPA ({ad.SELF_ATTENTION_PATH}) found in this "
            f"graph ({n_sdpa} SDPA calls, {dict(left)}); compiling it dense. The model must use "
            "diffusers' 'native' attention backend (transformer.set_attention_backend('native'))"
            " and be compiled whole, or, for regional compilation, attached first "
            "(backend.attach(transformer))", stacklevel=3)
        return [], seen_self_layers

    return sites, seen_self_layers


def check_against_plan(gm: torch.fx.GraphModule, sites: list[tuple], seen_self_layers: set[int],
                       report: RewriteReport,
                       tables_for, *, patch_size, grid, head_dim, on_dynamic_shapes, head_range):
    """Step 2: the latent grid (from the adapter, or the ``grid`` option), the plan's tables for
    it, and every site's layer, heads and head_dim against the plan. Returns
    ``(tables, per-layer device tensors, {layer: (h0, h1) | None})``, or ``None`` when the grid is
    symbolic and ``on_dynamic_shapes="dense"``."""
    ad = adapter_for_graph(gm)
    if grid is not None:
        found, where = tuple(grid), "the grid option"
    else:
        found, where = ad.find_latent_grid(gm, patch_size)
    if found is None:
        raise PlanMismatchError(
            f"scaling_attn_backend: cannot find the latent grid ({where}); the graph must "
            f"contain the transformer's {ad.PATCH_EMBEDDING} (no graph break before the blocks), or "
            "pass grid=(F, H, W) or patch_size=(pt, ph, pw) to scaling_attn_backend")
    if not all(_is_static(x) for x in found):
        msg = f"latent grid {found} (from {where}) is symbolic"
        if on_dynamic_shapes == "error":
            raise DynamicShapeError(
                f"scaling_attn_backend: {msg}; compile with torch.compile(..., dynamic=False) "
                "or pass on_dynamic_shapes='dense'")
        log.warning("%s; this graph runs dense attention", msg)
        report.dense_fallback = msg
        return None
    found = tuple(int(x) for x in found)
    s = math.prod(found)
    for _n, _layer, path, qn, *_ in sites:
        if _val(qn).shape[2] != s:
            raise PlanMismatchError(
                f"scaling_attn_backend: {path} self-attention length S={_val(qn).shape[2]} is "
                f"not F*H*W={s} of the latent grid {found} (from {where}); pass the model's "
                "patch_size=(pt, ph, pw) or grid=(F, H, W) to scaling_attn_backend")
    report.grid, report.seq_len = found, s

    device = _val(sites[0][3]).device
    tables, per_layer = tables_for(found, device)
    n_layers = len(per_layer)
    if ad.whole_model(gm) and len(seen_self_layers) != n_layers:
        raise PlanMismatchError(
            f"scaling_attn_backend: the model has {len(seen_self_layers)} self-attention layers, "
            f"the plan has {n_layers}; use the plan made for this model")
    head_slices = {}  # layer -> (h0, h1) of the plan's heads, or None for all of them
    for _n, layer, path, qn, *_ in sites:
        q = _val(qn)
        h = q.shape[1]
        if layer >= n_layers:
            raise PlanMismatchError(
                f"scaling_attn_backend: {path} is layer {layer} but the plan has {n_layers} "
                "layers; use the plan made for this model")
        plan_h = per_layer[layer][0].shape[0]
        rng = head_range(plan_h) if callable(head_range) else head_range
        if rng is None:
            if h != plan_h:
                raise PlanMismatchError(
                    f"scaling_attn_backend: {path} has {h} heads, the plan's layer {layer} has "
                    f"{plan_h}; use the plan made for this model. If the model runs Ulysses "
                    f"sequence parallelism (each rank holds H/N heads), tell the backend which "
                    "heads this rank holds: parallel=<the transformer | its "
                    "ContextParallelConfig | (rank, degree) | 'auto'> or head_range=(h0, h1)")
        else:
            h0, h1 = (int(x) for x in rng)
            if not (0 <= h0 < h1 <= plan_h and h1 - h0 == h):
                raise PlanMismatchError(
                    f"scaling_attn_backend: {path} has {h} heads; the head range "
                    f"[{h0}, {h1}) of the plan's {plan_h} heads does not fit it (expected "
                    f"{h} heads within [0, {plan_h})); check parallel=/head_range= (was "
                    "enable_parallelism called before compiling, with the same degree?)")
            head_slices[layer] = None if (h0, h1) == (0, plan_h) else (h0, h1)
            report.head_range = (h0, h1)
        check_site_fits_kernel(path, q, head_dim)

    return tables, per_layer, head_slices


def bind_timestep(gm: torch.fx.GraphModule, sites: list[tuple], tables: AttentionTables,
                  example_inputs) -> tuple[torch.fx.Node, Any]:
    """Step 3: the graph's timestep input the op reads its bucket from, or a constant 0 when the
    plan has one bucket and the graph has no usable timestep. Returns ``(node, fake_mode)``."""
    g = gm.graph
    device = _val(sites[0][3]).device
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(list(example_inputs)) if example_inputs else None
    ts = adapter_for_graph(gm).find_timestep(gm)
    batch = _val(sites[0][3]).shape[0]
    needs_ts = tables.bucket_bounds.numel() > 0
    if ts is not None:
        tv = _val(ts)
        seq = _val(sites[0][3]).shape[2]  # q is (B, H, S, D)
        if isinstance(tv, torch.Tensor) and tv.dim() == 2 and tv.shape[0] in (1, batch) and (
                tv.shape[1] == seq):
            # Per-token timestep (B, S) (Wan2.2 TI2V-5B, expand_timesteps): the bucket is the
            # step's, the max over tokens; the first frame's tokens (the conditioning image)
            # carry 0. The calibration through the pipeline reads the same max.
            with g.inserting_before(sites[0][0]):
                ts = g.call_function(torch.amax, (ts, 1))
            ts.meta["example_value"] = torch.amax(tv, 1)
            tv = _val(ts)
        ok = isinstance(tv, torch.Tensor) and (tv.dim() == 0 or (
            tv.dim() == 1 and (tv.shape[0] == 1 or tv.shape[0] == batch)))
        if not ok:
            if needs_ts:
                raise PlanMismatchError(
                    "scaling_attn_backend: the timestep input must be a tensor of shape "
                    f"({batch},), () or per token ({batch}, {seq}), got "
                    f"{getattr(tv, 'shape', type(tv))}; use a plan with one timestep bucket")
            ts = None
    if ts is None:
        if needs_ts:
            raise PlanMismatchError(
                "scaling_attn_backend: the plan's density depends on the timestep but the graph "
                "has no timestep tensor input; call the transformer with timestep=<tensor> "
                "(a Python number is baked into the graph)")
        with g.inserting_before(sites[0][0]):
            ts = _register_constant(gm, BUFFER_PREFIX + "timestep",
                                    torch.zeros((), device=device), fake_mode)

    return ts, fake_mode


def rewrite_sites(gm: torch.fx.GraphModule, sites: list[tuple], per_layer: list, head_slices: dict,
                  ts: torch.fx.Node, fake_mode, energy, report: RewriteReport,
                  precision: str = "bf16") -> None:
    """Step 4: each site becomes ``torch.ops.scaling_attn.sparse_attention`` bound to its layer's
    tables (graph buffers with a ``ConstantSource``) and the timestep; the graph is recompiled."""
    g = gm.graph
    s = report.seq_len
    for n, layer, path, qn, kn, vn, scale in sites:
        masks, level_table, bounds = per_layer[layer]
        if head_slices.get(layer) is not None:
            h0, h1 = head_slices[layer]
            masks = masks[h0:h1].contiguous()
            level_table = level_table[:, h0:h1].contiguous()
        with g.inserting_before(n):
            m_node = _register_constant(gm, f"{BUFFER_PREFIX}masks_{layer}", masks, fake_mode)
            l_node = _register_constant(gm, f"{BUFFER_PREFIX}level_table_{layer}", level_table,
                                        fake_mode)
            b_node = _register_constant(gm, BUFFER_PREFIX + "bucket_bounds", bounds, fake_mode)
            args = (qn, kn, vn, m_node, l_node, b_node, ts, scale)
            rule, threshold = energy(layer, s) if energy is not None else (0, 0.0)
            # The 8-argument form stays the default: it is what the template lowers
            filtered = (rule, threshold) if rule else ()
            if precision != "bf16":  # the 8-bit op (its own lowering, no launch order)
                new = g.call_function(OP_Q8, (*args, precision, *filtered))
            else:
                new = g.call_function(OP, (*args, *filtered), launch_order_kwargs(
                    gm, f"{BUFFER_PREFIX}launch_order_{layer}", masks, level_table,
                    _val(qn).shape[2], fake_mode))
        new.meta.update(n.meta)
        q = _val(qn)
        if isinstance(q, torch.Tensor):
            new.meta["example_value"] = torch.empty_like(q)  # what the op's fake returns
        n.replace_all_uses_with(new)
        g.erase_node(n)
        report.per_layer[layer] = report.per_layer.get(layer, 0) + 1
        log.debug("%s -> sparse_attention(layer %d, scale %.4g)",
                  path, layer, scale)
    g.lint()
    gm.recompile()


OP = torch.ops.scaling_attn.sparse_attention.default
OP_Q8 = torch.ops.scaling_attn.sparse_attention_q8.default


def launch_order_kwargs(gm, name: str, masks, level_table, seq_len: int, fake_mode) -> dict:
    """``{"launch_order": <graph constant>}`` for one layer's (sliced, padded) tables, or ``{}``
    where ``SCALING_ATTN_LAUNCH_ORDER=0``. Call inside the graph's ``inserting_before``."""
    if not launch_order_enabled():
        return {}
    order = launch_order(masks, level_table, seq_len)
    return {"launch_order": _register_constant(gm, name, order, fake_mode)}


BUFFER_PREFIX = "scaling_attn_"
