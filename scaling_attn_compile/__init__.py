"""scaling_attn_compile: block-sparse self-attention for video diffusion transformers, as a
``torch.compile`` backend.

    plan = load_plan("wan.plan.safetensors")        # WEST topology + FAST schedule
    torch.compile(transformer, backend=scaling_attn_backend(plan), dynamic=False)
"""

import importlib

from .contract.masks import dense_tables, pack_blocks, unpack_blocks
from .contract.reference import energy_filtered_attention_reference, sparse_attention_reference
from .contract.tables import AttentionTables, uniform_tables
from .errors import PlanError
from .offline.fast import (
    build_fast_plan,
    dense_first_schedule,
    fit_schedule,
    profile_fidelity,
    uniform_schedule,
)
from .ops.energy import EnergyFilter
from .ops.op import lambda_from_recall, sparse_attention
from .plan.io import load_plan
from .plan.plan import FastSchedule, Plan

__version__ = "0.1.0"

# Imported on first use: the backend pulls in Inductor (~3 s) and the tiny model diffusers
# (~4 s), which the op, the reference and the plan tools do not need.
_LAZY = {
    "scaling_attn_backend": "compile.backend",
    "ScalingAttnBackend": "compile.backend",
    "PlanMismatchError": "errors",
    "UnsupportedModelError": "errors",
    "DynamicShapeError": "errors",
    "rewrite_self_attention": "compile.rewrite",
    "enable_sparse_attention": "compile.pipeline",
    "calibrate_west_pipeline": "offline.pipeline",
    "build_fast_plan_pipeline": "offline.pipeline",
    "pipeline_calls": "offline.pipeline",
    "load_tiny_wan": "tiny.tiny_wan",
    "encode_captions": "tiny.tiny_wan",
    "generate": "tiny.tiny_wan",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AttentionTables",
    "EnergyFilter",
    "FastSchedule",
    "Plan",
    "PlanError",
    "build_fast_plan",
    "dense_first_schedule",
    "dense_tables",
    "energy_filtered_attention_reference",
    "fit_schedule",
    "lambda_from_recall",
    "load_plan",
    "pack_blocks",
    "profile_fidelity",
    "sparse_attention",
    "sparse_attention_reference",
    "uniform_schedule",
    "uniform_tables",
    "unpack_blocks",
    *_LAZY,
]
