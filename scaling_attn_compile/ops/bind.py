"""``torch.ops.scaling_attn.bind_tables``: a marker that makes one layer's tables graph inputs.

``bind_tables(masks, level_table, bucket_bounds, timestep, launch_order=None) -> None`` does
nothing when run. Under
regional compilation (diffusers' ``compile_repeated_blocks``) one graph serves every block, so a
layer's tables cannot be graph constants; they live as buffers on each block's self-attention
module (:mod:`scaling_attn_compile.compile.regional`), whose forward pre-hook calls this op on
them. Dynamo lifts only tensors the traced code uses, so the call is what makes the buffers
graph inputs; the FX pass binds the self-attention SDPA of the same module to the call's
arguments and erases the call.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("scaling_attn::bind_tables", mutates_args=())
def bind_tables(masks: torch.Tensor, level_table: torch.Tensor, bucket_bounds: torch.Tensor,
                timestep: torch.Tensor, launch_order: torch.Tensor | None = None) -> None:
    return None


@bind_tables.register_fake
def _(masks, level_table, bucket_bounds, timestep, launch_order=None):
    return None


# How a Dynamo graph may hold the call: the overload packet (what the hook calls) or its default.
BIND_TABLES = (torch.ops.scaling_attn.bind_tables, torch.ops.scaling_attn.bind_tables.default)
