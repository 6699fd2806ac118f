"""Quality study (issue 7, items 4 and 5): which sparse-attention method keeps the bundled tiny
Wan's videos closest to dense at equal *computed* density, and do the paper's claims hold here?

    python benchmarks/bench_quality.py                       # both parts, bundled model, CPU
    python benchmarks/bench_quality.py --skip-claims --num-prompts 2
    python benchmarks/bench_quality.py --skip-quality        # item 5 only

Part 1 (``--out-quality``, default ``benchmarks/results/quality-cpu-tiny-wan.json`` + ``.png``):
at each global density in ``--densities`` (0.5, 0.35, 0.25, 0.15) six methods run the held-out
captions (never seen by any calibration) with the same seeds as the dense run:

``west_fast``         WEST topology + FAST schedule fitted to the target.
``west_uniform``      WEST topology, one threshold everywhere (``fast.uniform_schedule``).
``dense_warmup``      WEST topology, first ``k`` of the ``T`` steps dense and the rest at one
                      threshold chosen so the *global* density is the target
                      (``fast.dense_first_schedule``, the SVG convention). ``k`` is the largest of
                      ``ceil(0.25 T)``, ``ceil(0.25 T) - 1``, ... whose sparse steps still get at
                      least half the target (at 0.15 a 25% warm-up alone would exceed the budget).
``energy_cumulative`` every block visited (dense tables); DynSparse's cumulative-energy rule skips.
``energy_blasst``     the same with BLASST's rule.
``west_fast_flat``    (diagnostic, not in the default set) FAST with ``rho=1``: one fidelity
                      target A for every layer and step, so only the head-wise fidelity choice
                      remains (no "early steps / shallow layers first" prior).
``west_fast_energy``  FAST fitted at ``min(1, 1.5 x target)``, cumulative-energy filter on top, its
                      threshold bisected so the *computed* density hits the target.

Energy thresholds (natural log, ``EnergyFilter(rule, threshold=lambda)``) are bisected (10 steps
over ``[-30, 5]``) on q/k captured from a *dense* run of a training caption (the FAST profiling
caption, 4 evenly spaced steps, all layers): the skipped-block counts come from
``reference.energy_filtered_attention_reference(..., return_skipped=True)`` with the method's
block masks at each captured step. The filtered trajectory differs from the dense one, so the
calibration density is an estimate; the reported density is the one measured during generation.

How the sparse videos are made, and how density is counted: every ``blocks.<i>.attn1`` gets a
processor (:class:`MeasuredAttention`) that computes q/k/v exactly as diffusers'
``WanAttnProcessor`` does and then runs the op's CPU semantics, bound to the method's tables
and the step's ``timestep``: ``torch.ops.scaling_attn.sparse_attention`` itself when no filter is
on, or, with a filter, the function the op's CPU energy path calls
(``energy_filtered_attention_reference``, float32, same block masks) with
``return_skipped=True``. Computed blocks = blocks the mask visits (``reference.block_masks_for``,
diagonal forced on) minus the ones the filter skipped, per (prompt, layer, head, query tile, KV
block, step); achieved density = computed / all, averaged over all of them. ``tests/
test_bench_quality.py`` checks that this processor path gives the same videos as the model
compiled with ``scaling_attn_backend`` (with and without ``energy_filter``).

Metrics against the dense video of the same caption and seed (``demo.video_metrics``): PSNR (data
range 2), SSIM, relative L2, per prompt and their mean.

Part 2 (``--out-claims``, default ``benchmarks/results/claims-cpu-tiny-wan.json``):

* topology stability: WEST codes from ``--claims-sets`` disjoint sets of training captions;
  IoU of the masks (all layers and heads pooled, and the mean per-head IoU) at 0.15/0.25/0.5,
  pairwise; ``p / (2 - p)`` is the IoU two independent random masks of density ``p`` would have;
* resolution transfer: WEST extracted at small grids (8x16x16, 8x16x32 pixels) from set 0's
  captions, remapped to the main grid and compared with set 0's native extraction there
  (``west.remap_recall``: recall and IoU at 0.25/0.5);
* schedule stability: FAST profiled on ``--claims-profiles`` different single training captions
  (same WEST plan), fitted at 0.25 and 0.35; pairwise agreement of the chosen level per (layer,
  bucket, head), mean |level index difference|, and the mean per-cell IoU of the chosen masks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import torch

from scaling_attn_compile import fast, west
from scaling_attn_compile.calibrate import (
    _apply_rotary_emb,
    calibrate_west,
    capture_self_attention,
    evenly_spaced,
)
from scaling_attn_compile.demo import (
    CPU_GRID,
    calibration_captions,
    calibration_input,
    video_metrics,
)
from scaling_attn_compile.masks import dense_tables
from scaling_attn_compile.reference import (
    ENERGY_RULES,
    block_masks_for,
    energy_filtered_attention_reference,
)
from scaling_attn_compile.tables import AttentionTables
from scaling_attn_compile.tiny_wan import ASSET_DIR, WEIGHTS_NAME, generate, load_tiny_wan, sigmas
from scaling_attn_compile.tiny_wan import token_grid as tiny_token_grid
from scaling_attn_compile.toy_video import held_out_captions, train_triples

RESULTS = Path(__file__).parent / "results"
DENSITIES = (0.5, 0.35, 0.25, 0.15)
METHODS = {
    "west_fast": "WEST+FAST",
    "west_uniform": "WEST, uniform density",
    "dense_warmup": "WEST uniform + dense warm-up (SVG)",
    "energy_cumulative": "cumulative energy alone",
    "energy_blasst": "BLASST alone",
    "west_fast_energy": "WEST+FAST + cumulative energy",
    "west_fast_flat": "WEST+FAST, flat A (rho=1; diagnostic)",
}
DEFAULT_METHODS = tuple(m for m in METHODS if m != "west_fast_flat")
LAMBDA_RANGE = (-30.0, 5.0)
ENERGY_FAST_FACTOR = 1.5  # west_fast_energy: FAST at 1.5 x target, the filter takes the rest
BAR_DB = 2.0  # issue 7: WEST+FAST >= 2 dB above uniform density at densities <= 0.35


# ---- environment -------------------------------------------------------------------------------

def environment(model_path: Path) -> dict:
    root = Path(__file__).resolve().parent.parent
    sha = os.environ.get("GIT_SHA") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=root).stdout.strip() or "unknown"
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, cwd=root).stdout.strip())
    weights = model_path / WEIGHTS_NAME
    card = model_path / "README.md"
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "git_sha": sha, "git_dirty": dirty,
            "device": "cpu", "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "model_path": str(model_path),
            "model_card": card.read_text().splitlines()[0].lstrip("# ").strip()
            if card.exists() else None,
            "model_weights_sha256_16": hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
            if weights.exists() else None}


# ---- the measured attention path ---------------------------------------------------------------

class MeasuredAttention:
    """Self-attention of every ``blocks.<i>.attn1`` through the op's semantics, counting blocks.

    ``configure(tables, rule, threshold)`` binds an :class:`AttentionTables` (the method's masks
    at the generation grid) and an energy rule (0 off, 1 cumulative, 2 BLASST). Inside
    ``installed()``, each self-attention call computes q/k/v as diffusers does, picks the block
    masks for the call's ``timestep`` (``block_masks_for``), and runs the op (no filter) or the
    op's CPU energy path with skip counts (filter). Counters: ``computed`` / ``total`` blocks per
    batch element, summed over layers, heads, tiles and calls.
    """

    def __init__(self, model):
        self.model = model
        self.tables: AttentionTables | None = None
        self.rule, self.threshold = 0, 0.0
        self.timestep = None
        self.reset()

    def configure(self, tables: AttentionTables, rule: int = 0, threshold: float = 0.0):
        self.tables, self.rule, self.threshold = tables, int(rule), float(threshold)
        self.reset()

    def reset(self):
        self.computed: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.calls = 0

    def density_per_sample(self) -> list[float]:
        return (self.computed / self.total).tolist()

    def density(self) -> float:
        return float(self.computed.sum() / self.total.sum())

    def attend(self, layer: int, q, k, v):
        t = self.tables
        B, H, S, D = q.shape
        masks, lt, bb = t.masks[layer], t.level_tables[layer], t.bucket_bounds
        ts = self.timestep.to(torch.float32)
        blocks = block_masks_for(masks, lt, bb, ts, B, S)  # (B, H, NB, NB), diagonal on
        scale = D ** -0.5
        if self.rule:
            # Exactly the op's CPU energy path (op.sparse_attention), plus the skip mask.
            out, skipped = energy_filtered_attention_reference(
                q, k, v, blocks, scale, self.rule, self.threshold, compute_dtype=torch.float32,
                return_skipped=True)
            computed = blocks & ~skipped
        else:
            out = torch.ops.scaling_attn.sparse_attention(q, k, v, masks, lt, bb, ts, scale)
            computed = blocks
        c = computed.sum(dim=(1, 2, 3)).double()
        n = torch.full((B,), float(blocks[0].numel()), dtype=torch.float64)
        self.computed = c if self.computed is None else self.computed + c
        self.total = n if self.total is None else self.total + n
        self.calls += 1
        return out

    def processor(self, original, layer: int):
        runner = self

        def proc(attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
            if encoder_hidden_states is not None or runner.tables is None:
                return original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                rotary_emb, **kwargs)
            from diffusers.models.transformers.transformer_wan import _get_qkv_projections

            q, k, v = _get_qkv_projections(attn, hidden_states, None)
            q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
            k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
            v = v.unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                q, k = _apply_rotary_emb(q, *rotary_emb), _apply_rotary_emb(k, *rotary_emb)
            out = runner.attend(layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2).flatten(2, 3).type_as(q)
            return attn.to_out[1](attn.to_out[0](out))

        return proc

    @contextlib.contextmanager
    def installed(self):
        model = self.model

        def hook(module, args, kwargs):
            self.timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        originals = {}
        try:
            for i, block in enumerate(model.blocks):
                originals[i] = block.attn1.processor
                block.attn1.processor = self.processor(originals[i], i)
            yield self
        finally:
            handle.remove()
            for i, proc in originals.items():
                model.blocks[i].attn1.processor = proc


def all_blocks_tables(num_layers: int, num_heads: int, grid) -> AttentionTables:
    """Every block visited (for the energy filter alone)."""
    S = math.prod(grid)
    per = [dense_tables(num_heads, S) for _ in range(num_layers)]
    return AttentionTables(tuple(grid), [m for m, _, _ in per], [lt for _, lt, _ in per],
                           per[0][2])


# ---- energy threshold calibration --------------------------------------------------------------

def capture_qk_at(model, cal_input, timesteps, latent, capture_steps) -> list[tuple]:
    """(layer, timestep, q, k) of a dense run at ``capture_steps`` (q/k cloned, float32)."""
    caps = []

    def on_layer(cap):
        caps.append((cap.layer, float(cap.timestep), cap.q.float().contiguous(),
                     cap.k.float().contiguous()))

    capture_self_attention(model, [cal_input], timesteps, on_layer, latent_shape=latent,
                           capture_steps=capture_steps, guidance_scale=1.0, progress=False)
    return caps


def filtered_density(captures, tables: AttentionTables, rule: int, lam: float) -> float:
    """Computed / all blocks when ``tables`` + filter ``(rule, lam)`` run on captured q/k
    (v does not change the skip decisions, so k stands in for it)."""
    comp = tot = 0.0
    for layer, t, q, k in captures:
        B, H, S, D = q.shape
        blocks = block_masks_for(tables.masks[layer], tables.level_tables[layer],
                                 tables.bucket_bounds, torch.tensor([t]), B, S)
        _, skipped = energy_filtered_attention_reference(
            q, k, k, blocks, D ** -0.5, rule, lam, compute_dtype=torch.float32,
            return_skipped=True)
        comp += float((blocks & ~skipped).sum())
        tot += blocks.numel()
    return comp / tot


def bisect_threshold(captures, tables, rule: int, target: float, *, iters: int = 10,
                     lo: float = LAMBDA_RANGE[0], hi: float = LAMBDA_RANGE[1]) -> dict:
    """Bisect ``lambda`` (density falls as it rises) so the calibration density is nearest
    ``target``; returns lambda, its calibration density and every evaluation."""
    evals: dict[float, float] = {}

    def d(lam):
        if lam not in evals:
            evals[lam] = filtered_density(captures, tables, rule, lam)
        return evals[lam]

    if d(lo) < target:  # the mask alone is below the target: no filtering
        return {"threshold": lo, "calibration_density": d(lo), "evals": evals,
                "note": "mask alone below target; filter at the bottom of the range"}
    if d(hi) > target:
        return {"threshold": hi, "calibration_density": d(hi), "evals": evals,
                "note": "target below what the filter reaches at the top of the range"}
    a, b = lo, hi
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if d(mid) >= target:
            a = mid
        else:
            b = mid
    lam = min((a, b), key=lambda x: abs(d(x) - target))
    return {"threshold": lam, "calibration_density": d(lam),
            "evals": {f"{k:.4f}": v for k, v in sorted(evals.items())}}


# ---- schedules -----------------------------------------------------------------------------------

def warmup_steps(target: float, num_steps: int, fraction: float = 0.25) -> int:
    """Dense warm-up steps for ``target``: the largest ``k <= ceil(fraction * T)`` whose sparse
    steps keep at least half the target ((target - k/T) / (1 - k/T) >= target / 2)."""
    k = math.ceil(fraction * num_steps - 1e-9)
    while k > 0 and (target - k / num_steps) / (1 - k / num_steps) < target / 2:
        k -= 1
    return k


# ---- part 1 --------------------------------------------------------------------------------------

def _summary(rows: list[dict]) -> dict:
    keys = ("psnr_db", "ssim", "rel_l2", "density")
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def run_quality(model, *, model_path: Path, grid=CPU_GRID, steps: int = 16,
                densities: Sequence[float] = DENSITIES, methods: Sequence[str] = DEFAULT_METHODS,
                num_prompts: int = 3, seed: int = 0, num_calib: int = 2,
                calib_capture_steps: int = 4, fast_capture_steps: int = 6,
                energy_capture_steps: int = 4, bisect_iters: int = 10,
                progress: bool = False, log=print) -> dict:
    """Part 1 on ``model``; returns the JSON-able result (no files written)."""
    t_start = time.perf_counter()
    grid = tuple(grid)
    tgrid = tiny_token_grid(grid)
    latent = (model.config.in_channels, *grid)
    ts_all = [1000.0 * s for s in sigmas(steps).tolist()[:-1]]
    L, H = len(model.blocks), model.config.num_attention_heads
    caps = calibration_captions(num_calib + 1)
    west_caps, fast_cap = caps[:-1], caps[-1]
    prompts = held_out_captions()[:num_prompts]
    assert not set(prompts) & set(caps), "held-out prompts must not be calibration captions"
    timings = {}

    t0 = time.perf_counter()
    with torch.no_grad():
        plan = calibrate_west(model, [calibration_input(c, 1000 + i, model_path=model_path)
                                      for i, c in enumerate(west_caps)], ts_all,
                              latent_shape=latent, guidance_scale=1.0, progress=progress,
                              capture_steps=evenly_spaced(steps, calib_capture_steps),
                              source="bench_quality")
        cal = calibration_input(fast_cap, 2000, model_path=model_path)
        profile = fast.profile_fidelity(plan, model, cal, timesteps=ts_all, latent_shape=latent,
                                        capture_steps=evenly_spaced(steps, fast_capture_steps),
                                        guidance_scale=1.0, progress=progress)
        energy_caps = capture_qk_at(model, cal, ts_all, latent,
                                    evenly_spaced(steps, energy_capture_steps))
    timings["calibration"] = time.perf_counter() - t0
    log(f"[quality] WEST on {west_caps}, FAST/energy calibration on {fast_cap!r}: "
        f"{timings['calibration']:.1f} s")

    gen_kw = dict(grid=grid, steps=steps, seed=seed, encoder_path=model_path)
    t0 = time.perf_counter()
    dense = generate(model, prompts, **gen_kw).float().cpu()
    timings["generate_dense"] = time.perf_counter() - t0
    runner = MeasuredAttention(model)
    full = all_blocks_tables(L, H, tgrid)

    def fast_schedule(target, **fit_kw):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            s = fast.fit_schedule(profile, target, **fit_kw)
        return s, [str(x.message) for x in w]

    results = []
    for target in densities:
        for method in methods:
            entry = {"method": method, "label": METHODS[method], "target_density": target,
                     "status": "ok", "params": {}}
            t0 = time.perf_counter()
            try:
                rule, lam = 0, 0.0
                if method in ("west_fast", "west_fast_flat"):
                    flat = {"rho": 1.0} if method == "west_fast_flat" else {}  # else FAST's default
                    sched, warn = fast_schedule(target, **flat)
                    entry["params"] = {"fit_density": sched.info["achieved_density"],
                                       "fit_warnings": warn}
                elif method == "west_uniform":
                    sched = fast.uniform_schedule(plan, target, grid=tgrid)
                    entry["params"] = {"threshold": sched.info["threshold"]}
                elif method == "dense_warmup":
                    k = warmup_steps(target, steps)
                    sched = fast.dense_first_schedule(plan, target, ts_all,
                                                      dense_fraction=k / steps, grid=tgrid)
                    entry["params"] = {"dense_steps": k, "num_steps": steps,
                                       "sparse_density": sched.info.get("sparse_density",
                                                                        sched.info.get(
                                                                            "achieved_density"))}
                elif method == "west_fast_energy":
                    ft = min(1.0, ENERGY_FAST_FACTOR * target)
                    sched, warn = fast_schedule(ft)
                    entry["params"] = {"fast_target": ft,
                                       "fast_fit_density": sched.info["achieved_density"],
                                       "fit_warnings": warn}
                    rule = ENERGY_RULES["cumulative"]
                else:
                    sched = None
                    rule = ENERGY_RULES["cumulative" if method == "energy_cumulative" else "blasst"]
                tables = full if sched is None else plan.with_schedule(sched).materialize(tgrid)
                if sched is not None:
                    sd = fast.schedule_density(sched, plan.thresholds(tgrid), ts_all)  # (L,T,H)
                    entry["planned_density"] = float(sd.mean())
                    entry["planned_density_per_step"] = sd.mean(dim=(0, 2)).tolist()
                    entry["planned_density_per_layer"] = sd.mean(dim=(1, 2)).tolist()
                if rule:
                    b = bisect_threshold(energy_caps, tables, rule, target, iters=bisect_iters)
                    lam = b["threshold"]
                    entry["params"].update(rule=[k for k, v in ENERGY_RULES.items()
                                                 if v == rule][0], threshold=lam,
                                           calibration_density=b["calibration_density"],
                                           bisection=b["evals"], **({"note": b["note"]}
                                                                    if "note" in b else {}))
                runner.configure(tables, rule, lam)
                with runner.installed():
                    sparse = generate(model, prompts, **gen_kw).float().cpu()
                per_d = runner.density_per_sample()
                rows = [{"prompt": p, "density": per_d[i], **video_metrics(sparse[i], dense[i])}
                        for i, p in enumerate(prompts)]
                s = _summary(rows)
                entry.update(achieved_density=runner.density(), psnr_db=s["psnr_db"],
                             ssim=s["ssim"], rel_l2=s["rel_l2"], per_prompt=rows,
                             attention_calls=runner.calls)
            except ValueError as e:  # e.g. FAST cannot reach the target on this topology
                entry.update(status="unreachable", error=str(e), achieved_density=None,
                             psnr_db=None, ssim=None, rel_l2=None)
            entry["time_s"] = time.perf_counter() - t0
            results.append(entry)
            if entry["status"] == "ok":
                log(f"[quality] {target:.2f} {method:18s} achieved {entry['achieved_density']:.3f}"
                    f"  PSNR {entry['psnr_db']:6.2f}  SSIM {entry['ssim']:.4f}  "
                    f"relL2 {entry['rel_l2']:.4f}  ({entry['time_s']:.0f} s)")
            else:
                log(f"[quality] {target:.2f} {method:18s} {entry['status']}: {entry['error']}")

    timings["total"] = time.perf_counter() - t_start
    return {"benchmark": "quality", "config": {
                "grid": list(grid), "token_grid": list(tgrid), "seq_len": math.prod(tgrid),
                "steps": steps, "shift": 1.0, "guidance_scale": 1.0, "seeds": list(
                    range(seed, seed + len(prompts))), "prompts": prompts,
                "calibration_captions": west_caps, "fast_and_energy_caption": fast_cap,
                "densities": list(densities), "methods": dict(METHODS), "num_layers": L,
                "num_heads": H, "calib_capture_steps": calib_capture_steps,
                "fast_capture_steps": fast_capture_steps,
                "energy_capture_steps": energy_capture_steps, "bisect_iters": bisect_iters,
                "lambda_range": list(LAMBDA_RANGE), "energy_fast_factor": ENERGY_FAST_FACTOR},
            "results": results, "bar": bar_check(results), "timings_s": timings}


def bar_check(results: list[dict]) -> dict:
    """Issue 7's bar: WEST+FAST >= BAR_DB dB PSNR above WEST uniform at targets <= 0.35, at equal
    density. A uniform threshold cannot hit every density (its codes move in steps of 1/NB and
    the calibration union makes the steps uneven), so WEST+FAST's PSNR is compared with the
    uniform curve interpolated (linearly in density, between the measured uniform points that
    bracket it) at WEST+FAST's achieved density; the same-target gain is kept alongside."""
    by = {(r["method"], r["target_density"]): r for r in results if r["status"] == "ok"}
    curve = sorted((r["achieved_density"], r["psnr_db"]) for (m, _), r in by.items()
                   if m == "west_uniform")
    rows = []
    for (m, t), r in sorted(by.items(), key=lambda kv: -kv[0][1]):
        u = by.get(("west_uniform", t))
        if m != "west_fast" or u is None:
            continue
        at = interpolate(curve, r["achieved_density"])
        rows.append({"target_density": t, "west_fast_density": r["achieved_density"],
                     "uniform_density": u["achieved_density"],
                     "west_fast_psnr_db": r["psnr_db"], "uniform_psnr_db": u["psnr_db"],
                     "gain_db": r["psnr_db"] - u["psnr_db"],
                     "uniform_psnr_db_at_equal_density": at,
                     "gain_db_equal_density": None if at is None else r["psnr_db"] - at,
                     "in_bar": t <= 0.35 + 1e-9})
    judged = [r for r in rows if r["in_bar"]]
    gain = lambda r: r["gain_db"] if r["gain_db_equal_density"] is None else r["gain_db_equal_density"]  # noqa: E731
    return {"rule": f"WEST+FAST PSNR >= uniform + {BAR_DB} dB at densities <= 0.35 (equal density: "
                    "uniform interpolated at WEST+FAST's achieved density where bracketed)",
            "rows": rows, "met": bool(judged) and all(gain(r) >= BAR_DB for r in judged)}


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation in sorted ``(x, y)`` points; ``None`` outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def quality_table(res: dict) -> str:
    lines = ["| method | target | achieved density | PSNR (dB) | SSIM | rel L2 |",
             "|---|---|---|---|---|---|"]
    for r in res["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['target_density']} | unreachable | | | |")
            continue
        lines.append(f"| {r['label']} | {r['target_density']} | {r['achieved_density']:.3f} | "
                     f"{r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['rel_l2']:.4f} |")
    return "\n".join(lines)


def plot_pareto(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, label in METHODS.items():
        pts = sorted((r["achieved_density"], r["psnr_db"]) for r in res["results"]
                     if r["method"] == m and r["status"] == "ok")
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    cfg = res["config"]
    ax.set_xlabel("achieved density (computed blocks / all blocks)")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.set_title(f"{(res['env'].get('model_card') or 'tiny Wan').split(':')[0]}, "
                 f"{'x'.join(map(str, cfg['grid']))}, "
                 f"{cfg['steps']} steps, {len(cfg['prompts'])} held-out prompts", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- part 2 --------------------------------------------------------------------------------------

def disjoint_caption_sets(n_sets: int, per_set: int, seed: int = 7) -> list[list[str]]:
    """``n_sets`` disjoint sets of training captions (seeded shuffle of the training triples)."""
    tr = train_triples()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(tr), generator=g).tolist()
    need = n_sets * per_set
    if need > len(tr):
        raise ValueError(f"need {need} training captions, have {len(tr)}")
    caps = [" ".join(tr[i]) for i in idx[:need]]
    return [caps[s * per_set:(s + 1) * per_set] for s in range(n_sets)]


def _west(model, captions, grid, steps, capture_steps, model_path, seed0):
    ts = [1000.0 * s for s in sigmas(steps).tolist()[:-1]]
    latent = (model.config.in_channels, *grid)
    with torch.no_grad():
        return calibrate_west(model, [calibration_input(c, seed0 + i, model_path=model_path)
                                      for i, c in enumerate(captions)], ts, latent_shape=latent,
                              capture_steps=evenly_spaced(steps, capture_steps),
                              guidance_scale=1.0, progress=False, source="bench_quality claims")


def _iou_stats(a: torch.Tensor, b: torch.Tensor, p: float) -> dict:
    ma, mb = west.mask_at(a, p), west.mask_at(b, p)
    per_head = [west.mask_iou(ma[i, j], mb[i, j]) for i in range(ma.shape[0])
                for j in range(ma.shape[1])]
    return {"iou_pooled": west.mask_iou(ma, mb), "iou_mean_per_head": sum(per_head) / len(per_head),
            "iou_min_per_head": min(per_head), "density_a": ma.float().mean().item(),
            "density_b": mb.float().mean().item(), "chance_iou": p / (2 - p)}


def run_claims(model, *, model_path: Path, grid=CPU_GRID, steps: int = 16, n_sets: int = 3,
               per_set: int = 2, capture_steps: int = 4, small_grids=((8, 16, 16), (8, 16, 32)),
               n_profiles: int = 3, fast_capture_steps: int = 6,
               fast_targets=(0.25, 0.35), densities=(0.15, 0.25, 0.5), log=print) -> dict:
    t_start = time.perf_counter()
    grid = tuple(grid)
    tgrid = tiny_token_grid(grid)
    flat = disjoint_caption_sets(1, n_sets * per_set + n_profiles)[0]
    sets = [flat[i * per_set:(i + 1) * per_set] for i in range(n_sets)]
    profile_caps = flat[n_sets * per_set:]  # FAST profiles: captions of no WEST set
    plans = [_west(model, s, grid, steps, capture_steps, model_path, 3000 + 10 * i)
             for i, s in enumerate(sets)]
    topo = []
    for i, j in combinations(range(len(plans)), 2):
        for p in densities:
            topo.append({"set_a": i, "set_b": j, "density": p,
                         **_iou_stats(plans[i].codes, plans[j].codes, p)})
    log(f"[claims] topology: {len(sets)} disjoint sets of {per_set}")

    transfer = []
    for sg in small_grids:
        small = _west(model, sets[0], sg, steps, capture_steps, model_path, 3000)
        rr = west.remap_recall(small.codes, tiny_token_grid(sg), plans[0].codes, tgrid,
                               densities=(0.25, 0.5))
        for p, v in rr.items():
            transfer.append({"small_grid": list(sg), "small_token_grid": list(tiny_token_grid(sg)),
                             "native_grid": list(grid), "density": p, **v})
    log("[claims] resolution transfer done")

    ts_all = [1000.0 * s for s in sigmas(steps).tolist()[:-1]]
    latent = (model.config.in_channels, *grid)
    codes = plans[0].thresholds(tgrid)
    profiles = []
    with torch.no_grad():
        for i, c in enumerate(profile_caps):
            profiles.append(fast.profile_fidelity(
                plans[0], model, calibration_input(c, 4000 + i, model_path=model_path),
                timesteps=ts_all, latent_shape=latent, guidance_scale=1.0, progress=False,
                capture_steps=evenly_spaced(steps, fast_capture_steps)))
    sched_rows = []
    for target in fast_targets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheds = [fast.fit_schedule(pr, target) for pr in profiles]
        for i, j in combinations(range(len(scheds)), 2):
            a, b = scheds[i], scheds[j]
            la, lb = a.level_tables.long(), b.level_tables.long()  # (L, NT, H), same levels
            ious = []
            for layer in range(la.shape[0]):
                for bk in range(la.shape[1]):
                    for h in range(la.shape[2]):
                        ma = west.mask_at(codes[layer, h], a.levels[int(la[layer, bk, h])])
                        mb = west.mask_at(codes[layer, h], b.levels[int(lb[layer, bk, h])])
                        ious.append(west.mask_iou(ma, mb))
            sched_rows.append({
                "target_density": target, "profile_a": profile_caps[i],
                "profile_b": profile_caps[j],
                "fit_density_a": a.info["achieved_density"],
                "fit_density_b": b.info["achieved_density"],
                "level_agreement": float((la == lb).double().mean()),
                "within_one_level": float(((la - lb).abs() <= 1).double().mean()),
                "mean_abs_level_diff": float((la - lb).abs().double().mean()),
                "mask_iou_mean": sum(ious) / len(ious)})
    log("[claims] schedule stability done")
    return {"benchmark": "claims", "config": {
                "grid": list(grid), "token_grid": list(tgrid), "steps": steps,
                "calibration_sets": sets, "capture_steps": capture_steps,
                "small_grids": [list(g) for g in small_grids], "profile_captions": profile_caps,
                "fast_capture_steps": fast_capture_steps, "fast_targets": list(fast_targets),
                "levels": list(fast.DEFAULT_LEVELS)},
            "topology_stability": topo, "resolution_transfer": transfer,
            "schedule_stability": sched_rows,
            "timings_s": {"total": time.perf_counter() - t_start}}


def claims_tables(res: dict) -> str:
    out = ["| sets | density | IoU pooled | mean per-head IoU | min per-head IoU | chance IoU |",
           "|---|---|---|---|---|---|"]
    for r in res["topology_stability"]:
        out.append(f"| {r['set_a']} vs {r['set_b']} | {r['density']} | {r['iou_pooled']:.3f} | "
                   f"{r['iou_mean_per_head']:.3f} | {r['iou_min_per_head']:.3f} | "
                   f"{r['chance_iou']:.3f} |")
    out += ["", "| extracted at | remapped to | density | recall | IoU |", "|---|---|---|---|---|"]
    for r in res["resolution_transfer"]:
        out.append(f"| {'x'.join(map(str, r['small_grid']))} | "
                   f"{'x'.join(map(str, r['native_grid']))} | {r['density']} | "
                   f"{r['recall']:.3f} | {r['iou']:.3f} |")
    out += ["", "| target | profiles | fit densities | same level | within 1 level | mask IoU |",
            "|---|---|---|---|---|---|"]
    for r in res["schedule_stability"]:
        out.append(f"| {r['target_density']} | {r['profile_a']} / {r['profile_b']} | "
                   f"{r['fit_density_a']:.3f} / {r['fit_density_b']:.3f} | "
                   f"{r['level_agreement']:.3f} | {r['within_one_level']:.3f} | "
                   f"{r['mask_iou_mean']:.3f} |")
    return "\n".join(out)


# ---- CLI -------------------------------------------------------------------------------------------

def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    from scaling_attn_compile.cli import parse_triple

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=Path, default=ASSET_DIR)
    p.add_argument("--grid", type=parse_triple, default=CPU_GRID, metavar="F,H,W")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--densities", type=_floats, default=list(DENSITIES))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, of {list(METHODS)}")
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-calib", type=int, default=2)
    p.add_argument("--bisect-iters", type=int, default=10)
    p.add_argument("--claims-sets", type=int, default=3)
    p.add_argument("--claims-profiles", type=int, default=3)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-claims", action="store_true")
    p.add_argument("--out-quality", type=Path, default=RESULTS / "quality-cpu-tiny-wan.json")
    p.add_argument("--out-claims", type=Path, default=RESULTS / "claims-cpu-tiny-wan.json")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    model = load_tiny_wan("cpu", torch.float32, path=args.model_path)
    env = environment(args.model_path)
    if not args.skip_quality:
        res = run_quality(model, model_path=args.model_path, grid=args.grid, steps=args.steps,
                          densities=args.densities, methods=methods,
                          num_prompts=args.num_prompts, seed=args.seed,
                          num_calib=args.num_calib, bisect_iters=args.bisect_iters)
        res["env"] = env
        res["command"] = " ".join(["python", "benchmarks/bench_quality.py", *(argv or sys.argv[1:])])
        args.out_quality.parent.mkdir(parents=True, exist_ok=True)
        args.out_quality.write_text(json.dumps(res, indent=2))
        png = plot_pareto(res, args.out_quality.with_suffix(".png"))
        print(quality_table(res))
        print(json.dumps(res["bar"], indent=2))
        print(f"wrote {args.out_quality}, {png}")
    if not args.skip_claims:
        res = run_claims(model, model_path=args.model_path, grid=args.grid, steps=args.steps,
                         n_sets=args.claims_sets, n_profiles=args.claims_profiles)
        res["env"] = env
        args.out_claims.parent.mkdir(parents=True, exist_ok=True)
        args.out_claims.write_text(json.dumps(res, indent=2))
        print(claims_tables(res))
        print(f"wrote {args.out_claims}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
