"""How much a unit of FAST's profiled error costs in the final video, per layer and step bucket.

FAST's profile measures each head's attention-output error at each profiled step. What a user
sees is the video at the end of the trajectory: an error at an early step is carried (and grown)
by every later step, and a layer's error passes through the layers above it and Wan's gates.
On small-wan (128 blocks, 50 steps; ``benchmarks/results/quality-nvidia-h200-small-wan.json``)
the dense warm-up, which spends a quarter of the budget on the first steps, beat the unweighted
allocation by 2.6 dB at density 0.35: the steps do not weigh alike.

Model: the final squared error is linear in the profiled errors with one gain per layer and one
per bucket, ``mse ~= sum_{l,b} g_l h_b C_{l,b}``, ``C_{l,b} = sum_h E[l, b, h, ref]`` the summed
profiled error at a reference level. ``L + T`` perturbed runs of the calibration input fit it:
run ``b`` makes only bucket ``b`` sparse (every layer and head at the reference level), run ``l``
only layer ``l``. The gains solve ``mse_b = h_b sum_l g_l C_lb`` and ``mse_l = g_l sum_b h_b C_lb``
by alternating updates. ``fast.fit_schedule(weights=g h^T)`` then minimises the predicted video
error instead of the unweighted sum.

Cost: ``L + T`` generations of one calibration video (small-wan: 14 x 0.4 s on an H200).
"""

from __future__ import annotations

import torch

from ..offline import fast
from ..plan.plan import FastSchedule

REF_LEVEL = 0.2  # sparse enough to move the video measurably, dense enough to stay near-linear


def _schedule(L: int, T: int, H: int, sparse_cells, levels_ref: float,
              timesteps) -> FastSchedule:
    """Levels ``[ref, 1.0]``: cells in ``sparse_cells`` (a bool ``(L, T)`` in step order) at the
    reference level, the rest dense."""
    table = torch.ones(L, T, H, dtype=torch.int32)
    table[sparse_cells] = 0
    return FastSchedule([levels_ref, 1.0], fast.steps_to_buckets(table).contiguous(),
                        fast.bucket_bounds_for(timesteps), {"method": "response_probe"})


def measure_response(model, spec, plan, profile, caption: str, *, grid, steps: int, seed: int,
                     runner, ref_level: float = REF_LEVEL, iters: int = 20) -> dict:
    """Fit the per-layer and per-bucket gains on ``caption`` (a training caption).

    ``runner``: a :class:`~.measure.MeasuredAttention` on ``model``. Returns ``weights``
    float64 ``(L, T)`` (mean 1), ``layer_gain``, ``bucket_gain``, the probe errors and the fit's
    relative residual (how well the separable model explains the probes)."""
    if ref_level not in profile.levels:
        raise ValueError(f"ref_level: {ref_level} is not one of the profile's levels "
                         f"{profile.levels}")
    i_ref = profile.levels.index(ref_level)
    if profile.output_error is None:
        raise ValueError("measure_response: the profile has no output_error (v not captured)")
    C = profile.output_error[..., i_ref].sum(-1).double()  # (L, T)
    L, T = C.shape
    H = profile.output_error.shape[2]
    tgrid = spec.token_grid(grid)
    dense = spec.generate(model, [caption], grid=grid, steps=steps, seed=seed).float()

    def probe(cells) -> float:
        sched = _schedule(L, T, H, cells, ref_level, profile.timesteps)
        runner.configure(plan.with_schedule(sched).materialize(tgrid))
        with runner.installed():
            out = spec.generate(model, [caption], grid=grid, steps=steps, seed=seed).float()
        return float((out - dense).square().mean())

    mse_b, mse_l = [], []
    for b in range(T):
        cells = torch.zeros(L, T, dtype=torch.bool)
        cells[:, b] = True
        mse_b.append(probe(cells))
    for l in range(L):
        cells = torch.zeros(L, T, dtype=torch.bool)
        cells[l] = True
        mse_l.append(probe(cells))
    mb, ml = torch.tensor(mse_b, dtype=torch.float64), torch.tensor(mse_l, dtype=torch.float64)
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
            "bucket_gain_by_step": (h / h.mean()).tolist(), "probe_mse_by_step": mse_b,
            "probe_mse_by_layer": mse_l, "ref_level": ref_level, "fit_residual": resid,
            "caption": caption, "seed": seed}
