"""The study's ``west_fast_weighted`` gains: :mod:`scaling_attn_compile.offline.fast_response`
(the model, the probes and the fit, shared with ``scaling-attn fast --objective video``) run on
a bundled model's own sampler (``spec.generate``) through the study's measured attention.

Cost: ``L + T + 1`` generations of one calibration video (small-wan: 40 s on an H200).
"""

from __future__ import annotations

from ..offline.fast_response import REF_LEVEL
from ..offline.fast_response import measure_response as fit_response

__all__ = ["REF_LEVEL", "measure_response"]


def measure_response(model, spec, plan, profile, caption: str, *, grid, steps: int, seed: int,
                     runner, ref_level: float = REF_LEVEL, iters: int = 20) -> dict:
    """Fit the per-layer and per-bucket gains on ``caption`` (a training caption).

    ``runner``: a :class:`~.measure.MeasuredAttention` on ``model``. Returns ``weights``
    float64 ``(L, T)`` (mean 1), ``layer_gain``, ``bucket_gain_by_step``, the probe errors and
    the fit's relative residual (``offline.fast_response.measure_response``)."""
    tgrid = spec.token_grid(grid)

    def run(schedule):
        if schedule is None:
            return spec.generate(model, [caption], grid=grid, steps=steps, seed=seed)
        runner.configure(plan.with_schedule(schedule).materialize(tgrid))
        with runner.installed():
            return spec.generate(model, [caption], grid=grid, steps=steps, seed=seed)

    out = fit_response(profile, plan.num_heads, run, ref_level=ref_level, iters=iters)
    return {**out, "caption": caption, "seed": seed}
