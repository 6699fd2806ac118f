"""Records, the bar checks, tables and plots of the quality study.

Per-video records (``records``): ``method, target_density, achieved_density, psnr, ssim, rel_l2,
ms_per_step, prompt, seed``. Per (method, target) summaries (``results``): the means over videos
plus how the method was built (``params``) and its timing.

The bars (issue 13, at small-wan's native grid on held-out prompts):

* equal density (:func:`bar_check`): WEST+FAST's PSNR at computed density 0.25 (its curve
  interpolated at 0.25) >= 26 dB, and WEST+FAST >= WEST uniform + 2 dB at every target <= 0.35,
  the uniform curve read at WEST+FAST's own achieved density: a uniform threshold cannot hit
  every density (its codes move in steps of 1/NB and the calibration union makes them uneven);
* equal time (:func:`pareto_check`): at every measured time budget, the best PSNR of the
  WEST+FAST family (with or without the energy filter) within the budget is at least every other
  method's best within it. The best-within-budget curves are staircases that change only at a
  method's own points, so it is enough to check each other point ``(t, psnr)`` against the
  family's best at ``t``; a point faster than every family point is a failure ("uncovered").
"""

from __future__ import annotations

import math
from pathlib import Path

from .methods import METHODS, WEST_FAST_FAMILY

RECORD_FIELDS = ("method", "target_density", "achieved_density", "psnr", "ssim", "rel_l2",
                 "ms_per_step", "prompt", "seed")
GAIN_DB = 2.0  # WEST+FAST >= uniform + 2 dB at densities <= 0.35
PSNR_BAR_DB, PSNR_BAR_DENSITY = 26.0, 0.25  # WEST+FAST >= 26 dB at computed density 0.25


def records(method: str, target: float, rows: list[dict], ms_per_step) -> list[dict]:
    """Per-video records from the per-prompt rows (``prompt, seed, density, psnr_db, ssim,
    rel_l2``)."""
    return [{"method": method, "target_density": target, "achieved_density": r["density"],
             "psnr": r["psnr_db"], "ssim": r["ssim"], "rel_l2": r["rel_l2"],
             "ms_per_step": ms_per_step, "prompt": r["prompt"], "seed": r["seed"]} for r in rows]


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation in sorted ``(x, y)`` points; ``None`` outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if len(points) == 1 and points[0][0] == x:
        return points[0][1]
    return None


def _ok(results):
    return [r for r in results if r.get("status") == "ok"]


def _curve(results, method, key="achieved_density"):
    return sorted((r[key], r["psnr_db"]) for r in _ok(results)
                  if r["method"] == method and r.get(key) is not None)


def bar_check(results: list[dict], method: str = "west_fast") -> dict:
    """The equal-density bar (see the module doc); the same-target gain is kept alongside.
    ``method``: which WEST+FAST is judged (``west_fast_weighted``: the video objective; its rows
    keep the ``west_fast_*`` keys)."""
    by = {(r["method"], r["target_density"]): r for r in _ok(results)}
    uniform = _curve(results, "west_uniform")
    rows = []
    for (m, t), r in sorted(by.items(), key=lambda kv: -kv[0][1]):
        u = by.get(("west_uniform", t))
        if m != method or u is None:
            continue
        at = interpolate(uniform, r["achieved_density"])
        rows.append({"target_density": t, "west_fast_density": r["achieved_density"],
                     "uniform_density": u["achieved_density"],
                     "west_fast_psnr_db": r["psnr_db"], "uniform_psnr_db": u["psnr_db"],
                     "gain_db": r["psnr_db"] - u["psnr_db"],
                     "uniform_psnr_db_at_equal_density": at,
                     "gain_db_equal_density": None if at is None else r["psnr_db"] - at,
                     "in_bar": t <= 0.35 + 1e-9})
    judged = [r for r in rows if r["in_bar"]]
    gain = lambda r: r["gain_db"] if r["gain_db_equal_density"] is None else r["gain_db_equal_density"]  # noqa: E731
    gain_met = bool(judged) and all(gain(r) >= GAIN_DB for r in judged)
    psnr_at = interpolate(_curve(results, method), PSNR_BAR_DENSITY)
    psnr_met = psnr_at is not None and psnr_at >= PSNR_BAR_DB
    return {"rule": f"WEST+FAST PSNR >= {PSNR_BAR_DB} dB at computed density {PSNR_BAR_DENSITY} "
                    f"(its curve interpolated there) and >= uniform + {GAIN_DB} dB at densities "
                    "<= 0.35 (uniform interpolated at WEST+FAST's achieved density where "
                    "bracketed, else the same target)",
            "method": method, "rows": rows, "west_fast_psnr_db_at_0.25": psnr_at,
            "psnr_met": psnr_met,
            "gain_met": gain_met, "met": gain_met and psnr_met}


def pareto_front(points: list[tuple[float, float, str, float]]) -> list[tuple]:
    """The points ``(ms, psnr, method, target)`` no other point beats (faster and at least as
    good, or as fast and better), by increasing time."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def pareto_check(results: list[dict], family=WEST_FAST_FAMILY) -> dict:
    """The equal-time bar (see the module doc), over the methods with a measured time."""
    pts = [(r["ms_per_step"], r["psnr_db"], r["method"], r["target_density"])
           for r in _ok(results) if r.get("ms_per_step") is not None]
    fam = sorted(p for p in pts if p[2] in family)
    rows = []
    for t, psnr, m, target in sorted(p for p in pts if p[2] not in family):
        within = [q[1] for q in fam if q[0] <= t]
        best = max(within) if within else None
        rows.append({"method": m, "target_density": target, "ms_per_step": t, "psnr_db": psnr,
                     "family_best_psnr_db_within": best,
                     "margin_db": None if best is None else best - psnr,
                     "ok": best is not None and best >= psnr})
    timed = bool(fam) and bool(rows)
    return {"rule": f"at every measured time budget, max PSNR of {list(family)} within it >= "
                    "every other method's",
            "timed": timed, "rows": rows,
            "uncovered": [r for r in rows if r["family_best_psnr_db_within"] is None],
            "front": [{"ms_per_step": p[0], "psnr_db": p[1], "method": p[2],
                       "target_density": p[3]} for p in pareto_front(pts)],
            "met": timed and all(r["ok"] for r in rows)}


def at_equal_density(results: list[dict], densities) -> dict:
    """PSNR of each method read off its curve (linear in achieved density) at each of
    ``densities``; ``None`` where its measured points do not bracket the density."""
    methods = sorted({r["method"] for r in _ok(results)}, key=list(METHODS).index)
    return {m: {str(d): interpolate(_curve(results, m), d) for d in densities} for m in methods}


def at_equal_time(results: list[dict], family=WEST_FAST_FAMILY) -> dict:
    """At each time budget (the measured ms per step of the WEST+FAST family's points), each
    method's best PSNR among its points within the budget (``None``: none fits)."""
    timed = [r for r in _ok(results) if r.get("ms_per_step") is not None]
    budgets = sorted({r["ms_per_step"] for r in timed if r["method"] in family})
    methods = sorted({r["method"] for r in timed}, key=list(METHODS).index)
    out = {}
    for m in methods:
        pts = [(r["ms_per_step"], r["psnr_db"]) for r in timed if r["method"] == m]
        out[m] = {f"{b:.3f}": max((p for t, p in pts if t <= b), default=None) for b in budgets}
    return out


def quality_table(res: dict) -> str:
    lines = ["| method | target | achieved density | PSNR (dB) | SSIM | rel L2 | ms / step |",
             "|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        label = r.get("label", METHODS.get(r["method"], r["method"]))
        if r["status"] != "ok":
            lines.append(f"| {label} | {r['target_density']} | {r['status']} | | | | |")
            continue
        ms = "" if r.get("ms_per_step") is None else f"{r['ms_per_step']:.2f}"
        lines.append(f"| {label} | {r['target_density']} | {r['achieved_density']:.3f} | "
                     f"{r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['rel_l2']:.4f} | {ms} |")
    return "\n".join(lines)


def plot_pareto(res: dict, path: Path) -> Path:
    """PSNR vs achieved density and, when timed, PSNR vs ms per step with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = res["results"]
    timed = any(r.get("ms_per_step") is not None for r in _ok(results))
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(13 if timed else 7, 6.0 if timed else 4.8),
                             squeeze=False)
    ax = axes[0][0]
    shown = [m for m in METHODS if _curve(results, m)]
    # One style per method, both panels: 10 colours, then the same colours with square markers
    # and dashed lines (the merged small-wan study shows 11 methods).
    colors = {m: dict(color=f"C{i % 10}", marker="os^"[i // 10 % 3], ls=("-", "--", ":")[i // 10 % 3])
              for i, m in enumerate(shown)}
    for m, label in METHODS.items():
        pts = _curve(results, m)
        if pts:
            ax.plot(*zip(*pts, strict=True), label=label, **colors[m])
    ax.set_xlabel("achieved density (computed blocks / all blocks)")
    ax.set_ylabel("PSNR vs dense (dB)")
    cfg = res["config"]
    ax.set_title(f"{(res.get('env', {}).get('model_card') or cfg.get('model', 'tiny Wan')).split(':')[0]}, "
                 f"{'x'.join(map(str, cfg['grid']))}, {cfg['steps']} steps, "
                 f"{len(cfg.get('prompts', []))} held-out prompts x {cfg.get('num_seeds', 1)} "
                 f"seed{'s' if cfg.get('num_seeds', 1) != 1 else ''}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    if timed:
        ax = axes[0][1]
        for m, label in METHODS.items():
            pts = _curve(results, m, key="ms_per_step")
            if pts:
                ax.plot(*zip(*pts, strict=True), label=label, **colors[m])
        front = res.get("pareto", {}).get("front") or []
        if front:
            xs = [p["ms_per_step"] for p in front]
            ys = [p["psnr_db"] for p in front]
            ax.step(xs, ys, where="post", color="black", lw=1.2, ls="--", label="Pareto front")
        ref = (res.get("reference_timing") or {}).get("dense_ours", {}).get("ms_per_step")
        if ref:
            ax.axvline(ref, color="grey", lw=0.8, ls=":", label="dense (our kernel)")
        device = res.get("timing_device") or res.get("env", {}).get("device", "")
        ax.set_xlabel(f"ms per denoising step (batch 1, {device})")
        ax.set_ylabel("PSNR vs dense (dB)")
        ax.set_title("PSNR vs measured time per step", fontsize=9)
        ax.grid(alpha=0.3)
        # One legend for both panels, below them: inside a panel it hid data points.
        fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
        fig.tight_layout(rect=(0, 0.16, 1, 1))
    else:
        ax.legend(fontsize=7)
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
