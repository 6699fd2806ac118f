"""``scaling-attn``: command line for offline plan building and inspection.

    scaling-attn west --model /path/to/Wan2.1-T2V-1.3B-Diffusers --prompts prompts.txt \\
        --height 480 --width 832 --frames 81 --steps 50 --capture-steps 10 --out wan13.plan.safetensors
    scaling-attn west --model tiny --num-prompts 4 --out tiny.plan.safetensors
    scaling-attn show wan13.plan.safetensors --layer 12 --density 0.3

Adding a subcommand (``fast``, ``demo``): write ``add_<name>_arguments(parser)`` and
``run_<name>(args) -> int`` (import heavy modules inside ``run_``), and append
``Command("<name>", "<help>", add_<name>_arguments, run_<name>)`` to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .args import (
    add_token_order_argument,
    check_input_file,
    check_output_path,
    int_list,
    levels_arg,
    parse_triple,
    plan_model,
    positive_float,
    positive_int,
    resolve_device,
    resolve_dtype,
    save_west_plan,
)
from .cli_fast import add_objective_arguments, check_objective
from .errors import CliError

PACKAGE_DIR = Path(__file__).resolve().parent
DEBUG_ENV = "SCALING_ATTN_DEBUG"  # =1: full tracebacks for user errors too


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- shared argument helpers -------------------------------------------------------------------


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model/--device/--dtype/--seed``, shared by commands that load a transformer."""
    p.add_argument("--model", default="tiny",
                   help="a local diffusers Wan folder (a full pipeline folder with "
                        "model_index.json runs the pipeline itself), a Hub id in the local Hugging "
                        "Face cache (Wan-AI/Wan2.1-T2V-1.3B-Diffusers), 'tiny' (the shipped tiny "
                        "model, else a random tiny config), or a built-in random-weight config: "
                        "tiny-random, wan2.1-1.3b, wan2.1-14b (default: tiny)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights, embeddings, noise")


def add_image_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", type=Path, default=None,
                   help="image-to-video pipeline: the conditioning first frame (PNG/JPEG)")
    p.add_argument("--component", default="transformer", choices=["transformer", "transformer_2"],
                   help="pipeline folder: which transformer the plan is for (transformer_2: "
                        "Wan2.2's low-noise expert, calibrated on the steps it runs)")


def _resolve_model(args) -> Path | None:
    """Resolve a Hub id through the local cache; the pipeline folder, if ``--model`` is one."""
    from .cli_pipeline import is_pipeline_folder
    from .models.hub import resolve_model

    path = resolve_model(args.model)
    return Path(path) if is_pipeline_folder(path) else None


# ---- west ----------------------------------------------------------------------------------------

# Pixel sizes per built-in when --height/--width/--frames are not given.
_DEFAULT_VIDEO = {"tiny-random": (13, 128, 256), "wan2.1-1.3b": (81, 480, 832),
                  "wan2.1-14b": (81, 480, 832), "ltx-video-2b": (161, 480, 704),  # LTXPipeline's
                  "wan2.2-ti2v-5b": (121, 704, 1280)}  # its 720p default: 24 fps, 5 s


def add_west_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="plan file to write (.safetensors)")
    p.add_argument("--height", type=positive_int,
                   help="video height in pixels (required for a pipeline folder; default 480 for "
                        "a bare Wan transformer)")
    p.add_argument("--width", type=positive_int,
                   help="video width in pixels (required for a pipeline folder; default 832)")
    p.add_argument("--frames", type=positive_int,
                   help="video frames (required for a pipeline folder; default 81)")
    add_image_argument(p)
    p.add_argument("--latent", type=parse_triple, metavar="F,H,W",
                   help="latent (F, H, W) before patching, instead of height/width/frames")
    p.add_argument("--vae-stride", type=parse_triple, metavar="T,H,W",
                   help="pixels per latent cell (default: the folder's vae/config.json, 4,8,8 for "
                        "Wan, 1,1,1 for a folder without a VAE)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", type=Path,
                     help=".txt (one prompt a line; needs the checkpoint's text_encoder/ and "
                          "tokenizer/) or .safetensors/.pt with prompt_embeds (N, L, text_dim)")
    src.add_argument("--num-prompts", type=positive_int, default=4,
                     help="random Gaussian embeddings (random-weight models only make sense with "
                          "these); default 4")
    p.add_argument("--negative-prompt", default=None,
                   help="with a .txt --prompts: negative prompt, enables CFG (both passes captured)")
    p.add_argument("--guidance-scale", type=float, help="default: the pipeline's; bare: CFG 5.0")
    p.add_argument("--text-len", type=positive_int, default=None,
                   help="length of random embeddings (default: 512 for Wan, 16 for tiny)")
    p.add_argument("--steps", type=positive_int, default=50,
                   help="denoising steps of the trajectory")
    p.add_argument("--capture-steps", type=positive_int, default=10,
                   help="steps to capture, evenly spaced incl. first and last (default 10)")
    p.add_argument("--shift", type=positive_float, default=None,
                   help="flow-matching shift (default 5.0 at >= 720p, else 3.0, as Wan)")
    p.add_argument("--block-mass", default="auto", choices=["auto", "triton", "torch"],
                   help="block-mass implementation (default: Triton on CUDA, torch on CPU)")
    add_token_order_argument(p)


def _west_inputs(args, src, ad):
    from .offline.calibrate import load_embeddings, random_inputs

    if args.prompts is None:
        if not src.random_weights:
            print("warning: random embeddings on a trained model are off its distribution; pass "
                  "--prompts for a meaningful topology", file=sys.stderr)
        return random_inputs(args.num_prompts, args.text_len or src.text_len,
                             src.transformer.config[ad.TEXT_DIM], seed=args.seed)
    if args.prompts.suffix == ".txt":
        enc = getattr(ad, "encode_prompts", None)  # Wan's (UMT5); others: the pipeline folder
        if enc is None or src.folder is None or not (src.folder / "text_encoder").is_dir():
            raise CliError(f"--prompts {args.prompts} is text, but the model {args.model!r} has "
                           f"no text_encoder/ this path reads; pass precomputed embeddings "
                           f"(.safetensors with prompt_embeds) or the pipeline folder instead")
        from .offline.calibrate import CalibrationInput

        prompts = [ln.strip() for ln in args.prompts.read_text().splitlines() if ln.strip()]
        emb = enc(src.folder, prompts, device=args._device, dtype=args._dtype)
        neg = None
        if args.negative_prompt is not None:
            neg = enc(src.folder, [args.negative_prompt], device=args._device,
                                 dtype=args._dtype)
        return [CalibrationInput(emb[i:i + 1], seed=args.seed + i, negative_prompt_embeds=neg,
                                 name=prompts[i][:40]) for i in range(len(prompts))]
    return load_embeddings(args.prompts, seed=args.seed)


def run_west(args: argparse.Namespace) -> int:
    from .contract.masks import num_blocks
    from .models.registry import adapter_for, load_transformer
    from .offline.calibrate import calibrate_west, default_timesteps, evenly_spaced

    check_output_path(args.out, "--out")  # before minutes of calibration, not after
    check_input_file(args.prompts, "--prompts")
    check_input_file(args.image, "--image")
    device = args._device = resolve_device(args.device)
    dtype = args._dtype = resolve_dtype(args.dtype, device)
    folder = _resolve_model(args)
    if folder is not None:
        from .cli_pipeline import run_west_pipeline

        return run_west_pipeline(args, folder)
    if args.image is not None:
        raise CliError(f"--image {args.image}: only a pipeline folder (model_index.json) "
                       f"conditions on an image; --model {args.model} is a bare transformer")
    t0 = time.perf_counter()
    src = load_transformer(args.model, dtype=dtype, device=device, seed=args.seed)
    ad = adapter_for(model := src.transformer, "--model")
    cfg = model.config
    print(f"model: {src.name} ({'random weights' if src.random_weights else src.folder}), "
          f"{ad.num_layers(model)} layers x {cfg.num_attention_heads} heads, {dtype}, {device}")
    if (needs := ad.bare_call_needs(model)) is not None:
        raise CliError(f"--model {args.model}: a {type(model).__name__} needs {needs}; pass the "
                       f"whole pipeline folder (with model_index.json)")
    if cfg.in_channels != cfg.out_channels:  # I2V: 36 in = 16 noise + 20 image condition
        raise CliError(f"--model {args.model}: an image-to-video transformer ({cfg.in_channels} "
                       f"input channels, {cfg.out_channels} output) needs its image conditioning;"
                       f" pass the whole pipeline folder (with model_index.json) and --image")
    stride = args.vae_stride or src.vae_stride
    if args.latent is not None:
        latent = (cfg.in_channels, *args.latent)
    else:
        vf, vh, vw = _DEFAULT_VIDEO.get(src.name, (None, None, None))
        if src.vae_stride == (4, 8, 8) and vf is None:
            vf, vh, vw = 81, 480, 832
        frames = args.frames if args.frames is not None else vf
        height = args.height if args.height is not None else vh
        width = args.width if args.width is not None else vw
        if None in (frames, height, width):
            raise CliError("pass --frames, --height and --width (or --latent F,H,W) for "
                           f"model {args.model!r}")
        latent = ad.latent_shape_for(frames, height, width, cfg.in_channels, stride)
    grid = ad.latent_token_grid(model, latent)
    s = grid[0] * grid[1] * grid[2]
    if num_blocks(s) < 2:
        print(f"warning: token grid {grid} is S = {s} tokens, one block of 128: every mask of "
              f"this plan keeps everything, here and remapped to larger grids; pass a larger "
              f"--latent or video size", file=sys.stderr)
    inputs = _west_inputs(args, src, ad)
    if not inputs:
        raise CliError(f"--prompts {args.prompts}: no calibration inputs (empty prompt file?)")
    # Wan's flow shift: 5.0 at 720p, 3.0 below (diffusers docs).
    shift = args.shift if args.shift is not None else (5.0 if latent[2] * stride[1] >= 720 else 3.0)
    timesteps = default_timesteps(args.steps, shift)
    capture = evenly_spaced(len(timesteps), args.capture_steps)
    print(f"latents (C, F, H, W) = {latent}, token grid (F, H, W) = {grid}, S = {s}; "
          f"{len(inputs)} inputs x {len(capture)}/{len(timesteps)} captured steps")
    plan = calibrate_west(model, inputs, timesteps, latent_shape=latent, capture_steps=capture,
                          guidance_scale=args.guidance_scale or 5.0, block_mass_impl=args.block_mass,
                          source=f"scaling-attn west --model {args.model}",
                          token_order=args.token_order)
    return save_west_plan(plan, args, t0)


# ---- show ----------------------------------------------------------------------------------------

def add_show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", type=Path, help="plan file")
    p.add_argument("--layer", type=int, default=0, help="layer to draw (default 0)")
    p.add_argument("--density", type=float, default=0.3,
                   help="keep-density threshold p of the drawn mask T <= p (default 0.3)")
    p.add_argument("--grid", type=parse_triple, metavar="F,H,W",
                   help="remap to this latent token grid first, after the VAE and patching, "
                        "not pixels: (21, 30, 52) for 81x480x832 Wan video (default: the "
                        "calibration grid)")
    p.add_argument("--heads", type=int_list, default=None,
                   help="comma-separated heads (default: all)")
    p.add_argument("--out", type=Path, default=None,
                   help="PNG path (default: <plan>.layer<L>.png next to the plan)")


def run_show(args: argparse.Namespace) -> int:
    from .plan.io import load_plan
    from .plan.viz import plot_layer

    out = args.out or args.plan.with_name(f"{args.plan.stem}.layer{args.layer}.png")
    plan = load_plan(args.plan)
    check_output_path(out, "--out")
    print(plan.summary())
    path = plot_layer(plan, args.layer, out, density=args.density, grid=args.grid,
                      heads=args.heads)
    print(f"wrote {path} (masks at T <= {args.density:g}: white = kept, black = dropped)")
    if plan.schedule is not None:  # a FAST plan runs its schedule, not one density cut
        from .plan.viz import plot_schedule

        sched_png = path.with_name(f"{args.plan.name.split('.')[0]}.schedule.png")
        check_output_path(sched_png, "schedule picture")
        print(f"wrote {plot_schedule(plan, sched_png)} (the FAST schedule that runs: density "
              f"per layer and timestep bucket)")
    return 0


# ---- fast ----------------------------------------------------------------------------------------

def add_fast_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.set_defaults(model=None)  # the plan's recorded model (run_fast says so)
    model = next(a for a in p._actions if a.dest == "model")
    model.help = model.help.replace("(default: tiny)", "(default: the plan's recorded --model)")
    add_image_argument(p)
    p.add_argument("--plan", required=True, type=Path, help="WEST plan file (from `west`)")
    p.add_argument("--target-density", required=True, type=float,
                   help="global kept-block fraction in (0, 1], e.g. 0.3")
    p.add_argument("--out", required=True, type=Path, help="plan file to write, with the schedule")
    p.add_argument("--png", type=Path, default=None,
                   help="schedule picture (default: <out stem>.schedule.png next to --out)")
    p.add_argument("--method", default="fast", choices=["fast", "uniform", "dense-first"],
                   help="fast (profiled, head-wise), or a baseline: uniform (one level), "
                        "dense-first (first --dense-fraction of steps dense); default fast")
    p.add_argument("--dense-fraction", type=float, default=0.25,
                   help="dense-first: fraction of steps run dense (default 0.25)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="denoising steps of the profiling run (default: the plan's calibration)")
    p.add_argument("--capture-steps", type=positive_int, default=None,
                   help="steps profiled = timestep buckets, evenly spaced (default: all)")
    p.add_argument("--shift", type=positive_float, default=None,
                   help="flow-matching shift (default 5.0 at >= 720p, else 3.0, as Wan)")
    p.add_argument("--levels", type=levels_arg, default=None,
                   help="WEST thresholds, ascending, ending with 1.0 (default "
                        "0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.65,0.8,1.0)")
    p.add_argument("--rows-per-block", type=positive_int, default=16,
                   help="sampled query rows per 128-row block (default 16)")
    p.add_argument("--allocation", default="lagrange", choices=["lagrange", "curve"],
                   help="how FAST spends the density: 'lagrange' minimises the summed error "
                        "over (layer, step, head) (default); 'curve' is the paper's A(l, t)")
    add_objective_arguments(p)
    p.add_argument("--gamma", type=float, default=1.0,
                   help="curve: A(l, t) curvature (default 1)")
    p.add_argument("--omega", type=float, default=None,
                   help="curve: A(l, t) step weight against layers (default L / T)")
    p.add_argument("--rho", type=float, default=0.1,
                   help="curve: (1 - A_max) / (1 - A_min), loss allowed early/shallow vs "
                        "late/deep (default 0.1)")
    p.add_argument("--reduce", default="mean", choices=["mean", "min"],
                   help="fidelity of a head: mean or min over sampled rows (default mean)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="calibration prompt: .txt (first line) or .safetensors/.pt embeddings "
                        "(first row); default a random embedding")
    p.add_argument("--negative-prompt", default=None, help="with a .txt --prompts: enables CFG")
    p.add_argument("--guidance-scale", type=float, help="default: the pipeline's; bare: CFG 5.0")
    p.add_argument("--text-len", type=positive_int, default=None,
                   help="length of a random embedding (default: 512 for Wan, 16 for tiny)")


def run_fast(args: argparse.Namespace) -> int:
    from .errors import PlanModelMismatch
    from .models.registry import adapter_for, load_transformer
    from .offline import fast
    from .offline.calibrate import default_timesteps, evenly_spaced
    from .plan.io import load_plan
    from .plan.viz import plot_schedule

    t0 = time.perf_counter()
    target = fast.check_target(args.target_density, "--target-density")
    png = args.png or args.out.with_name(f"{args.out.name.split('.')[0]}.schedule.png")
    plan = load_plan(args.plan)
    check_output_path(args.out, "--out")
    check_output_path(png, "--png")
    check_input_file(args.prompts, "--prompts")
    check_input_file(args.image, "--image")
    check_objective(args)
    calib = plan.meta.calibration
    if args.model is None and args.method == "fast":
        args.model = plan_model(calib)
        print(f"--model not given: profiling the plan's model {args.model}")
    steps = args.steps or int(calib.get("num_steps", 50))
    latent = calib.get("latent_shape")
    shift = args.shift
    if shift is None:  # Wan's rule (VAE stride 8): 5.0 at >= 720p, else 3.0
        shift = 5.0 if latent is not None and latent[2] * 8 >= 720 else 3.0
    timesteps = default_timesteps(steps, shift)
    if calib.get("pipeline_timesteps") and args.steps is None:  # what the pipeline's scheduler ran
        timesteps = [float(t) for t in calib["pipeline_timesteps"]]
    if args.method == "uniform":
        schedule = fast.uniform_schedule(plan, target)
    elif args.method == "dense-first":
        schedule = fast.dense_first_schedule(plan, target, timesteps, args.dense_fraction)
    elif (folder := _resolve_model(args)) is not None:
        from .cli_fast import resolve_objective, video_schedule
        from .cli_pipeline import run_fast_pipeline

        args._device = resolve_device(args.device)
        args._dtype = resolve_dtype(args.dtype, args._device)
        plan = run_fast_pipeline(args, folder, plan, target, video_fit=video_schedule,
                                 resolve_objective=resolve_objective)
        schedule = plan.schedule
    else:
        if latent is None:
            raise CliError(f"--plan {args.plan} has no calibration latent_shape; re-extract it "
                           f"with `scaling-attn west`")
        device = args._device = resolve_device(args.device)
        dtype = args._dtype = resolve_dtype(args.dtype, device)
        src = load_transformer(args.model, dtype=dtype, device=device, seed=args.seed)
        ad = adapter_for(model := src.transformer, "--model")
        if (needs := ad.bare_call_needs(model)) is not None:
            raise CliError(f"--model {args.model}: a {type(model).__name__} needs {needs}; pass "
                           f"the whole pipeline folder (with model_index.json)")
        args.num_prompts = 1
        inputs = _west_inputs(args, src, ad)[:1]
        if not inputs:
            raise CliError(f"--prompts {args.prompts}: no calibration input (empty prompt "
                           f"file?)")
        capture = None if args.capture_steps is None else evenly_spaced(steps, args.capture_steps)
        print(f"profiling {src.name}: latents {tuple(latent)}, {steps} steps "
              f"({'all' if capture is None else len(capture)} profiled), target density {target}")
        levels = args.levels or list(fast.DEFAULT_LEVELS)
        try:
            plan.check_model(model)
        except PlanModelMismatch as e:
            made_by = calib.get("source") or "scaling-attn west"
            raise CliError(f"--model {args.model}: {e}. The plan was made by `{made_by}`: pass "
                           f"the same --model") from None
        from .cli_fast import fit_builtin

        plan = fit_builtin(args, plan, model, inputs[0], target, timesteps=timesteps,
                           latent=latent, capture=capture, levels=levels)
        schedule = plan.schedule
    plan = plan.with_schedule(schedule)
    path = plan.save(args.out)
    plot_schedule(plan, png)
    info = schedule.info
    print(plan.summary())
    print(f"{info.get('method')}: achieved global density {info.get('achieved_density', 0):.4f} "
          f"(target {target})")
    print(f"wrote {path} and {png} in {time.perf_counter() - t0:.1f} s")
    return 0


# ---- demo ----------------------------------------------------------------------------------------

def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from .tiny.demo import add_demo_arguments as add

    add(p)


def run_demo(args: argparse.Namespace) -> int:
    from .cli_fast import builtin_video_fit
    from .tiny.demo import main as demo_main

    return demo_main(args, video_fit=builtin_video_fit)


# ---- entry point ---------------------------------------------------------------------------------

COMMANDS: list[Command] = [
    Command("west", "extract the WEST topology by dense calibration and write a plan file",
            add_west_arguments, run_west),
    Command("show", "print a plan's summary and draw a layer's threshold maps as PNG",
            add_show_arguments, run_show),
    Command("fast", "profile head-wise fidelity and write a FAST timestep schedule into a plan",
            add_fast_arguments, run_fast),
    Command("demo", "the tiny Wan end to end: WEST + FAST + compile, dense vs sparse videos, "
            "masks, PSNR/SSIM/time table", add_demo_arguments, run_demo),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaling-attn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def _innermost_file(exc: BaseException) -> Path | None:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return None if tb is None else Path(tb.tb_frame.f_code.co_filename).resolve()


def is_user_error(exc: BaseException) -> bool:
    """Errors that describe the user's input, not a bug: :class:`CliError`, files that cannot be
    read or written (``OSError``), and ``ValueError``/``ImportError`` raised by this package's
    own checks (plan and argument errors; they name the argument and the fix). A
    ``ValueError`` from inside torch or diffusers keeps its traceback."""
    inner = getattr(exc, "inner_exception", None)  # torch.compile's BackendCompilerFailed
    if isinstance(inner, BaseException) and inner is not exc:
        return is_user_error(inner)
    if isinstance(exc, (CliError, OSError)):
        return True
    where = _innermost_file(exc)
    return isinstance(exc, (ValueError, ImportError)) and where is not None and \
        where.is_relative_to(PACKAGE_DIR)


def main(argv: list[str] | None = None) -> int:
    """Run a command. User errors print ``scaling-attn CMD: error: ...`` (one line) to stderr and
    return 2, as argparse does; set SCALING_ATTN_DEBUG=1 for their tracebacks."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as e:
        if os.environ.get(DEBUG_ENV) == "1" or not is_user_error(e):
            raise
        inner = getattr(e, "inner_exception", None)
        msg = " ".join(str(inner if isinstance(inner, BaseException) else e).split())
        print(f"scaling-attn {args.command}: error: {msg or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
