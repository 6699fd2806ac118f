"""Inductor lowering of ``torch.ops.scaling_attn.sparse_attention``: a Triton template on CUDA,
the eager op (an extern call) everywhere else.

Importing this module registers the lowering; :mod:`scaling_attn_compile.compile.backend` imports it.

One source of kernel math: the template's source (:mod:`.template_source`) is a stub plus the
*source text* of the kernel's jit functions, the same functions the eager launcher calls.
Constexprs come from ``kernels/launch.py``'s ``launch_meta`` and ``CONFIGS``.

Cache hygiene: Inductor's FX graph cache key does not cover this project's files, so a kernel
edit could reuse stale generated code. :class:`KernelSourceHash` is a no-op post-grad pass whose
``uuid()`` hashes this file, ``backend.py``, ``rewrite.py``, ``regional.py``,
``template_source.py``, the kernel and
its launcher (``kernels/``) and the template source (taken at
import); the backend installs it in the config patches it gives ``compile_fx``.

Version notes (torch 2.11 to 2.14): the template is created
once at import (a duplicate ``TritonTemplate`` name asserts up to 2.13);
``autotune_select_algorithm`` returns ``node`` on 2.11 and ``(node, choice)`` from 2.12;
``store_output`` takes ``val_shape`` in all four, but the stub only passes it when the installed
signature has it.
"""

from __future__ import annotations

import inspect
import logging
import math
import os

import torch
from torch._inductor import ir
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.lowering import fallback_handler, register_lowering
from torch._inductor.select_algorithm import (
    SymbolicGridFn,
    TritonTemplate,
    autotune_select_algorithm,
    realize_inputs,
)
from torch._inductor.virtualized import V

from ..contract.masks import num_blocks, pack_blocks
from ..contract.validate import HEAD_DIMS, KERNEL_DTYPES
from ..kernels import block_sparse_attention as _kernel
from ..kernels import launch as _launch
from ..ops import op as _op  # noqa: F401  (registers torch.ops.scaling_attn.sparse_attention)
from . import template_source as _template_source
from .template_source import _TILE_FN, template_source

log = logging.getLogger("scaling_attn_compile")

OP = torch.ops.scaling_attn.sparse_attention.default
TEMPLATE_NAME = "scaling_attn_bsa"

# Devices the template is generated for. Anything else (the CPU) gets the eager op. Tests add
# "cpu" (with Inductor's triton cpu backend) to render the template without a GPU.
TEMPLATE_DEVICE_TYPES = {"cuda"}


@SymbolicGridFn
def _grid(b, h, m, d, meta, *, cdiv):
    return (cdiv(m, meta["BLOCK_M"]), b, h)


def _make_template(name: str, source: str) -> TritonTemplate:
    """Created once, at import: torch <= 2.13 asserts on a second TritonTemplate with a name."""
    if name in TritonTemplate.all_templates:  # importlib.reload: keep the registered one
        return TritonTemplate.all_templates[name]
    # always_freeze_layout (torch >= 2.12, as flex uses it): fix an input's layout when the
    # template reads its strides, instead of a speculative constraint that the scheduler may
    # resolve by falling back to aten; this op has no aten fallback inside the choices.
    extra = ({"always_freeze_layout": True} if "always_freeze_layout"
             in inspect.signature(TritonTemplate.__init__).parameters else {})
    return TritonTemplate(name=name, grid=_grid, source=source, **extra)


_TEMPLATE_SOURCE = template_source()
_TEMPLATE = _make_template(TEMPLATE_NAME, _TEMPLATE_SOURCE)
# The variant with a per-batch key length (kv_lens): one more input, HAS_KV_LENS=True.
_TEMPLATE_KV_SOURCE = template_source(kv_lens=True)
_TEMPLATE_KV = _make_template(TEMPLATE_NAME + "_kv", _TEMPLATE_KV_SOURCE)


def _select(name, choices, input_nodes, layout, **kwargs):
    result = autotune_select_algorithm(name, choices, input_nodes, layout, **kwargs)
    return result[0] if isinstance(result, tuple) else result  # 2.11: node; >= 2.12: (node, choice)


def _static(x) -> int:
    """An int for a size or stride: static values as they are, symbolic ones by their hint
    (for benchmark inputs only; the constexprs below are asserted static by the backend).
    ``size_hint`` became ``optimization_hint`` in torch 2.13."""
    try:
        return int(x)
    except TypeError:
        sizevars = V.graph.sizevars
        hint = getattr(sizevars, "optimization_hint", None) or sizevars.size_hint
        return int(hint(x))


def _shape(node) -> list[int]:
    return [_static(s) for s in node.get_size()]


def _like(node, values: torch.Tensor) -> torch.Tensor:
    """``values`` copied into a tensor with ``node``'s size, strides, dtype and device."""
    size, stride = _shape(node), [_static(s) for s in node.get_stride()]
    out = torch.empty_strided(size, stride, dtype=node.get_dtype(), device=node.get_device())
    return out.copy_(values.to(out.device, out.dtype).expand(size))


def _input_gen_fns(seq_len: int):
    """Op inputs for autotuning benchmarks: all real blocks kept, the slowest mask, which is what
    the tile configs must be good at (random words would time a random density; the kernel
    clamps levels and ignores bits past the last block, so no values read out of bounds).
    """
    nb = num_blocks(seq_len)

    def masks(node):
        h, levels, rows, _ = _shape(node)
        full = torch.ones(h, levels, rows, nb, dtype=torch.bool)
        return _like(node, pack_blocks(full))

    def level_table(node):
        return _like(node, torch.zeros(_shape(node), dtype=torch.int32))

    def bounds(node):
        n = _shape(node)[0]
        return _like(node, torch.linspace(0.0, 1000.0, n + 2)[1:-1])  # sorted, in (0, 1000)

    def timestep(node):
        return _like(node, torch.full(_shape(node), 500.0))

    def kv_lens(node):  # every key valid: the slowest case, as the masks above
        return _like(node, torch.full(_shape(node), seq_len, dtype=torch.int32))

    return {3: masks, 4: level_table, 5: bounds, 6: timestep, 7: kv_lens}


def template_configs() -> list[dict]:
    """The kernel module's tile configurations, as dicts of their fields.

    ``CONFIGS`` holds ``KernelConfig`` named tuples (block_m, num_warps, num_stages, use_tma,
    warp_specialize) or plain ``(block_m, num_warps, num_stages)`` tuples. Configs with TMA or
    warp specialisation are left to the eager launcher: device-side tensor descriptors need a
    Triton allocator that Inductor's generated code does not set.
    """
    out = []
    for c in _launch.CONFIGS:
        fields = getattr(c, "_fields", ("block_m", "num_warps", "num_stages"))
        d = dict(zip(fields, c, strict=False))
        if d.get("use_tma") or d.get("warp_specialize"):
            continue
        out.append(d)
    return out


def _tile_constexprs(meta: dict, config: dict) -> dict:
    """The tile function's constexpr parameters for one config: launch_meta's, BLOCK_M, any
    other config field by its upper-case name (USE_TMA, ...), then the parameter defaults."""
    raw = getattr(_TILE_FN, "fn", _TILE_FN)
    out = dict(meta)
    out["BLOCK_M"] = config["block_m"]
    for key, value in config.items():
        if key.upper() not in out and key not in ("num_warps", "num_stages"):
            out[key.upper()] = value
    for name, p in inspect.signature(raw).parameters.items():
        # A None default is a pointer (KV_LENS): the stub binds it, it is no constexpr.
        if name not in out and p.default is not inspect.Parameter.empty and p.default is not None:
            out[name] = p.default
    params = inspect.signature(raw).parameters
    return {k: v for k, v in out.items() if k in params}


def _template_supported(q) -> bool:
    head_dim = _static(q.get_size()[-1])
    return q.get_dtype() in KERNEL_DTYPES and head_dim in HEAD_DIMS


@register_lowering(OP, type_promotion_kind=None)
def _lower_sparse_attention(q, k, v, masks, level_table, bucket_bounds, timestep, scale,
                            energy_rule=0, energy_threshold=0.0, kv_lens=None):
    device = q.get_device()
    eager_args = (q, k, v, masks, level_table, bucket_bounds, timestep, scale) + (
        (energy_rule, energy_threshold) if energy_rule or kv_lens is not None else ()) + (
        (kv_lens,) if kv_lens is not None else ())
    if device is None or device.type not in TEMPLATE_DEVICE_TYPES or not _template_supported(q) \
            or (energy_rule and not math.isfinite(energy_threshold)):
        # CPU (and unsupported dtypes / head dims on CUDA, which the eager op rejects with a
        # clear error; and a filter threshold of +-inf, which is no constexpr the generated code
        # can spell): an extern call to the registered eager implementation.
        return fallback_handler(OP, add_to_fallback_set=False)(*eager_args)

    inputs = [realize_inputs(x) for x in (q, k, v, masks, level_table, bucket_bounds, timestep)]
    if kv_lens is not None:  # the kernel reads KV_LENS + b: stride 1
        inputs.append(ir.ExternKernel.require_contiguous(realize_inputs(kv_lens)))
    template = _TEMPLATE if kv_lens is None else _TEMPLATE_KV
    q = inputs[0]
    size = list(q.get_size())
    b, h, s, d = (_static(x) for x in size)
    # Output: q's size and fill order, as the fake (empty_like(q)) promises.
    stride = ir.FlexibleLayout.stride_ordered(size, ir.get_stride_order(q.get_stride()))
    layout = ir.FixedLayout(device, q.get_dtype(), size, stride)

    # The eager launcher reads timestep[b] with stride 0 when there is one timestep for the
    # whole batch; the same here (a (1,) timestep with B > 1 must not be read past its end).
    ts = inputs[6]
    ts_size = ts.get_size()
    if len(ts_size) == 0 or V.graph.sizevars.statically_known_equals(ts_size[0], 1):
        stride_ts = 0
    else:
        stride_ts = _static(ts.get_stride()[0])
    meta = _launch.launch_meta(s, _shape(inputs[3])[-1], _shape(inputs[5])[0], d)
    if energy_rule:  # the filter is the tile's constexpr rule and threshold (log2 units)
        meta.update(ENERGY_RULE=int(energy_rule), energy_thr=float(energy_threshold) * _kernel.LOG2E)
    if kv_lens is not None:
        meta.update(HAS_KV_LENS=True)
    choices: list = []
    for config in template_configs():
        if energy_rule and config["block_m"] != _kernel.MASK_BLOCK:
            continue  # the filter votes per 128-row query tile, as in the eager launcher
        err = template.maybe_append_choice(
            choices, input_nodes=inputs, layout=layout, num_stages=config["num_stages"],
            num_warps=config["num_warps"], call_sizes=size,
            QK_SCALE=float(scale) * _kernel.LOG2E, STRIDE_TS=stride_ts,
            **_tile_constexprs(meta, config))
        if err is not None:
            log.debug("sparse_attention template config %s skipped: %s", config, err)
    if not choices:
        log.warning("sparse_attention: no template choice for q %s %s; using the eager op",
                    (b, h, s, d), q.get_dtype())
        return fallback_handler(OP, add_to_fallback_set=False)(*inputs[:7], *eager_args[7:])
    return _select(template.name, choices, inputs, layout, input_gen_fns=_input_gen_fns(s))


_HASHED_FILES = (
    os.path.abspath(__file__),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend.py"),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "rewrite.py"),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "regional.py"),
    os.path.abspath(_template_source.__file__),
    os.path.abspath(_kernel.__file__),
    os.path.abspath(_launch.__file__),
)


def source_hash(paths=_HASHED_FILES) -> bytes:
    """sha256 of the files and of the template source this process built at import.

    Taken once at import (``_SOURCE_HASH``), not at every ``uuid()``: the template was built
    from the files as they were then, and a file edited later in a running process must not
    file this process's (old) generated code under the new file's key.
    """
    return get_hash_for_files(tuple(p for p in paths if os.path.exists(p)),
                              _TEMPLATE_SOURCE + _TEMPLATE_KV_SOURCE)


_SOURCE_HASH = source_hash()


class KernelSourceHash(CustomGraphPass):
    """A post-grad pass that does nothing; its ``uuid()`` puts the lowering, backend and kernel
    sources into Inductor's FX graph cache key, so a changed kernel never reuses stale code.

    ``inner`` (optional) is a user pass to run and hash along (the backend composes it when the
    user's ``inductor_config`` sets ``post_grad_custom_post_pass`` too).
    """

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self):
        if self.inner is None:
            return _SOURCE_HASH
        inner_uuid = getattr(self.inner, "uuid", None)
        if inner_uuid is None:
            return None  # an un-hashable user pass: Inductor bypasses the cache, as it would
        return _SOURCE_HASH + repr(inner_uuid()).encode()
