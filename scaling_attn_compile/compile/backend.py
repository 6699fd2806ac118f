"""The ``torch.compile`` backend: block-sparse self-attention in a diffusers Wan transformer.

    backend = scaling_attn_backend(plan)                  # build ONCE, reuse for every compile
    transformer = torch.compile(transformer, backend=backend, fullgraph=True, dynamic=False)

    # or by name, through the torch_dynamo_backends entry point "scaling_attn":
    transformer = torch.compile(transformer, backend="scaling_attn", options={"plan": plan})

For each graph Dynamo hands it, the backend

0. checks that the graph's parameters are the plan's model (config shapes and the attention
   weights fingerprint, ``check_model``); a graph with symbolic sizes is compiled per concrete
   size at its first call instead (``on_dynamic_shapes="specialize"``, :mod:`.specialize`);
1. finds the latent grid ``(F, H, W)`` after patching (the output shape of the ``patch_embedding``
   Conv3d applied to the ``hidden_states`` input ``[B, C, F, H, W]``), materialises the plan for
   it and checks the plan against the model (layers, heads, head_dim, sequence length);
2. rewrites every ``F.scaled_dot_product_attention`` call of self-attention
   (``blocks.<i>.attn1`` in ``nn_module_stack``, ``Sq == Sk``, no mask, no dropout, not causal)
   into ``torch.ops.scaling_attn.sparse_attention`` bound to layer ``i``'s tables (graph buffers
   with a ``ConstantSource``, so their values stay out of compiled code and caches) and the
   transformer's ``timestep`` input (density is looked up on the device: no recompile per step);
3. hands the graph to Inductor's ``compile_fx``; the op's lowering (:mod:`.lowering`) makes it a
   Triton template kernel on CUDA and an extern call to the eager op elsewhere.

Cross-attention (``attn2``: text, and text + image for I2V) is never touched. The design and the
reasons are in ``DESIGN.md``.

Logging: logger ``scaling_attn_compile``; INFO gives one line per compiled graph with the
rewrite count per layer; ``verbose=True`` attaches a stderr handler at INFO.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch._dynamo.source import ConstantSource

from . import lowering as _lowering  # registers the Inductor lowering of the op
from ..contract.masks import num_blocks, num_words
from ..ops.op import HEAD_DIMS, KERNEL_DTYPES
from .specialize import PerShape, is_symbolic
from ..contract.tables import AttentionTables

log = logging.getLogger("scaling_attn_compile")

OP = torch.ops.scaling_attn.sparse_attention.default
# "L['self'].blocks.0.attn1" (torch 2.11) and
# "L['self'].__dict__['_modules']['blocks'].0.attn1" (torch 2.13): one regex for both.
LAYER_RE = re.compile(r"blocks\W+(\d+)\W+(attn\d)")
# A block whose forward a diffusers hook replaced (context parallelism puts its split hook on
# blocks.0) is reached through the hook's closure, e.g. "...['blocks'].0.forward.func
# .__closure__[0].cell_contents.forward.__self__.attn1". Only these wrapper tokens may stand
# between the layer index and the attention, so no other nesting is mistaken for a layer.
HOOKED_LAYER_RE = re.compile(
    r"blocks\W+(\d+)(?:\W|\d|forward|func|__closure__|cell_contents|__self__)*?\W(attn\d)$")
SELF_ATTENTION = "attn1"
BUFFER_PREFIX = "scaling_attn_"


class PlanMismatchError(ValueError):
    """The plan does not fit the compiled model (layers, heads, head_dim, grid or dtype)."""


class DynamicShapeError(RuntimeError):
    """A self-attention sequence length is symbolic; masks exist per static resolution."""


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
    """

    grid: tuple[int, int, int] | None = None
    seq_len: int | None = None
    per_layer: dict[int, int] = field(default_factory=dict)
    left_dense: dict[str, int] = field(default_factory=dict)
    dense_fallback: str | None = None
    head_range: tuple[int, int] | None = None
    token_order: str | None = None

    @property
    def num_rewritten(self) -> int:
        return sum(self.per_layer.values())


# --------------------------------------------------------------------------------------------
# Graph inspection helpers
# --------------------------------------------------------------------------------------------


def _site(node: torch.fx.Node) -> tuple[int | None, str | None, str | None]:
    """(layer index, 'attn1'/'attn2', module path) of the innermost ``blocks.<i>.attn<k>``."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in reversed(list(stack.values())):
        m = LAYER_RE.search(str(path)) or HOOKED_LAYER_RE.search(str(path))
        if m:
            return int(m.group(1)), m.group(2), str(path)
    return None, None, None


def _module_paths(node: torch.fx.Node) -> list[str]:
    return [str(p) for p, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _val(node) -> Any:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else node


def _is_static(x) -> bool:
    return isinstance(x, int) and not isinstance(x, torch.SymInt)


def _sdpa_args(node: torch.fx.Node) -> dict[str, Any]:
    """SDPA arguments by name, whether Dynamo recorded them as args or kwargs."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
           "enable_gqa": False}
    out.update(dict(zip(names, node.args, strict=False)))
    out.update(node.kwargs)
    return out


def _source_name(node: torch.fx.Node) -> str:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    try:
        return source.name() if callable(getattr(source, "name", None)) else str(source.name)
    except Exception:  # noqa: BLE001 - a source without a name is just not matched by name
        return ""


def _is_param_or_buffer(node: torch.fx.Node) -> bool:
    name = _source_name(node)
    return "_parameters" in name or "_buffers" in name


def find_timestep(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The transformer's ``timestep`` placeholder.

    By name (``L['kwargs']['timestep']`` or a placeholder called ``*timestep*``); failing that
    (a positional call), the non-parameter placeholder feeding Wan's ``timesteps_proj``.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in placeholders:
        if _is_param_or_buffer(n):
            continue
        src = _source_name(n)
        if re.search(r"\[['\"]timestep['\"]\]$", src) or (
                "timestep" in n.name and "encoder" not in n.name):
            return n
    # A positional call: walk back from the nodes of the sinusoidal timestep embedding.
    seen = set()
    todo = [x for n in gm.graph.nodes if any("timesteps_proj" in p for p in _module_paths(n))
            for x in n.all_input_nodes]
    while todo:
        x = todo.pop(0)
        if x in seen:
            continue
        seen.add(x)
        if x.op == "placeholder" and not _is_param_or_buffer(x):
            return x
        todo.extend(x.all_input_nodes)
    return None


def find_latent_grid(gm: torch.fx.GraphModule, patch_size: Sequence[int] | None = None
                     ) -> tuple[tuple[Any, ...] | None, str]:
    """Latent grid ``(F, H, W)`` after patching, and where it came from.

    The output of the ``patch_embedding`` Conv3d is ``[B, inner, F, H, W]``: its last three sizes
    are the grid whatever the kernel, stride or padding. With ``patch_size`` given, the grid is
    the ``hidden_states`` input ``[B, C, F, H, W]`` divided by it instead. May return symbolic
    sizes (the caller decides what to do with them).
    """
    conv = None
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (torch.conv3d, F.conv3d) and any(
                "patch_embedding" in p for p in _module_paths(n)):
            conv = n
            break
    if patch_size is not None:
        hidden = conv.args[0] if conv is not None else None
        if hidden is None:
            cands = [n for n in gm.graph.nodes if n.op == "placeholder"
                     and not _is_param_or_buffer(n) and "encoder" not in n.name
                     and "hidden_states" in (_source_name(n) + n.name)]
            hidden = cands[0] if cands else None
        shape = getattr(_val(hidden), "shape", None)
        if shape is None or len(shape) != 5:
            return None, "no 5-D hidden_states input [B, C, F, H, W] in the graph"
        pt, ph, pw = patch_size
        f, h, w = shape[2:]
        if any(_is_static(a) and a % p for a, p in zip((f, h, w), (pt, ph, pw), strict=True)):
            raise PlanMismatchError(
                f"scaling_attn_backend: hidden_states grid {tuple(shape[2:])} is not divisible "
                f"by patch_size={tuple(patch_size)}; pass the model's patch size "
                "(transformer.config.patch_size) or leave patch_size=None")
        return (f // pt, h // ph, w // pw), f"hidden_states {tuple(shape)} / patch {patch_size}"
    if conv is None:
        return None, "no patch_embedding Conv3d in the graph"
    out = _val(conv)
    if out is None or len(out.shape) != 5:
        return None, "patch_embedding output is not 5-D"
    return tuple(out.shape[2:]), f"patch_embedding output {tuple(out.shape)}"


def _whole_model(gm: torch.fx.GraphModule) -> bool:
    """Does this graph hold the model's first and last parts (no graph break in between)?"""
    paths = [p for n in gm.graph.nodes for p in _module_paths(n)]
    return any("patch_embedding" in p for p in paths) and any("proj_out" in p for p in paths)


# --------------------------------------------------------------------------------------------
# The FX pass
# --------------------------------------------------------------------------------------------


def _register_constant(gm: torch.fx.GraphModule, name: str, value: torch.Tensor,
                       fake_mode) -> torch.fx.Node:
    """A graph buffer AOT lifts as an input. Without the ConstantSource, AOT asserts
    "``name`` not found in param_name_to_source"; a plain tensor attribute would reach the fake
    kernel as a real tensor (research/inductor.md §3)."""
    if name not in dict(gm.named_buffers()):
        gm.register_buffer(name, value)
        if hasattr(gm, "_param_name_to_source"):
            gm._param_name_to_source[name] = ConstantSource(name)
    node = gm.graph.get_attr(name)
    if fake_mode is not None:
        node.meta["example_value"] = fake_mode.from_tensor(value, static_shapes=True)
    return node


def _check_tables(tables: AttentionTables, grid) -> None:
    if not all(hasattr(tables, a) for a in ("grid", "masks", "level_tables", "bucket_bounds")):
        raise TypeError(
            "scaling_attn_backend: the plan must give AttentionTables (grid, masks, "
            f"level_tables, bucket_bounds), got {type(tables).__name__}")
    if tuple(tables.grid) != tuple(grid):
        raise PlanMismatchError(
            f"scaling_attn_backend: the plan's tables are for latent grid {tuple(tables.grid)}, "
            f"the model runs grid {tuple(grid)} (F, H, W after patching); pass a Plan "
            "(with .materialize(grid)) or a callable grid -> AttentionTables so the backend can "
            "materialise the tables for each resolution")
    s = math.prod(grid)
    nb, nw = num_blocks(s), num_words(s)
    if len(tables.masks) != len(tables.level_tables):
        raise PlanMismatchError(
            f"scaling_attn_backend: the plan has {len(tables.masks)} mask tables but "
            f"{len(tables.level_tables)} level tables; rebuild the plan")
    nt = tables.bucket_bounds.numel() + 1
    b = tables.bucket_bounds.float()
    if tables.bucket_bounds.dim() != 1 or (b[1:] < b[:-1]).any():
        raise PlanMismatchError(
            "scaling_attn_backend: bucket_bounds must be 1-D ascending, got "
            f"{b.tolist()}; rebuild the plan")
    for i, (m, lt) in enumerate(zip(tables.masks, tables.level_tables, strict=True)):
        if m.dtype != torch.int32 or m.dim() != 4 or m.shape[2] != nb or m.shape[3] != nw:
            raise PlanMismatchError(
                f"scaling_attn_backend: layer {i} masks must be int32 (H, L, NB={nb}, W={nw}) "
                f"for grid {tuple(grid)} (S={s}), got {m.dtype} {tuple(m.shape)}; "
                "materialise the plan for this grid")
        if lt.dtype != torch.int32 or tuple(lt.shape) != (nt, m.shape[0]):
            raise PlanMismatchError(
                f"scaling_attn_backend: layer {i} level_table must be int32 (NT={nt}, "
                f"H={m.shape[0]}), got {lt.dtype} {tuple(lt.shape)}; rebuild the plan")
        if lt.numel() and (int(lt.min()) < 0 or int(lt.max()) >= m.shape[1]):
            raise PlanMismatchError(
                f"scaling_attn_backend: layer {i} level_table holds levels "
                f"[{int(lt.min())}, {int(lt.max())}] but the masks have {m.shape[1]} levels; "
                "rebuild the plan")


# --------------------------------------------------------------------------------------------
# Sequence parallelism: which of the plan's heads this rank runs
# --------------------------------------------------------------------------------------------


def ulysses_rank(parallel) -> tuple[int, int] | None:
    """``(rank in the Ulysses group, Ulysses degree)`` from a ``parallel`` option, or None.

    Accepts ``(rank, degree)``; a diffusers ``ContextParallelConfig`` or ``ParallelConfig`` set
    up by ``transformer.enable_parallelism`` (its ``_ulysses_local_rank`` and
    ``ulysses_degree``), or the transformer itself (its ``_parallel_config``); or ``"auto"``:
    ``torch.distributed``'s rank and world size, right when the Ulysses group is the whole
    default group in rank order (diffusers' mesh for ``ulysses_degree == world_size``, which
    is how ``torchrun --nproc-per-node N`` with ``ContextParallelConfig(ulysses_degree=N)``
    runs); None when torch.distributed is not initialised.
    """
    if parallel is None:
        return None
    if isinstance(parallel, str):
        if parallel != "auto":
            raise ValueError("scaling_attn_backend: parallel must be 'auto', (rank, degree), a "
                             "diffusers ContextParallelConfig/ParallelConfig or the transformer; "
                             f"got {parallel!r}")
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.get_rank(), dist.get_world_size()
    if isinstance(parallel, Sequence):
        rank, degree = (int(x) for x in parallel)
    else:
        cfg = getattr(parallel, "_parallel_config", None) or parallel  # the transformer
        cfg = getattr(cfg, "context_parallel_config", None) or cfg  # ParallelConfig
        if not hasattr(cfg, "ulysses_degree"):
            raise TypeError(
                "scaling_attn_backend: parallel must be 'auto', (rank, degree), a diffusers "
                "ContextParallelConfig/ParallelConfig or a transformer after "
                f"enable_parallelism; got {type(parallel).__name__}")
        if (cfg.ring_degree or 1) > 1:
            # Ring attention splits the keys over ranks: the op would see a chunk of the
            # sequence, and the block masks are for the whole sequence.
            raise PlanMismatchError(
                f"scaling_attn_backend: ring_degree={cfg.ring_degree}; block-sparse attention "
                "supports Ulysses sequence parallelism only; use "
                "ContextParallelConfig(ulysses_degree=N) with ring_degree=1")
        rank, degree = cfg._ulysses_local_rank, cfg.ulysses_degree
        if rank is None:
            raise PlanMismatchError(
                "scaling_attn_backend: the ContextParallelConfig is not set up (no Ulysses "
                "rank yet); call transformer.enable_parallelism(config=...) before the first "
                "compiled call")
    if not 0 <= rank < degree:
        raise ValueError(f"scaling_attn_backend: parallel=(rank, degree) needs 0 <= rank < "
                         f"degree, got ({rank}, {degree})")
    return rank, degree


def ulysses_head_range(plan_heads: int, rank: int, degree: int) -> tuple[int, int]:
    """The plan's heads rank ``rank`` of ``degree`` holds after the Ulysses all-to-all.

    diffusers' ``TemplatedUlyssesAttention`` views each rank's ``(B, S/N, H, D)`` as
    ``(B, S/N, N, H/N, D)`` and all-to-alls over the ``N`` axis: rank ``r`` receives head
    chunk ``r`` from every rank, i.e. heads ``[r*H/N, (r+1)*H/N)`` for the whole sequence.
    (xDiT/yunchang's ``SeqAllToAll4D`` splits heads the same way.)
    """
    if plan_heads % degree:
        raise PlanMismatchError(
            f"scaling_attn_backend: Ulysses degree {degree} does not divide the plan's "
            f"{plan_heads} heads; use a degree that divides the head count")
    n = plan_heads // degree
    return rank * n, (rank + 1) * n


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

    Returns:
        A :class:`RewriteReport`.
    """
    if on_dynamic_shapes not in ("error", "dense"):
        raise ValueError("scaling_attn_backend: on_dynamic_shapes must be 'error' or 'dense', "
                         f"got {on_dynamic_shapes!r}")
    g = gm.graph
    report = RewriteReport()
    left = Counter()
    sites = []  # (node, layer, module path, q node, k node, v node, scale)
    seen_self_layers = set()
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not F.scaled_dot_product_attention:
            continue
        layer, which, path = _site(n)
        if which != SELF_ATTENTION:
            left["cross-attention" if which else "not under blocks.<i>.attn<k>"] += 1
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
            warnings.warn(f"scaling_attn_backend: {path} SDPA left dense: {reason}", stacklevel=2)
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
            return report
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
            "scaling_attn_backend: no self-attention SDPA (blocks.<i>.attn1) found in this "
            f"graph ({n_sdpa} SDPA calls, {dict(left)}); compiling it dense. The model must use "
            "diffusers' 'native' attention backend (transformer.set_attention_backend('native'))"
            " and be compiled whole (regional compilation hides the layer index)", stacklevel=2)
        return report

    # -- the latent grid and the plan for it --------------------------------------------------
    if grid is not None:
        found, where = tuple(grid), "the grid option"
    else:
        found, where = find_latent_grid(gm, patch_size)
    if found is None:
        raise PlanMismatchError(
            f"scaling_attn_backend: cannot find the latent grid ({where}); the graph must "
            "contain the transformer's patch_embedding (no graph break before the blocks), or "
            "pass grid=(F, H, W) or patch_size=(pt, ph, pw) to scaling_attn_backend")
    if not all(_is_static(x) for x in found):
        msg = f"latent grid {found} (from {where}) is symbolic"
        if on_dynamic_shapes == "error":
            raise DynamicShapeError(
                f"scaling_attn_backend: {msg}; compile with torch.compile(..., dynamic=False) "
                "or pass on_dynamic_shapes='dense'")
        log.warning("%s; this graph runs dense attention", msg)
        report.dense_fallback = msg
        return report
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
    if _whole_model(gm) and len(seen_self_layers) != n_layers:
        raise PlanMismatchError(
            f"scaling_attn_backend: the model has {len(seen_self_layers)} self-attention layers, "
            f"the plan has {n_layers}; use the plan made for this model")
    head_slices = {}  # layer -> (h0, h1) of the plan's heads, or None for all of them
    for _n, layer, path, qn, *_ in sites:
        q = _val(qn)
        b, h, _, d = q.shape
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
        if head_dim is not None and d != head_dim:
            raise PlanMismatchError(
                f"scaling_attn_backend: {path} has head_dim {d}, the plan was made for "
                f"head_dim {head_dim}; use the plan made for this model")
        if q.device.type == "cuda" and (q.dtype not in KERNEL_DTYPES or d not in HEAD_DIMS):
            raise PlanMismatchError(
                f"scaling_attn_backend: {path} runs {q.dtype} with head_dim {d} on CUDA; the "
                f"kernel supports dtypes {KERNEL_DTYPES} and head_dim in {HEAD_DIMS}; cast the "
                "transformer, e.g. transformer.to(torch.bfloat16)")

    # -- the timestep input --------------------------------------------------------------------
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(list(example_inputs)) if example_inputs else None
    ts = find_timestep(gm)
    batch = _val(sites[0][3]).shape[0]
    needs_ts = tables.bucket_bounds.numel() > 0
    if ts is not None:
        tv = _val(ts)
        ok = isinstance(tv, torch.Tensor) and (tv.dim() == 0 or (
            tv.dim() == 1 and (tv.shape[0] == 1 or tv.shape[0] == batch)))
        if not ok:
            if needs_ts:
                raise PlanMismatchError(
                    "scaling_attn_backend: the timestep input must be a tensor of shape "
                    f"({batch},) or (), got {getattr(tv, 'shape', type(tv))} (a per-token "
                    "timestep, as in Wan2.2 TI2V, is not supported); use a plan with one "
                    "timestep bucket")
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

    # -- rewrite -------------------------------------------------------------------------------
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
            if rule:  # the 8-argument form stays the default: it is what the template lowers
                args = (*args, rule, threshold)
            new = g.call_function(OP, args)
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
    return report


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


def _pad_bounds(level_table: torch.Tensor, bounds: torch.Tensor):
    """Append a +inf bound and repeat the last level row: the same bucket for every finite t
    (``#{bounds <= t}`` never counts +inf), and no zero-element graph input for Inductor or the
    Triton launcher (a single-bucket plan has an empty ``bucket_bounds``)."""
    inf = torch.full((1,), float("inf"), dtype=bounds.dtype, device=bounds.device)
    return torch.cat([level_table, level_table[-1:]]), torch.cat([bounds, inf])


class ScalingAttnBackend:
    """A ``torch.compile`` backend callable; see :func:`scaling_attn_backend`.

    Attributes:
        reports: one :class:`RewriteReport` per graph compiled, in order.
    """

    def __init__(self, plan, *, inductor_config: Mapping[str, Any] | None = None,
                 patch_size: Sequence[int] | None = None, grid: Sequence[int] | None = None,
                 on_dynamic_shapes: str = "specialize", compiler: str | Callable = "inductor",
                 hash_kernel_sources: bool = True, materialize_kwargs: Mapping | None = None,
                 energy_filter=None, head_range: Sequence[int] | None = None,
                 parallel=None, check_model: str | bool = "weights", verbose: bool = False):
        if not (isinstance(plan, AttentionTables) or hasattr(plan, "materialize")
                or callable(plan)):
            raise TypeError(
                "scaling_attn_backend: plan must be AttentionTables, an object with "
                f".materialize(grid) -> AttentionTables, or a callable grid -> AttentionTables; "
                f"got {type(plan).__name__}")
        if on_dynamic_shapes not in ("specialize", "error", "dense"):
            raise ValueError("scaling_attn_backend: on_dynamic_shapes must be 'specialize', "
                             f"'error' or 'dense', got {on_dynamic_shapes!r}")
        if not (compiler in ("inductor", "eager") or callable(compiler)):
            raise ValueError("scaling_attn_backend: compiler must be 'inductor', 'eager' or a "
                             f"callable (gm, example_inputs) -> callable, got {compiler!r}")
        if patch_size is not None and len(tuple(patch_size)) != 3:
            raise ValueError("scaling_attn_backend: patch_size must be (pt, ph, pw), got "
                             f"{patch_size!r}")
        if head_range is not None and parallel is not None:
            raise ValueError("scaling_attn_backend: pass head_range=(h0, h1) or parallel=..., "
                             "not both (both say which heads this rank holds)")
        if head_range is not None and (len(tuple(head_range)) != 2 or not all(
                isinstance(x, int) for x in head_range)):
            raise ValueError("scaling_attn_backend: head_range must be (h0, h1), ints, got "
                             f"{head_range!r}")
        if isinstance(parallel, str) and parallel != "auto":
            raise ValueError("scaling_attn_backend: parallel must be 'auto', (rank, degree), a "
                             "diffusers ContextParallelConfig/ParallelConfig or the transformer; "
                             f"got {parallel!r}")
        self.head_range = tuple(head_range) if head_range is not None else None
        # Resolved at compile time, not here: diffusers sets the Ulysses rank up in
        # enable_parallelism, which may come after the backend is built.
        self.parallel = parallel
        self.plan = plan
        self.inductor_config = dict(inductor_config or {})
        self.patch_size = tuple(patch_size) if patch_size is not None else None
        self.grid = tuple(grid) if grid is not None else None
        self.on_dynamic_shapes = on_dynamic_shapes
        self.compiler = compiler
        self.hash_kernel_sources = hash_kernel_sources
        self.materialize_kwargs = dict(materialize_kwargs or {})
        from ..ops.energy import EnergyFilter

        if energy_filter is None:  # the plan may carry one (Plan.with_energy_filter)
            energy_filter = getattr(plan, "energy_filter", None)
        if isinstance(energy_filter, Mapping):
            energy_filter = EnergyFilter.from_dict(energy_filter)
        if energy_filter is not None and not isinstance(energy_filter, EnergyFilter):
            raise TypeError("scaling_attn_backend: energy_filter must be an EnergyFilter, a dict "
                            f"of its fields, or None; got {type(energy_filter).__name__}")
        self.energy_filter = energy_filter
        if self.materialize_kwargs and not hasattr(plan, "materialize"):
            raise ValueError("scaling_attn_backend: materialize_kwargs needs a plan with "
                             f".materialize(grid, **kwargs), got {type(plan).__name__}")
        meta = getattr(plan, "meta", None)
        self.head_dim = getattr(plan, "head_dim", None) or getattr(meta, "head_dim", None)
        from .model_check import ModelCheck

        # Checked before the first compile, from the graph's parameters (the backend never
        # sees the transformer itself); AttentionTables and callables record no model.
        check = ModelCheck(plan, check_model)  # validates the option
        self.model_check = check if ModelCheck.applies(plan) else None
        self.reports: list[RewriteReport] = []
        self._tables: dict[tuple, tuple[AttentionTables, list]] = {}
        if verbose:
            log.setLevel(logging.INFO)
            if not log.handlers:
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
                log.addHandler(handler)

    # One materialisation per (grid, device): recompiles (new graph, same resolution) and the
    # graphs of a model with graph breaks share the same device tensors.
    def tables_for(self, grid: tuple[int, int, int], device: torch.device):
        key = (tuple(grid), str(device))
        if key not in self._tables:
            plan = self.plan
            if isinstance(plan, AttentionTables):
                tables = plan
            elif hasattr(plan, "materialize"):
                tables = plan.materialize(tuple(grid), **self.materialize_kwargs)
            else:
                tables = plan(tuple(grid))
            _check_tables(tables, grid)
            per_layer = []
            bounds = tables.bucket_bounds.to(device=device, dtype=torch.float32)
            for m, lt in zip(tables.masks, tables.level_tables, strict=True):
                lt, b = _pad_bounds(lt.to(device).contiguous(), bounds)
                per_layer.append((m.to(device).contiguous(), lt, b))
            # All layers share one bounds tensor: one graph buffer, not one per layer.
            per_layer = [(m, lt, per_layer[0][2]) for m, lt, _ in per_layer]
            self._tables[key] = (tables, per_layer)
        return self._tables[key]

    def heads_for(self, plan_heads: int) -> tuple[int, int] | None:
        """The plan's heads this process's graphs run (see ``head_range``/``parallel``)."""
        if self.head_range is not None:
            return self.head_range
        rd = ulysses_rank(self.parallel)
        return None if rd is None else ulysses_head_range(plan_heads, *rd)

    def _apply_token_order(self, gm, report: RewriteReport, example_inputs) -> None:
        """Permute the graph's tokens into the tables' order (``order_pass.py``), if not raster."""
        if not report.per_layer:
            return
        orders = {t.token_order if hasattr(t, "token_order") else "raster"
                  for (g, _dev), (t, _) in self._tables.items() if g == tuple(report.grid)}
        if len(orders) != 1:
            raise PlanMismatchError(f"scaling_attn_backend: tables for grid {report.grid} come in "
                                    f"token orders {sorted(orders)}; use one plan per backend")
        (order,) = orders
        if str(order) != "raster" and (self.parallel is not None or self.head_range is not None):
            # Untested: Ulysses' split hooks cut the tokens and RoPE tables after the patch
            # embedding and gather them after proj_out, around where the permutations go.
            raise PlanMismatchError(
                f"scaling_attn_backend: the plan's blocks are in {order} order, which is not yet "
                "supported with sequence parallelism (parallel=/head_range=); extract a "
                "raster-order plan (scaling-attn west --token-order raster)")
        from torch._guards import detect_fake_mode

        from .order_pass import apply_token_order

        fake_mode = detect_fake_mode(list(example_inputs)) if example_inputs else None
        if apply_token_order(gm, report.grid, order, timestep=find_timestep(gm),
                             register_constant=_register_constant, fake_mode=fake_mode):
            report.token_order = str(order)

    def config_patches(self) -> dict[str, Any]:
        patches = dict(self.inductor_config)
        if self.hash_kernel_sources:
            patches["post_grad_custom_post_pass"] = _lowering.KernelSourceHash(
                patches.get("post_grad_custom_post_pass"))
        return patches

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        if self.model_check is not None:
            self.model_check(gm, example_inputs)
        if self.on_dynamic_shapes == "specialize" and is_symbolic(gm, example_inputs):
            # Dynamo's automatic-dynamic recompile at a second resolution (or dynamic=True):
            # masks exist per static grid, so compile once per concrete size at its first call.
            log.info("graph with symbolic sizes: compiling it per resolution at first call")
            return PerShape(gm, example_inputs, self.compile_static)
        return self.compile_static(gm, example_inputs)

    def compile_static(self, gm: torch.fx.GraphModule, example_inputs):
        """Rewrite and compile one graph (static shapes, or per ``on_dynamic_shapes``)."""
        report = rewrite_self_attention(
            gm, self.tables_for, example_inputs=example_inputs, patch_size=self.patch_size,
            grid=self.grid, head_dim=self.head_dim,
            on_dynamic_shapes="error" if self.on_dynamic_shapes == "specialize"
            else self.on_dynamic_shapes,
            energy=self.energy_filter.for_layer if self.energy_filter is not None else None,
            head_range=self.heads_for)
        self.reports.append(report)
        self._apply_token_order(gm, report, example_inputs)
        if report.per_layer and torch.is_grad_enabled() and any(
                isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
            # AOT would trace a backward through the op, which has no autograd formula, and
            # fail with "Trying to backward through scaling_attn.sparse_attention".
            raise RuntimeError(
                "scaling_attn_backend: the sparse attention op is inference-only, but this "
                "graph was traced with autograd on (parameters require grad); call the compiled "
                "transformer under torch.no_grad() or torch.inference_mode() (diffusers "
                "pipelines already do), or transformer.requires_grad_(False)")
        if report.per_layer:
            counts = ", ".join(f"{k}:{v}" for k, v in sorted(report.per_layer.items()))
            log.info("grid %s (S=%d): rewrote %d self-attention calls "
                     "(layer:count %s); left dense %s", report.grid, report.seq_len,
                     report.num_rewritten, counts, report.left_dense or "{}")
        if self.compiler == "eager":
            return gm.forward
        if callable(self.compiler):
            return self.compiler(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=self.config_patches())


def scaling_attn_backend(plan, **options) -> ScalingAttnBackend:
    """A ``torch.compile`` backend that runs self-attention block-sparse.

    Build it **once** and reuse it: Dynamo guards on the backend object, so a new backend per
    ``torch.compile`` call recompiles.

    Args:
        plan: :class:`~scaling_attn_compile.tables.AttentionTables` for the one latent grid the
            model runs, or an object with ``.materialize(grid) -> AttentionTables`` (a
            :class:`Plan`), or a callable ``grid -> AttentionTables``. ``grid`` is the latent
            ``(F, H, W)`` after patching (``S = F * H * W``).
        inductor_config: config patches for ``compile_fx`` (e.g. ``{"max_autotune": True}``;
            ``{"triton.cudagraphs": True}`` for CUDA graphs).
        patch_size: ``(pt, ph, pw)``; the grid is then ``hidden_states[B, C, F, H, W]`` sizes
            divided by it instead of the ``patch_embedding`` output shape.
        grid: the latent grid, for graphs that do not contain the patch embedding.
        on_dynamic_shapes: what to do with a graph whose sizes are symbolic (Dynamo's
            automatic-dynamic recompile at a second resolution, or ``dynamic=True``):
            ``"specialize"`` (default) compiles it once per concrete size at its first call
            (:mod:`.specialize`), so each resolution runs sparse with its own masks;
            ``"error"`` raises :class:`DynamicShapeError`; ``"dense"`` leaves it dense.
        check_model: before compiling, check that the model is the plan's (a :class:`Plan`
            records its model's config and weights fingerprint; see :mod:`.model_check`):
            ``"weights"`` (default) needs both to match; ``"config"`` allows other weights of
            the same architecture (a fine-tune or LoRA of the calibrated model) and logs a
            warning; ``False`` skips the check and logs that. A mismatch raises
            :class:`~scaling_attn_compile.plan.PlanModelMismatch` naming what differs.
        compiler: ``"inductor"`` (default), ``"eager"`` (run the rewritten graph eagerly; for
            debugging) or a callable ``(gm, example_inputs) -> callable``.
        hash_kernel_sources: put the kernel/lowering sources into Inductor's cache key.
        materialize_kwargs: extra keyword arguments for ``plan.materialize(grid, ...)``, e.g.
            ``{"density": 0.25}`` for a plan without a FAST schedule.
        energy_filter: an :class:`~scaling_attn_compile.energy.EnergyFilter` (or a dict of its
            fields): the kernel's online skipping of negligible visited blocks, per layer.
            ``None`` uses the plan's (``Plan.with_energy_filter``), if any.
        parallel: Ulysses sequence parallelism (each rank runs ``H/N`` heads for the whole
            sequence, and binds the plan's heads ``[r*H/N, (r+1)*H/N)``): the transformer after
            ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``, that config,
            ``(rank, N)``, or ``"auto"`` (``torch.distributed`` rank and world size; right when
            ``ulysses_degree`` is the world size). See :func:`ulysses_rank`.
        head_range: ``(h0, h1)``, the plan's heads this process runs, for other head splits.
            Without ``parallel``/``head_range`` a model with fewer heads than the plan is an
            error.
        verbose: log each compiled graph's rewrite counts to stderr.
    """
    return ScalingAttnBackend(plan, **options)


# Backends built by name, one per (plan, options): the same plan and options reuse one backend
# object and so its materialised tables. The plan is kept alive here, so its id stays unique.
_NAMED: dict[tuple, tuple[Any, ScalingAttnBackend]] = {}


def dynamo_backend(gm: torch.fx.GraphModule, example_inputs, *, options: Mapping | None = None,
                   mode: str | None = None):
    """The backend by name, for the ``torch_dynamo_backends`` entry point ``scaling_attn``:

        torch.compile(transformer, backend="scaling_attn", options={"plan": plan, ...})

    ``options`` holds ``plan`` and any keyword of :func:`scaling_attn_backend`; ``mode`` (e.g.
    ``"max-autotune-no-cudagraphs"``) becomes Inductor config patches, as for Inductor.
    """
    options = dict(options or {})
    if "plan" not in options:
        raise ValueError(
            "scaling_attn backend: options must hold the plan, e.g. torch.compile(transformer, "
            "backend='scaling_attn', options={'plan': load_plan(path)}); got options "
            f"{sorted(options)}")
    plan = options.pop("plan")
    if mode is not None:
        from torch._inductor import list_mode_options

        options["inductor_config"] = {**list_mode_options(mode),
                                      **dict(options.get("inductor_config") or {})}
    key = (id(plan), repr(sorted(options.items(), key=lambda kv: kv[0])))
    if key not in _NAMED:
        _NAMED[key] = (plan, ScalingAttnBackend(plan, **options))
    return _NAMED[key][1](gm, example_inputs)
