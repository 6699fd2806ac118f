"""The Inductor template's source, made from the kernel's own source text (one source of kernel
math): the stub below plus the *source text* of ``bsa_forward_tile`` in
``kernels/block_sparse_attention.py`` and of every ``@triton.jit`` function it calls (found by
walking its globals), the same functions the eager launcher calls. The stub only computes
program ids, binds strides and sizes to the tile's parameter names, calls the tile and stores it
through ``store_output`` (so Inductor can fuse a pointwise epilogue). :mod:`.lowering` builds
the template from :func:`template_source`.
"""

from __future__ import annotations

import ast
import dis
import inspect
import re
import textwrap
import types

from torch._inductor.select_algorithm import TritonTemplateKernel

from ..kernels import block_sparse_attention as _kernel
from ..kernels import block_sparse_attention_q8 as _kernel_q8

# The entry point of the kernel math; it and every jit function it calls (found by walking the
# globals its code names) are pasted into the template, and so is the launch-order lookup the
# stub calls before it (with its callees).
_TILE_FN = _kernel.bsa_forward_tile
_SLOT_FN = _kernel.bsa_launch_slot
# The 8-bit kernel's tile (its template reads the quantize pre-pass's outputs).
_TILE_FN_Q8 = _kernel_q8.bsa_q8_forward_tile


def _is_jit(obj) -> bool:
    return hasattr(obj, "fn") and hasattr(obj, "src") or type(obj).__name__ in (
        "JITFunction", "InterpretedFunction")


def _global_names(code) -> set[str]:
    """Names a function reads as globals. Not ``co_names``: that also lists attribute names
    (``x.T``, ``desc.load``), which collide with whatever a module happens to hold (Triton's
    interpreter injects its own globals, ``T`` among them, into the kernel module)."""
    names = {i.argval for i in dis.get_instructions(code)
             if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _jit_closure(root) -> list:
    """``root`` and the jit functions it calls, transitively, callees first."""
    order, seen = [], set()

    def visit(fn):
        raw = getattr(fn, "fn", fn)
        if raw.__name__ in seen:
            return
        seen.add(raw.__name__)
        for name in _global_names(raw.__code__):
            obj = raw.__globals__.get(name)
            if obj is not None and _is_jit(obj):
                visit(obj)
        order.append(fn)

    visit(root)
    return order


def _jit_source(fn, allowed_globals: set[str]) -> str:
    """``@triton.jit`` + the source of a jit function, decorator lines stripped.

    ``JITFunction.src`` starts at ``def`` in triton 3.6 and 3.9 (``JITCallable.__init__`` cuts
    everything before the first ``^def``); the regex below makes that true whatever a future
    version keeps, and falls back to ``inspect`` for objects without ``.src``.
    """
    raw = getattr(fn, "fn", fn)
    src = getattr(fn, "src", None) or inspect.getsource(raw)
    m = re.search(r"^def\s+\w+\s*\(", src, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"lowering: cannot find the def line of jit function {raw.__name__}")
    src = src[m.start():]
    # The pasted function runs in the generated module, whose globals are triton's and the
    # pasted functions only: a module-level constant of the kernel file would be a NameError on
    # the GPU. Catch it here, at import, on any machine.
    for name in _global_names(raw.__code__):
        value = raw.__globals__.get(name)
        if value is not None and name not in allowed_globals and not isinstance(
                value, types.ModuleType):
            raise RuntimeError(
                f"lowering: jit function {raw.__name__} uses the module global {name!r} of "
                f"{inspect.getsourcefile(raw)}; the Inductor template pastes only the jit "
                "functions' source, so pass it as an argument or a tl.constexpr (launch_meta)")
    if "'''" in src:  # Inductor embeds the kernel in a ''' string in its output code
        raise RuntimeError(f"lowering: jit function {raw.__name__} contains ''' (use \"\"\")")
    return "@triton.jit\n" + src


def _constexpr_globals(fns) -> dict:
    """Module-level ``tl.constexpr`` values the pasted functions read (the 8-bit kernel's
    ``PV_DEFERRED``, ...): the template defines them before the functions, with the same value."""
    out = {}
    for fn in fns:
        raw = getattr(fn, "fn", fn)
        for name in _global_names(raw.__code__):
            value = raw.__globals__.get(name)
            if type(value).__name__ == "constexpr" and isinstance(
                    getattr(value, "value", None), (int, float, bool)):
                out[name] = value.value
    return out


def _helpers_source(roots=(_TILE_FN, _SLOT_FN)) -> str:
    fns: list = []
    names: set[str] = set()
    for root in roots:
        for f in _jit_closure(root):
            if getattr(f, "fn", f).__name__ not in names:
                names.add(getattr(f, "fn", f).__name__)
                fns.append(f)
    consts = _constexpr_globals(fns)
    header = "".join(f"{name} = tl.constexpr({value!r})\n" for name, value in sorted(consts.items()))
    return (header + "\n\n" if header else "") + "\n\n".join(
        _jit_source(f, names | set(consts)) for f in fns)


def _tile_call(tile_fn=_TILE_FN) -> str:
    """``acc, offs_m, offs_d[, extra...] = bsa_forward_tile(<its parameter names>)``.

    The stub defines a local or a constexpr for every parameter name, so the call follows the
    function's signature instead of copying it. The tile returns ``(acc, offs_m, offs_d)``
    first; anything after (e.g. a skipped-block count) is ignored here, and its count is read
    from the ``return`` statement so the unpacking matches.
    """
    raw = getattr(tile_fn, "fn", tile_fn)
    names = list(inspect.signature(raw).parameters)
    tree = ast.parse(textwrap.dedent(inspect.getsource(raw)))
    returns = [n for n in ast.walk(tree) if isinstance(n, ast.Return) and n.value is not None]
    counts = {len(r.value.elts) if isinstance(r.value, ast.Tuple) else 1 for r in returns}
    if len(counts) != 1 or min(counts) < 3:
        raise RuntimeError(
            f"lowering: {raw.__name__} must return (acc, offs_m, offs_d, ...) from every return, "
            f"got tuples of sizes {sorted(counts)}")
    targets = ["acc", "offs_m", "offs_d"] + [f"_tile_extra{i}" for i in range(counts.pop() - 3)]
    return f"{', '.join(targets)} = {raw.__name__}({', '.join(names)})"


def _store_output_call() -> str:
    params = inspect.signature(TritonTemplateKernel.store_output).parameters
    extra = ', val_shape=("BLOCK_M", "HEAD_DIM")' if "val_shape" in params else ""
    return f'{{{{store_output(("idx_b", "idx_h", "idx_m", "idx_d"), "acc", "mask"{extra})}}}}'


# The stub. Grid: (ceil(S / 128) * (128 // BLOCK_M), B, H) (launch.program_rows). It binds one local per non-constexpr parameter of
# bsa_forward_tile; the constexpr parameters (BLOCK_M, NUM_WORDS, EVEN_S, ...) are the kernel's
# defines, made from the lowering's kwargs: BLOCK_M from the config, the rest from the kernel
# module's launch_meta, the same function the eager launcher uses.
_STUB = r'''
DEF_KERNEL
    stride_qb, stride_qh, stride_qs, stride_qd = {{stride("Q")}}
    stride_kb, stride_kh, stride_ks, stride_kd = {{stride("K")}}
    stride_vb, stride_vh, stride_vs, stride_vd = {{stride("V")}}
    stride_mh, stride_ml, stride_mu, stride_mw = {{stride("MASKS")}}
    stride_lt_t, stride_lt_h = {{stride("LEVEL_TABLE")}}
    stride_ts = STRIDE_TS
    qk_scale = QK_SCALE
    SEQ_LEN = {{size("Q", 2)}}
    num_levels = {{size("MASKS", 1)}}
    BIND_KV_LENS
    pid_m = tl.program_id(0)
    off_b = tl.program_id(1)
    off_h = tl.program_id(2)
    BIND_LAUNCH_ORDER
    TILE_CALL
    idx_b = off_b.to(INDEX_DTYPE)
    idx_h = off_h.to(INDEX_DTYPE)
    idx_m = offs_m[:, None].to(INDEX_DTYPE)
    idx_d = offs_d[None, :].to(INDEX_DTYPE)
    mask = (idx_m < SEQ_LEN) & (idx_d < HEAD_DIM)
    STORE_OUTPUT
'''


_INPUTS = '"Q", "K", "V", "MASKS", "LEVEL_TABLE", "BOUNDS", "TS"'


# With a launch order: which (head, query tile) this program computes, longest rows first.
_LAUNCH_ORDER = """stride_lo_t, stride_lo_s = {{stride("LAUNCH_ORDER")}}
    NUM_HEADS = {{size("Q", 1)}}
    off_h, pid_m = bsa_launch_slot(LAUNCH_ORDER, stride_lo_t, TS, stride_ts, BOUNDS, off_b, off_h,
                                   pid_m, NUM_HEADS, SEQ_LEN, NUM_BOUNDS, BOUNDS_P2, BLOCK_M)"""


def template_source(kv_lens: bool = False, launch_order: bool = False) -> str:
    """The full Jinja source: stub, then the kernel module's jit functions (verbatim, in a raw
    block so that no ``{{``/``{#`` in them is ever read as Jinja). Helpers come after the kernel,
    as in Inductor's flex template: ``def_kernel`` emits the imports at the top of the module.

    ``kv_lens``: the variant with a per-batch key-length input ``KV_LENS`` (the lowering passes
    ``HAS_KV_LENS=True``); without it the tile's ``KV_LENS`` is bound to ``TS``, never read
    (``HAS_KV_LENS`` is a constexpr False, so the load is not even generated).
    ``launch_order``: the variant with a ``LAUNCH_ORDER`` input (``contract/masks.launch_order``),
    read by the stub before the tile.
    """
    inputs = _INPUTS + (', "KV_LENS"' if kv_lens else "") + (
        ', "LAUNCH_ORDER"' if launch_order else "")
    stub = (_STUB.replace("DEF_KERNEL", f"{{{{def_kernel({inputs})}}}}")
            .replace("BIND_KV_LENS", "" if kv_lens else "KV_LENS = TS  # unused: HAS_KV_LENS is False")
            .replace("BIND_LAUNCH_ORDER", _LAUNCH_ORDER if launch_order else "")
            .replace("STORE_OUTPUT", _store_output_call()).replace("TILE_CALL", _tile_call()))
    return stub + "\n\n{% raw %}\n" + _helpers_source() + "\n{% endraw %}\n"


# The 8-bit stub: the bf16 one with other inputs. Q and K are the pre-pass's 8-bit codes
# (B, H, S, D), V its FP8 V^T in (B, H, D, pitch) memory (K-major for the P.V wgmma, rows padded
# to 16 bytes), QS / KS / VS its float32 scales ((B * H, blocks) and (B * H, D)); no key lengths
# and no launch order.
_STUB_Q8 = (_STUB.replace('stride_vb, stride_vh, stride_vs, stride_vd = {{stride("V")}}',
                          'stride_vb, stride_vh, stride_vd, stride_vs = {{stride("V")}}')
            .replace("BIND_KV_LENS", 'NUM_HEADS = {{size("Q", 1)}}\n    NQB = {{size("QS", 1)}}'
                     '\n    NKB = {{size("KS", 1)}}')
            .replace("    BIND_LAUNCH_ORDER\n", ""))
assert 'stride_vd, stride_vs = {{stride("V")}}' in _STUB_Q8 and "BIND_" not in _STUB_Q8, \
    "template_source: the bf16 stub changed; rebuild the 8-bit stub from it"

INPUTS_Q8 = ("Q", "K", "V", "QS", "KS", "VS", "MASKS", "LEVEL_TABLE", "BOUNDS", "TS")


def template_source_q8() -> str:
    """The 8-bit kernel's Jinja source: :data:`_STUB_Q8`, then :func:`bsa_q8_forward_tile`
    and its callees (the bf16 kernel's walk helpers among them), as :func:`template_source`."""
    inputs = ", ".join(f'"{name}"' for name in INPUTS_Q8)
    stub = (_STUB_Q8.replace("DEF_KERNEL", f"{{{{def_kernel({inputs})}}}}")
            .replace("STORE_OUTPUT", _store_output_call())
            .replace("TILE_CALL", _tile_call(_TILE_FN_Q8)))
    return stub + "\n\n{% raw %}\n" + _helpers_source((_TILE_FN_Q8,)) + "\n{% endraw %}\n"
