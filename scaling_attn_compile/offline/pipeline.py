"""WEST calibration and FAST profiling through the user's own diffusers pipeline (issue 18).

The transformer-only driver (:func:`.calibrate.capture_self_attention`) runs its own sampler:
flow-matching Euler with a shift guessed from the resolution. A pipeline runs its scheduler
(UniPC for Wan2.1: 8 steps run [999, 954, 900, ...] where the own sampler ran [1000, 948, 883,
...]), its text encoder, CFG and image conditioning (I2V: 36 input channels). Here the pipeline
is called as users call it (``pipe(prompt=..., height=..., ..., output_type="latent")``) with

* the family's ``capture_qk`` (:func:`..models.registry.capture_for`) on the chosen transformer's self-attention, and
* a forward pre-hook on that transformer recording the timestep it actually receives and which
  call of the step it is (``"cond"`` first, then ``"uncond"`` under CFG), and a
  ``callback_on_step_end`` counting the steps.

WEST's codes and FAST's buckets then come from what the pipeline ran. The accumulators are the
ones the transformer-only path uses (``west.ThresholdAccumulator``, FAST's fidelity accumulator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..contract.masks import num_blocks
from ..contract.token_order import TokenOrder, in_token_order
from ..models.capture import LayerCapture
from ..models.fingerprint import _unwrap
from ..models.registry import adapter_for, capture_for
from . import west
from .calibrate import evenly_spaced


@dataclass
class PipelineRun:
    """What one captured pipeline session saw.

    ``timesteps``: per pipeline call, ``{step index: timestep}`` of each denoising step that ran
    this transformer, as it received it (the largest element of its ``timestep`` argument); a
    two-expert pipeline (Wan2.2) runs each expert on part of the steps only. ``latent_shape``: the
    transformer's ``hidden_states`` ``(C, F, H, W)`` (I2V: the 16 noise + 20 condition channels).
    """

    timesteps: list[dict[int, float]] = field(default_factory=list)
    latent_shape: tuple[int, ...] | None = None
    transformer_calls: int = 0


def _timestep_of(t) -> float | None:
    if t is None:
        return None
    # max, not the first element: with expand_timesteps (Wan2.2 TI2V) the timestep is per token
    # (B, S) and the first frame's tokens, the conditioning image, carry 0.
    return float(t.max()) if isinstance(t, torch.Tensor) else float(t)


def capture_through_pipeline(pipe, calls: Sequence[dict], on_layer: Callable[[LayerCapture], None],
                             *, capture_steps: Sequence[int] | None = None,
                             component: str = "transformer", progress: bool = True) -> PipelineRun:
    """Call ``pipe(**call, output_type="latent")`` for each call and capture self-attention.

    ``capture_steps``: step indices captured (default all); the other steps still run.
    ``component``: the pipeline attribute holding the transformer to capture
    (``"transformer_2"`` for Wan2.2's low-noise expert).
    """
    transformer = getattr(pipe, component, None)
    if transformer is None:
        raise ValueError(f"capture_through_pipeline: component={component!r}: the pipeline "
                         f"{type(pipe).__name__} has no such transformer; pass 'transformer'")
    taken = sorted({"output_type", "callback_on_step_end"} & {k for c in calls for k in c})
    if taken:
        raise ValueError(f"capture_through_pipeline: calls set {taken}, which the capture sets "
                         f"itself (latents out, a step counter); drop them")
    model = _unwrap(transformer)
    run = PipelineRun()
    wanted = None if capture_steps is None else set(capture_steps)
    step = {"index": 0, "calls": 0}

    ad = adapter_for(model, "capture_through_pipeline")
    with capture_for(model).capture_qk(model, on_layer) as state:
        def pre_hook(module, args, kwargs):
            hs, t = ad.forward_inputs(args, kwargs)
            t = _timestep_of(t)
            if step["calls"] == 0:
                run.timesteps[-1][step["index"]] = t
            if hs is not None and run.latent_shape is None:
                run.latent_shape = tuple(int(s) for s in hs.shape[1:])
                if hs.dim() == 3:  # packed tokens [B, S, C] (LTX): (C, F, H, W) of its grid
                    run.latent_shape = (run.latent_shape[1], *ad.forward_grid(model, args, kwargs))
            state.enabled = wanted is None or step["index"] in wanted
            state.step_index, state.timestep = step["index"], t
            state.branch = "cond" if step["calls"] == 0 else "uncond"
            step["calls"] += 1
            run.transformer_calls += 1

        def on_step_end(_pipe, i, t, callback_kwargs):
            step["index"], step["calls"] = i + 1, 0
            return {}

        handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            for n, call in enumerate(calls):
                run.timesteps.append({})
                step["index"], step["calls"] = 0, 0
                state.input_index = n
                if not progress:
                    pipe.set_progress_bar_config(disable=True)
                with torch.no_grad():
                    pipe(**call, output_type="latent", callback_on_step_end=on_step_end)
        finally:
            handle.remove()
    return run


def pipeline_calls(prompts: Sequence[str], *, height: int, width: int, num_frames: int,
                   num_inference_steps: int, guidance_scale: float = 5.0,
                   negative_prompt: str | None = None, image=None, seed: int = 0,
                   **pipeline_kwargs) -> list[dict]:
    """One ``pipe(...)`` keyword set per prompt, seeded ``seed + i`` (a CPU generator)."""
    if not prompts:
        raise ValueError("pipeline_calls: prompts is empty; pass at least one prompt")
    calls = []
    for i, prompt in enumerate(prompts):
        call = dict(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                    num_frames=num_frames, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=torch.Generator().manual_seed(seed + i), **pipeline_kwargs)
        if image is not None:
            call["image"] = image
        calls.append(call)
    return calls


def _capture_list(num_steps: int, capture_steps: int | Sequence[int] | None) -> list[int]:
    if capture_steps is None:
        return list(range(num_steps))
    if isinstance(capture_steps, int):
        return evenly_spaced(num_steps, capture_steps)
    chosen = sorted(set(capture_steps))
    if not chosen or chosen[0] < 0 or chosen[-1] >= num_steps:
        raise ValueError(f"capture_steps: expected indices in 0..{num_steps - 1}, got "
                         f"{list(capture_steps)}")
    return chosen


def calibrate_west_pipeline(pipe, calls: Sequence[dict], *,
                            capture_steps: int | Sequence[int] | None = None,
                            component: str = "transformer", block_mass_impl: str = "auto",
                            source: str = "", token_order=None, progress: bool = True):
    """WEST through the pipeline: a :class:`~scaling_attn_compile.plan.plan.Plan` (no schedule).

    ``calls``: ``pipe(...)`` keyword sets (:func:`pipeline_calls`), all at one resolution and
    step count. ``capture_steps``: how many steps (evenly spaced) or which indices.
    """
    from ..plan.plan import Plan

    if not calls:
        raise ValueError("calibrate_west_pipeline: calls is empty; pass pipeline_calls(...)")
    steps = {int(c["num_inference_steps"]) for c in calls}
    if len(steps) != 1:
        raise ValueError(f"calibrate_west_pipeline: every call must run the same "
                         f"num_inference_steps, got {sorted(steps)}")
    chosen = _capture_list(steps.pop(), capture_steps)
    model = _unwrap(getattr(pipe, component))
    ad = adapter_for(model, "calibrate_west_pipeline")
    order = TokenOrder.for_new_plan(token_order, can_permute=ad.ORDER_SITES is not None)
    acc: dict = {}

    def on_layer(cap: LayerCapture) -> None:
        if "acc" not in acc:
            acc["grid"] = cap.grid
            acc["acc"] = west.ThresholdAccumulator(
                adapter_for(model).num_layers(model), model.config.num_attention_heads, math.prod(cap.grid),
                device=cap.q.device)
        if cap.grid != acc["grid"]:
            raise ValueError(f"calibrate_west_pipeline: calls ran token grids {acc['grid']} and "
                             f"{cap.grid}; calibrate one resolution per plan")
        acc["acc"].update(cap.layer, west.block_mass(cap.q, cap.k, impl=block_mass_impl))

    run = capture_through_pipeline(pipe, calls, in_token_order(on_layer, order),
                                   capture_steps=chosen, component=component, progress=progress)
    if "acc" not in acc or any(n == 0 for n in acc["acc"].updates):
        raise RuntimeError("calibrate_west_pipeline: some self-attention layers were never "
                           "captured; does the pipeline call its transformer?")
    ran = run.timesteps[0]  # {step: t} of the steps this transformer ran
    all_t = [ran[j] for j in sorted(ran)]
    grid = acc["grid"]
    calibration = {
        "timesteps": [ran[j] for j in chosen if j in ran],
        "num_steps": int(calls[0]["num_inference_steps"]),
        "pipeline_timesteps": all_t, "steps_run": sorted(ran),
        "latent_shape": list(run.latent_shape),
        "maps_per_layer": acc["acc"].updates[0],
        "guidance_scale": calls[0].get("guidance_scale"),
        "cfg": run.transformer_calls > len(calls) * len(all_t),
        "seeds": [int(c["generator"].initial_seed()) if c.get("generator") is not None else None
                  for c in calls],
        "source": source, "nb": num_blocks(math.prod(grid)),
        "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
        "component": component,
        "video": [calls[0].get("num_frames"), calls[0].get("height"), calls[0].get("width")],
    }
    return Plan.from_codes(acc["acc"].codes, model, grid, len(calls), calibration,
                           token_order=order)


def profile_pipeline(plan, pipe, call: dict, *, capture_steps: int | Sequence[int] | None = None,
                     levels: Sequence[float] | None = None, rows_per_block: int | None = None,
                     seed: int = 0, component: str = "transformer", progress: bool = True):
    """FAST's dense profile (:func:`.fast.profile_fidelity`) of one pipeline call: its buckets
    are the timesteps the pipeline's scheduler ran. Returns a :class:`.fast.FastProfile`."""
    from . import fast

    levels = fast.check_levels(levels or fast.DEFAULT_LEVELS)
    rows_per_block = rows_per_block or fast.DEFAULT_ROWS_PER_BLOCK
    model = _unwrap(getattr(pipe, component))
    plan.check_model(model)
    chosen = _capture_list(int(call["num_inference_steps"]), capture_steps)
    state: dict = {}

    def on_layer(cap: LayerCapture) -> None:
        if "acc" not in state:  # the grid is known at the first call
            codes = plan.thresholds(cap.grid)
            rows = sample_rows_for(cap.grid)
            state.update(grid=cap.grid, codes=codes, rows=rows, acc=fast._FidelityAccumulator(
                codes, levels, rows, {j: i for i, j in enumerate(chosen)}))
        state["acc"](cap)

    def sample_rows_for(grid):
        return fast.sample_rows(math.prod(grid), rows_per_block, seed=seed)

    run = capture_through_pipeline(pipe, [call], in_token_order(on_layer, plan.token_order),
                                   capture_steps=chosen, component=component, progress=progress)
    acc = state.get("acc")
    ran = set(run.timesteps[0]) if run.timesteps else set()
    steps_ran = [i for i, j in enumerate(chosen) if j in ran]
    if acc is None or not steps_ran or bool((acc.count[:, steps_ran] == 0).any()):
        raise RuntimeError("profile_pipeline: some (layer, step) pairs were never captured; "
                           "does the pipeline call its transformer at every step?")
    ran = run.timesteps[0]
    keep = [i for i, j in enumerate(chosen) if j in ran]  # an expert runs part of the steps
    count = acc.count[:, keep, None, None]
    mean = acc.sum[:, keep] / count
    err = acc.err_sum[:, keep] / count if acc.has_v else None
    info = {"grid": list(state["grid"]), "rows_per_block": rows_per_block,
            "rows": int(state["rows"].numel()), "seed": seed,
            "num_steps": int(call["num_inference_steps"]),
            "capture_steps": [chosen[i] for i in keep], "input": str(call.get("prompt", ""))[:40],
            "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
            "component": component}
    return fast.FastProfile(list(levels), mean, acc.min[:, keep],
                            fast.level_densities(state["codes"], levels),
                            [ran[chosen[i]] for i in keep], info, err)


def build_fast_plan_pipeline(plan, pipe, call: dict, target_density: float, *,
                             capture_steps: int | Sequence[int] | None = None,
                             levels: Sequence[float] | None = None,
                             rows_per_block: int | None = None, seed: int = 0,
                             component: str = "transformer", progress: bool = True,
                             **fit_kwargs):
    """Profile through the pipeline + fit: ``(plan with schedule, profile)``."""
    from . import fast

    fast.check_target(target_density)  # before the dense run
    prof = profile_pipeline(plan, pipe, call, capture_steps=capture_steps, levels=levels,
                            rows_per_block=rows_per_block, seed=seed, component=component,
                            progress=progress)
    return plan.with_schedule(fast.fit_schedule(prof, target_density, **fit_kwargs)), prof
