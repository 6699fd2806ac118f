"""FAST's schedule fit: one level per (layer, step, head) at a target global density, and the
baselines on the same schedule format. The profile comes from :mod:`.fast` (``FastProfile``);
this module needs only its tensors.

Lagrangian allocation
---------------------
For a multiplier ``lambda`` every (layer, step, head) takes the level minimising
``E + lambda * density``; this is the least summed error of any schedule with the same global
density. The global density falls with ``lambda``, which is bisected (log scale) to the target.
Optional ``weights (L, T)`` scale each (layer, step)'s error (e.g. its measured effect on the
final video).

Target A(l, t) and the fit (``allocation="curve"``)
---------------------------------------------------
``A(l, t) = A_min + (A_max - A_min) * (1 - x)^gamma``, ``x = (l + omega t) / (L + omega T)``,
``l`` the layer, ``t`` the profiled step's index (0 = first, noisiest step), ``L`` layers and
``T`` profiled steps: early steps and shallow layers must be most faithful, and A is
non-increasing in ``l`` and ``t``. Written with the allowed fidelity loss ``eps = 1 - A``:
``eps_max = 1 - A_min`` (deep, late) and ``eps_min = 1 - A_max = rho * eps_max``. ``gamma``,
``omega`` and ``rho`` are options; ``eps_max`` is bisected in ``[0, 1 / rho]`` (A from 1 down to
<= 0, i.e. from all-dense to all-sparsest), since A, and so the achieved density, is monotone
in it. The achieved global density is the mean over layers, steps and heads of the chosen
level's achieved density (kept blocks / all blocks, diagonal included, at the profiling grid).
It is a step function of ``eps_max``; we take the side of the jump nearest the target and
accept an *absolute* error ``tol`` (default 0.01), else warn (too few cells for that target).

Head-wise choice: per (layer, step, head) the smallest level whose *mean* fidelity over the
sampled rows (``reduce="mean"``, default; ``"min"`` for the worst row) is ``>= A(l, t)``, else
the densest level (levels must include 1.0, whose fidelity is exactly 1, so A <= 1 is always
met). Buckets: boundaries are midpoints between consecutive profiled timesteps, so any number
of inference steps maps onto the profiled ones; bucket 0 holds the smallest timesteps, so the
last profiled step is bucket 0 and the first is bucket ``T - 1``.

Baselines on the same schedule format: :func:`uniform_schedule` (one level everywhere) and
:func:`dense_first_schedule` (first ``k%`` steps dense, the SVG convention).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from ..contract.masks import timestep_bucket
from ..plan.plan import FastSchedule, Plan
from . import west

DEFAULT_LEVELS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0)
DEFAULT_ROWS_PER_BLOCK = 16
DEFAULT_TOL = 0.01  # absolute error allowed on the achieved global density


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------

def check_target(target_density: float, name: str = "target_density") -> float:
    """``target_density`` as a float in ``(0, 1]``, else ValueError naming the argument."""
    try:
        t = float(target_density)
    except (TypeError, ValueError):
        t = float("nan")
    if not 0.0 < t <= 1.0:  # also rejects nan
        raise ValueError(f"{name}: expected the kept-block fraction in (0, 1], got "
                         f"{target_density!r}; pass e.g. 0.3 for 30% of the blocks")
    return t


def check_levels(levels: Sequence[float]) -> list[float]:
    """Ascending distinct thresholds in ``(0, 1]`` ending with 1.0 (so A is always met)."""
    lv = [float(p) for p in levels]
    if not lv or any(not 0.0 < p <= 1.0 for p in lv) or any(b <= a for a, b in zip(lv, lv[1:], strict=False)):
        raise ValueError(f"levels: expected ascending distinct thresholds in (0, 1], got {lv}; "
                         f"e.g. {list(DEFAULT_LEVELS)}")
    if lv[-1] != 1.0:
        raise ValueError(f"levels: the last level must be 1.0 (dense) so every fidelity target "
                         f"can be met, got {lv}; append 1.0")
    return lv


def level_densities(codes: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """Achieved density (kept blocks / all blocks, diagonal included) of each level's mask:
    float64 ``(..., NL)`` for codes ``(..., NB, NB)``."""
    return torch.stack([west.mask_at(codes, p).double().mean(dim=(-1, -2)) for p in levels], -1)


# --------------------------------------------------------------------------------------------
# Target A(l, t) and the fit
# --------------------------------------------------------------------------------------------

def target_fidelity(num_layers: int, num_steps: int, a_min: float, a_max: float, *,
                    gamma: float = 1.0, omega: float | None = None) -> torch.Tensor:
    """``A(l, t) = A_min + (A_max - A_min) (1 - x)^gamma``, ``x = (l + omega t) / (L + omega T)``:
    float64 ``(L, T)``; non-increasing in ``l`` and ``t`` when ``A_max >= A_min``.
    ``omega=None``: ``L / T``, so the layer and step axes weigh equally."""
    if gamma <= 0:
        raise ValueError(f"gamma: expected > 0, got {gamma}")
    omega = num_layers / num_steps if omega is None else float(omega)
    if omega < 0:
        raise ValueError(f"omega: expected >= 0, got {omega}")
    l = torch.arange(num_layers, dtype=torch.float64)[:, None]
    t = torch.arange(num_steps, dtype=torch.float64)[None, :]
    x = (l + omega * t) / (num_layers + omega * num_steps)
    return a_min + (a_max - a_min) * (1.0 - x) ** gamma


def choose_levels(fidelity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per (layer, step, head) the smallest level with ``fidelity >= target``, else the last.

    ``fidelity`` ``(L, T, H, NL)``, ``target`` ``(L, T)``; returns int64 ``(L, T, H)``."""
    ok = fidelity >= target[:, :, None, None]
    ok[..., -1] = True  # the densest level is the fallback
    return ok.to(torch.int8).argmax(-1)  # argmax returns the first maximal index


def achieved_density(choice: torch.Tensor, level_density: torch.Tensor) -> float:
    """Mean over (layer, step, head) of the chosen level's density; ``choice`` ``(L, T, H)``,
    ``level_density`` ``(L, H, NL)``."""
    L, T, H = choice.shape
    dens = level_density[:, None].expand(L, T, H, -1)
    return float(dens.gather(-1, choice[..., None]).mean())


def bucket_bounds_for(timesteps: Sequence[float]) -> torch.Tensor:
    """Midpoints between consecutive (descending, distinct) timesteps, ascending float32
    ``(T - 1,)``; ``bucket(t) = #{bounds <= t}`` sends step ``j`` to bucket ``T - 1 - j``."""
    ts = [float(t) for t in timesteps]
    if any(b >= a for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError(f"timesteps: expected strictly descending, got {ts}")
    asc = ts[::-1]
    return torch.tensor([(a + b) / 2 for a, b in zip(asc, asc[1:], strict=False)], dtype=torch.float32)


def steps_to_buckets(table: torch.Tensor) -> torch.Tensor:
    """``(L, T, ...)`` indexed by step (first step first) -> by bucket (smallest t first)."""
    return table.flip(1)


ALLOCATIONS = ("lagrange", "curve")
OBJECTIVES = ("output_error", "fidelity")


def lagrange_choice(cost: torch.Tensor, level_density: torch.Tensor, lam: float) -> torch.Tensor:
    """Per (layer, step, head) the level minimising ``cost + lam * density``: int64 ``(L, T, H)``
    for ``cost`` ``(L, T, H, NL)`` and ``level_density`` ``(L, H, NL)``. Ties go to the first
    (sparsest) level. For each ``lam`` this is the exact minimum of the summed cost over all
    schedules of the same global density (a Lagrangian relaxation of the knapsack)."""
    L, T, H, NL = cost.shape
    total = cost + lam * level_density[:, None].expand(L, T, H, NL)
    return total.argmin(-1)


def _fit_lagrange(cost: torch.Tensor, dens_ld: torch.Tensor, target: float, iters: int):
    """Bisect ``lam`` (log scale) so the global density of :func:`lagrange_choice` is nearest
    ``target``; density is non-increasing in ``lam``. Returns ``(density, choice, lam)``."""
    def run(lam):
        choice = lagrange_choice(cost, dens_ld, lam)
        return achieved_density(choice, dens_ld), choice, lam

    at0 = run(0.0)
    if at0[0] <= target:  # even the least-cost choice is at or below the target
        return at0
    lo, hi = -12.0, 6.0  # log10 lam: costs and densities are both in [0, 1]
    while run(10.0 ** hi)[0] > target and hi < 30:
        hi += 6.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if run(10.0 ** mid)[0] >= target:
            lo = mid
        else:
            hi = mid
    return min((run(10.0 ** lo), run(10.0 ** hi)), key=lambda r: abs(r[0] - target))


def fit_schedule(profile, target_density: float, *, allocation: str = "lagrange",
                 objective: str = "output_error", weights: torch.Tensor | None = None,
                 gamma: float = 1.0,
                 omega: float | None = None, rho: float = 0.1, reduce: str = "mean",
                 tol: float = DEFAULT_TOL, iters: int = 60) -> FastSchedule:
    """Choose a level per (layer, step, head) so the global density hits ``target_density``.

    ``allocation="lagrange"`` (default): minimise the summed ``objective`` over every cell at
    the target's global density (:func:`lagrange_choice`, ``lam`` bisected). ``objective``:
    ``"output_error"``, the sampled rows' mean relative output error (needs a profile with
    ``output_error``, i.e. v captured), or ``"fidelity"``, ``1 - F`` (``reduce`` picks mean or
    min). ``weights``: ``(L, T)`` non-negative gains per (layer, profiled step), step order
    (e.g. ``fast_response.measure_response``: what a unit of error costs in the final video);
    the summed cost is then ``sum weights[l, t] * cost[l, t, h, level]``. On small-wan at 0.25 the paper's curve put 0.13 density in the last steps and
    deepest layers and lost 4.7 dB to uniform density (``benchmarks/results/``); minimising the
    summed error cannot be worse than uniform on the profile's own cost, by construction.

    ``allocation="curve"``: the paper's A(l, t): ``eps_max = 1 - A_min`` is bisected in
    ``[0, 1 / rho]`` with ``A_max = 1 - rho * eps_max`` (see the module doc); ``gamma``,
    ``omega`` (``None``: ``L / T``) shape the curve.

    Raises ValueError for a target outside ``(0, 1]`` or below the all-sparsest schedule's
    density. Warns when the nearest achievable density is more than ``tol`` (absolute) away.
    """
    target = check_target(target_density)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: expected one of {list(ALLOCATIONS)}, got {allocation!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {list(OBJECTIVES)}, got {objective!r}")
    if allocation == "lagrange" and objective == "output_error" and profile.output_error is None:
        raise ValueError("objective: 'output_error' needs a profile with output_error (v "
                         "captured by profile_fidelity); re-profile, or pass "
                         "objective='fidelity'")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho: expected (1 - A_max) / (1 - A_min) in (0, 1], got {rho}")
    fid = profile.fidelity(reduce)
    L, T, H, NL = fid.shape
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if allocation != "lagrange" or tuple(weights.shape) != (L, T) or \
                not bool(torch.isfinite(weights).all() and (weights >= 0).all()):
            raise ValueError(f"weights: expected finite non-negative (L, T) = {(L, T)} gains "
                             f"with allocation='lagrange', got {tuple(weights.shape)} with "
                             f"{allocation!r}")
    dens_ld = profile.level_density

    def run(eps_max: float):
        a_min, a_max = 1.0 - eps_max, 1.0 - rho * eps_max
        choice = choose_levels(fid, target_fidelity(L, T, a_min, a_max, gamma=gamma, omega=omega))
        return achieved_density(choice, dens_ld), choice, a_min, a_max

    sparsest = achieved_density(torch.zeros(L, T, H, dtype=torch.int64), dens_ld)
    if target < sparsest - tol:
        raise ValueError(f"target_density: {target} is below {sparsest:.4f}, the density with every "
                         f"head at the lowest level {profile.levels[0]} (the WEST union and the "
                         f"diagonal keep more than p); pass >= {sparsest:.3f} or add lower levels")
    if allocation == "lagrange":
        cost = (profile.output_error if objective == "output_error" else 1.0 - fid).double()
        if weights is not None:
            cost = cost * weights[:, :, None, None]
        dens, choice, lam = _fit_lagrange(cost, dens_ld, target, iters)
        if abs(dens - target) > tol:
            warnings.warn(f"fit_schedule: nearest achievable global density is {dens:.4f} for "
                          f"target {target} (|error| > {tol}); the profile has too few (layer, "
                          f"step, head) cells or too coarse levels for that target", stacklevel=2)
        info = {"method": "fast", "allocation": "lagrange", "objective": objective,
                "weighted": weights is not None, "target_density": target, "achieved_density": dens, "density_tol_abs": tol,
                "lambda": lam, "profile_cost": float(cost.gather(-1, choice[..., None]).mean()),
                "reduce": reduce, "profiled_timesteps": list(profile.timesteps),
                **{f"profile_{k}": v for k, v in profile.info.items()}}
        return FastSchedule(list(profile.levels),
                            steps_to_buckets(choice).to(torch.int32).contiguous(),
                            bucket_bounds_for(profile.timesteps), info)
    lo, hi = 0.0, 1.0 / rho  # density(lo) = dense (1.0) >= target >= density(hi) = sparsest
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if run(mid)[0] >= target:
            lo = mid
        else:
            hi = mid
    best = min((run(lo), run(hi)), key=lambda r: abs(r[0] - target))
    dens, choice, a_min, a_max = best
    if abs(dens - target) > tol:
        warnings.warn(f"fit_schedule: nearest achievable global density is {dens:.4f} for target "
                      f"{target} (|error| > {tol}); the profile has too few (layer, step, head) "
                      f"cells or too coarse levels for that target", stacklevel=2)
    omega_used = L / T if omega is None else float(omega)
    info = {"method": "fast", "allocation": "curve", "target_density": target,
            "achieved_density": dens, "density_tol_abs": tol, "a_min": a_min, "a_max": a_max, "gamma": gamma,
            "omega": omega_used, "rho": rho, "reduce": reduce,
            "profiled_timesteps": list(profile.timesteps), **{f"profile_{k}": v
                                                             for k, v in profile.info.items()}}
    return FastSchedule(list(profile.levels), steps_to_buckets(choice).to(torch.int32).contiguous(),
                        bucket_bounds_for(profile.timesteps), info)


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------

def _uniform_threshold(codes: torch.Tensor, density: float) -> tuple[float, float]:
    """The WEST threshold ``c / 255`` whose mean achieved density over all layers and heads
    (diagonal included) is nearest ``density``; returns ``(p, achieved)``."""
    best = None
    for c in range(1, west.CODE_MAX + 1):  # density is monotone in c; 255 masks are cheap
        d = west.mask_at(codes, c / west.CODE_MAX).double().mean().item()
        if best is None or abs(d - density) < abs(best[1] - density):
            best = (c / west.CODE_MAX, d)
        if d >= density:
            break
    return best


def uniform_schedule(plan: Plan, density: float, *, grid=None) -> FastSchedule:
    """Baseline: one level for every layer, head and step, the threshold whose global achieved
    density (at ``grid``, default the calibration grid) is nearest ``density``. One bucket."""
    density = check_target(density, "density")
    codes = plan.thresholds(grid)
    p, got = _uniform_threshold(codes, density)
    L, H = plan.num_layers, plan.num_heads
    return FastSchedule([p], torch.zeros(L, 1, H, dtype=torch.int32),
                        torch.zeros(0, dtype=torch.float32),
                        {"method": "uniform", "target_density": density, "achieved_density": got,
                         "threshold": p})


def dense_first_schedule(plan: Plan, density: float, timesteps: Sequence[float],
                         dense_fraction: float = 0.25, *, match_global: bool = True,
                         grid=None) -> FastSchedule:
    """Baseline (SVG convention): the first ``ceil(dense_fraction * T)`` of the inference
    ``timesteps`` (descending) run dense, the rest at one uniform level.

    ``match_global=True``: the sparse level is chosen so the *global* density (dense steps
    included) is ``density``, for equal-compute comparisons; ``False``: the sparse steps run at
    ``density``. Two buckets split at the midpoint between the last dense and first sparse step.
    """
    density = check_target(density, "density")
    if not 0.0 <= dense_fraction < 1.0:
        raise ValueError(f"dense_fraction: expected a fraction in [0, 1), got {dense_fraction}")
    ts = [float(t) for t in timesteps]
    bucket_bounds_for(ts)  # checks descending
    T = len(ts)
    k = math.ceil(dense_fraction * T - 1e-9)
    if k == 0:
        sched = uniform_schedule(plan, density, grid=grid)
        sched.info.update(method="dense_first", dense_steps=0, dense_fraction=dense_fraction)
        return sched
    if k >= T:
        raise ValueError(f"dense_fraction: {dense_fraction} of {T} steps leaves no sparse step")
    sparse = (density - k / T) / (1 - k / T) if match_global else density
    if sparse <= 0:
        raise ValueError(f"density: {density} is below the {k}/{T} dense steps' share {k / T:.3f}; "
                         f"pass density > {k / T:.3f}, a smaller dense_fraction or "
                         f"match_global=False")
    p, got = _uniform_threshold(plan.thresholds(grid), sparse)
    L, H = plan.num_layers, plan.num_heads
    table = torch.zeros(L, 2, H, dtype=torch.int32)
    levels = [p]
    if p < 1.0:
        levels.append(1.0)
        table[:, 1] = 1  # bucket 1 = large timesteps = the first (dense) steps
    bound = torch.tensor([(ts[k - 1] + ts[k]) / 2], dtype=torch.float32)
    return FastSchedule(levels, table, bound,
                        {"method": "dense_first", "target_density": density,
                         "dense_fraction": dense_fraction, "dense_steps": k, "num_steps": T,
                         "match_global": match_global, "sparse_threshold": p,
                         "bucket_steps": [T - k, k],  # bucket 0: the sparse steps
                         "sparse_density": got,
                         "achieved_density": (k + (T - k) * got) / T})


def schedule_density(schedule: FastSchedule, codes: torch.Tensor,
                     timesteps: Sequence[float]) -> torch.Tensor:
    """Achieved density per (layer, step, head) of ``schedule`` when run at ``timesteps``:
    float64 ``(L, T, H)`` (codes ``(L, H, NB, NB)`` at the grid of interest)."""
    dens = level_densities(codes, schedule.levels)  # (L, H, NL)
    # The op's bucket rule (float32, as the kernel compares), not a copy of it.
    b = timestep_bucket(torch.tensor([float(t) for t in timesteps]), schedule.bucket_bounds)
    lt = schedule.level_tables.long()[:, b]  # (L, T, H)
    L, T, H = lt.shape
    return dens[:, None].expand(L, T, H, -1).gather(-1, lt[..., None])[..., 0]
