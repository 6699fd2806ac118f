"""``torch.ops.scaling_attn.sparse_attention_fa4``: the op's block-sparse attention through
FlashAttention-4 (``kernels/fa4.py``), with the op's own inputs.

``sparse_attention_fa4(q, k, v, masks, level_table, bucket_bounds, timestep, launch_order=None,
*, scale) -> out``

``launch_order`` is accepted and ignored (FA4 schedules its own work): the template's choice
takes it as an input, and Inductor's autotuner gives every choice the same number of inputs
(``select_algorithm.get_inputs`` asserts it), so the extern choice takes the same list.

It exists so Inductor can autotune FA4 against the Triton template (``compile/lowering.py``
offers it as an extern choice, as Inductor offers cuBLAS beside its Triton matmuls): an extern
choice is emitted into the generated code as a call of a registered op, and a registered op
loads back from Inductor's cache in a new process. The level is the one the timestep selects,
built on the device (no host sync, CUDA-graph safe). No energy filter and no ``kv_lens``: FA4's
full blocks cannot express them, so the lowering never offers this op for such calls.

``out`` has q's fill order, as the fake (``empty_like(q)``) promises; FA4 writes ``(B, S, H, D)``
memory, which is q's order for the ``(B, H, S, D)`` views of ``(B, S, H, D)`` memory diffusers
passes (no copy then); any other q order costs one copy.

The eager op (``op.py``) takes the same path on CUDA where :func:`fa4_eager_refusal` finds no
reason against it: FA4's block-sparse kernel was faster than the Triton kernel at every mask
family and density measured (H100, 2026-12-05: 0.78-0.85x at the 1.3B shape, 0.84-0.95x at
14B, ``benchmarks/results/attention-fa4-*``). One switch rules both paths: ``SCALING_ATTN_FA4=0``
or ``with fa4_choice(False):`` (the backend's ``fa4=False``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from ..kernels.fa4 import fa4_available, fa4_block_sparse_attention

# "0" / "false" / "off" / "no" turn FA4 off (A/B timing, or to rule FA4 out).
FA4_ENV = "SCALING_ATTN_FA4"

# Set by fa4_choice(False) for the calls and compiles under it (a backend option's hook).
_FA4_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("scaling_attn_fa4_off",
                                                                default=False)


def fa4_switch_off() -> str | None:
    """Why the user's switch rules FA4 out (``None``: it does not): ``SCALING_ATTN_FA4`` set to
    0/false/off/no, or a call under ``fa4_choice(False)``."""
    if _FA4_OFF.get():
        return "fa4_choice(False)"
    if os.environ.get(FA4_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return f"{FA4_ENV}={os.environ.get(FA4_ENV)}"
    return None


def fa4_enabled() -> bool:
    """The user's switch: on unless ``SCALING_ATTN_FA4`` is 0/false/off/no or the call runs
    under ``fa4_choice(False)``."""
    return fa4_switch_off() is None


@contextlib.contextmanager
def fa4_choice(enabled: bool):
    """Use FA4 (``True``: where it can run) or not, for the op calls and compiles inside: a
    backend option ``fa4=False`` is ``with fa4_choice(self.fa4): compile_fx(...)`` (the lowering
    and the cache key are computed in that call, in this thread)."""
    token = _FA4_OFF.set(not enabled)
    try:
        yield
    finally:
        _FA4_OFF.reset(token)


def fa4_refusal_reason(dtype, head_dim: int, last_dim_strides, device_ok, *, energy_rule: int = 0,
                       has_kv_lens: bool = False, has_launch_order: bool = False) -> str | None:
    """Why FA4 cannot take a call (``None``: it can), from what both paths know of it: the
    eager op's tensors (:func:`fa4_eager_refusal`) and the lowering's IR nodes
    (``compile/lowering.fa4_refusal``). Cheapest checks first; ``device_ok()`` last (it imports
    ``flash_attn.cute`` once)."""
    off = fa4_switch_off()
    if off:
        return off
    if energy_rule:
        return "energy filter"  # an online, per-tile skip decision: not a fixed block list
    if has_kv_lens:
        return "kv_lens"  # per-batch key lengths: FA4's lists are per (b, h), no key mask
    if has_launch_order:
        return "launch_order"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype}"
    if head_dim > 128 or head_dim % 8:  # sm90 keeps 128-wide KV tiles only up to D = 128
        return f"head_dim {head_dim}"
    if any(s != 1 for s in last_dim_strides):
        return "q/k/v last dim not contiguous"
    if not device_ok():
        return "flash_attn.cute not importable or not an sm90 GPU"
    return None


def fa4_eager_refusal(q, k, v, energy_rule: int = 0, kv_lens=None,
                      launch_order=None) -> str | None:
    """Why the eager op keeps the Triton kernel for this call (``None``: it runs FA4): the
    lowering's rules, plus a launch order (a schedule of the Triton kernel's programs, asked
    for by name; compiled, the autotuner races FA4 against the template either way)."""
    return fa4_refusal_reason(q.dtype, q.shape[-1], [x.stride(-1) for x in (q, k, v)],
                              lambda: fa4_available(q.device),  # False for a CPU tensor
                              energy_rule=energy_rule, has_kv_lens=kv_lens is not None,
                              has_launch_order=launch_order is not None)


def fa4_attention(q, k, v, masks, level_table, bucket_bounds, timestep, scale: float):
    """FA4 block-sparse attention with the op's inputs, returned with the strides
    ``torch.empty_like(q)`` gives (what both ops' fakes promise)."""
    out = fa4_block_sparse_attention(q, k, v, masks, level_table, bucket_bounds, timestep, scale)
    # The strides empty_like(q) gives (q's, or q's fill order when q is not dense), without
    # allocating: a meta tensor.
    want = torch.empty_like(q, device="meta").stride()
    if out.stride() == want:
        return out
    return torch.empty_like(q).copy_(out)


@torch.library.custom_op("scaling_attn::sparse_attention_fa4", mutates_args=())
def sparse_attention_fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor,
                         level_table: torch.Tensor, bucket_bounds: torch.Tensor,
                         timestep: torch.Tensor, launch_order: torch.Tensor | None = None, *,
                         scale: float) -> torch.Tensor:
    return fa4_attention(q, k, v, masks, level_table, bucket_bounds, timestep, scale)


@sparse_attention_fa4.register_fake
def _(q, k, v, masks, level_table, bucket_bounds, timestep, launch_order=None, *, scale):
    return torch.empty_like(q)


FA4_OP = torch.ops.scaling_attn.sparse_attention_fa4.default
