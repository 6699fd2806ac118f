"""scaling_attn_compile: block-sparse self-attention for video diffusion transformers, as a
``torch.compile`` backend.

    torch.compile(transformer, backend=scaling_attn_backend(plan))
"""

from .masks import dense_tables, pack_blocks, unpack_blocks
from .op import sparse_attention
from .reference import sparse_attention_reference

__all__ = [
    "dense_tables",
    "pack_blocks",
    "sparse_attention",
    "sparse_attention_reference",
    "unpack_blocks",
]
__version__ = "0.1.0"

# WEST topology and the plan file (issue 4): load_plan(path).materialize(grid) -> AttentionTables.
from .plan import FastSchedule, Plan, PlanError, load_plan  # noqa: E402

__all__ += ["FastSchedule", "Plan", "PlanError", "load_plan"]
