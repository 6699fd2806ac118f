"""Quality study (issue 7 items 4-5, issue 13 item 3): which sparse-attention method keeps a
bundled model's videos closest to its dense output, at equal *computed* density and at equal
*measured* time per step, and do the paper's claims hold on it?

    python benchmarks/bench_quality.py                                  # tiny-wan, CPU, both parts
    python benchmarks/bench_quality.py --model small-wan --prompts 8 --seeds 2 --steps 50 \\
        --skip-claims --budget-minutes 8                                # the GPU study
    python benchmarks/bench_quality.py --token-order raster             # strips of token rows
    python benchmarks/bench_quality.py --skip-claims --prompts 2       # quicker
    python benchmarks/bench_quality.py --skip-quality                   # part 2 only

Models come from a registry (``scaling_attn_compile.tiny.registry``: ``tiny-wan``, ``small-wan``),
each with its loader, caption encoder, sampler, held-out prompts (never seen by calibration),
training captions for calibration and native grid. Methods (``quality.methods``): WEST+FAST,
WEST uniform, uniform + dense warm-up (SVG), cumulative energy, BLASST, WEST+FAST + energy, and
the training-free anchors as plans (``anchors``: ``radial``, ``sta``, ``svg_split``).

Part 1 (``--out-quality``, default ``benchmarks/results/quality-<device>-<model>.json`` + ``.png``;
``<device>`` is ``cpu`` or the GPU's name as a slug): see ``quality/study.py`` for the order of
work. ``--token-order`` (the blocks of every plan: WEST, the anchors, part 2's) defaults to
``auto`` as ``scaling-attn west`` does: tile order on the bundled Wan models; ``raster`` and
``tile`` (or ``tile:FxHxW``) are selectable; ``config.token_order`` of both records is the
order that ran (``config.token_order_requested``: as passed). Density is what was **computed** (blocks the mask visits minus the blocks the energy
filter skipped, counted per video, layer, head, query tile and step: ``quality/measure.py``).
On CUDA each method's step is timed through the real compiled path (``quality/timing.py``;
``--time-cpu`` times on the CPU too, else ``ms_per_step`` is null there): ``ms_per_step`` is a
replayed CUDA graph of the step where capture works (``--no-graphs``: the plain call's clock,
always kept as ``timing.ms_per_step_wall``), with one profiled step (``timing.profile``:
attention kernel vs all kernel time, launches, GPU idle), the blocks the tables visit
(``timing.work``) and the template's autotune (``timing.autotune``); ``--retune-per-method`` and
``--sweep-configs`` test whether one autotuned config is slow on some methods' tables. Metrics against the
dense video of the same prompt and seed (``demo.video_metrics``): PSNR (data range 2), SSIM,
relative L2. Per-video ``records`` (method, target_density, achieved_density, psnr, ssim, rel_l2,
ms_per_step, prompt, seed), per-(method, target) ``results``, and the bar checks ``bar`` (equal
density) and ``pareto`` (equal time): ``quality/report.py``. The JSON is rewritten after every
(target, method), so a run cut short leaves what it finished.

Part 2 (``--out-claims``, default ``benchmarks/results/claims-<device>-<model>.json``):
``quality/claims.py`` (topology and schedule stability, resolution transfer).

The CPU run of the README (tiny-wan, 8x32x32, 16 steps, 3 prompts x 1 seed, the methods it
lists, ``--token-order raster``: the records were made before tile order was the default)
reproduces the earlier records: same calibration, seeds and computations.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from scaling_attn_compile.quality.claims import claims_tables, run_claims
from scaling_attn_compile.quality.measure import (  # noqa: F401  (re-exported for tests)
    MeasuredAttention,
    all_blocks_tables,
    bisect_threshold,
    capture_qk_at,
    filtered_density,
)
from scaling_attn_compile.quality.methods import DEFAULT_METHODS, METHODS, warmup_steps  # noqa: F401
from scaling_attn_compile.quality.report import (  # noqa: F401
    at_equal_density,
    at_equal_time,
    bar_check,
    interpolate,
    pareto_check,
    plot_pareto,
    quality_table,
)
from scaling_attn_compile.quality.study import DENSITIES, run_quality  # noqa: F401
from scaling_attn_compile.tiny.registry import MODELS, BundledModel, get_model

RESULTS = Path(__file__).parent / "results"


def device_slug(device: torch.device) -> str:
    """``cpu``, or the GPU's name as other benchmarks' records spell it (``nvidia-h200``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def environment(spec: BundledModel | Path, device: torch.device | None = None) -> dict:
    import os

    import diffusers

    if isinstance(spec, Path | str):  # the old signature: a tiny-wan folder
        spec = get_model("tiny-wan", Path(spec))
    device = device or torch.device("cpu")
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=root).stdout.strip()
        except OSError:  # no git (the GPU machine's copy has no .git either)
            return ""

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__,
           "python": platform.python_version(),
           "git_sha": os.environ.get("GIT_SHA") or git("rev-parse", "--short", "HEAD")
           or "unknown",
           "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
           "device": "cpu" if device.type != "cuda" else torch.cuda.get_device_name(device),
           "cpu": platform.processor() or platform.machine(),
           "torch_threads": torch.get_num_threads(), "model": spec.name,
           "model_path": str(spec.path), "model_card": spec.card(),
           "model_weights_sha256_16": spec.weights_sha256_16()}
    if device.type == "cuda":
        import triton

        env["triton"] = triton.__version__
    return env


def finite(obj):
    """``obj`` with every non-finite float as ``None`` (strict JSON; a PSNR of a video equal to
    its dense reference is infinite)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def merge(paths: list[Path], times_from: list[Path] | None = None) -> dict:
    """One result from runs of one study split over calls: other densities or methods, or a
    run without timing (``--no-time``) and one with timing only (``--timing-only``). Rows are
    joined by (method, target): the first run with videos gives the quality, the first with a
    time gives ``ms_per_step``; the bars are recomputed. Each run's PSNR is against its own
    dense videos, so rows stay comparable when the runs share model, grid, steps, prompts, seeds
    and calibration captions, which is checked (the calibration is deterministic in them).
    ``times_from`` (some of ``paths``): every row's time comes from those runs alone (the first
    of them that timed it), replacing the others' (a re-timing with a new clock; rows none of
    them timed have none)."""
    import copy

    runs = [json.loads(Path(p).read_text()) for p in paths]
    base = runs[0]
    same = ("model", "grid", "steps", "videos", "seeds", "calibration_captions", "token_order")
    no_videos = ("videos", "seeds")  # a --timing-only run makes none: its prompts do not matter
    defaults = {"token_order": "raster"}  # records from before the option were raster order
    for p, r in zip(paths[1:], runs[1:], strict=True):
        timing_only = r["config"].get("timing_only") or base["config"].get("timing_only")
        diff = [k for k in same if r["config"].get(k, defaults.get(k))
                != base["config"].get(k, defaults.get(k))
                and not (timing_only and k in no_videos)]
        if diff:
            raise SystemExit(f"--merge: {p} differs from {paths[0]} in {diff}; merge only runs "
                             "of one study (same model, grid, steps, prompts, seeds and token "
                             "order)")
    # The runs must have timed and filmed the same tables: the calibration is deterministic in
    # the captions, so a (method, target) planned at another density means another plan.
    planned: dict[tuple, float] = {}
    for p, r in zip(paths, runs, strict=True):
        for e in r["results"]:
            key, d = (e["method"], e["target_density"]), e.get("planned_density")
            if d is None:
                continue
            if key in planned and abs(planned[key] - d) > 1e-6:
                raise SystemExit(f"--merge: {p} planned {key[0]} at {key[1]} to density {d:.6f}, "
                                 f"another run to {planned[key]:.6f}: not the same tables")
            planned.setdefault(key, d)
    rows: dict[tuple, dict] = {}
    recs: dict[tuple, list] = {}
    for r in runs:
        for e in r["results"]:
            key = (e["method"], e["target_density"])
            if e["status"] == "skipped_budget":
                continue
            have = rows.get(key)
            if have is None or (have["status"] == "timed" and e["status"] == "ok"):
                timed = have if have is not None else None
                rows[key] = copy.deepcopy(e)
                recs[key] = [x for x in r["records"]
                             if (x["method"], x["target_density"]) == key]
                if timed is not None and rows[key].get("ms_per_step") is None:
                    rows[key].update(ms_per_step=timed["ms_per_step"],
                                     timing=timed.get("timing"))
            elif have.get("ms_per_step") is None and e.get("ms_per_step") is not None:
                have.update(ms_per_step=e["ms_per_step"], timing=e.get("timing"))
    clock = base  # the run whose clock the times (and the dense reference) come from
    if times_from:
        names = [str(p) for p in paths]
        for t in times_from:
            if str(t) not in names:
                raise SystemExit(f"--times-from {t}: not one of the merged runs")
        clocks = [runs[names.index(str(t))] for t in times_from]
        timed: dict[tuple, dict] = {}
        for c in clocks:
            for e in c["results"]:
                if e.get("ms_per_step") is not None:
                    timed.setdefault((e["method"], e["target_density"]), e)
        for key, e in rows.items():
            t = timed.get(key, {})
            e.update(ms_per_step=t.get("ms_per_step"), timing=t.get("timing"))
        devices = {c.get("env", {}).get("device") for c in clocks}
        if len(devices) > 1:
            raise SystemExit(f"--times-from: the runs timed on different GPUs {sorted(map(str, devices))}; "
                             "times from one GPU only")
        clock = clocks[0]
    for key, e in rows.items():
        for x in recs.get(key, []):
            x["ms_per_step"] = e.get("ms_per_step")
    results = list(rows.values())
    out = dict(base)
    out["config"] = dict(base["config"], densities=sorted(
        {d for r in runs for d in r["config"]["densities"]}, reverse=True))
    out.update(results=results, records=[x for v in recs.values() for x in v],
               bar=bar_check(results),
               bar_video_objective=bar_check(results, "west_fast_weighted"), pareto=pareto_check(results),
               at_equal_density=at_equal_density(results, out["config"]["densities"]),
               at_equal_time=at_equal_time(results), merged_from=[str(p) for p in paths],
               reference_timing=clock.get("reference_timing") or {} if times_from else next(
                   (r["reference_timing"] for r in runs if r.get("reference_timing")), {}),
               timing_device=clock.get("env", {}).get("device"),
               budget=[r.get("budget") for r in runs],
               envs=[dict(path=str(p), device=r.get("env", {}).get("device"),
                          git_sha=r.get("env", {}).get("git_sha"),
                          timing_only=bool(r["config"].get("timing_only")))
                     for p, r in zip(paths, runs, strict=True)],
               timings_s=[r.get("timings_s") for r in runs])
    return out


def print_result(res: dict) -> None:
    """The table, then both objectives' bar verdicts and the Pareto verdict (no per-row detail)."""
    print(quality_table(res))
    print(json.dumps({key: {k: v for k, v in res[key].items() if k != "rows"}
                      for key in ("bar", "bar_video_objective")}
                     | {"pareto_met": res["pareto"]["met"]}, indent=2))


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    from scaling_attn_compile.args import (
        add_token_order_argument,
        parse_triple,
        resolve_device,
        resolve_dtype,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-wan", choices=sorted(MODELS))
    p.add_argument("--model-path", type=Path, default=None,
                   help="the model's weights folder (default: its bundled assets)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--grid", type=parse_triple, default=None, metavar="F,H,W",
                   help="generation grid (default: the model's native grid)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the model's, 16 tiny-wan, 50 small-wan)")
    p.add_argument("--response-grid", type=parse_triple, default=None, metavar="F,H,W",
                   help="measure the weighted methods' gains on this grid instead (its own FAST "
                        "profile and probes; does a cheaper run's weighting transfer?)")
    p.add_argument("--response-steps", type=int, default=None,
                   help="measure the weighted methods' gains with this many steps instead")
    p.add_argument("--densities", type=_floats, default=list(DENSITIES))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, of {list(METHODS)}")
    p.add_argument("--prompts", "--num-prompts", dest="prompts", type=int, default=3,
                   help="held-out prompts (default 3)")
    p.add_argument("--seeds", type=int, default=1, help="noise seeds per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0, help="first noise seed (video i: seed + i)")
    p.add_argument("--num-calib", type=int, default=2)
    # The block order of every plan (WEST, the anchors; both parts), as `scaling-attn west`.
    add_token_order_argument(p)
    p.add_argument("--bisect-iters", type=int, default=10)
    p.add_argument("--time-cpu", action="store_true",
                   help="time the compiled step on the CPU too (default: CUDA only)")
    p.add_argument("--no-time", action="store_true", help="do not time (density and PSNR only)")
    p.add_argument("--timing-only", action="store_true",
                   help="time every method, make no videos (join with a --no-time run by "
                        "--merge): splits a GPU study over two calls")
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--timing-steps", type=int, default=None,
                   help="time this many evenly spaced steps (default: all)")
    p.add_argument("--no-graphs", action="store_true",
                   help="time the plain compiled call only (default on CUDA: also replay one "
                        "captured CUDA graph per step, which is then ms_per_step)")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the one profiled step per method (attention vs all kernel time)")
    p.add_argument("--retune-per-method", action="store_true",
                   help="compile each method in a fresh Inductor cache, so the template is "
                        "autotuned for it (default: the first compile's choice is reused)")
    p.add_argument("--retune-also", default="", metavar="M1,M2@D",
                   help="time these methods (or method@density items) a second time in a fresh "
                        "Inductor cache (timing_retuned, beside the usual timing)")
    p.add_argument("--sweep-configs", action="store_true",
                   help="CUDA: time every kernel config on each method's own tables too")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="scale densities, then prompts, then seeds down to fit; skip what "
                        "would still overrun (the record says which)")
    p.add_argument("--claims-sets", type=int, default=3)
    p.add_argument("--claims-profiles", type=int, default=3)
    p.add_argument("--claims-per-set", type=int, default=2,
                   help="training captions per WEST calibration set (topology stability)")
    p.add_argument("--claims-capture-steps", type=int, default=4,
                   help="steps captured per WEST calibration (each costs ~95 s for small-wan "
                        "at its native grid on 2 CPU cores, 13 s uncaptured)")
    p.add_argument("--claims-fast-capture-steps", type=int, default=6,
                   help="steps profiled per FAST profile (schedule stability)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-claims", action="store_true")
    p.add_argument("--out-quality", type=Path, default=None)
    p.add_argument("--out-claims", type=Path, default=None)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="join quality records of one study split over calls into "
                        "--out-quality (bars recomputed, plot redrawn); runs nothing")
    p.add_argument("--times-from", type=Path, nargs="+", default=None, metavar="JSON",
                   help="--merge: take every row's ms/step from these of the merged runs (one "
                        "GPU; a re-timing), not from whichever run timed it first")
    args = p.parse_args(argv)
    if args.times_from is not None and not args.merge:
        p.error("--times-from: only with --merge")
    if args.merge:
        if args.out_quality is None:
            p.error("--merge: pass --out-quality for the merged record")
        res = merge(args.merge, args.times_from)
        args.out_quality.write_text(json.dumps(finite(res), indent=2, allow_nan=False))
        png = plot_pareto(res, args.out_quality.with_suffix(".png"))
        print_result(res)
        print(f"wrote {args.out_quality}, {png}")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods + [x.split("@")[0] for x in args.retune_also.split(",")]
           if m and m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    try:
        spec = get_model(args.model, args.model_path)
        spec.held_out(args.prompts)  # a clear error now, not after calibration
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    device = resolve_device(args.device)
    model = spec.load(device, resolve_dtype("auto", device))
    env = environment(spec, device)
    slug = device_slug(device)
    if not args.skip_quality:
        out = args.out_quality or RESULTS / f"quality-{slug}-{spec.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python", "benchmarks/bench_quality.py", *(argv or sys.argv[1:])])

        def write(res):  # after every (target, method): a run cut short keeps its rows
            res["env"], res["command"] = env, command
            out.write_text(json.dumps(finite(res), indent=2, allow_nan=False))
            plot_pareto(res, out.with_suffix(".png"))

        if args.timing_only and args.no_time:
            p.error("--timing-only and --no-time: pick one (each is half of a split study)")
        timing = True if args.timing_only else None if not (args.time_cpu or args.no_time) \
            else (args.time_cpu and not args.no_time)
        res = run_quality(model, spec, grid=args.grid, steps=args.steps,
                          densities=args.densities, methods=methods, num_prompts=args.prompts,
                          num_seeds=args.seeds, seed=args.seed, num_calib=args.num_calib,
                          bisect_iters=args.bisect_iters, time_steps=timing,
                          timing_repeats=args.timing_repeats, timing_steps=args.timing_steps,
                          timing_only=args.timing_only, timing_graphs=not args.no_graphs,
                          timing_profile=not args.no_profile,
                          retune_per_method=args.retune_per_method,
                          retune_also=[m for m in args.retune_also.split(",") if m],
                          sweep_configs=args.sweep_configs, token_order=args.token_order,
                          response_grid=args.response_grid, response_steps=args.response_steps,
                          budget_minutes=args.budget_minutes, progress=args.progress,
                          on_result=write)
        write(res)
        png = out.with_suffix(".png")
        print_result(res)
        print(f"wrote {out}, {png}")
    if not args.skip_claims:
        res = run_claims(model, spec, grid=args.grid, steps=args.steps or spec.steps,
                         n_sets=args.claims_sets, n_profiles=args.claims_profiles,
                         per_set=args.claims_per_set, capture_steps=args.claims_capture_steps,
                         fast_capture_steps=args.claims_fast_capture_steps,
                         token_order=args.token_order)
        res["env"] = env
        out = args.out_claims or RESULTS / f"claims-{slug}-{spec.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(claims_tables(res))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
