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
from collections.abc import Sequence
from unittest import mock

import torch

from ..errors import PlanMismatchError


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


def ulysses_rank(parallel) -> tuple[int, int] | None:
    """``(rank in the Ulysses group, Ulysses degree)`` from a ``parallel`` option, or None.

    Accepts ``(rank, degree)``; a diffusers ``ContextParallelConfig`` or ``ParallelConfig`` set
    up by ``transformer.enable_parallelism`` (its ``_ulysses_local_rank`` and
    ``ulysses_degree``), or the transformer itself (its ``_parallel_config``); or ``"auto"``:
    ``torch.distributed``'s rank and world size, right when the Ulysses group is the whole
    default group in rank order (diffusers' mesh for ``ulysses_degree == world_size``, which
    is how ``torchrun --nproc-per-node N`` with ``ContextParallelConfig(ulysses_degree=N)``
    runs); None when torch.distributed is not initialised.
    """
    if parallel is None:
        return None
    if isinstance(parallel, str):
        if parallel != "auto":
            raise ValueError("scaling_attn_backend: parallel must be 'auto', (rank, degree), a "
                             "diffusers ContextParallelConfig/ParallelConfig or the transformer; "
                             f"got {parallel!r}")
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.get_rank(), dist.get_world_size()
    if isinstance(parallel, Sequence):
        rank, degree = (int(x) for x in parallel)
    else:
        cfg = getattr(parallel, "_parallel_config", None) or parallel  # the transformer
        cfg = getattr(cfg, "context_parallel_config", None) or cfg  # ParallelConfig
        if not hasattr(cfg, "ulysses_degree"):
            raise TypeError(
                "scaling_attn_backend: parallel must be 'auto', (rank, degree), a diffusers "
                "ContextParallelConfig/ParallelConfig or a transformer after "
                f"enable_parallelism; got {type(parallel).__name__}")
        if (cfg.ring_degree or 1) > 1:
            # Ring attention splits the keys over ranks: the op would see a chunk of the
            # sequence, and the block masks are for the whole sequence.
            raise PlanMismatchError(
                f"scaling_attn_backend: ring_degree={cfg.ring_degree}; block-sparse attention "
                "supports Ulysses sequence parallelism only; use "
                "ContextParallelConfig(ulysses_degree=N) with ring_degree=1")
        rank, degree = cfg._ulysses_local_rank, cfg.ulysses_degree
        if rank is None:
            raise PlanMismatchError(
                "scaling_attn_backend: the ContextParallelConfig is not set up (no Ulysses "
                "rank yet); call transformer.enable_parallelism(config=...) before the first "
                "compiled call")
    if not 0 <= rank < degree:
        raise ValueError(f"scaling_attn_backend: parallel=(rank, degree) needs 0 <= rank < "
                         f"degree, got ({rank}, {degree})")
    return rank, degree


def ulysses_head_range(plan_heads: int, rank: int, degree: int) -> tuple[int, int]:
    """The plan's heads rank ``rank`` of ``degree`` holds after the Ulysses all-to-all.

    diffusers' ``TemplatedUlyssesAttention`` views each rank's ``(B, S/N, H, D)`` as
    ``(B, S/N, N, H/N, D)`` and all-to-alls over the ``N`` axis: rank ``r`` receives head
    chunk ``r`` from every rank, i.e. heads ``[r*H/N, (r+1)*H/N)`` for the whole sequence.
    (xDiT/yunchang's ``SeqAllToAll4D`` splits heads the same way.)
    """
    if plan_heads % degree:
        raise PlanMismatchError(
            f"scaling_attn_backend: Ulysses degree {degree} does not divide the plan's "
            f"{plan_heads} heads; use a degree that divides the head count")
    n = plan_heads // degree
    return rank * n, (rank + 1) * n
