"""``scaling-attn fast``: what the schedule fit minimises (``--objective``) and the video probes.

``--objective video`` (the default where it can run): the summed profiled attention error
weighted per (layer, step bucket) by its measured cost in the final video
(:mod:`.offline.fast_response`): ``L + T + 1`` extra generations of the calibration video on the
sampler the profile ran, each with one bucket or one layer sparse, run through
:class:`.quality.measure.MeasuredAttention` (the op's semantics: the Triton kernel on CUDA, the
reference on the CPU); by default at half the height and width and half the steps.
``--objective attention``: the unweighted sum (``fast.fit_schedule``), the fallback (with a line
saying why) where the probes cannot run: another model class, or a fit the gains do not
weight (``--method uniform`` / ``dense-first`` fit nothing, so they need no objective).
``cli.py`` and ``cli_pipeline.py`` call in here; this module sits between them and
``quality/`` in the import floors.
"""

from __future__ import annotations

import argparse
import time

from .args import check_probe_steps, parse_triple, positive_int
from .errors import CliError

OBJECTIVES = ("attention", "video")
# One line for --help: the small-wan GPU study in tile order (128 blocks, 50 steps, 8 held-out
# prompts x 2 seeds; benchmarks/results/quality-small-wan-tile-pareto.json), PSNR vs dense.
VIDEO_MEASURED = ("measured on small-wan, PSNR vs dense at density 0.5/0.35/0.25/0.15: "
                  "42.0/36.4/32.0/26.6 dB against 36.1/32.0/29.9/23.7 for 'attention' and "
                  "36.2/31.2/27.2/22.4 for uniform density")
FEW_BUCKETS = 6  # profiled steps the probe-count hint suggests (the small-wan study's)
PROBED_CLASSES = ("WanTransformer3DModel",)  # MeasuredAttention computes q/k/v as Wan's processor


def add_objective_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objective", default=None, choices=list(OBJECTIVES),
                   help="what the lagrange fit minimises: 'video' (the default where it can "
                        "run: Wan, --method fast), the summed profiled attention error weighted "
                        "per (layer, step bucket) by its measured effect on the final video, "
                        "which costs L + T + 1 extra generations of the calibration video (L "
                        "layers, T profiled steps), by default at half its height and width and "
                        "half its steps (small-wan: 35 s on an H100); 'attention', the "
                        f"unweighted sum (cheaper; the fallback elsewhere); {VIDEO_MEASURED}")
    p.add_argument("--probe-latent", type=parse_triple, default=None, metavar="F,H,W",
                   help="--objective video: run the probes (and a profile for them) on this "
                        "latent (F, H, W) instead of the default (the calibration's with half "
                        "its H and W), and weight the "
                        "full profile's fit with their gains (through a pipeline: that "
                        "latent times the VAE's strides, e.g. 21,30,52 -> 81x240x416). On "
                        "small-wan at the CPU demo grid, gains from 1/4 of the tokens and half "
                        "the steps gave 30.35 dB against 30.02 with full-size probes, at 7x less "
                        "probe time")
    p.add_argument("--probe-steps", type=positive_int, default=None, metavar="N",
                   help="--objective video: the probes' sampler steps, a coarser version of "
                        "the calibration's schedule (at least the profiled step count; default "
                        "half the steps)")
    p.add_argument("--error", default="output_error", choices=["output_error", "fidelity"],
                   help="lagrange: the attention error, relative attention-output error "
                        "(default) or 1 - Hellinger fidelity")


def check_objective(args: argparse.Namespace) -> None:
    """Refuse option mixes the video objective cannot serve, before any model is loaded. A
    ``--probe-*`` option without ``--objective`` asks for the video objective; with neither,
    :func:`resolve_objective` picks once the model is loaded."""
    probes = [f for f, v in (("--probe-latent", args.probe_latent),
                             ("--probe-steps", args.probe_steps)) if v is not None]
    if probes and args.objective is None:
        args.objective = "video"
    if probes and args.objective != "video":
        raise CliError(f"{probes[0]}: sets where the video objective's probes run; pass "
                       f"--objective video, or drop {probes[0]}")
    if args.objective != "video":
        return
    if args.probe_steps is not None and args.capture_steps is not None:  # before any loading
        check_probe_steps(args.probe_steps, args.capture_steps)
    if (misfit := _option_misfit(args)) is not None:
        raise CliError(misfit[0])


def _option_misfit(args: argparse.Namespace) -> tuple[str, str] | None:
    """The first option the video objective cannot serve, or ``None``: (the refusal when
    ``--objective video`` was asked for, the reason the default's fallback line gives)."""
    from .offline.fast_response import REF_LEVEL

    if args.method != "fast":
        why = f"--method {args.method} fits nothing"
        return (f"--objective video: weights FAST's fit; {why}; drop --objective or pass "
                f"--method fast"), why
    if args.allocation != "lagrange":
        return (f"--objective video: weights the lagrange allocation's errors, got "
                f"--allocation {args.allocation}; pass --allocation lagrange",
                f"--allocation {args.allocation} is not the lagrange fit the gains weight")
    if args.error != "output_error":
        return ("--objective video: the gains are fitted on the profiled output error, "
                f"got --error {args.error}; pass --error output_error",
                f"--error {args.error} is not the output error the gains are fitted on")
    if args.levels is not None and REF_LEVEL not in args.levels:
        return (f"--levels {','.join(f'{x:g}' for x in args.levels)}: --objective video "
                f"probes at level {REF_LEVEL}, which must be one of them; add {REF_LEVEL}",
                f"--levels lacks the probes' reference level {REF_LEVEL}")
    return None


def resolve_objective(args: argparse.Namespace, model, *, latent, num_steps: int,
                      num_profiled: int, num_layers: int) -> None:
    """``--objective`` left out: ``video`` where it can run, else ``attention`` with one line
    saying why. The video objective's probes run on ``fast_response.cheap_probe_setting``
    unless ``--probe-*`` says otherwise. ``latent``: the calibration latent ``(F, H, W)``. One
    line names the probe cost and the way out."""
    from .models.fingerprint import _unwrap
    from .offline.fast_response import cheap_probe_setting

    if args.objective == "attention":
        return
    name = type(_unwrap(model)).__name__
    why = None
    if args.objective == "video":  # asked for: check_objective refused the option misfits
        if name not in PROBED_CLASSES:
            raise CliError(f"--objective video: the video probes run sparse attention through "
                           f"{', '.join(PROBED_CLASSES)}'s processor, got {name}; pass "
                           f"--objective attention")
    elif (misfit := _option_misfit(args)) is not None:
        why = misfit[1]
    elif name not in PROBED_CLASSES:
        why = f"its probes run {', '.join(PROBED_CLASSES)}'s processor, not {name}'s"
    if why is not None:
        args.objective = "attention"
        print(f"--objective attention: the video objective (the default) cannot run here: {why}")
        return
    args.objective = "video"
    if args.probe_latent is None and args.probe_steps is None:
        args.probe_latent, args.probe_steps = cheap_probe_setting(
            latent, _unwrap(model).config.patch_size, num_steps, num_profiled)
    size = "x".join(map(str, args.probe_latent or latent))
    # One probe per profiled step: every step profiled (no --capture-steps) at 50 steps is 50 of
    # them; 6 (the demo's, and the small-wan study's) kept the +4 to +6 dB there.
    fewer = (f"; --capture-steps {FEW_BUCKETS} makes {num_layers + FEW_BUCKETS + 1}"
             if args.capture_steps is None and num_profiled > 2 * FEW_BUCKETS else "")
    print(f"--objective video: {num_layers + num_profiled + 1} probe generations "
          f"at latent {size}, {args.probe_steps or num_steps} steps, before the fit; "
          f"--objective attention skips them{fewer}")


def fit_kwargs(args: argparse.Namespace) -> dict:
    """``fast.fit_schedule``'s options from the command line."""
    return dict(allocation=args.allocation, objective=args.error, gamma=args.gamma,
                omega=args.omega, rho=args.rho, reduce=args.reduce)


def sparse_run(model, plan, grid, sample):
    """``run(schedule)`` for :func:`.offline.fast_response.measure_response`: ``sample()`` with
    ``schedule``'s tables at ``grid`` on every self-attention layer of ``model`` (dense for
    ``None``). Only Wan's processor is probed; other classes are refused in one line."""
    from .models.fingerprint import _unwrap
    from .quality.measure import MeasuredAttention

    name = type(_unwrap(model)).__name__
    if name not in PROBED_CLASSES:
        raise CliError(f"--objective video: the video probes run sparse attention through "
                       f"{', '.join(PROBED_CLASSES)}'s processor, got {name}; pass "
                       f"--objective attention")
    runner = MeasuredAttention(_unwrap(model))

    def per_sample_timestep(module, args, kwargs):
        t = runner.timestep  # (B, S) under expand_timesteps (Wan2.2 TI2V): the noise level is
        if t is not None and t.dim() > 1:  # the max (the image tokens carry 0), as the profile
            runner.timestep = t.flatten(1).amax(1)

    def run(schedule):
        if schedule is None:
            return sample()
        runner.configure(plan.with_schedule(schedule).materialize(grid))
        with runner.installed():
            handle = _unwrap(model).register_forward_pre_hook(per_sample_timestep,
                                                              with_kwargs=True)
            try:
                return sample()
            finally:
                handle.remove()

    return run


def video_schedule(model, plan, profile, sample, target: float, args: argparse.Namespace,
                   probe_profile=None):
    """The video objective's schedule: the probes (a tqdm bar), then the weighted fit of
    ``profile``; the gains and the probe cost go into ``schedule.info``. ``probe_profile``: the
    probes' own profile when they run on a smaller latent or fewer steps (``sample`` runs that
    setting); its gains, one per layer and profiled step, weight ``profile``'s fit."""
    return _video_fit(model, plan, profile, sample, target, fit_kwargs(args), probe_profile)


def _video_fit(model, plan, profile, sample, target: float, fit_kw: dict, probe_profile=None,
               progress: bool = True):
    from .offline import fast_response as R

    probe = profile if probe_profile is None else probe_profile
    run = sparse_run(model, plan, tuple(probe.info["grid"]), sample)
    t0 = time.perf_counter()
    resp = R.measure_response(probe, plan.num_heads, run,
                              progress="FAST video probes" if progress else False)
    seconds = time.perf_counter() - t0
    sched = R.fit_video_schedule(profile, target, resp, seconds, **fit_kw)
    sched.info["response"].update(probe_grid=list(probe.info["grid"]),
                                  probe_steps=probe.info["num_steps"])
    return sched


def builtin_video_fit(model, plan, profile, calibration_input, target: float, *, timesteps,
                      latent, guidance_scale: float, probe_latent=None, probe_steps=None,
                      rows_per_block: int | None = None, seed: int = 0, fit_kw: dict | None = None,
                      progress: bool = True):
    """The video objective on the built-in sampler (``profile`` is its FAST profile at
    ``latent`` and ``timesteps``): the schedule. ``probe_latent`` ``(F, H, W)`` / ``probe_steps``:
    the probes, with a profile of their own, run on that smaller latent / a coarser version of
    ``timesteps`` (at least the profiled step count). ``scaling-attn fast`` and the demo."""
    from .offline import fast
    from .offline.calibrate import evenly_spaced
    from .offline.fast_response import sampler_run_fn

    p_latent, p_ts, probe = tuple(latent), list(timesteps), None
    if probe_latent is not None or probe_steps is not None:
        if probe_latent is not None:
            p_latent = (latent[0], *probe_latent)
        if probe_steps is not None:  # a coarser version of the same schedule
            p_ts = [p_ts[i] for i in evenly_spaced(len(p_ts), probe_steps)]
        t = len(profile.timesteps)
        check_probe_steps(len(p_ts), t)
        kw = {} if rows_per_block is None else {"rows_per_block": rows_per_block}
        probe = fast.profile_fidelity(plan, model, calibration_input, timesteps=p_ts,
                                      latent_shape=p_latent,
                                      capture_steps=evenly_spaced(len(p_ts), t),
                                      levels=profile.levels, seed=seed,
                                      guidance_scale=guidance_scale,
                                      progress="FAST probe profile" if progress else False,
                                      **kw)
    sample = sampler_run_fn(model, calibration_input, p_ts, p_latent, guidance_scale)
    return _video_fit(model, plan, profile, sample, target, fit_kw or {}, probe, progress)


def fit_builtin(args: argparse.Namespace, plan, model, calibration_input, target: float, *,
                timesteps, latent, capture, levels):
    """Profile on the built-in sampler and fit (either objective): the plan with its
    schedule."""
    from .offline import fast

    guidance = args.guidance_scale or 5.0
    resolve_objective(args, model, latent=latent[1:], num_steps=len(timesteps),
                      num_profiled=len(timesteps) if capture is None else len(capture),
                      num_layers=plan.num_layers)
    prof = fast.profile_fidelity(plan, model, calibration_input, timesteps=timesteps,
                                 latent_shape=latent, capture_steps=capture, levels=levels,
                                 rows_per_block=args.rows_per_block, seed=args.seed,
                                 guidance_scale=guidance, progress="FAST profile")
    if args.objective == "video":
        sched = builtin_video_fit(model, plan, prof, calibration_input, target,
                                  timesteps=timesteps, latent=latent, guidance_scale=guidance,
                                  probe_latent=args.probe_latent, probe_steps=args.probe_steps,
                                  rows_per_block=args.rows_per_block, seed=args.seed,
                                  fit_kw=fit_kwargs(args))
    else:
        sched = fast.fit_schedule(prof, target, **fit_kwargs(args))
    return plan.with_schedule(sched)
