"""The study's methods: for a target density, the tables (and energy filter) each one runs.

``west_fast``         WEST topology + FAST schedule fitted to the target (``fast.fit_schedule``'s
                      default: the Lagrangian allocation minimising the summed output error).
``west_uniform``      WEST topology, one threshold everywhere (``fast.uniform_schedule``).
``dense_warmup``      WEST topology, first ``k`` of the ``T`` steps dense and the rest at one
                      threshold chosen so the *global* density is the target
                      (``fast.dense_first_schedule``, the SVG convention). ``k`` is the largest of
                      ``ceil(0.25 T)``, ``ceil(0.25 T) - 1``, ... whose sparse steps still get at
                      least half the target (at 0.15 a 25% warm-up alone would exceed the budget).
``energy_cumulative`` every block visited (dense tables); DynSparse's cumulative-energy rule skips.
``energy_blasst``     the same with BLASST's rule.
``west_fast_energy``  FAST fitted at ``min(1, 1.5 x target)``, cumulative-energy filter on top, its
                      threshold bisected so the *computed* density hits the target.
``radial``, ``sta``, ``svg_split``: the training-free anchors (``scaling_attn_compile.offline.anchors``);
                      SVG's head types are chosen per target from the block mass of the dense
                      profiling run (the FAST/energy caption).
Diagnostics, not in the default set:
``west_fast_curve``   FAST with the paper's A(l, t) curve (``allocation="curve"``, rho 0.1).
``west_fast_flat``    the curve with ``rho=1``: one fidelity target A for every layer and step.
``west_fast_fidelity`` the Lagrangian allocation on ``1 - F`` (Hellinger) instead of output error.
``west_fast_weighted`` the Lagrangian allocation with each (layer, step)'s error weighted by its
                      measured gain on the final video (``quality.response``);
                      ``west_fast_weighted_half`` by its square root (a compromise, as the gains
                      come from one reference level and the error is not linear far from it).
``west_fast_warmup``  the Lagrangian allocation with the first profiled step's bucket dense.

Energy thresholds (natural log) are bisected (``--bisect-iters`` steps over ``[-30, 5]``) on q/k
captured from a *dense* run of a training caption (4 evenly spaced steps, all layers); the
filtered trajectory differs from the dense one, so the calibration density is an estimate and
the reported density is the one counted during generation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..contract.masks import ENERGY_RULES
from ..contract.tables import AttentionTables
from ..offline import anchors, fast
from .measure import all_blocks_tables, bisect_threshold

METHODS = {
    "west_fast": "WEST+FAST",
    "west_uniform": "WEST, uniform density",
    "dense_warmup": "WEST uniform + dense warm-up (SVG)",
    "energy_cumulative": "cumulative energy alone",
    "energy_blasst": "BLASST alone",
    "west_fast_energy": "WEST+FAST + cumulative energy",
    "radial": "Radial-style static mask",
    "sta": "STA-style 3D window",
    "svg_split": "SVG-style spatial/temporal heads",
    "west_fast_curve": "WEST+FAST, the paper's A(l, t) curve (diagnostic)",
    "west_fast_flat": "WEST+FAST, flat A (rho=1; diagnostic)",
    "west_fast_fidelity": "WEST+FAST, Lagrangian on Hellinger fidelity (diagnostic)",
    "west_fast_weighted": "WEST+FAST, error weighted by its measured cost in the video",
    "west_fast_weighted_half": "WEST+FAST, weighted by the square root of that cost",
    "west_fast_warmup": "WEST+FAST, first profiled step bucket dense",
    "west_fast_fp8": "WEST+FAST, 8-bit attention (FP8 Q.K^T and P.V)",
    "west_fast_int8": "WEST+FAST, 8-bit attention (INT8 Q.K^T, FP8 P.V)",
}
# 8-bit attention (issue 15): west_fast's tables through the backend's precision= op.
PRECISION = {"west_fast_fp8": "fp8", "west_fast_int8": "int8"}
DIAGNOSTICS = ("west_fast_curve", "west_fast_flat", "west_fast_fidelity", "west_fast_weighted",
               "west_fast_weighted_half", "west_fast_warmup", *PRECISION)
WARMUP_WEIGHT = 1e6  # west_fast_warmup: a gain no sparse level's error can pay for
DEFAULT_METHODS = tuple(m for m in METHODS if m not in DIAGNOSTICS)
FIT_OPTIONS = {"west_fast": {}, "west_fast_curve": {"allocation": "curve"},
               "west_fast_flat": {"allocation": "curve", "rho": 1.0},
               "west_fast_fidelity": {"objective": "fidelity"}}
# The Pareto bar's "WEST+FAST": every method that runs a WEST topology under a FAST fit, with
# either objective (west_fast: attention error; west_fast_weighted: the video objective,
# `scaling-attn fast`'s default for Wan since 2026-12-05), with or without the energy filter,
# and the diagnostics' variants of the fit. The bar compares it with the *other* methods (the
# baselines and the anchors). west_fast_warmup counts: it is the same Lagrangian fit with one
# bucket pinned dense. On the H100 (2026-12-05) its points at 2.99 / 3.38 / 3.93 ms (target
# 0.15 / 0.25 / 0.35; it lands under the target, at 0.142 / 0.214 / 0.316) were the fastest of
# the family; before it counted, the 2.99 ms budget had no family point at all.
WEST_FAST_FAMILY = tuple(m for m in METHODS if m.startswith("west_fast"))
ENERGY_FAST_FACTOR = 1.5  # west_fast_energy: FAST at 1.5 x target, the filter takes the rest


def warmup_steps(target: float, num_steps: int, fraction: float = 0.25) -> int:
    """Dense warm-up steps for ``target``: the largest ``k <= ceil(fraction * T)`` whose sparse
    steps keep at least half the target ((target - k/T) / (1 - k/T) >= target / 2)."""
    k = math.ceil(fraction * num_steps - 1e-9)
    while k > 0 and (target - k / num_steps) / (1 - k / num_steps) < target / 2:
        k -= 1
    return k


@dataclass
class Calibration:
    """What every method is built from (one per study): the WEST plan, the FAST profile, q/k of
    a dense run for the energy bisection and the SVG head profile (block mass per layer)."""

    plan: object
    profile: object
    energy_captures: list
    block_mass: list | None
    timesteps: list[float]
    token_grid: tuple[int, int, int]
    num_layers: int
    num_heads: int
    bisect_iters: int = 10
    pad_to: tuple[int, int] | None = None  # (levels, buckets) every method's tables share
    response: dict | None = None  # quality.response.measure_response, for west_fast_weighted


def pad_tables(t: AttentionTables, levels: int, buckets: int) -> AttentionTables:
    """The same attention in tables of a common shape, so every method compiles to one graph
    shape, for Inductor's FX graph cache and the template's autotuning to hit: on the H200
    (small-wan) WEST+FAST's tables (10 levels x 6 buckets) compiled in 32 s and the dense
    warm-up's (2 x 2) in 24 s, while WEST uniform's, of the dense reference's shape (1 x 1),
    compiled in 4 s after it. Masks ``(H, levels, NB, W)``: extra levels copy the last and are
    never selected; level tables ``(buckets, H)``: extra rows copy the last; bounds padded with
    +inf, which ``#{bounds <= t}`` never counts for a finite ``t``, so no extra row is reached."""
    nl, nt = t.masks[0].shape[1], t.level_tables[0].shape[0]
    levels, buckets = max(levels, nl), max(buckets, nt)
    if (levels, buckets) == (nl, nt):
        return t
    inf = torch.full((buckets - nt,), float("inf"), dtype=torch.float32)
    masks = [torch.cat([m, m[:, -1:].expand(-1, levels - nl, -1, -1)], 1) for m in t.masks]
    lts = [torch.cat([lt, lt[-1:].expand(buckets - nt, -1)]) for lt in t.level_tables]
    dens = None if t.level_densities is None else [
        torch.cat([d, d[:, -1:].expand(-1, levels - nl)], 1) for d in t.level_densities]
    return AttentionTables(t.grid, [m.contiguous() for m in masks],
                           [lt.contiguous() for lt in lts],
                           torch.cat([t.bucket_bounds.float().cpu(), inf]), dens, t.token_order)


@dataclass
class Setup:
    tables: AttentionTables
    rule: int = 0
    threshold: float = 0.0
    params: dict = field(default_factory=dict)
    planned: dict = field(default_factory=dict)  # planned density (mask-only methods)
    precision: str | None = None  # "int8" / "fp8": 8-bit attention (PRECISION)


def _fit(profile, target, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = fast.fit_schedule(profile, target, **kw)
    return s, [str(x.message) for x in w]


WEIGHTED = ("west_fast_weighted", "west_fast_weighted_half", "west_fast_warmup")


def fit_weights(method: str, cal: Calibration) -> torch.Tensor:
    """The ``(L, T)`` gains a weighted FAST variant fits with (see the module doc)."""
    if method == "west_fast_warmup":
        w = torch.ones(cal.num_layers, len(cal.profile.timesteps), dtype=torch.float64)
        w[:, 0] = WARMUP_WEIGHT
        return w
    if cal.response is None:
        raise ValueError(f"{method}: no measured response; the study measures it when a "
                         f"weighted method is asked for")
    return cal.response["weights"] ** (0.5 if method == "west_fast_weighted_half" else 1.0)


def build(method: str, target: float, cal: Calibration) -> Setup:
    """The tables and filter ``method`` runs at ``target``; ValueError when unreachable."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    if method in PRECISION:  # the same tables as west_fast; only the arithmetic differs
        s = build("west_fast", target, cal)
        s.precision = PRECISION[method]
        s.params["precision"] = s.precision
        return s
    plan, tgrid, ts = cal.plan, cal.token_grid, cal.timesteps
    L, H = cal.num_layers, cal.num_heads
    params, rule, sched, tables = {}, 0, None, None
    order = getattr(getattr(plan, "meta", None), "token_order", "raster")  # anchors follow WEST
    if method in FIT_OPTIONS or method in WEIGHTED:
        kw = dict(FIT_OPTIONS.get(method, {}))
        if method in WEIGHTED:
            kw["weights"] = fit_weights(method, cal)
        sched, warn = _fit(cal.profile, target, **kw)
        params = {"fit_density": sched.info["achieved_density"], "fit_warnings": warn,
                  "allocation": sched.info["allocation"],
                  **({"objective": sched.info["objective"]} if "objective" in sched.info else {}),
                  **({"weighted": True} if method in WEIGHTED else {})}
    elif method == "west_uniform":
        sched = fast.uniform_schedule(plan, target, grid=tgrid)
        params = {"threshold": sched.info["threshold"]}
    elif method == "dense_warmup":
        k = warmup_steps(target, len(ts))
        sched = fast.dense_first_schedule(plan, target, ts, dense_fraction=k / len(ts), grid=tgrid)
        params = {"dense_steps": k, "num_steps": len(ts),
                  "sparse_density": sched.info.get("sparse_density",
                                                   sched.info.get("achieved_density"))}
    elif method == "west_fast_energy":
        ft = min(1.0, ENERGY_FAST_FACTOR * target)
        sched, warn = _fit(cal.profile, ft)
        params = {"fast_target": ft, "fast_fit_density": sched.info["achieved_density"],
                  "fit_warnings": warn}
        rule = ENERGY_RULES["cumulative"]
    elif method in ("energy_cumulative", "energy_blasst"):
        tables = all_blocks_tables(L, H, tgrid)
        rule = ENERGY_RULES["cumulative" if method == "energy_cumulative" else "blasst"]
    elif method == "svg_split":
        if cal.block_mass is None:
            raise ValueError("svg_split: no profiled block mass; the study captures it with the "
                             "energy calibration run")
        # The profiled mass is of raster-order q/k; the types hold in any order.
        types, share = anchors.svg_head_types(cal.block_mass, tgrid, target)
        tables = anchors.svg_split_tables(tgrid, target, types, token_order=order)
        params = {"head_types": types.tolist(), "spatial_heads": int((types == 0).sum()),
                  "temporal_heads": int((types == 1).sum()),
                  "kept_mass_share": share.tolist()}
    else:  # radial, sta
        tables = anchors.anchor_tables(method, tgrid, target, L, H, token_order=order)
    planned = {}
    if sched is not None:
        tables = plan.with_schedule(sched).materialize(tgrid)
        sd = fast.schedule_density(sched, plan.thresholds(tgrid), ts)  # (L, T, H)
        planned = {"planned_density": float(sd.mean()),
                   "planned_density_per_step": sd.mean(dim=(0, 2)).tolist(),
                   "planned_density_per_layer": sd.mean(dim=(1, 2)).tolist()}
    elif method in anchors.KINDS:
        planned = {"planned_density": float(sum(float(d.mean()) for d in tables.level_densities)
                                            / len(tables.level_densities))}
    if cal.pad_to is not None:
        tables = pad_tables(tables, *cal.pad_to)
    lam = 0.0
    if rule:
        b = bisect_threshold(cal.energy_captures, tables, rule, target, iters=cal.bisect_iters)
        lam = b["threshold"]
        params.update(rule=[k for k, v in ENERGY_RULES.items() if v == rule][0], threshold=lam,
                      calibration_density=b["calibration_density"], bisection=b["evals"],
                      **({"note": b["note"]} if "note" in b else {}))
    return Setup(tables, rule, lam, params, planned)
