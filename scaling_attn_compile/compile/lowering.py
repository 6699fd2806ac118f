"""Inductor lowering of ``torch.ops.scaling_attn.sparse_attention``: a Triton template on CUDA,
the eager op (an extern call) everywhere else.

Choices on CUDA, autotuned on the same inputs: the template's tile configs (``CONFIGS``; the TMA
ones where K/V suit TMA on sm90+, :func:`_tma_ok`) and, where :func:`fa4_refusal` finds no
reason against it, FlashAttention-4 block-sparse as an extern choice
(``torch.ops.scaling_attn.sparse_attention_fa4``). ``SCALING_ATTN_FA4=0`` leaves FA4 out.
:data:`PICKS` records what each lowered call was offered and what won.

Importing this module registers the lowering; :mod:`scaling_attn_compile.compile.backend` imports
it, and :mod:`.lowering_q8` (the 8-bit op's lowering, which builds on this module's helpers).

One source of kernel math: the template's source (:mod:`.template_source`) is a stub plus the
*source text* of the kernel's jit functions, the same functions the eager launcher calls.
Constexprs come from ``kernels/launch.py``'s ``launch_meta`` and ``CONFIGS``.

Cache hygiene: Inductor's FX graph cache key does not cover this project's files, so a kernel
edit could reuse stale generated code. :class:`KernelSourceHash` is a no-op post-grad pass whose
``uuid()`` hashes this file, ``backend.py``, ``rewrite.py``, ``regional.py``,
``template_source.py``, the kernel, its launcher, ``fa4.py`` and ``ops/fa4_op.py`` and the
template source (taken at import), plus whether FA4 may be offered; the backend installs it
in the config patches it gives ``compile_fx``.

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
    ExternKernelChoice,
    SymbolicGridFn,
    TritonTemplate,
    autotune_select_algorithm,
    extern_kernels,
    realize_inputs,
)
from torch._inductor.virtualized import V

from ..contract.masks import natural_order, num_blocks, pack_blocks
from ..contract.validate import HEAD_DIMS, KERNEL_DTYPES
from ..kernels import block_sparse_attention as _kernel
from ..kernels import block_sparse_attention_q8 as _kernel_q8
from ..kernels import fa4 as _fa4
from ..kernels import launch as _launch
from ..kernels import quantize_q8 as _quantize_q8
from ..ops import op as _op  # noqa: F401  (registers torch.ops.scaling_attn.sparse_attention)
from ..ops.fa4_op import (  # noqa: F401  (FA4_ENV, fa4_choice, fa4_enabled: re-exported)
    FA4_ENV,
    FA4_OP,
    fa4_choice,
    fa4_enabled,
    fa4_refusal_reason,
)
from . import template_source as _template_source
from .template_source import _TILE_FN, template_source, template_source_q8

log = logging.getLogger("scaling_attn_compile")

OP = torch.ops.scaling_attn.sparse_attention.default
TEMPLATE_NAME = "scaling_attn_bsa"

# Devices the template is generated for. Anything else (the CPU) gets the eager op. Tests add
# "cpu" (with Inductor's triton cpu backend) to render the template without a GPU.
TEMPLATE_DEVICE_TYPES = {"cuda"}


@SymbolicGridFn
def _grid(b, h, m, d, meta, *, cdiv):
    # launch.program_rows: whole 128-row mask blocks of BLOCK_M-row tiles (a launch order may
    # hand any query block's tiles to any slot).
    return (cdiv(m, _kernel.MASK_BLOCK) * (_kernel.MASK_BLOCK // meta["BLOCK_M"]), b, h)


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


# One template per optional input: kv_lens (a per-batch key length, HAS_KV_LENS=True) and
# launch_order (the program order table the stub reads). Keyed by (kv_lens, launch_order).
_TEMPLATE_SOURCES = {(kv, lo): template_source(kv_lens=kv, launch_order=lo)
                     for kv in (False, True) for lo in (False, True)}
_TEMPLATES = {key: _make_template(TEMPLATE_NAME + "_kv" * key[0] + "_lo" * key[1], src)
              for key, src in _TEMPLATE_SOURCES.items()}
_TEMPLATE = _TEMPLATES[False, False]


def _select(name, choices, input_nodes, layout, **kwargs):
    """``(node, "fa4" | "template" | None)``; torch 2.11 returns the node, >= 2.12
    ``(node, choice)``."""
    result = autotune_select_algorithm(name, choices, input_nodes, layout, **kwargs)
    return (result[0] if isinstance(result, tuple) else result), _picked(result)


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


def _input_gen_fns(seq_len: int, has_kv_lens: bool = False, has_launch_order: bool = False):
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

    def launch_order(node):  # index order: with every block kept, every order is the same work
        nt, n = _shape(node)
        return _like(node, natural_order(nt, n // nb, seq_len))

    fns = {3: masks, 4: level_table, 5: bounds, 6: timestep}
    if has_kv_lens:
        fns[7] = kv_lens
    if has_launch_order:
        fns[len(fns) + 3] = launch_order
    return fns


def template_configs(tma: bool = False) -> list[dict]:
    """The kernel module's tile configurations, as dicts of their fields.

    ``CONFIGS`` holds ``KernelConfig`` named tuples (block_m, num_warps, num_stages, use_tma,
    warp_specialize) or plain ``(block_m, num_warps, num_stages)`` tuples. ``tma``: include the
    TMA configs (the lowering passes it where :func:`_tma_ok` holds). Their device-side tensor
    descriptors need a global scratch allocator, which Inductor's launcher sets before every
    launch (``CachingAutotuner.run`` calls ``triton.set_allocator``, torch 2.11 to 2.13; flex
    attention's ``USE_TMA`` relies on the same), and its static CUDA launcher, which has no
    scratch, declines such kernels and leaves them to Triton's. Warp-specialised configs stay
    with the eager launcher: none is in ``CONFIGS`` and the template has never run one.
    """
    out = []
    for c in _launch.CONFIGS:
        fields = getattr(c, "_fields", ("block_m", "num_warps", "num_stages"))
        d = dict(zip(fields, c, strict=False))
        if (d.get("use_tma") and not tma) or d.get("warp_specialize"):
            continue
        out.append(d)
    return out


def _tma_device(device) -> bool:
    """Hopper or newer: TMA (device-side tensor descriptors) exists from sm90."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


# TMA's rules (cuTensorMapEncodeTiled): base address and every outer stride 16-byte aligned,
# inner stride 1. The tile makes descriptors on K and V only (Q is one load per program).
TMA_ALIGN = 16


def _tma_ok(device, k, v) -> bool:
    """Whether the template's TMA configs can read ``k`` and ``v`` as they are laid out."""
    if not _tma_device(device):
        return False
    for node in (k, v):
        size = node.get_size()
        item = node.get_dtype().itemsize
        stride = [_static(x) for x in node.get_stride()]
        offset = _static(node.get_layout().offset)
        if stride[-1] != 1 or (offset * item) % TMA_ALIGN:
            return False
        if any((st * item) % TMA_ALIGN for st, n in zip(stride[:-1], size[:-1], strict=True)
               if _static(n) > 1):
            return False
    return True


# -- FlashAttention-4 as an extern choice -------------------------------------------------------

FA4_CHOICE_NAME = "scaling_attn_fa4"


def _fa4_device(device) -> bool:
    """``flash_attn.cute`` imports and ``device`` is sm90 (FA4's 128-row sparse blocks)."""
    return _fa4.fa4_available(device)


def fa4_refusal(device, q, k, v, energy_rule=0, kv_lens=None) -> str | None:
    """Why FA4 is not offered for this call (``None``: it is): the rules the eager op applies
    too (``ops/fa4_op.fa4_refusal_reason``), read off the IR nodes."""
    return fa4_refusal_reason(
        q.get_dtype(), _static(q.get_size()[-1]), [_static(x.get_stride()[-1]) for x in (q, k, v)],
        lambda: device is not None and _fa4_device(device), energy_rule=energy_rule,
        has_kv_lens=kv_lens is not None)


def _fa4_extern_choice() -> ExternKernelChoice:
    """Created once, at import (Inductor asserts on a second extern kernel of one name). The
    generated code calls the op (``use_fallback_kernel``), so a cached graph loads back anywhere
    this package imports; the benchmark calls it with ``scale`` as a keyword."""
    if hasattr(extern_kernels, FA4_CHOICE_NAME):  # importlib.reload: register it again
        delattr(extern_kernels, FA4_CHOICE_NAME)
    return ExternKernelChoice(FA4_OP, name=FA4_CHOICE_NAME, has_out_variant=False,
                              op_overload=FA4_OP, use_fallback_kernel=True)


_FA4_CHOICE = _fa4_extern_choice()

# What each lowered call was offered and what the autotuner kept, in lowering order:
# {"shape": (B, H, S, D), "choices": [names], "fa4": reason it was not offered or None,
#  "picked": "fa4" | "template" | None (unknown)}. Benchmarks and tests read it.
PICKS: list[dict] = []


def _picked(result) -> str | None:
    """``"fa4"`` or ``"template"`` from what ``autotune_select_algorithm`` returned: the choice
    (torch >= 2.12 returns ``(node, choice)``) or else the node, unwrapped to its buffer."""
    if isinstance(result, tuple) and len(result) > 1 and result[1] is not None:
        choice = result[1]
        return "fa4" if getattr(choice, "name", None) == FA4_CHOICE_NAME or getattr(
            getattr(choice, "choice", None), "name", None) == FA4_CHOICE_NAME else "template"
    node = result[0] if isinstance(result, tuple) else result
    for _ in range(6):  # TensorBox -> StorageBox -> MultiOutput -> FallbackKernel
        if isinstance(node, ir.FallbackKernel):
            return "fa4" if node.op_overload is FA4_OP else None
        if isinstance(node, ir.TritonTemplateBuffer):
            return "template"
        if isinstance(node, ir.MultiOutput):
            node = node.inputs[0]
            continue
        node = getattr(node, "data", None)
        if node is None:
            return None
    return None


def _tile_constexprs(meta: dict, config: dict, tile_fn=_TILE_FN) -> dict:
    """The tile function's constexpr parameters for one config: launch_meta's, BLOCK_M, any
    other config field by its upper-case name (USE_TMA, ...), then the parameter defaults."""
    raw = getattr(tile_fn, "fn", tile_fn)
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


def _eager_only(device, q, energy_rule, energy_threshold) -> bool:
    """Whether a call stays the eager op (an extern call): off the template's devices (the CPU),
    unsupported dtypes / head dims on CUDA (which the eager op rejects with a clear error), and a
    filter threshold of +-inf, which is no constexpr the generated code can spell. Both kernels'
    lowerings ask it."""
    return (device is None or device.type not in TEMPLATE_DEVICE_TYPES
            or not _template_supported(q) or bool(energy_rule and not math.isfinite(energy_threshold)))


def _output_layout(q, device):
    """``(size, layout)`` of the op's output: q's size, dtype and fill order, as the fake
    (``empty_like(q)``) promises. ``q`` realized (a view of a computed buffer has no strides)."""
    size = list(q.get_size())
    stride = ir.FlexibleLayout.stride_ordered(size, ir.get_stride_order(q.get_stride()))
    return size, ir.FixedLayout(device, q.get_dtype(), size, stride)


def _timestep_stride(ts) -> int:
    """The eager launcher reads timestep[b] with stride 0 when there is one timestep for the
    whole batch; the same here (a (1,) timestep with B > 1 must not be read past its end)."""
    ts_size = ts.get_size()
    if len(ts_size) == 0 or V.graph.sizevars.statically_known_equals(ts_size[0], 1):
        return 0
    return _static(ts.get_stride()[0])


@register_lowering(OP, type_promotion_kind=None)
def _lower_sparse_attention(q, k, v, masks, level_table, bucket_bounds, timestep, scale,
                            energy_rule=0, energy_threshold=0.0, kv_lens=None, launch_order=None):
    device = q.get_device()
    eager_args = (q, k, v, masks, level_table, bucket_bounds, timestep, scale) + (
        (energy_rule, energy_threshold) if energy_rule or kv_lens is not None
        or launch_order is not None else ()) + (
        (kv_lens,) if kv_lens is not None or launch_order is not None else ()) + (
        (launch_order,) if launch_order is not None else ())
    if _eager_only(device, q, energy_rule, energy_threshold):
        return fallback_handler(OP, add_to_fallback_set=False)(*eager_args)

    inputs = [realize_inputs(x) for x in (q, k, v, masks, level_table, bucket_bounds, timestep)]
    if kv_lens is not None:  # the kernel reads KV_LENS + b: stride 1
        inputs.append(ir.ExternKernel.require_contiguous(realize_inputs(kv_lens)))
    if launch_order is not None:  # read at LAUNCH_ORDER + bucket * stride + slot: last dim 1
        inputs.append(ir.ExternKernel.require_contiguous(realize_inputs(launch_order)))
    template = _TEMPLATES[kv_lens is not None, launch_order is not None]
    q = inputs[0]
    size, layout = _output_layout(q, device)
    b, h, s, d = (_static(x) for x in size)
    stride_ts = _timestep_stride(inputs[6])
    meta = _launch.launch_meta(s, _shape(inputs[3])[-1], _shape(inputs[5])[0], d)
    if energy_rule:  # the filter is the tile's constexpr rule and threshold (log2 units)
        meta.update(ENERGY_RULE=int(energy_rule), energy_thr=float(energy_threshold) * _kernel.LOG2E)
    if kv_lens is not None:
        meta.update(HAS_KV_LENS=True)
    choices: list = []
    tma = _tma_ok(device, inputs[1], inputs[2])
    for config in template_configs(tma=tma):
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
    # FlashAttention-4 beside the template, as Inductor puts cuBLAS beside its Triton matmuls:
    # the autotuner times both on the same inputs (all blocks kept) and keeps the faster.
    refusal = fa4_refusal(device, *inputs[:3], energy_rule, kv_lens)
    if refusal is None:
        # The same inputs as the template's (the autotuner asserts equal counts); FA4 ignores
        # the launch order. kv_lens never reaches here (fa4_refusal).
        choices.append(_FA4_CHOICE.bind(inputs, layout, scale=float(scale)))
    node, picked = _select(template.name, choices, inputs, layout,
                           input_gen_fns=_input_gen_fns(s, kv_lens is not None,
                                                        launch_order is not None))
    PICKS.append({"shape": (b, h, s, d), "choices": [c.name for c in choices], "fa4": refusal,
                  "picked": picked})
    log.info("sparse_attention %s: %d choices (FA4 %s), picked %s", (b, h, s, d), len(choices),
             "offered" if refusal is None else f"not offered: {refusal}", picked)
    return node


_HASHED_FILES = (
    os.path.abspath(__file__),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend.py"),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "rewrite.py"),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "regional.py"),
    os.path.abspath(_template_source.__file__),
    os.path.abspath(_kernel.__file__),
    os.path.abspath(_launch.__file__),
    os.path.abspath(_kernel_q8.__file__),
    os.path.join(os.path.dirname(os.path.abspath(_kernel_q8.__file__)), "launch_q8.py"),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "lowering_q8.py"),
    os.path.abspath(_quantize_q8.__file__),
    os.path.abspath(_op.__file__),
    os.path.abspath(_fa4.__file__),
    os.path.join(os.path.dirname(os.path.abspath(_op.__file__)), "fa4_op.py"),
)


def source_hash(paths=_HASHED_FILES) -> bytes:
    """sha256 of the files and of the template source this process built at import.

    Taken once at import (``_SOURCE_HASH``), not at every ``uuid()``: the template was built
    from the files as they were then, and a file edited later in a running process must not
    file this process's (old) generated code under the new file's key.
    """
    return get_hash_for_files(tuple(p for p in paths if os.path.exists(p)),
                              "".join(_TEMPLATE_SOURCES.values()) + template_source_q8())


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
        own = _SOURCE_HASH + _fa4_key()
        if self.inner is None:
            return own
        inner_uuid = getattr(self.inner, "uuid", None)
        if inner_uuid is None:
            return None  # an un-hashable user pass: Inductor bypasses the cache, as it would
        return own + repr(inner_uuid()).encode()


def _fa4_key() -> bytes:
    """b"+fa4" where the lowering may offer FA4 (switch on, CUDA, ``flash_attn.cute`` imports):
    a graph compiled with FA4 among the choices is not reused with ``SCALING_ATTN_FA4=0`` or
    where FA4 is gone. Empty otherwise, so machines without FA4 keep their keys."""
    on = fa4_enabled() and torch.cuda.is_available() and _fa4._fa4_imports()
    return b"+fa4" if on else b""
