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

# The tiny trained Wan (issue 7). Lazy: importing it pulls in diffusers (~4 s), which the op and
# backend do not need.
_TINY_WAN = ("load_tiny_wan", "encode_captions", "generate")


def __getattr__(name):
    if name in _TINY_WAN:
        from . import tiny_wan

        return getattr(tiny_wan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ += list(_TINY_WAN)

# The torch.compile backend (issue 3). Lazy: it imports Inductor (~3 s), which the op, the
# reference and the plan tools do not need. Chains to the __getattr__ above.
_BACKEND = ("scaling_attn_backend", "ScalingAttnBackend", "PlanMismatchError",
            "DynamicShapeError", "rewrite_self_attention")
_getattr_before_backend = __getattr__


def __getattr__(name):  # noqa: F811 - extends the lazy lookup above
    if name in _BACKEND:
        from . import backend

        return getattr(backend, name)
    return _getattr_before_backend(name)


__all__ += list(_BACKEND)

# FAST schedule (issue 5): build_fast_plan(plan, model, input, target) -> plan with a schedule.
from .fast import (  # noqa: E402
    build_fast_plan,
    dense_first_schedule,
    fit_schedule,
    profile_fidelity,
    uniform_schedule,
)

__all__ += ["build_fast_plan", "dense_first_schedule", "fit_schedule", "profile_fidelity",
            "uniform_schedule"]
