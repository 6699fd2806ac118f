"""``enable_sparse_attention(pipe, plan)``: the one-line switch for a diffusers pipeline.

    pipe = WanPipeline.from_pretrained(folder)
    enable_sparse_attention(pipe, "wan.plan.safetensors")
    video = pipe(prompt=..., height=480, width=832, num_frames=81).frames

Each transformer of the pipeline (``transformer``, and ``transformer_2`` for two-expert
pipelines when a plan is given for it) is compiled in place with ``nn.Module.compile`` and the
plan's backend, ``dynamic=False`` (masks exist per static grid) and ``fullgraph=True`` unless
the model is offloaded: accelerate's offload hooks (``enable_model_cpu_offload``) run a
``torch.compiler.disable``-d function, which a full graph cannot contain ("Skip calling
torch.compiler.disable()d function"). One log line per transformer says what runs: the density
or the FAST schedule, the calibration grid, and, at the first call, the layers rewritten and the
grid remapped to.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

from ..models.registry import check_supported
from ..plan.plan import DEFAULT_DENSITY, Plan

log = logging.getLogger("scaling_attn_compile")

COMPONENTS = ("transformer", "transformer_2")


def _load(plan, what: str) -> Plan:
    from ..plan.io import load_plan

    if isinstance(plan, (str, Path)):
        return load_plan(plan)
    if not isinstance(plan, Plan):
        raise TypeError(f"enable_sparse_attention: {what} must be a Plan or a plan file path, "
                        f"got {type(plan).__name__}")
    return plan


def is_offloaded(module) -> bool:
    """True when accelerate (``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``) or
    diffusers' group offloading hooked ``module`` or one of its children."""
    # A pipeline call gives every model a diffusers HookRegistry (cache contexts), offloaded
    # or not: only hooks named for offloading ("group_offloading", ...) count.
    def offload_hooks(m):
        return [n for n in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
                if "offload" in n]

    return any(hasattr(m, "_hf_hook") or offload_hooks(m) for m in module.modules())


def describe(plan: Plan, density: float | None) -> str:
    """What a plan runs: its FAST schedule, or the WEST density (and whether it is the default)."""
    s = plan.schedule
    if s is not None:
        achieved = s.info.get("achieved_density")
        target = s.info.get("target_density")
        d = f", density {achieved:.3f} (target {target})" if achieved is not None else ""
        return (f"FAST schedule ({s.info.get('method', 'fast')}, {s.level_tables.shape[1]} "
                f"timestep buckets{d})")
    if density is None:
        return (f"WEST density {DEFAULT_DENSITY} (the default; pass density= to choose, or add "
                f"a FAST schedule with `scaling-attn fast`)")
    return f"WEST density {density}"


class _LoggingBackend:
    """The plan's backend, plus one log line per compiled graph: layers rewritten and the grid
    against the calibration grid (a remap when they differ)."""

    def __init__(self, name: str, plan: Plan, backend):
        self.name, self.plan, self.backend = name, plan, backend

    def __call__(self, gm, example_inputs):
        out = self.backend(gm, example_inputs)
        if self.backend.reports:
            r = self.backend.reports[-1]
            calib = tuple(self.plan.calib_grid)
            if r.grid is None:
                where = "no self-attention grid seen (left dense)"
            elif tuple(r.grid) == calib:
                where = f"grid {tuple(r.grid)} (the calibration grid)"
            else:
                where = f"grid {tuple(r.grid)} remapped from calibration grid {calib}"
            log.info("%s: rewrote %d/%d self-attention layers, %s", self.name,
                        len(r.per_layer), self.plan.num_layers, where)
        return out


PLAN_FOLDER = "sparse_attention"  # <pipeline folder>/sparse_attention/<component>.plan.safetensors


def plans_next_to(pipe) -> dict[str, Path]:
    """The plans kept with the model: ``<folder>/sparse_attention/<component>.plan.safetensors``
    (``from_pretrained`` loads only the components ``model_index.json`` names, so the folder
    rides along untouched)."""
    folder = getattr(getattr(pipe, "config", None), "_name_or_path", None) or \
        getattr(pipe, "name_or_path", None)
    found = {}
    if folder:
        for c in COMPONENTS:
            path = Path(folder) / PLAN_FOLDER / f"{c}.plan.safetensors"
            if path.is_file():
                found[c] = path
    if not found:
        raise ValueError(f"enable_sparse_attention: plan=None looks for "
                         f"{Path(folder or '<pipeline folder>') / PLAN_FOLDER / 'transformer.plan.safetensors'}"
                         f", which is not there; pass plan= (a Plan or a plan file)")
    return found


def enable_sparse_attention(pipe, plan=None, density: float | None = None, *,
                            fullgraph: bool | None = None, regional: bool = False,
                            **backend_options) -> dict:
    """Compile each transformer of ``pipe`` with block-sparse self-attention, in place.

    Args:
        pipe: a diffusers pipeline (``WanPipeline``, ``WanImageToVideoPipeline``, ...), or a bare
            transformer.
        plan: a :class:`Plan` or a plan file for ``pipe.transformer``, or a mapping
            ``{"transformer": plan, "transformer_2": plan2}``; ``None``: the plans kept next
            to the model (:func:`plans_next_to`).
        density: the kept-block fraction of a plan without a FAST schedule (default
            ``DEFAULT_DENSITY`` = 0.5, logged as the default). A FAST plan carries its own
            densities: passing ``density`` with one is an error.
        fullgraph: default True, False when the transformer is offloaded (see the module doc).
        regional: compile one transformer block and reuse it for every layer (diffusers'
            ``compile_repeated_blocks``; :mod:`.regional`: each layer's tables are attached to
            its block first). Not with tile-order plans.
        backend_options: keyword arguments of :func:`.backend.scaling_attn_backend`
            (``check_model``, ``inductor_config``, ``energy_filter``, ...).

    Returns:
        ``{component: backend}``; each backend's ``reports`` lists what its graphs rewrote.
    """
    import torch

    from .backend import scaling_attn_backend

    if density is not None and not 0 < density <= 1:
        raise ValueError(f"enable_sparse_attention: density must be in (0, 1], got {density}")
    if isinstance(pipe, torch.nn.Module):
        targets = {"transformer": pipe}
    else:
        targets = {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}
    if not targets:
        raise ValueError(f"enable_sparse_attention: pipe {type(pipe).__name__} has no "
                         f"transformer; pass a diffusers pipeline or a transformer")
    for module in targets.values():
        check_supported(module, "enable_sparse_attention")
    if plan is None:
        plans = plans_next_to(pipe)
    else:
        plans = dict(plan) if isinstance(plan, Mapping) else {"transformer": plan}
    unknown = sorted(set(plans) - set(targets))
    if unknown:
        raise ValueError(f"enable_sparse_attention: plan names {unknown}, but the pipeline's "
                         f"transformers are {sorted(targets)}")
    if "materialize_kwargs" in backend_options and density is not None:
        raise ValueError("enable_sparse_attention: pass density= or materialize_kwargs=, not both")
    backends = {}
    for name, module in targets.items():
        if name not in plans:
            log.info("%s: no plan given, left dense", name)
            continue
        p = _load(plans[name], f"plan[{name!r}]")
        if density is not None and p.schedule is not None:
            raise ValueError(f"enable_sparse_attention: density={density}, but the plan for "
                             f"{name} has a FAST schedule, which sets the densities; drop "
                             f"density=, or re-run `scaling-attn fast --target-density "
                             f"{density}`")
        options = {"verbose": True, **backend_options}  # verbose: the log lines reach stderr
        if density is not None:
            options["materialize_kwargs"] = {"density": density}
        backend = scaling_attn_backend(p, **options)
        full = not is_offloaded(module) if fullgraph is None else fullgraph
        grid = tuple(p.calib_grid)
        log.info("%s: %d layers x %d heads, %s; calibrated at grid %s (S = %d)"
                    "; %s(dynamic=False, fullgraph=%s)%s", name, p.num_layers,
                    p.num_heads, describe(p, density), grid, math.prod(grid),
                    "compile_repeated_blocks" if regional else "torch.compile", full,
                    "" if full or fullgraph is not None else " (offloaded)")
        if regional:
            backend.attach(module)  # the block graph reads each layer's tables from its block
            module.compile_repeated_blocks(backend=_LoggingBackend(name, p, backend),
                                           dynamic=False, fullgraph=full)
        else:
            module.compile(backend=_LoggingBackend(name, p, backend), dynamic=False,
                           fullgraph=full)
        backends[name] = backend
    return backends
