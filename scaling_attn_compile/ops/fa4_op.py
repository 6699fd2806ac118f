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
"""

from __future__ import annotations

import torch

from ..kernels.fa4 import fa4_block_sparse_attention


@torch.library.custom_op("scaling_attn::sparse_attention_fa4", mutates_args=())
def sparse_attention_fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor,
                         level_table: torch.Tensor, bucket_bounds: torch.Tensor,
                         timestep: torch.Tensor, launch_order: torch.Tensor | None = None, *,
                         scale: float) -> torch.Tensor:
    out = fa4_block_sparse_attention(q, k, v, masks, level_table, bucket_bounds, timestep, scale)
    # The strides empty_like(q) gives (q's, or q's fill order when q is not dense), without
    # allocating: a meta tensor.
    want = torch.empty_like(q, device="meta").stride()
    if out.stride() == want:
        return out
    return torch.empty_like(q).copy_(out)


@sparse_attention_fa4.register_fake
def _(q, k, v, masks, level_table, bucket_bounds, timestep, launch_order=None, *, scale):
    return torch.empty_like(q)


FA4_OP = torch.ops.scaling_attn.sparse_attention_fa4.default
