"""FAST: fidelity-aware, head-wise density per (layer, timestep bucket) on the WEST topology.

Pipeline (the ScalingAttention paper, FAST)::

    plan (WEST codes) + model + one calibration input
      -> profile_fidelity     one dense run; per (layer, step, head, level) the fidelity of the
                              sampled rows under the level's mask            -> FastProfile
      -> fit_schedule         A(l, t) fitted so the global density hits the target; per
                              (layer, step, head) the smallest level with F >= A -> FastSchedule
      -> plan.with_schedule   saved in the plan file (``plan.py``)

Fidelity of one attention row
-----------------------------
``F = 1 - Hellinger(P, P~)`` with ``P`` the dense softmax row and ``P~`` the row restricted to
the mask's kept blocks and renormalised (what the kernel computes; diagonal block always kept).
With ``m`` the dense mass on kept keys, ``q_k = p_k / m`` on kept keys, so
``sum_k sqrt(p_k q_k) = sqrt(m)`` and ``H^2 = 1 - sqrt(m)``: the fidelity depends only on the
kept mass, ``F = 1 - sqrt(1 - sqrt(m))``. We compute it from the *dropped* mass ``d = 1 - m``
as ``F = 1 - sqrt(d / (1 + sqrt(1 - d)))`` (no cancellation when ``d`` is tiny; ``d = 0`` gives
exactly 1). Levels are nested (``T <= p``), so the kept mass of every level comes from one
histogram of the row's block masses over threshold codes: ``dropped(p) = sum of the mass of
blocks with code > ceil(255 p)``. Rows are sampled stratified: ``rows_per_block`` rows (seeded)
of each 128-row query block; only ``sampled rows x S`` scores exist, in chunks.

Target A(l, t) and the fit
--------------------------
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
from dataclasses import dataclass, field

import torch

from ..contract.masks import BLOCK, num_blocks
from ..contract.token_order import in_token_order
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


# --------------------------------------------------------------------------------------------
# Fidelity of sampled rows
# --------------------------------------------------------------------------------------------

def sample_rows(seq_len: int, rows_per_block: int = DEFAULT_ROWS_PER_BLOCK, *,
                seed: int = 0) -> torch.Tensor:
    """Stratified row sample: ``min(rows_per_block, block size)`` distinct rows of each 128-row
    query block (the last may be partial), seeded. int64 ``(R,)`` ascending."""
    if rows_per_block < 1:
        raise ValueError(f"rows_per_block: expected >= 1, got {rows_per_block}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for u in range(num_blocks(seq_len)):
        n = min(BLOCK, seq_len - u * BLOCK)
        pick = torch.randperm(n, generator=g)[:min(rows_per_block, n)]
        out.append(u * BLOCK + pick.sort().values)
    return torch.cat(out)


def fidelity_from_dropped(dropped: torch.Tensor) -> torch.Tensor:
    """``F = 1 - Hellinger`` from the dropped mass ``d = 1 - m`` of a row (any shape):
    ``1 - sqrt(1 - sqrt(1 - d))`` written as ``1 - sqrt(d / (1 + sqrt(1 - d)))`` (stable)."""
    d = dropped.clamp(0.0, 1.0)
    return 1.0 - (d / (1.0 + (1.0 - d).sqrt())).sqrt()


def hellinger_fidelity_direct(p: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Reference: ``1 - H(P, P~)`` from full rows ``p (..., S)`` and a key mask ``keep (..., S)``
    (the definition, for tests; needs the whole row)."""
    q = torch.where(keep, p, torch.zeros_like(p))
    q = q / q.sum(-1, keepdim=True)
    h = ((p.sqrt() - q.sqrt()) ** 2).sum(-1).div(2.0).sqrt()
    return 1.0 - h


def dropped_mass(q: torch.Tensor, k: torch.Tensor, codes: torch.Tensor, levels: Sequence[float],
                 rows: torch.Tensor, scale: float | None = None, *,
                 max_chunk_elements: int = 2**25) -> torch.Tensor:
    """Dense softmax mass that each level's mask drops, per sampled row.

    Args:
        q, k: ``(B, H, S, D)`` self-attention inputs (any float dtype).
        codes: uint8 ``(H, NB, NB)`` WEST threshold codes of this layer at this grid.
        levels: thresholds ``p``; level mask ``codes <= ceil(255 p)``, diagonal block kept.
        rows: int64 ``(R,)`` sampled query rows (:func:`sample_rows`).
        scale: softmax scale (default ``1 / sqrt(D)``).
        max_chunk_elements: bound on one chunk of scores ``B * H * rows * S``.

    Returns:
        float64 ``(B, H, NL, R)``, in ``[0, 1)``; 0 exactly where the mask keeps every block.
    """
    B, H, S, D = q.shape
    nb = num_blocks(S)
    if k.shape != q.shape or tuple(codes.shape) != (H, nb, nb):
        raise ValueError(f"dropped_mass: expected q, k (B, H, S, D) alike and codes (H, NB, NB) = "
                         f"{(H, nb, nb)}, got q {tuple(q.shape)}, k {tuple(k.shape)}, codes "
                         f"{tuple(codes.shape)}")
    scale = D**-0.5 if scale is None else float(scale)
    cuts = torch.tensor([west.code_for(p) for p in levels], device=q.device)  # (NL,)
    kf = k.float()
    rows = rows.to(q.device)
    out = torch.empty(B, H, len(levels), rows.numel(), dtype=torch.float64, device=q.device)
    step = max(1, max_chunk_elements // max(1, B * H * S))
    pad = nb * BLOCK - S
    for start in range(0, rows.numel(), step):
        r = rows[start:start + step]
        probs = torch.einsum("bhrd,bhsd->bhrs", q[:, :, r].float(), kf).mul_(scale).softmax(-1)
        probs = torch.nn.functional.pad(probs, (0, pad))
        mass = probs.view(B, H, r.numel(), nb, BLOCK).sum(-1, dtype=torch.float64)  # (B,H,Rc,NB)
        del probs
        u = r // BLOCK
        crow = codes[:, u, :].long()  # (H, Rc, NB)
        # The diagonal block is always kept: code 0 is below every cut.
        crow[:, torch.arange(r.numel(), device=q.device), u] = 0
        hist = torch.zeros(B, H, r.numel(), west.CODE_MAX + 1, dtype=torch.float64,
                           device=q.device)
        hist.scatter_add_(-1, crow.expand(B, -1, -1, -1), mass)
        # Suffix sums: dropped(cut) = mass of codes > cut, without the 1 - kept cancellation.
        suffix = hist.flip(-1).cumsum(-1).flip(-1)  # suffix[c] = mass of codes >= c
        suffix = torch.nn.functional.pad(suffix, (0, 1))  # suffix[256] = 0
        out[:, :, :, start:start + r.numel()] = suffix[..., cuts + 1].permute(0, 1, 3, 2)
    return out


def row_fidelity(q, k, codes, levels, rows, scale=None) -> torch.Tensor:
    """``F = 1 - Hellinger`` per level and sampled row: float64 ``(B, H, NL, R)``."""
    return fidelity_from_dropped(dropped_mass(q, k, codes, levels, rows, scale))


def level_densities(codes: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """Achieved density (kept blocks / all blocks, diagonal included) of each level's mask:
    float64 ``(..., NL)`` for codes ``(..., NB, NB)``."""
    return torch.stack([west.mask_at(codes, p).double().mean(dim=(-1, -2)) for p in levels], -1)


# --------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------

@dataclass
class FastProfile:
    """What one dense profiling run measured.

    Attributes:
        levels: thresholds ``(NL,)``, ascending, last 1.0.
        fidelity_mean / fidelity_min: float64 ``(L, T, H, NL)`` mean / min fidelity over the
            sampled rows (and batch elements, CFG branches) of each (layer, step, head, level).
        level_density: float64 ``(L, H, NL)`` achieved density of each level's mask.
        timesteps: the ``T`` profiled timesteps, descending (step index 0 first).
        info: JSON-able facts (grid, rows per block, seed, ...).
    """

    levels: list[float]
    fidelity_mean: torch.Tensor
    fidelity_min: torch.Tensor
    level_density: torch.Tensor
    timesteps: list[float]
    info: dict = field(default_factory=dict)

    def fidelity(self, reduce: str = "mean") -> torch.Tensor:
        if reduce not in ("mean", "min"):
            raise ValueError(f"reduce: expected 'mean' or 'min', got {reduce!r}")
        return self.fidelity_mean if reduce == "mean" else self.fidelity_min


class _FidelityAccumulator:
    """on_layer callback: sums / mins of row fidelities per (layer, step, head, level)."""

    def __init__(self, codes, levels, rows, step_of):
        L, H = codes.shape[:2]
        T, NL = len(step_of), len(levels)
        self.codes, self.levels, self.rows, self.step_of = codes, levels, rows, step_of
        self.sum = torch.zeros(L, T, H, NL, dtype=torch.float64)
        self.min = torch.full((L, T, H, NL), math.inf, dtype=torch.float64)
        self.count = torch.zeros(L, T, dtype=torch.int64)

    def __call__(self, cap) -> None:
        t = self.step_of[cap.step_index]
        codes = self.codes[cap.layer].to(cap.q.device)
        f = row_fidelity(cap.q, cap.k, codes, self.levels, self.rows).cpu()  # (B, H, NL, R)
        self.sum[cap.layer, t] += f.sum(dim=(0, 3))
        self.min[cap.layer, t] = torch.minimum(self.min[cap.layer, t], f.amin(dim=(0, 3)))
        self.count[cap.layer, t] += f.shape[0] * f.shape[3]


def profile_fidelity(plan: Plan, transformer, calibration_input, *,
                     timesteps: Sequence[float], latent_shape: Sequence[int],
                     capture_steps: Sequence[int] | None = None,
                     levels: Sequence[float] = DEFAULT_LEVELS,
                     rows_per_block: int = DEFAULT_ROWS_PER_BLOCK, seed: int = 0,
                     guidance_scale: float = 5.0, progress: bool = True) -> FastProfile:
    """One dense run of ``transformer`` on one calibration input, measuring fidelities on the fly.

    Args:
        plan: the WEST plan of ``transformer`` (checked with ``plan.check_model``).
        calibration_input: a :class:`~scaling_attn_compile.offline.calibrate.CalibrationInput`.
        timesteps: descending 0..1000 (e.g. ``calibrate.default_timesteps``).
        latent_shape: ``(C, F, H, W)``; its grid may differ from the plan's (remapped codes).
        capture_steps: step indices to profile (default all); these become the buckets.
        levels: WEST thresholds, ascending, last 1.0.
        rows_per_block: sampled rows per 128-row query block (stratified, ``seed``).

    Memory: per layer call ``B x H x NL x R`` fidelities plus one chunk of sampled scores.
    """
    from .calibrate import capture_self_attention

    levels = check_levels(levels)
    plan.check_model(transformer)
    grid = plan.grid_for(latent_shape)
    codes = plan.thresholds(grid)  # (L, H, NB, NB)
    S = math.prod(grid)
    steps = list(timesteps)
    chosen = list(range(len(steps))) if capture_steps is None else sorted(set(capture_steps))
    if not chosen or chosen[0] < 0 or chosen[-1] >= len(steps):
        raise ValueError(f"capture_steps: expected indices in 0..{len(steps) - 1}, got "
                         f"{capture_steps}")
    rows = sample_rows(S, rows_per_block, seed=seed)
    acc = _FidelityAccumulator(codes, levels, rows, {j: i for i, j in enumerate(chosen)})
    # The codes' blocks are in the plan's token order: q/k go into it before scoring.
    capture_self_attention(transformer, [calibration_input], steps,
                           in_token_order(acc, plan.token_order),
                           latent_shape=latent_shape, capture_steps=chosen,
                           guidance_scale=guidance_scale, progress=progress)
    if bool((acc.count == 0).any()):
        raise RuntimeError("profile_fidelity: some (layer, step) pairs were never captured; is "
                           "blocks.<i>.attn1 running a processor that bypasses __call__?")
    mean = acc.sum / acc.count[:, :, None, None]
    info = {"grid": list(grid), "rows_per_block": rows_per_block, "rows": int(rows.numel()),
            "seed": seed, "num_steps": len(steps), "capture_steps": chosen,
            "input": getattr(calibration_input, "name", "")}
    return FastProfile(levels, mean, acc.min, level_densities(codes, levels),
                       [steps[j] for j in chosen], info)


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


def fit_schedule(profile: FastProfile, target_density: float, *, gamma: float = 1.0,
                 omega: float | None = None, rho: float = 0.1, reduce: str = "mean",
                 tol: float = DEFAULT_TOL, iters: int = 60) -> FastSchedule:
    """Fit A(l, t) so the global density hits ``target_density`` and build the schedule.

    ``eps_max = 1 - A_min`` is bisected in ``[0, 1 / rho]`` with ``A_max = 1 - rho * eps_max``
    (see the module doc); ``gamma``, ``omega`` (``None``: ``L / T``) shape the curve. Raises
    ValueError for a target outside ``(0, 1]`` or below the all-sparsest schedule's density.
    Warns when the nearest achievable density is more than ``tol`` (absolute) away.
    """
    target = check_target(target_density)
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho: expected (1 - A_max) / (1 - A_min) in (0, 1], got {rho}")
    fid = profile.fidelity(reduce)
    L, T, H, NL = fid.shape
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
    info = {"method": "fast", "target_density": target, "achieved_density": dens,
            "density_tol_abs": tol, "a_min": a_min, "a_max": a_max, "gamma": gamma,
            "omega": omega_used, "rho": rho, "reduce": reduce,
            "profiled_timesteps": list(profile.timesteps), **{f"profile_{k}": v
                                                             for k, v in profile.info.items()}}
    return FastSchedule(list(profile.levels), steps_to_buckets(choice).to(torch.int32).contiguous(),
                        bucket_bounds_for(profile.timesteps), info)


def build_fast_plan(plan: Plan, transformer, calibration_input, target_density: float, *,
                    timesteps: Sequence[float], latent_shape: Sequence[int],
                    capture_steps: Sequence[int] | None = None,
                    levels: Sequence[float] = DEFAULT_LEVELS,
                    rows_per_block: int = DEFAULT_ROWS_PER_BLOCK, seed: int = 0,
                    progress: bool = True, **fit_kwargs) -> tuple[Plan, FastProfile]:
    """Profile + fit: ``plan.with_schedule(fit_schedule(profile_fidelity(...), target))``."""
    check_target(target_density)  # fail before the dense run
    prof = profile_fidelity(plan, transformer, calibration_input, timesteps=timesteps,
                            latent_shape=latent_shape, capture_steps=capture_steps, levels=levels,
                            rows_per_block=rows_per_block, seed=seed, progress=progress)
    return plan.with_schedule(fit_schedule(prof, target_density, **fit_kwargs)), prof


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
                         "sparse_density": got,
                         "achieved_density": (k + (T - k) * got) / T})


def schedule_density(schedule: FastSchedule, codes: torch.Tensor,
                     timesteps: Sequence[float]) -> torch.Tensor:
    """Achieved density per (layer, step, head) of ``schedule`` when run at ``timesteps``:
    float64 ``(L, T, H)`` (codes ``(L, H, NB, NB)`` at the grid of interest)."""
    dens = level_densities(codes, schedule.levels)  # (L, H, NL)
    b = torch.tensor([int((schedule.bucket_bounds <= float(t)).sum()) for t in timesteps])
    lt = schedule.level_tables.long()[:, b]  # (L, T, H)
    L, T, H = lt.shape
    return dens[:, None].expand(L, T, H, -1).gather(-1, lt[..., None])[..., 0]
