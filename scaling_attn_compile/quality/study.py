"""Part 1 of the quality study: every method at every target density on held-out prompts, against
the same model's dense videos; computed density counted, time per step measured on the GPU.

Order of work (each stage timed in ``timings_s``):

1. calibration on training captions: WEST (``num_calib`` captions), the FAST profile and a dense
   run of one more caption whose q/k (``energy_capture_steps`` steps) serve the energy bisection
   and the SVG head profile, and whose transformer inputs are the timing inputs;
2. reference timings (when timing): all blocks through our kernel, and plain Inductor (SDPA);
3. the budget plan (``budget_minutes``): the cost of one (method, target) is a generation
   (a probe step at the full batch x steps) plus a compile; densities, then prompts, then
   seeds are cut until the estimate fits, and the record says so;
4. the dense videos of ``prompts x seeds`` (one batch; video ``i`` from noise seed ``seed + i``);
5. per (target, method), the bar's densities first: tables, sparse videos through
   :class:`~.measure.MeasuredAttention` (the computed density), metrics, and the timing through
   the compiled path. A (target, method) that would overrun the budget is skipped and says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from ..contract.masks import ENERGY_RULES
from ..contract.token_order import NEW_PLAN_ORDER
from ..models.wan import compute_dtype, num_layers
from ..offline.calibrate import calibrate_west, evenly_spaced
from ..offline.fast import profile_fidelity
from ..ops.energy import EnergyFilter
from ..tiny.metrics import video_metrics
from ..tiny.registry import BundledModel
from . import methods as M
from .measure import MeasuredAttention, all_blocks_tables, capture_qk_at, profiled_block_mass
from .report import at_equal_density, at_equal_time, bar_check, pareto_check, records
from .timing import record_inputs, time_compiled

DENSITIES = (0.5, 0.35, 0.25, 0.15)
PRIORITY = (0.25, 0.35, 0.15, 0.5)  # the bars read 0.25 and <= 0.35 first
MIN_PROMPTS = 2


def _summary(rows: list[dict]) -> dict:
    keys = ("psnr_db", "ssim", "rel_l2", "density")
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def _timing_note(tm: dict | None) -> str:
    """What a timing line adds to the step time: its clock, the wall clock, the profiled step's
    attention share and the blocks the tables visit."""
    if not tm:
        return ""
    parts = [f"[{tm.get('timing_clock', 'wall')}; wall {tm.get('ms_per_step_wall', 0):.2f}"]
    pr = tm.get("profile")
    if pr and pr.get("kernel_ms"):
        parts.append(f"attention {pr['attention_ms']:.2f} of {pr['kernel_ms']:.2f} ms kernels, "
                     f"{pr['kernel_launches']} launches, idle {pr['gpu_idle_ms']:.2f} ms")
    wk = tm.get("work")
    if wk:
        parts.append(f"visits {wk['visited_density']:.3f}, rows {wk['mean_row_blocks']:.1f}/"
                     f"{wk['max_row_blocks']}")
    if not tm.get("graph", {}).get("used", True):
        parts.append(f"graph off: {tm['graph']['reason']}")
    return "; ".join(parts) + "] "


def _ordered(densities: Sequence[float]) -> list[float]:
    rank = {d: i for i, d in enumerate(PRIORITY)}
    return sorted(densities, key=lambda d: (rank.get(d, len(PRIORITY)), d))


def plan_budget(budget_s: float, spent_s: float, *, gen_s: float, timing_item_s: float,
                n_methods: int, densities: Sequence[float], prompts: int, seeds: int) -> dict:
    """Cut densities (to the two the bars need), then prompts (to 2), then seeds (to 1) until
    ``dense + n_methods x len(densities) x (generation + timing)`` fits ``budget_s - spent_s``;
    videos are cut only if that makes it fit.
    ``gen_s``: one generation of all ``prompts x seeds`` videos (measured: a probe step at that
    batch x steps); a smaller batch is costed in proportion to its size (the attention at 16k
    tokens is compute-bound, so a batch costs about its size in B = 1 runs)."""
    dens = _ordered(densities)
    left = budget_s - spent_s

    def cost(nd, p, s):
        gen = gen_s * (p * s) / (prompts * seeds)
        return gen + n_methods * nd * (gen + timing_item_s)

    p, s, nd = prompts, seeds, len(dens)
    cuts = []
    while cost(nd, p, s) > left and nd > min(2, len(dens)):
        nd -= 1
        cuts.append(f"density {dens[nd]} dropped")
    # Fewer videos save generation only; where compiles dominate and even the floor would not
    # fit, keep the videos (the bars' statistics) and let the guard skip the last items.
    if cost(nd, min(p, MIN_PROMPTS), 1) <= left:
        while cost(nd, p, s) > left and p > MIN_PROMPTS:
            p = max(MIN_PROMPTS, p // 2)
            cuts.append(f"prompts -> {p}")
        while cost(nd, p, s) > left and s > 1:
            s -= 1
            cuts.append(f"seeds -> {s}")
    elif cost(nd, p, s) > left:
        cuts.append("does not fit even at 2 prompts x 1 seed: videos kept, the last "
                    "(target, method) items will be skipped")
    return {"budget_s": budget_s, "spent_before_plan_s": spent_s, "gen_s_all_videos": gen_s,
            "timing_item_s": timing_item_s, "estimate_s": spent_s + cost(nd, p, s),
            "densities": [d for d in densities if d in dens[:nd]], "prompts": p, "seeds": s,
            "scaled": cuts, "fits": cost(nd, p, s) <= left}


def probe_generation_s(model, spec: BundledModel, grid, steps: int, batch: int) -> float:
    """One generation of ``batch`` videos, estimated from one timed step through the counting
    path with every block visited (the energy-only methods' cost, the most any method pays)."""
    L, H = num_layers(model), model.config.num_attention_heads
    p = next(model.parameters())
    dev, dt = p.device, compute_dtype(model)
    x = torch.randn(batch, model.config.in_channels, *grid, device=dev).to(dt)
    ts = torch.full((batch,), 500.0, device=dev)
    enc = spec.encode(spec.held_out(1) * batch, dev, dt)
    runner = MeasuredAttention(model)
    runner.configure(all_blocks_tables(L, H, spec.token_grid(grid)))
    with runner.installed(), torch.no_grad():
        for i in range(2):  # the first call autotunes the kernel for this shape
            if i == 1:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            model(hidden_states=x, timestep=ts, encoder_hidden_states=enc, return_dict=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return steps * (time.perf_counter() - t0)


def run_quality(model, spec: BundledModel | None = None, *, model_path=None, grid=None,
                steps: int | None = None, densities: Sequence[float] = DENSITIES,
                methods: Sequence[str] = M.DEFAULT_METHODS, num_prompts: int = 3,
                num_seeds: int = 1, seed: int = 0, num_calib: int = 2,
                calib_capture_steps: int = 4, fast_capture_steps: int = 6,
                energy_capture_steps: int = 4, bisect_iters: int = 10,
                time_steps: bool | None = None, timing_repeats: int = 3,
                timing_steps: int | None = None, timing_compiler: str = "inductor",
                timing_only: bool = False, timing_graphs: bool = True,
                timing_profile: bool = True, retune_per_method: bool = False,
                retune_also: Sequence[str] = (),
                sweep_configs: bool = False, budget_minutes: float | None = None,
                token_order: str | None = NEW_PLAN_ORDER,
                response_grid: Sequence[int] | None = None, response_steps: int | None = None,
                progress: bool = False, log: Callable = print,
                on_result: Callable[[dict], None] | None = None) -> dict:
    """Part 1 on ``model`` (a loaded transformer of ``spec``); returns the JSON-able result.

    ``spec`` defaults to tiny-wan at ``model_path``. ``time_steps``: time each method through the
    compiled path (default: on CUDA only). ``timing_only``: build and time every method but make
    no videos (status ``"timed"``; ``--merge`` joins it with a run made without timing).
    ``token_order``: the WEST plan's (and so every WEST method's and anchor's) block order,
    ``"auto"`` (default, as ``scaling-attn west``: tile for a Wan model), ``"raster"``,
    ``"tile"`` or ``"tile:FxHxW"``; the record's ``config.token_order`` is the order that ran
    (``config.token_order_requested``: as passed). ``on_result(partial)`` is called after
    every (target, method) with the result so far, for incremental writes.
    Timing options (``quality/timing.py``): ``timing_graphs`` (CUDA-graph replay is the
    ``ms_per_step``, the wall clock kept beside it), ``timing_profile`` (one profiled step per
    method), ``retune_per_method`` (each method compiles in a fresh Inductor cache, so it is
    autotuned anew; not the references), ``retune_also`` (these methods, ``"sta"``, or
    (method, target) items, ``"sta@0.15"``, are timed a second time that way, into
    ``timing_retuned``, beside the usual timing), ``sweep_configs`` (CUDA: every kernel config
    on each method's own tables, ``timing_diag.sweep_configs``).
    ``response_grid`` / ``response_steps``: the weighted methods' gains are measured on a
    cheaper run (another grid and/or step count: its own FAST profile and ``L + T + 1`` probes
    there, the same number of profiled steps) and applied to this run's profile, to test whether
    the gains transfer (default: measured at ``grid`` and ``steps``)."""
    from ..tiny.registry import tiny_wan

    t_start = time.perf_counter()
    spec = spec or tiny_wan(model_path)
    grid = tuple(grid or spec.native_grid)
    steps = steps or spec.steps
    tgrid = spec.token_grid(grid)
    device = next(model.parameters()).device
    timing = (device.type == "cuda") if time_steps is None else bool(time_steps)
    latent = (model.config.in_channels, *grid)
    ts_all = spec.timesteps(steps)
    L, H = num_layers(model), model.config.num_attention_heads
    caps = spec.training(num_calib + 1)
    west_caps, fast_cap = caps[:-1], caps[-1]
    all_prompts = spec.held_out(num_prompts)
    assert not set(all_prompts) & set(caps), "held-out prompts must not be calibration captions"
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    with torch.no_grad():
        plan = calibrate_west(model, [spec.calibration_input(c, 1000 + i)
                                      for i, c in enumerate(west_caps)], ts_all,
                              latent_shape=latent, guidance_scale=1.0, progress=progress,
                              capture_steps=evenly_spaced(steps, calib_capture_steps),
                              source="bench_quality", token_order=token_order)
        cal = spec.calibration_input(fast_cap, 2000)
        profile = profile_fidelity(plan, model, cal, timesteps=ts_all, latent_shape=latent,
                                   capture_steps=evenly_spaced(steps, fast_capture_steps),
                                   guidance_scale=1.0, progress=progress)
        t1 = time.perf_counter()
        with record_inputs(model) as timing_inputs:
            energy_caps = capture_qk_at(model, cal, ts_all, latent,
                                        evenly_spaced(steps, energy_capture_steps))
        run_b1_s = time.perf_counter() - t1
        mass = profiled_block_mass(energy_caps, L) if "svg_split" in methods else None
    timings["calibration"] = time.perf_counter() - t0
    log(f"[quality] {spec.name}: WEST on {west_caps}, FAST/energy/SVG profile on {fast_cap!r}: "
        f"{timings['calibration']:.1f} s (one B=1 run {run_b1_s:.1f} s)")
    # Every method's tables in one shape: FAST's levels and buckets (see methods.pad_tables).
    pad_to = (max(len(profile.levels), 2), max(len(profile.timesteps), 2))
    calib = M.Calibration(plan, profile, energy_caps, mass, ts_all, tgrid, L, H, bisect_iters,
                          pad_to)
    response = None
    if {"west_fast_weighted", "west_fast_weighted_half"} & set(methods):
        # also when timing only: the timed tables are these
        from .response import measure_response

        t0 = time.perf_counter()
        p_grid, p_steps = tuple(response_grid or grid), response_steps or steps
        with torch.no_grad():
            p_profile = profile
            if (p_grid, p_steps) != (grid, steps):  # the gains from a cheaper run
                p_profile = profile_fidelity(
                    plan, model, cal, timesteps=spec.timesteps(p_steps),
                    latent_shape=(model.config.in_channels, *p_grid),
                    capture_steps=evenly_spaced(p_steps, fast_capture_steps),
                    guidance_scale=1.0, progress=progress)
                if len(p_profile.timesteps) != len(profile.timesteps):
                    raise ValueError(
                        f"response_steps={p_steps}: profiles {len(p_profile.timesteps)} steps, "
                        f"the study's profile {len(profile.timesteps)}; the gains are one per "
                        f"profiled step, so pass response_steps >= fast_capture_steps="
                        f"{fast_capture_steps}")
            response = measure_response(model, spec, plan, p_profile, fast_cap, grid=p_grid,
                                        steps=p_steps, seed=2000, runner=MeasuredAttention(model))
        response.update(probe_grid=list(p_grid), probe_steps=p_steps)
        calib.response = response
        timings["response"] = time.perf_counter() - t0
        log(f"[quality] response gains at grid {p_grid}, {p_steps} steps (layers "
            f"{[round(x, 2) for x in response['layer_gain']]}, steps "
            f"{[round(x, 2) for x in response['bucket_gain_by_step']]}, residual "
            f"{response['fit_residual']:.2f}): {timings['response']:.1f} s")
    if timing_only and not timing:
        raise ValueError("timing_only: needs timing (CUDA, or time_steps=True)")
    if timing_steps:
        timing_inputs = [timing_inputs[j] for j in evenly_spaced(len(timing_inputs), timing_steps)]

    reference = {}
    if timing:
        t0 = time.perf_counter()
        tkw = {"repeats": timing_repeats, "compiler": timing_compiler, "graphs": timing_graphs,
               "profile": timing_profile}
        dense_tables = M.pad_tables(all_blocks_tables(L, H, tgrid), *pad_to)
        reference["dense_ours"] = time_compiled(model, dense_tables, timing_inputs, **tkw)
        reference["dense_inductor_sdpa"] = time_compiled(model, None, timing_inputs, **tkw)
        # The same tables under a new backend: what a method's compile costs once the Inductor
        # and Triton caches are warm (the budget plan's estimate per method).
        reference["dense_ours_recompiled"] = time_compiled(
            model, M.pad_tables(all_blocks_tables(L, H, tgrid), *pad_to), timing_inputs, **tkw)
        timings["reference_timing"] = time.perf_counter() - t0
        log(f"[quality] dense step: ours {reference['dense_ours']['ms_per_step']:.2f} ms "
            f"{_timing_note(reference['dense_ours'])}, Inductor SDPA "
            f"{reference['dense_inductor_sdpa']['ms_per_step']:.2f} ms "
            f"{_timing_note(reference['dense_inductor_sdpa'])}"
            f"(first pass {reference['dense_ours']['first_pass_s']:.1f} s cold, "
            f"{reference['dense_ours_recompiled']['first_pass_s']:.1f} s warm)")

    budget = None
    num_prompts_run, num_seeds_run, dens_run = num_prompts, num_seeds, list(densities)
    if budget_minutes is not None:
        # Methods whose tables have other shapes (levels, buckets) or an energy filter miss the
        # FX graph cache and cost more than the warm recompile; the guard below skips what
        # would still overrun.
        warm = reference.get("dense_ours_recompiled", {})
        # Wall passes, then (graphs) as many replayed passes, then the profiled step.
        item_t = (warm["first_pass_s"] + (1 + timing_graphs) * timing_repeats
                  * warm["steps_timed"] * warm.get("ms_per_step_wall", warm["ms_per_step"])
                  / 1e3) if timing else 0.0
        gen_s = 0.0 if timing_only else probe_generation_s(model, spec, grid, steps,
                                                           num_prompts * num_seeds)
        budget = plan_budget(60.0 * budget_minutes, time.perf_counter() - t_start,
                             gen_s=gen_s, timing_item_s=item_t, n_methods=len(methods),
                             densities=densities, prompts=num_prompts, seeds=num_seeds)
        num_prompts_run, num_seeds_run = budget["prompts"], budget["seeds"]
        dens_run = budget["densities"]
        if budget["scaled"]:
            log(f"[quality] budget {budget_minutes} min: {', '.join(budget['scaled'])} "
                f"(estimate {budget['estimate_s']:.0f} s)")
    prompts = all_prompts[:num_prompts_run]
    videos = [p for _ in range(num_seeds_run) for p in prompts]  # seed round r: r*N + i
    seeds = [seed + i for i in range(len(videos))]

    t0 = time.perf_counter()
    # Videos stay on the model's device: the metrics (float64 SSIM of 16 videos of 16x128x128 at
    # small-wan's grid) take seconds per method on the CPU.
    dense = None if timing_only else spec.generate(model, videos, grid=grid, steps=steps,
                                                   seed=seed).float()
    timings["generate_dense"] = time.perf_counter() - t0
    if dense is not None:
        log(f"[quality] dense: {len(videos)} videos in {timings['generate_dense']:.1f} s")
    runner = MeasuredAttention(model)

    def result_so_far(results, recs):
        order = {(d, m): i for i, (d, m) in enumerate((d, m) for d in densities for m in methods)}
        res_sorted = sorted(results, key=lambda r: order[(r["target_density"], r["method"])])
        recs_sorted = sorted(recs, key=lambda r: order[(r["target_density"], r["method"])])
        return {"benchmark": "quality", "config": {
                    "model": spec.name, "grid": list(grid), "token_grid": list(tgrid),
                    "seq_len": math.prod(tgrid), "num_blocks": math.ceil(math.prod(tgrid) / 128),
                    "token_order": plan.meta.token_order,  # what ran ("auto" resolved)
                    "token_order_requested": str(token_order),
                    "steps": steps, "guidance_scale": 1.0, "timesteps": ts_all,
                    "prompts": prompts, "num_seeds": num_seeds_run, "seeds": seeds,
                    "videos": videos, "calibration_captions": west_caps,
                    "fast_and_energy_caption": fast_cap, "densities": list(densities),
                    "methods": {m: M.METHODS[m] for m in methods}, "num_layers": L,
                    "num_heads": H, "calib_capture_steps": calib_capture_steps,
                    "fast_capture_steps": fast_capture_steps,
                    "energy_capture_steps": energy_capture_steps, "bisect_iters": bisect_iters,
                    "lambda_range": [-30.0, 5.0], "energy_fast_factor": M.ENERGY_FAST_FACTOR,
                    "timing_only": timing_only,
                    "timing": {"on": timing, "batch": 1, "repeats": timing_repeats,
                               "compiler": timing_compiler, "graphs": timing_graphs,
                               "profile": timing_profile, "retune_per_method": retune_per_method,
                               "retune_also": list(retune_also),
                               "sweep_configs": sweep_configs,
                               "steps_timed": len(timing_inputs) if timing else 0,
                               "inputs": f"dense trajectory of {fast_cap!r}",
                               "path": "torch.compile(model, backend=scaling_attn_backend("
                                       "tables, energy_filter=...), dynamic=False, "
                                       "fullgraph=True)"}},
                "response": None if response is None else
                {k: v for k, v in response.items() if k != "weights"},
                "budget": budget, "reference_timing": reference, "results": res_sorted,
                "records": recs_sorted, "bar": bar_check(res_sorted),
                "bar_video_objective": bar_check(res_sorted, "west_fast_weighted"),
                "pareto": pareto_check(res_sorted),
                "at_equal_density": at_equal_density(res_sorted, densities),
                "at_equal_time": at_equal_time(res_sorted), "timings_s": dict(timings)}

    results, recs, took = [], [], {}

    def expected_s(method):
        """This method's last time; else the median item so far: compiles of the energy
        methods (a new kernel per threshold) took 40 s on the H200, a mask's 4-30 s."""
        if method in took:
            return took[method]
        seen = sorted(took.values())
        return seen[len(seen) // 2] if seen else 0.0

    for target in _ordered(dens_run):
        for method in methods:
            entry = {"method": method, "label": M.METHODS[method], "target_density": target,
                     "status": "ok", "params": {}, "ms_per_step": None}
            t0 = time.perf_counter()
            spent = t0 - t_start
            need = expected_s(method)
            if budget is not None and spent + need > budget["budget_s"]:
                entry.update(status="skipped_budget", achieved_density=None, psnr_db=None,
                             ssim=None, rel_l2=None, error=f"{spent:.0f} s spent + {need:.0f} s "
                             f"expected > budget {budget['budget_s']:.0f} s")
                results.append(entry)
                log(f"[quality] {target:.2f} {method:18s} skipped: over the budget")
                continue
            try:
                s = M.build(method, target, calib)
                entry["params"] = s.params
                entry.update(s.planned)
                rows = []
                if timing_only:
                    entry.update(status="timed", achieved_density=None, psnr_db=None, ssim=None,
                                 rel_l2=None)
                else:
                    runner.configure(s.tables, s.rule, s.threshold, precision=s.precision)
                    with runner.installed():
                        sparse = spec.generate(model, videos, grid=grid, steps=steps,
                                               seed=seed).float()
                    per_d = runner.density_per_sample()
                    rows = [{"prompt": p, "seed": seeds[i], "density": per_d[i],
                             **video_metrics(sparse[i], dense[i])} for i, p in enumerate(videos)]
                    sm = _summary(rows)
                    entry.update(achieved_density=runner.density(), psnr_db=sm["psnr_db"],
                                 ssim=sm["ssim"], rel_l2=sm["rel_l2"], per_prompt=rows,
                                 attention_calls=runner.calls)
                if timing:
                    filt = None if not s.rule else EnergyFilter(
                        [k for k, v in ENERGY_RULES.items() if v == s.rule][0],
                        threshold=s.threshold)
                    tm = time_compiled(model, s.tables, timing_inputs, energy_filter=filt,
                                       retune=retune_per_method, precision=s.precision, **tkw)
                    if (method in retune_also or f"{method}@{target:g}" in retune_also) \
                            and not retune_per_method:
                        entry["timing_retuned"] = time_compiled(
                            model, s.tables, timing_inputs, energy_filter=filt, retune=True, **tkw)
                    if sweep_configs and device.type == "cuda" and not s.rule:
                        from .timing_diag import sweep_configs as sweep

                        at = tm.get("profile", {}).get("timestep") or float(
                            timing_inputs[len(timing_inputs) // 2][1].reshape(-1)[0])
                        head_dim = model.config.attention_head_dim
                        tm["config_sweep"] = sweep(s.tables, at, head_dim=head_dim,
                                                   dtype=compute_dtype(model))
                    entry["ms_per_step"] = tm["ms_per_step"]
                    entry["timing"] = tm
                recs += records(method, target, rows, entry["ms_per_step"])
            except ValueError as e:  # e.g. FAST cannot reach the target on this topology
                entry.update(status="unreachable", error=str(e), achieved_density=None,
                             psnr_db=None, ssim=None, rel_l2=None)
            entry["time_s"] = time.perf_counter() - t0
            took[method] = entry["time_s"]
            results.append(entry)
            if entry["status"] == "timed":
                log(f"[quality] {target:.2f} {method:18s} {entry['ms_per_step']:.2f} ms/step "
                    f"{_timing_note(entry.get('timing'))}({entry['time_s']:.0f} s)")
                if "timing_retuned" in entry:
                    log(f"[quality] {target:.2f} {method:18s} retuned: "
                        f"{entry['timing_retuned']['ms_per_step']:.2f} ms/step "
                        f"{_timing_note(entry['timing_retuned'])}")
            elif entry["status"] == "ok":
                ms = "" if entry["ms_per_step"] is None else f"  {entry['ms_per_step']:.2f} ms/step"
                log(f"[quality] {target:.2f} {method:18s} achieved {entry['achieved_density']:.3f}"
                    f"  PSNR {entry['psnr_db']:6.2f}  SSIM {entry['ssim']:.4f}  "
                    f"relL2 {entry['rel_l2']:.4f}{ms} {_timing_note(entry.get('timing'))}"
                    f"({entry['time_s']:.0f} s)")
            else:
                log(f"[quality] {target:.2f} {method:18s} {entry['status']}: {entry['error']}")
            if on_result is not None:
                timings["total"] = time.perf_counter() - t_start
                on_result(result_so_far(results, recs))
    timings["total"] = time.perf_counter() - t_start
    return result_so_far(results, recs)
