"""``scaling-attn west`` / ``fast`` on a full diffusers pipeline folder (``model_index.json``).

The pipeline is loaded with ``DiffusionPipeline.from_pretrained`` and called as users call it
(:mod:`.offline.pipeline`): its scheduler, text encoder, CFG and image conditioning make the
plan. ``cli.py`` dispatches here when ``--model`` resolves to such a folder.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from pathlib import Path

from .args import check_probe_steps, save_west_plan
from .errors import CliError
from .models.registry import adapter_for


def is_pipeline_folder(path) -> bool:
    return path is not None and (Path(path) / "model_index.json").is_file()


def load_pipeline(folder: Path, device, dtype):
    import importlib.util

    from diffusers import DiffusionPipeline

    if importlib.util.find_spec("accelerate") is None:
        raise ImportError(f"loading the pipeline {folder} needs the `accelerate` package; "
                          f"pip install accelerate")
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype)
    return pipe.to(device)


def takes_image(pipe) -> bool:
    """An image-to-video pipeline: its ``__call__`` has an ``image`` argument."""
    return "image" in inspect.signature(pipe.__call__).parameters


def _prompts(args, what: str) -> list[str]:
    if args.prompts is None or args.prompts.suffix != ".txt":
        raise CliError(f"{what}: --model {args.model} is a pipeline folder, which encodes text "
                       f"itself: pass --prompts PROMPTS.txt (one prompt a line), got "
                       f"{args.prompts or 'none'}")
    prompts = [ln.strip() for ln in args.prompts.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise CliError(f"--prompts {args.prompts}: no prompts (empty file?)")
    return prompts


def _image(args, pipe):
    if not takes_image(pipe):
        if args.image is not None:
            raise CliError(f"--image {args.image}: the pipeline {type(pipe).__name__} is not "
                           f"image-to-video; drop --image")
        return None
    if args.image is None:
        raise CliError(f"--model {args.model}: {type(pipe).__name__} conditions on an image; "
                       f"pass --image FIRST_FRAME.png")
    from PIL import Image

    return Image.open(args.image).convert("RGB")


def vae_strides(pipe) -> tuple[int, int]:
    """(temporal, spatial) pixels per latent cell of this pipeline's VAE. Wan's pipelines name
    them vae_scale_factor_*, LTX's vae_*_compression_ratio."""
    st = int(getattr(pipe, "vae_scale_factor_temporal", None)
             or getattr(pipe, "vae_temporal_compression_ratio", None) or 4)
    ss = int(getattr(pipe, "vae_scale_factor_spatial", None)
             or getattr(pipe, "vae_spatial_compression_ratio", None) or 8)
    return st, ss


def latent_grid(pipe, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent grid ``(F, H, W)`` of a ``frames x height x width`` video through this
    pipeline's causal VAE (unchecked: :func:`token_grid` checks the size)."""
    st, ss = vae_strides(pipe)
    return ((frames - 1) // st + 1, height // ss, width // ss)


def token_grid(pipe, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Self-attention token grid of a ``frames x height x width`` video in this pipeline."""
    from .models.registry import adapter_for

    ss = vae_strides(pipe)[1]
    pt, ph, pw = adapter_for(pipe.transformer, "scaling-attn west").patch_size(pipe.transformer)
    lat = latent_grid(pipe, frames, height, width)
    if lat[0] % pt or lat[1] % ph or lat[2] % pw or height % ss or width % ss:
        raise CliError(f"--height {height} --width {width}: must be multiples of {ss * ph} "
                       f"pixels for this pipeline (VAE {ss}x, patch {ph}x{pw})")
    return (lat[0] // pt, lat[1] // ph, lat[2] // pw)


def run_west_pipeline(args: argparse.Namespace, folder: Path) -> int:
    from .contract.masks import num_blocks
    from .offline.calibrate import evenly_spaced
    from .offline.pipeline import calibrate_west_pipeline, pipeline_calls

    missing = [f"--{n}" for n in ("frames", "height", "width") if getattr(args, n) is None]
    if missing or args.latent is not None:
        raise CliError(f"--model {args.model} is a pipeline folder: pass the video size with "
                       f"--frames, --height and --width (missing {', '.join(missing) or 'none'}"
                       f"{'; --latent does not apply' if args.latent is not None else ''}); a "
                       f"plan is calibrated at one resolution, e.g. --frames 81 --height 480 "
                       f"--width 832")
    if args.shift is not None:
        raise CliError("--shift: the pipeline's own scheduler sets the flow shift; drop --shift "
                       "(or set it in the folder's scheduler/scheduler_config.json)")
    prompts = _prompts(args, "west")
    t0 = time.perf_counter()
    pipe = load_pipeline(folder, args._device, args._dtype)
    image = _image(args, pipe)
    grid = token_grid(pipe, args.frames, args.height, args.width)
    s = math.prod(grid)
    capture = evenly_spaced(args.steps, args.capture_steps)
    cfg = pipe.transformer.config
    args.guidance_scale = _guidance(args, pipe)
    layers = adapter_for(pipe.transformer).num_layers(pipe.transformer)  # HunyuanVideo: 2 kinds
    print(f"pipeline: {type(pipe).__name__} ({folder}), scheduler "
          f"{type(pipe.scheduler).__name__}, {layers} layers x "
          f"{cfg.num_attention_heads} heads, {args._dtype}, {args._device}")
    print(f"video {args.frames}x{args.height}x{args.width} -> token grid (F, H, W) = {grid}, "
          f"S = {s} tokens, {num_blocks(s)} blocks of 128; {len(prompts)} prompts x "
          f"{len(capture)}/{args.steps} captured steps, "
          + (f"guidance {args.guidance_scale} embedded in the model (no CFG pass)"
             if cfg.get("guidance_embeds") else
             f"CFG {'on' if args.guidance_scale > 1 else 'off'} (scale {args.guidance_scale})"))
    if num_blocks(s) < 2:
        print(f"warning: S = {s} tokens is one block of 128: every mask of this plan keeps "
              f"everything; pass a larger video size", file=sys.stderr)
    extra = {} if args.text_len is None else {"max_sequence_length": args.text_len}
    calls = pipeline_calls(prompts, height=args.height, width=args.width,
                           num_frames=args.frames, num_inference_steps=args.steps,
                           guidance_scale=args.guidance_scale,
                           negative_prompt=args.negative_prompt, image=image, seed=args.seed,
                           **extra)
    if getattr(pipe, args.component, None) is None:
        raise CliError(f"--component {args.component}: {type(pipe).__name__} in {folder} has "
                       f"no {args.component}; pass --component transformer")
    plan = calibrate_west_pipeline(pipe, calls, capture_steps=capture, component=args.component,
                                   block_mass_impl=args.block_mass,
                                   source=f"scaling-attn west --model {args.model}",
                                   token_order=args.token_order)
    return save_west_plan(plan, args, t0)


def run_fast_pipeline(args: argparse.Namespace, folder: Path, plan, target: float, *,
                      video_fit=None, resolve_objective=None):
    """FAST profile through the pipeline at the plan's calibration video size; returns the
    plan with its schedule. ``--objective video``: ``video_fit(model, plan, profile, sample,
    target, args)`` fits it (``cli_fast.video_schedule``), its probes calling the pipeline as
    the profile did (same scheduler, timesteps and noise). ``resolve_objective``:
    ``cli_fast.resolve_objective``, which picks the objective once the pipeline is loaded."""
    from .errors import PlanModelMismatch
    from .offline import fast
    from .offline.calibrate import evenly_spaced
    from .offline.pipeline import build_fast_plan_pipeline, pipeline_calls

    calib = plan.meta.calibration
    video = calib.get("video")
    if not video or None in video:
        raise CliError(f"--plan {args.plan} was not calibrated through a pipeline (no video "
                       f"size recorded); re-extract it with `scaling-attn west --model {folder} "
                       f"--frames F --height H --width W`")
    frames, height, width = (int(v) for v in video)
    prompt = _prompts(args, "fast")[0]
    pipe = load_pipeline(folder, args._device, args._dtype)
    image = _image(args, pipe)
    steps = args.steps or int(calib.get("num_steps", 50))
    capture = None if args.capture_steps is None else evenly_spaced(steps, args.capture_steps)
    try:
        if getattr(pipe, args.component, None) is None:
            raise CliError(f"--component {args.component}: the pipeline has none")
        plan.check_model(getattr(pipe, args.component))
    except PlanModelMismatch as e:
        raise CliError(f"--model {args.model}: {e}. The plan was made by "
                       f"`{calib.get('source') or 'scaling-attn west'}`: pass the same "
                       f"--model") from None
    print(f"FAST profile through {type(pipe).__name__}: video {frames}x{height}x{width}, "
          f"{steps} steps ({'all' if capture is None else len(capture)} profiled), target "
          f"density {target}")
    extra = {} if args.text_len is None else {"max_sequence_length": args.text_len}
    call = pipeline_calls([prompt], height=height, width=width, num_frames=frames,
                          num_inference_steps=steps, guidance_scale=_guidance(args, pipe),
                          negative_prompt=args.negative_prompt, image=image, seed=args.seed,
                          **extra)[0]
    fit = dict(allocation=args.allocation, objective=args.error, gamma=args.gamma,
               omega=args.omega, rho=args.rho, reduce=args.reduce)
    levels = args.levels or list(fast.DEFAULT_LEVELS)
    if resolve_objective is None:  # called without the CLI's objective rule: as asked
        args.objective = args.objective or "attention"
    else:
        resolve_objective(args, getattr(pipe, args.component),
                          latent=latent_grid(pipe, frames, height, width), num_steps=steps,
                          num_profiled=steps if capture is None else len(capture),
                          num_layers=plan.num_layers)
    if args.objective != "video":
        return build_fast_plan_pipeline(
            plan, pipe, call, target, capture_steps=capture, component=args.component,
            levels=levels, rows_per_block=args.rows_per_block, seed=args.seed, **fit)[0]
    if video_fit is None:
        raise CliError("--objective video: no probe runner was given for the pipeline path; "
                       "pass --objective attention")
    from .offline.fast_response import pipeline_run_fn
    from .offline.pipeline import profile_pipeline

    prof = profile_pipeline(plan, pipe, call, capture_steps=capture, levels=levels,
                            rows_per_block=args.rows_per_block, seed=args.seed,
                            component=args.component)
    probe, probe_call = None, call
    if args.probe_latent is not None or args.probe_steps is not None:
        # The probes' own, cheaper video: --probe-latent times the VAE's strides, and/or
        # --probe-steps of the pipeline's scheduler; a profile of their own at that setting.
        if args.probe_latent is not None:
            st, ss = vae_strides(pipe)
            f, h, w = args.probe_latent
            frames, height, width = (f - 1) * st + 1, h * ss, w * ss
        p_steps = args.probe_steps or steps
        t = len(prof.timesteps)
        check_probe_steps(p_steps, t)
        probe_call = pipeline_calls([prompt], height=height, width=width, num_frames=frames,
                                    num_inference_steps=p_steps,
                                    guidance_scale=_guidance(args, pipe),
                                    negative_prompt=args.negative_prompt, image=image,
                                    seed=args.seed, **extra)[0]
        print(f"video probes: {frames}x{height}x{width}, {p_steps} steps")
        probe = profile_pipeline(plan, pipe, probe_call, capture_steps=evenly_spaced(p_steps, t),
                                 levels=levels, rows_per_block=args.rows_per_block,
                                 seed=args.seed, component=args.component)
    return plan.with_schedule(video_fit(getattr(pipe, args.component), plan, prof,
                                        pipeline_run_fn(pipe, probe_call), target, args,
                                        probe_profile=probe))


def _guidance(args, pipe) -> float:
    """``--guidance-scale``, or the pipeline's own default (``__call__``'s): CFG for Wan (5.0),
    the guidance *embedded* in the model for HunyuanVideo (6.0), where 5.0 would be wrong."""
    if args.guidance_scale is not None:
        return args.guidance_scale
    default = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return 5.0 if default is None or default.default is inspect.Parameter.empty else default.default
