"""Ulysses sequence parallelism through diffusers' own context parallelism.

    # torchrun --nproc-per-node N ...; torch.distributed initialised (nccl on GPUs, gloo on CPU)
    enable_ulysses(transformer, N)
    backend = scaling_attn_backend(plan, parallel=transformer)    # rank r binds heads r*H/N..
    transformer = torch.compile(transformer, backend=backend, fullgraph=True, dynamic=False)

diffusers' ``TemplatedUlyssesAttention`` all-to-alls q/k/v so that each rank holds ``H/N`` heads
for the whole sequence and calls ``F.scaled_dot_product_attention`` on them; the backend's FX
pass rewrites that call like the single-GPU one and binds the plan's slice of heads.

:func:`enable_ulysses` is ``transformer.enable_parallelism(config=ContextParallelConfig(
ulysses_degree=N))`` plus three work-arounds for diffusers 0.42.1 (each says why below).
"""

from __future__ import annotations

import contextlib
import inspect
from unittest import mock

import torch


def enable_ulysses(transformer, degree: int):
    """Turn on diffusers' Ulysses context parallelism of ``degree`` ranks on ``transformer``.

    Needs ``torch.distributed`` initialised with ``degree`` ranks; returns the model's
    ``ParallelConfig``. The model must use diffusers' ``native`` attention backend (the default),
    whose Ulysses path ends in ``F.scaled_dot_product_attention``: the call the backend rewrites.
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("enable_ulysses: torch.distributed is not initialised; launch with "
                           "torchrun --nproc-per-node N and call "
                           "torch.distributed.init_process_group first")
    if dist.get_world_size() != degree:
        raise ValueError(f"enable_ulysses: degree must be the world size "
                         f"{dist.get_world_size()} (pure Ulysses), got {degree}")
    heads = transformer.config.num_attention_heads
    if heads % degree:
        raise ValueError(f"enable_ulysses: degree {degree} must divide the model's {heads} "
                         "heads (Ulysses splits heads over ranks); pick a divisor")
    # 1. The timestep entry of Wan's _cp_plan expects a 2-D (per-token, Wan2.2 TI2V) timestep;
    #    on the usual 1-D one the hook skips it and calls `logger.warning_once`, which diffusers'
    #    logger does not have (AttributeError). Skipping it is what would happen anyway.
    plan = {k: v for k, v in transformer._cp_plan.items() if k != ""}
    # 2. `_resolve_parallel_config` picks `rank % torch.accelerator.device_count()`, which is
    #    0 on a CPU-only torch (ZeroDivisionError); the index is unused by CPU tensors and gloo.
    patch = (mock.patch.object(torch.accelerator, "device_count", lambda: 1)
             if torch.accelerator.device_count() == 0 else contextlib.nullcontext())
    with patch:
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree),
                                       cp_plan=plan)
    # 3. The split hooks find their input's position with inspect.signature on the first call;
    #    under torch.compile(fullgraph=True) Dynamo cannot trace that ("Unsupported hasattr call
    #    ... __wrapped__"). Fill their cache now, as their first eager call would.
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in (registry.hooks.values() if registry is not None else ()):
            meta = getattr(hook, "module_forward_metadata", None)
            if meta is not None and meta.cached_parameter_indices is None:
                names = list(inspect.signature(meta._cls.forward).parameters)[1:]  # no self
                meta.cached_parameter_indices = {n: i for i, n in enumerate(names)}
    return transformer._parallel_config

