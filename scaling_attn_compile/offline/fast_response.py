"""What a unit of FAST's profiled error costs in the final video, per layer and step bucket
(``scaling-attn fast --objective video``; the quality study's ``west_fast_weighted``).

FAST's profile measures each head's attention-output error at each profiled step. What a user
sees is the video at the end of the trajectory: an error at an early step is carried (and grown)
by every later step, and a layer's error passes through the layers above it and Wan's gates.
On small-wan (128 blocks, 50 steps, 8 held-out prompts x 2 seeds, H200;
``benchmarks/results/quality-nvidia-h200-small-wan.json``) the measured bucket gains by step were
[5.48, 0.42, 0.037, 0.023, 0.028, 0.0095] (the first, noisiest step weighs 100-500x the late
ones) and the layer gains 0.17..2.63; the weighted fit gained +4.5 to +7.3 dB over uniform
density at 0.15-0.5 where the unweighted one gained +1.4 to +2.9 dB.

Model: the final squared error is linear in the profiled errors with one gain per layer and one
per bucket, ``mse ~= sum_{l,b} g_l h_b C_{l,b}``, ``C_{l,b} = sum_h E[l, b, h, ref]`` the summed
profiled error at a reference level. ``L + T`` perturbed runs of the calibration input fit it:
run ``b`` makes only bucket ``b`` sparse (every layer and head at the reference level), run ``l``
only layer ``l``. The gains solve ``mse_b = h_b sum_l g_l C_lb`` and ``mse_l = g_l sum_b h_b C_lb``
by alternating updates (:func:`fit_gains`). ``fit_schedule(weights=g h^T)`` then minimises the
predicted video error instead of the unweighted sum.

This module does not know how to run sparse attention or which sampler made the profile: the
caller passes ``run(schedule)``, one generation of the calibration input with ``schedule`` (or
dense for ``None``) on the *same* sampler the profile ran; :func:`sampler_run_fn` and
:func:`pipeline_run_fn` make the dense halves of it for the built-in sampler and a diffusers
pipeline. Cost: ``L + T + 1`` generations (small-wan on an H200: 40 s for 14 probes against
9.5 s of calibration).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..plan.plan import FastSchedule
from .fast_fit import bucket_bounds_for, fit_schedule, steps_to_buckets

REF_LEVEL = 0.2  # sparse enough to move the video measurably, dense enough to stay near-linear
FIT_ITERS = 20  # alternating updates of (g, h); the study's fit, same numbers
# The probes' default, cheaper setting: half the latent height and width (1/4 of the tokens) and
# half the steps. Gains measured there and applied to the full-size fit gave, on small-wan at its
# native grid (16x128x128, 50 steps, 8 held-out prompts x 2 seeds, GPU), 36.12 / 32.49 dB at
# density 0.35 / 0.25 against 36.44 / 31.96 with full-size probes
# (benchmarks/results/quality-nvidia-h100-80gb-hbm3-small-wan-probe.json), and at the CPU demo
# grid 30.35 against 30.02 dB. Below 8 blocks a probe at the reference level barely changes the
# video, so small grids probe at full size.
PROBE_MIN_BLOCKS = 8


def cheap_probe_setting(latent: Sequence[int], patch: Sequence[int], num_steps: int,
                        num_profiled: int) -> tuple[tuple[int, int, int] | None, int | None]:
    """The probes' default ``(latent (F, H, W), steps)`` for a calibration latent ``(F, H, W)``
    on ``num_steps`` sampler steps with ``num_profiled`` profiled: H and W halved (rounded down
    to the patch), steps halved (at least the profiled count); ``None`` for what stays full
    size."""
    from ..contract.masks import num_blocks

    f, h, w = (int(x) for x in latent)
    pf, ph, pw = (int(x) for x in patch)
    small = (f, max(ph, h // 2 // ph * ph), max(pw, w // 2 // pw * pw))
    tokens = (f // pf) * (small[1] // ph) * (small[2] // pw)
    probe_latent = None if num_blocks(tokens) < PROBE_MIN_BLOCKS or small == (f, h, w) else small
    probe_steps = max(num_profiled, num_steps // 2)
    return probe_latent, (None if probe_steps >= num_steps else probe_steps)


def probe_schedule(num_layers: int, num_heads: int, sparse_cells: torch.Tensor,
                   ref_level: float, timesteps: Sequence[float]) -> FastSchedule:
    """Levels ``[ref, 1.0]``: cells in ``sparse_cells`` (a bool ``(L, T)`` in step order) at the
    reference level, the rest dense; buckets at the profiled ``timesteps``."""
    table = torch.ones(num_layers, sparse_cells.shape[1], num_heads, dtype=torch.int32)
    table[sparse_cells] = 0
    return FastSchedule([ref_level, 1.0], steps_to_buckets(table).contiguous(),
                        bucket_bounds_for(timesteps), {"method": "response_probe"})


def probe_cells(num_layers: int, num_steps: int) -> list[torch.Tensor]:
    """The ``T + L`` probes' sparse cells, bool ``(L, T)``: each bucket (all layers) first, then
    each layer (all buckets)."""
    out = []
    for b in range(num_steps):
        cells = torch.zeros(num_layers, num_steps, dtype=torch.bool)
        cells[:, b] = True
        out.append(cells)
    for l in range(num_layers):
        cells = torch.zeros(num_layers, num_steps, dtype=torch.bool)
        cells[l] = True
        out.append(cells)
    return out


def fit_gains(C: torch.Tensor, mse_b: Sequence[float], mse_l: Sequence[float],
              iters: int = FIT_ITERS) -> dict:
    """Layer gains ``g (L,)`` and bucket gains ``h (T,)`` with ``mse_b = h_b sum_l g_l C_lb`` and
    ``mse_l = g_l sum_b h_b C_lb`` (alternating updates from ones). ``C`` ``(L, T)`` in step
    order. Returns ``weights`` float64 ``(L, T) = g h^T`` scaled to mean 1, the gains (mean 1)
    and the fit's relative residual (how well the separable model explains the probes)."""
    C = C.double()
    mb = torch.as_tensor(list(mse_b), dtype=torch.float64)
    ml = torch.as_tensor(list(mse_l), dtype=torch.float64)
    L, T = C.shape
    if mb.shape != (T,) or ml.shape != (L,):
        raise ValueError(f"fit_gains: expected {T} bucket and {L} layer probe errors for C "
                         f"{(L, T)}, got {tuple(mb.shape)} and {tuple(ml.shape)}")
    g, h = torch.ones(L, dtype=torch.float64), torch.ones(T, dtype=torch.float64)
    tiny = 1e-30
    for _ in range(iters):
        h = mb / (g[:, None] * C).sum(0).clamp_min(tiny)
        g = ml / (h[None, :] * C).sum(1).clamp_min(tiny)
    w = g[:, None] * h[None, :]
    pred_b, pred_l = h * (g[:, None] * C).sum(0), g * (h[None, :] * C).sum(1)
    resid = float(((pred_b - mb).abs().sum() + (pred_l - ml).abs().sum())
                  / (mb.sum() + ml.sum()).clamp_min(tiny))
    return {"weights": w / w.mean(), "layer_gain": (g / g.mean()).tolist(),
            "bucket_gain_by_step": (h / h.mean()).tolist(), "fit_residual": resid}


def measure_response(profile, num_heads: int, run: Callable[[FastSchedule | None], torch.Tensor],
                     *, ref_level: float = REF_LEVEL, iters: int = FIT_ITERS,
                     progress: bool | str = False) -> dict:
    """Fit the per-layer and per-bucket gains from ``L + T`` probes of ``run``.

    ``profile``: a :class:`~.fast.FastProfile` with ``output_error`` and ``ref_level`` among its
    levels. ``run(schedule)``: the final output (any shape, e.g. latents) of one generation of
    the calibration input with ``schedule``'s sparse attention, dense for ``None``; every call
    must start from the same noise. Returns :func:`fit_gains`'s dict plus the probe errors
    (``probe_mse_by_step``, ``probe_mse_by_layer``), ``ref_level`` and ``generations``."""
    if ref_level not in profile.levels:
        raise ValueError(f"ref_level: {ref_level} is not one of the profile's levels "
                         f"{profile.levels}; pass one of them (default {REF_LEVEL})")
    if profile.output_error is None:
        raise ValueError("measure_response: the profile has no output_error (v not captured); "
                         "re-profile with profile_fidelity")
    i_ref = profile.levels.index(ref_level)
    C = profile.output_error[..., i_ref].sum(-1).double()  # (L, T)
    L, T = C.shape
    cells = probe_cells(L, T)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells) + 1, unit="run",
                   desc=progress if isinstance(progress, str) else "FAST video probes")
    dense, mse = None, []
    for c in [None, *cells]:
        out = run(None if c is None else
                  probe_schedule(L, num_heads, c, ref_level, profile.timesteps)).float()
        if dense is None:
            dense = out
        else:
            mse.append(float((out - dense).square().mean()))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not any(m > 0 for m in mse) or not bool((C > 0).any()):
        # Every probe equals the dense run (or the profile saw no error at the reference level):
        # at this sequence length the reference level keeps every block, so there is nothing
        # to weigh. The gains would be 0/0.
        raise ValueError(f"measure_response: the {len(cells)} probes at level {ref_level} left "
                         f"the video unchanged (the reference level keeps every block at "
                         f"{profile.info.get('grid')} tokens); probe on a larger latent")
    fit = fit_gains(C, mse[:T], mse[T:], iters)
    return {**fit, "probe_mse_by_step": mse[:T], "probe_mse_by_layer": mse[T:],
            "ref_level": ref_level, "generations": len(cells) + 1}


def response_info(response: dict, seconds: float) -> dict:
    """What a plan's FAST metadata keeps of a response fit (JSON-able: no ``weights`` tensor)."""
    keep = ("layer_gain", "bucket_gain_by_step", "fit_residual", "ref_level", "generations",
            "probe_mse_by_step", "probe_mse_by_layer")
    return {**{k: response[k] for k in keep if k in response}, "probe_seconds": float(seconds)}


def fit_video_schedule(profile, target_density: float, response: dict, seconds: float,
                       **fit_kwargs) -> FastSchedule:
    """``fit_schedule(profile, target, weights=response["weights"])`` with the fit recorded in
    its info: ``objective="video"``, ``error`` (the profiled error the gains weigh) and
    ``response`` (:func:`response_info`: the gains, the residual, the probes' cost)."""
    sched = fit_schedule(profile, target_density, weights=response["weights"], **fit_kwargs)
    sched.info.update(objective="video", error=sched.info.get("objective", "output_error"),
                      response=response_info(response, seconds))
    return sched


# ---- the dense halves of ``run``: the sampler the profile ran ---------------------------------

def sampler_run_fn(transformer, calibration_input, timesteps: Sequence[float],
                   latent_shape: Sequence[int], guidance_scale: float = 5.0
                   ) -> Callable[[], torch.Tensor]:
    """One generation on the built-in sampler (:func:`.calibrate.capture_self_attention`, what
    :func:`.fast.profile_fidelity` runs), nothing captured: final latents ``(1, C, F, H, W)``."""
    from .calibrate import capture_self_attention

    def sample() -> torch.Tensor:
        return capture_self_attention(transformer, [calibration_input], timesteps,
                                      lambda cap: None, latent_shape=latent_shape,
                                      capture_steps=[], guidance_scale=guidance_scale,
                                      progress=False)[0]

    return sample


def pipeline_run_fn(pipe, call: dict) -> Callable[[], torch.Tensor]:
    """One ``pipe(**call, output_type="latent")`` (its own scheduler and timesteps, as
    :func:`.pipeline.profile_pipeline` ran it), the generator re-seeded each time so every call
    starts from the same noise: the latents, float32 on the CPU."""
    gen = call.get("generator")
    seed = None if gen is None else int(gen.initial_seed())

    def sample() -> torch.Tensor:
        kw = dict(call)
        if seed is not None:
            kw["generator"] = torch.Generator().manual_seed(seed)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            out = pipe(**kw, output_type="latent")
        return out[0].float().cpu()

    return sample
