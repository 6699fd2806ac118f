"""FAST: fidelity-aware, head-wise density per (layer, timestep bucket) on the WEST topology.

Pipeline (after the ScalingAttention paper's FAST)::

    plan (WEST codes) + model + one calibration input
      -> profile_fidelity     one dense run; per (layer, step, head, level) the fidelity and the
                              relative output error of the sampled rows under the level's mask
                                                                              -> FastProfile
      -> fit_schedule         per (layer, step, head) one level, the global density on target:
                              "lagrange" (default) minimises the summed output error;
                              "curve" is the paper's A(l, t) fidelity target  -> FastSchedule
      -> plan.with_schedule   saved in the plan file (``plan.py``)

Why the Lagrangian is the default: on small-wan (128 blocks, 50 steps, 8 held-out prompts x 2
seeds, H200) at density 0.25 it reached 27.7 dB PSNR against dense where the paper's curve gave
20.0 dB and uniform density 24.7 dB (README, "Quality on small-wan").

Output error of one attention row
---------------------------------
``E = |O~ - O|^2 / |O|^2`` with ``O`` the dense attention output and ``O~`` the output over the
level's kept blocks (renormalised): what the kernel changes in the layer's output, relative to
it. One dense PV pass gives every level: per key block the partial output ``sum p_k v_k`` and
mass ``sum p_k``; a level's output is the sum over its kept blocks over their mass.
The fit (the Lagrangian allocation, the paper's A(l, t) curve, the buckets and the baselines)
lives in :mod:`.fast_fit`; its names are re-exported here.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..contract.masks import BLOCK, num_blocks
from ..contract.token_order import in_token_order
from ..models.wan import SELF_ATTENTION_PATH
from ..plan.plan import Plan
from . import west
from .fast_fit import (  # noqa: F401  (the fit's names, re-exported: fast.fit_schedule, ...)
    ALLOCATIONS,
    DEFAULT_LEVELS,
    DEFAULT_ROWS_PER_BLOCK,
    DEFAULT_TOL,
    OBJECTIVES,
    achieved_density,
    bucket_bounds_for,
    check_levels,
    check_target,
    choose_levels,
    dense_first_schedule,
    fit_schedule,
    lagrange_choice,
    level_densities,
    schedule_density,
    steps_to_buckets,
    target_fidelity,
    uniform_schedule,
)

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
    """Dense softmax mass that each level's mask drops, per sampled row: float64
    ``(B, H, NL, R)`` (see :func:`level_errors`, which also gives the output error)."""
    return level_errors(q, k, None, codes, levels, rows, scale,
                        max_chunk_elements=max_chunk_elements)[0]


def level_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, codes: torch.Tensor,
                 levels: Sequence[float], rows: torch.Tensor, scale: float | None = None, *,
                 max_chunk_elements: int = 2**25) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense softmax mass that each level's mask drops, per sampled row.

    Args:
        q, k, v: ``(B, H, S, D)`` self-attention inputs (any float dtype); ``v=None`` skips the
            output error.
        codes: uint8 ``(H, NB, NB)`` WEST threshold codes of this layer at this grid.
        levels: thresholds ``p``; level mask ``codes <= ceil(255 p)``, diagonal block kept.
        rows: int64 ``(R,)`` sampled query rows (:func:`sample_rows`).
        scale: softmax scale (default ``1 / sqrt(D)``).
        max_chunk_elements: bound on one chunk of scores ``B * H * rows * S``.

    Returns:
        ``(dropped, error)``: the dropped mass, float64 ``(B, H, NL, R)`` in ``[0, 1)``, 0 exactly
        where the mask keeps every block; and (with ``v``) the relative output error
        ``|O~ - O|^2 / |O|^2`` of each sampled row, float32 ``(B, H, NL, R)``, with ``O`` the dense
        attention output and ``O~`` the level's (kept blocks, renormalised), else ``None``.
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
    err = None if v is None else torch.empty(B, H, len(levels), rows.numel(),
                                             dtype=torch.float32, device=q.device)
    step = max(1, max_chunk_elements // max(1, B * H * S))
    pad = nb * BLOCK - S
    if v is not None:  # (B, H, NB, BLOCK, D), zero rows past S
        vb = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(B, H, nb, BLOCK, D)
    for start in range(0, rows.numel(), step):
        r = rows[start:start + step]
        probs = torch.einsum("bhrd,bhsd->bhrs", q[:, :, r].float(), kf).mul_(scale).softmax(-1)
        probs = torch.nn.functional.pad(probs, (0, pad))
        pblk = probs.view(B, H, r.numel(), nb, BLOCK)
        mass = pblk.sum(-1, dtype=torch.float64)  # (B,H,Rc,NB)
        # Per-block partial outputs sum_{k in block j} p_k v_k: a level's output is the sum over
        # its kept blocks over their kept mass, so one dense PV pass serves every level.
        pv = None if v is None else torch.einsum("bhrjk,bhjkd->bhrjd", pblk, vb)
        del probs, pblk
        u = r // BLOCK
        crow = codes[:, u, :].long()  # (H, Rc, NB)
        # The diagonal block is always kept: code 0 is below every cut.
        crow[:, torch.arange(r.numel(), device=q.device), u] = 0
        if pv is not None:
            dense_o = pv.sum(3)  # (B, H, Rc, D)
            norm = dense_o.square().sum(-1).clamp_min(1e-30)
            for i, cut in enumerate(cuts.tolist()):
                keep = (crow <= cut).to(pv.dtype)  # (H, Rc, NB)
                kept_mass = (mass.float() * keep).sum(-1, keepdim=True)  # (B, H, Rc, 1)
                o = torch.einsum("bhrjd,hrj->bhrd", pv, keep) / kept_mass
                err[:, :, i, start:start + r.numel()] = (o - dense_o).square().sum(-1) / norm
            del pv
        hist = torch.zeros(B, H, r.numel(), west.CODE_MAX + 1, dtype=torch.float64,
                           device=q.device)
        hist.scatter_add_(-1, crow.expand(B, -1, -1, -1), mass)
        # Suffix sums: dropped(cut) = mass of codes > cut, without the 1 - kept cancellation.
        suffix = hist.flip(-1).cumsum(-1).flip(-1)  # suffix[c] = mass of codes >= c
        suffix = torch.nn.functional.pad(suffix, (0, 1))  # suffix[256] = 0
        out[:, :, :, start:start + r.numel()] = suffix[..., cuts + 1].permute(0, 1, 3, 2)
    return out, err


def row_fidelity(q, k, codes, levels, rows, scale=None) -> torch.Tensor:
    """``F = 1 - Hellinger`` per level and sampled row: float64 ``(B, H, NL, R)``."""
    return fidelity_from_dropped(dropped_mass(q, k, codes, levels, rows, scale))


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
        output_error: float64 ``(L, T, H, NL)`` mean relative output error ``|O~ - O|^2 / |O|^2``
            of the sampled rows (:func:`level_errors`), or ``None`` when v was not captured.
    """

    levels: list[float]
    fidelity_mean: torch.Tensor
    fidelity_min: torch.Tensor
    level_density: torch.Tensor
    timesteps: list[float]
    info: dict = field(default_factory=dict)
    output_error: torch.Tensor | None = None

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
        self.err_sum = torch.zeros(L, T, H, NL, dtype=torch.float64)
        self.has_v = True
        self.count = torch.zeros(L, T, dtype=torch.int64)

    def __call__(self, cap) -> None:
        t = self.step_of[cap.step_index]
        codes = self.codes[cap.layer].to(cap.q.device)
        v = getattr(cap, "v", None)
        dropped, err = level_errors(cap.q, cap.k, v, codes, self.levels, self.rows)
        f = fidelity_from_dropped(dropped).cpu()  # (B, H, NL, R)
        if err is None:
            self.has_v = False
        else:
            self.err_sum[cap.layer, t] += err.double().sum(dim=(0, 3)).cpu()
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
                           f"{SELF_ATTENTION_PATH} running a processor that bypasses __call__?")
    mean = acc.sum / acc.count[:, :, None, None]
    err = acc.err_sum / acc.count[:, :, None, None] if acc.has_v else None
    info = {"grid": list(grid), "rows_per_block": rows_per_block, "rows": int(rows.numel()),
            "seed": seed, "num_steps": len(steps), "capture_steps": chosen,
            "input": getattr(calibration_input, "name", "")}
    return FastProfile(levels, mean, acc.min, level_densities(codes, levels),
                       [steps[j] for j in chosen], info, err)


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
