"""``scaling-attn demo``: the whole pipeline on a bundled Wan, end to end, in minutes on a CPU.

    scaling-attn demo                      # small-wan: CPU 4x128x128, 16 steps; CUDA 16x128x128, 50
    scaling-attn demo --model tiny-wan --model-path /tmp/tw --target-density 0.25 --out demo_out

Which model (``--model``, ``tiny.registry``): small-wan, the photo-trained Wan. On the CPU it runs
4 frames (4x32x32 tokens = 32 blocks per video: a block is a 3D tile of 4x4x8 tokens) for 16
steps, in minutes; on CUDA its native grid (16,384 tokens = 128 blocks per video, the
granularity the quality study measures). The tiny Wan (``--model tiny-wan``, 16 blocks at
8x32x32: a block is half a frame) is faster but its sparse frames show block seams.

Stages (each timed):

1. load the model and its caption encoder from ``--model-path`` (default: the bundled assets);
2. WEST: dense calibration runs on a few *training* captions -> threshold codes (``calibrate_west``);
3. FAST: one profiling run (a training caption not used in 2) -> head-wise schedule fitted to
   ``--target-density``; with ``--objective video`` (the default) each (layer, step)'s error
   is weighted by its measured cost in the video, from ``L + T + 1`` probe generations at half
   the height and width and half the steps (``cli_fast.builtin_video_fit``, which the CLI
   passes in);
4. compile the transformer with ``scaling_attn_backend(plan)`` (CPU: the op's kept-blocks path, kernels/block_gather_cpu.py);
5. generate the *held-out* captions dense (eager model) and sparse (compiled), same seeds;
6. write to ``--out``: ``side_by_side.gif`` (dense | sparse per prompt), ``masks_layer<i>.png``,
   ``schedule.png``, ``blocks.png`` (which tokens each mask block holds, ``--token-order``), ``plan.safetensors``, ``results.md``, ``results.json``.

Metrics of the sparse video against the dense one of the same prompt and seed (``metrics.py``):
PSNR, SSIM and relative L2. Density is kept blocks / all
blocks (diagonal included) of the schedule's masks at the generation grid, averaged over layers,
heads and the sampler's steps.

Calibration, profiling and sampling share one trajectory definition: rectified-flow Euler on
``tiny_wan.sigmas(steps, shift)`` with ``timestep = 1000 t`` and noise seeded per sample, so
``calibrate.capture_self_attention`` sees exactly what the model's ``generate`` will run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from .metrics import video_metrics

COLUMNS = ("prompt", "density", "psnr_db", "ssim", "rel_l2")
CPU_GRID = (8, 32, 32)  # tiny-wan on the CPU: 16 blocks, ~3 min on 2 cores
CUDA_GRID = (12, 64, 64)  # tiny-wan on CUDA (small-wan runs its native grid)
# small-wan on the CPU: 4 of its 16 frames at full size, 4x32x32 tokens = 32 blocks, 16 steps.
# tiny-wan's 16 blocks (a block is half a frame) showed seams at 0.35 (22.7 dB); here a block is
# 4 token rows of one frame and the sparse video measured 25.8 dB with no visible seams.
SMALL_WAN_CPU = ((4, 128, 128), 16)
DEFAULT_MODEL = {"cpu": "small-wan", "cuda": "small-wan"}


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from ..args import add_token_order_argument, parse_triple, positive_int

    p.add_argument("--model", default="auto", choices=["auto", "tiny-wan", "small-wan"],
                   help="bundled model (default auto: small-wan; with --model-path, the one "
                        "whose patch size the folder's config has)")
    p.add_argument("--model-path", type=Path, default=None,
                   help="the model's folder (config.json, diffusion_pytorch_model.safetensors, "
                        "caption_encoder.safetensors); default: its bundled assets/<model>/")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out/)")
    p.add_argument("--target-density", type=float, default=0.35,
                   help="FAST global kept-block fraction (default 0.35)")
    p.add_argument("--grid", type=parse_triple, default=None, metavar="F,H,W",
                   help=f"video size in pixels (= latents): default for small-wan (patch 1x4x4) "
                        f"{'x'.join(map(str, SMALL_WAN_CPU[0]))} on CPU, its native 16x128x128 "
                        f"on CUDA; for tiny-wan (patch 1x2x2) {'x'.join(map(str, CPU_GRID))} on "
                        f"CPU, {'x'.join(map(str, CUDA_GRID))} on CUDA")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="Euler steps of every run (default: 16 tiny-wan; small-wan 16 on CPU, "
                        "50 on CUDA)")
    p.add_argument("--shift", type=float, default=1.0, help="flow shift of the sigma schedule (default 1)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance (default 1.0 = off, as the model card samples)")
    p.add_argument("--num-calib", type=int, default=2, help="training captions for WEST (default 2)")
    p.add_argument("--calib-capture-steps", type=int, default=4,
                   help="steps captured per WEST calibration run, evenly spaced (default 4)")
    p.add_argument("--fast-capture-steps", type=int, default=6,
                   help="steps profiled by FAST = timestep buckets (default 6)")
    p.add_argument("--num-prompts", type=int, default=3, help="held-out captions generated (default 3)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the generated videos")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--compiler", default="inductor", choices=["inductor", "eager"],
                   help="what compiles the rewritten graph (default inductor; eager skips "
                        "Inductor codegen, same op)")
    p.add_argument("--layers-to-plot", default=None,
                   help="comma-separated layers for masks PNGs (default: first and last)")
    p.add_argument("--objective", default="video", choices=["video", "attention"],
                   help="FAST's fit: 'video' (default) weights each (layer, step)'s attention "
                        "error by its measured cost in the video, from probes at half the "
                        "height and width and half the steps, as scaling-attn fast's default; "
                        "'attention' skips the probes (small-wan, CPU grid, density 0.35: "
                        "30.35 vs 26.85 dB)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_token_order_argument(p)


# ---- metrics -------------------------------------------------------------------------------------


# ---- outputs -------------------------------------------------------------------------------------

def write_gif(dense, sparse, path: Path, captions: list[str], *, scale: int = 4, fps: int = 6) -> Path:
    """Animated GIF: one row per prompt, dense | sparse, frames upscaled ``scale``x (nearest)."""
    import torch
    from PIL import Image, ImageDraw

    def to_u8(v):  # (C, F, H, W) in [-1, 1] -> (F, H*s, W*s, 3) uint8
        v = ((v.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        v = v.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        return v.permute(1, 2, 3, 0)

    label_h, gap = 14, 4
    rows = []
    for d, s in zip(dense, sparse, strict=True):
        d, s = to_u8(d), to_u8(s)
        sep = torch.full((d.shape[0], d.shape[1], gap, 3), 255, dtype=torch.uint8)
        rows.append(torch.cat([d, sep, s], dim=2))
    T, h, w, _ = rows[0].shape
    frames = []
    for t in range(T):
        canvas = Image.new("RGB", (w, len(rows) * (h + label_h)), "white")
        draw = ImageDraw.Draw(canvas)
        for i, r in enumerate(rows):
            y = i * (h + label_h)
            draw.text((2, y + 1), f"{captions[i]}: dense | sparse", fill=(0, 0, 0))
            canvas.paste(Image.fromarray(r[t].numpy()), (0, y + label_h))
        frames.append(canvas)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


def markdown_table(rows: list[dict], timings: dict, meta: dict) -> str:
    lines = [f"# scaling-attn demo: {meta['model']}",
             "",
             f"grid {meta['grid']} pixels -> tokens {meta['token_grid']} (S = {meta['seq_len']}, "
             f"{meta['num_blocks']} blocks of 128), {meta['steps']} steps, device {meta['device']}, "
             f"target density {meta['target_density']}, FAST fit {meta['fast_fit_density']:.4f}",
             "",
             "| prompt | density | PSNR (dB) | SSIM | rel L2 |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt']} | {r['density']:.3f} | {r['psnr_db']:.2f} | {r['ssim']:.4f} "
                     f"| {r['rel_l2']:.4f} |")
    lines += ["", "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


# ---- the demo ------------------------------------------------------------------------------------

def calibration_captions(n: int) -> list[str]:
    """``n`` training captions (never held out), spread over the training triples."""
    from .toy_video import train_triples

    tr = train_triples()
    n = max(1, min(n, len(tr)))
    return [" ".join(tr[((i * len(tr)) // n + i % 3) % len(tr)]) for i in range(n)]


def calibration_input(caption: str, seed: int, *, model_path=None, guidance_scale: float = 1.0):
    """A :class:`~scaling_attn_compile.offline.calibrate.CalibrationInput` for one caption of the tiny
    Wan's encoder (with the null caption as negative when ``guidance_scale != 1``)."""
    from ..offline.calibrate import CalibrationInput
    from .tiny_wan import encode_captions

    emb = encode_captions([caption], path=model_path)
    neg = encode_captions([""], path=model_path) if guidance_scale != 1.0 else None
    return CalibrationInput(emb, seed=seed, negative_prompt_embeds=neg, name=caption)


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = time.perf_counter() - self.t0
                print(f"[demo] {name}: {timer.times[name]:.1f} s", flush=True)

        return _Ctx()


def _auto_model(device_type: str, model_path: Path | None) -> str:
    """``--model auto``: small-wan, or for a ``--model-path`` folder the bundled model whose
    patch size its config has (tiny-wan 1x2x2, small-wan 1x4x4; a folder written by
    ``train_tiny`` is a tiny-wan)."""
    if model_path is not None and (Path(model_path) / "config.json").exists():
        config = json.loads((Path(model_path) / "config.json").read_text())
        return "small-wan" if list(config.get("patch_size", [])) == [1, 4, 4] else "tiny-wan"
    if model_path is not None:
        return "tiny-wan"  # no folder yet: the missing-weights error names tiny-wan's trainer
    return DEFAULT_MODEL.get(device_type, "small-wan")


# The video objective's probes run on a cheaper setting (offline/fast_response.cheap_probe_setting,
# as `scaling-attn fast`): half the height and width and half the steps, full size below 8 blocks.


def _video_schedule(args, video_fit, model, plan, prof, cal_in, target, ts_all, latent):
    """FAST's schedule with the video objective, or ``None`` (with a line saying why) where the
    probes cannot run: no probe function (called outside the CLI), or probes that change
    nothing (a grid so small that the reference level keeps every block)."""
    from ..offline.fast_response import cheap_probe_setting

    if video_fit is None:
        print("[demo] --objective video needs the probes `scaling-attn demo` wires in; fitting "
              "the attention objective", flush=True)
        return None
    probe, probe_steps = cheap_probe_setting(latent[1:], model.config.patch_size, len(ts_all),
                                             len(prof.timesteps))
    try:
        return video_fit(model, plan, prof, cal_in, target, timesteps=ts_all, latent=latent,
                         guidance_scale=args.guidance_scale, probe_latent=probe,
                         probe_steps=probe_steps, progress=not args.quiet)
    except ValueError as e:
        print(f"[demo] --objective video: {e}; fitting the attention objective", flush=True)
        return None


def run_demo(args: argparse.Namespace, video_fit=None) -> dict:
    """Run the demo; returns what ``results.json`` holds (rows, timings, meta, files).
    ``video_fit``: ``cli_fast.builtin_video_fit`` (the CLI passes it; this module sits below
    the probes' code in the import floors), for ``--objective video``."""
    import torch

    from ..args import resolve_device, resolve_dtype
    from ..compile.backend import scaling_attn_backend
    from ..contract.masks import num_blocks
    from ..offline import fast
    from ..offline.calibrate import calibrate_west, evenly_spaced
    from ..plan.viz import plot_block_layout, plot_layer, plot_schedule
    from .registry import get_model

    progress = not args.quiet
    target = fast.check_target(args.target_density, "--target-density")
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    name = _auto_model(device.type, args.model_path) if args.model == "auto" else args.model
    spec = get_model(name, args.model_path)
    model_path = spec.path
    if not (model_path / spec.weights_name).exists():
        raise SystemExit(
            f"demo: no {name} weights at {model_path} ({spec.weights_name} missing). The bundled "
            f"model ships in scaling_attn_compile/assets/{name}/; if it is not there yet, pass "
            f"--model-path to a folder written by its trainer (e.g. `python -m "
            f"scaling_attn_compile.tiny.train_tiny --out DIR`)")
    cpu_small = name == "small-wan" and device.type != "cuda"
    steps = args.steps or (SMALL_WAN_CPU[1] if cpu_small else spec.steps)
    if args.grid:
        grid = tuple(args.grid)
    elif name == "tiny-wan":
        grid = CUDA_GRID if device.type == "cuda" else CPU_GRID
    else:
        grid = SMALL_WAN_CPU[0] if cpu_small else spec.native_grid
    tgrid = spec.token_grid(grid)
    S = math.prod(tgrid)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    print(f"[demo] {name} from {model_path}, grid {grid} -> tokens {tgrid} (S = {S}, "
          f"{num_blocks(S)} blocks), {steps} steps, {device} {dtype}", flush=True)

    with timer("load model"):
        model = spec.load(device, dtype)
        # WEST calibration and FAST profiling take the model's compute dtype from the adapter;
        # they run on an fp32 copy (7.5M parameters at most) so the plan is fitted on exact
        # attention; the plan's weight fingerprint rounds to bf16, so it matches the bf16 model
        # that is compiled and sampled.
        calib_model = model if dtype == torch.float32 else spec.load(device, torch.float32)
    C = model.config.in_channels
    latent = (C, *grid)
    ts_all = spec.timesteps(steps, args.shift)  # what generate runs
    cfg = args.guidance_scale != 1.0

    def calib_input(caption: str, seed: int):
        return spec.calibration_input(caption, seed, guidance_scale=args.guidance_scale)

    caps = spec.training(args.num_calib + 1)
    west_caps, fast_cap = caps[:-1], caps[-1]
    with timer("WEST calibration"), torch.no_grad():
        inputs = [calib_input(c, 1000 + i) for i, c in enumerate(west_caps)]
        plan = calibrate_west(calib_model, inputs, ts_all, latent_shape=latent,
                              capture_steps=evenly_spaced(len(ts_all), args.calib_capture_steps),
                              guidance_scale=args.guidance_scale, progress=progress,
                              source=f"scaling-attn demo ({name}, {model_path.name})",
                              token_order=args.token_order)
    with timer("FAST profile + fit"), torch.no_grad():
        cal_in = calib_input(fast_cap, 2000)
        prof = fast.profile_fidelity(
            plan, calib_model, cal_in, timesteps=ts_all, latent_shape=latent,
            capture_steps=evenly_spaced(len(ts_all), args.fast_capture_steps),
            guidance_scale=args.guidance_scale, progress=progress)
        schedule = None
        if args.objective == "video":
            # The probes run the model the demo generates with (bf16 on CUDA): they go through
            # the op's semantics, whose CUDA kernel takes fp16/bf16, not the fp32 copy.
            schedule = _video_schedule(args, video_fit, model, plan, prof, cal_in,
                                       target, ts_all, latent)
        if schedule is None:
            schedule = fast.fit_schedule(prof, target)
        plan = plan.with_schedule(schedule)
    fit = float(plan.schedule.info.get("achieved_density", float("nan")))
    plan_path = plan.save(out / "plan.safetensors")
    density = float(fast.schedule_density(plan.schedule, plan.thresholds(tgrid), ts_all).mean())
    print(f"[demo] FAST fit density {fit:.4f} (target {target}); density over the {len(ts_all)} "
          f"sampler steps {density:.4f}", flush=True)

    with timer("plots"):
        L = plan.num_layers
        layers = ([int(x) for x in args.layers_to_plot.split(",")] if args.layers_to_plot
                  else sorted({0, L - 1}))
        pngs = [plot_layer(plan, li, out / f"masks_layer{li}.png", density=target)
                for li in layers]
        pngs.append(plot_schedule(plan, out / "schedule.png"))
        pngs.append(plot_block_layout(tgrid, plan.token_order, out / "blocks.png"))

    prompts = spec.held_out(args.num_prompts)
    B = len(prompts)
    gen_kw = dict(grid=grid, steps=steps, seed=args.seed, guidance_scale=args.guidance_scale,
                  shift=args.shift, progress=progress)
    with timer("compile (sparse backend, first call)"), torch.no_grad():
        backend = scaling_attn_backend(plan, compiler=args.compiler)
        compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
        Bp = 2 * B if cfg else B  # warm up at the shape generate will use
        compiled(hidden_states=torch.zeros(Bp, *latent, device=device, dtype=dtype),
                 timestep=torch.full((Bp,), 500.0, device=device),
                 encoder_hidden_states=spec.encode(prompts + ([""] * B if cfg else []),
                                                   device=device, dtype=dtype),
                 return_dict=False)
    rewritten = sum(r.num_rewritten for r in backend.reports)
    if rewritten == 0:
        raise RuntimeError("demo: the backend rewrote no self-attention call; the sparse run "
                           "would be dense")
    with timer("generate dense"), torch.no_grad():
        dense = spec.generate(model, prompts, **gen_kw)
    with timer("generate sparse"), torch.no_grad():
        sparse = spec.generate(model, prompts, transformer=compiled, **gen_kw)
    dense, sparse = dense.float().cpu(), sparse.float().cpu()

    rows = [{"prompt": p, "density": density, **video_metrics(sparse[i], dense[i])}
            for i, p in enumerate(prompts)]
    rows.append({"prompt": "mean", "density": density,
                 **{k: sum(r[k] for r in rows) / len(rows) for k in COLUMNS[2:]}})
    with timer("write gif"):
        gif = write_gif(dense, sparse, out / "side_by_side.gif", prompts)

    meta = {"model": str(model_path), "model_name": name, "grid": list(grid), "token_grid": list(tgrid), "seq_len": S,
            "num_blocks": num_blocks(S), "steps": steps, "shift": args.shift,
            "guidance_scale": args.guidance_scale, "device": str(device), "dtype": str(dtype),
            "calibration_dtype": str(next(calib_model.parameters()).dtype),
            "target_density": target, "fast_fit_density": fit, "density": density,
            "calibration_captions": west_caps, "fast_caption": fast_cap, "prompts": prompts,
            "seed": args.seed, "compiler": args.compiler, "rewritten_attention_calls": rewritten,
            "num_layers": plan.num_layers, "num_heads": plan.num_heads,
            "token_order": plan.meta.token_order,
            "fast_objective": plan.schedule.info.get("objective", "attention"),
            "video_probes": {k: v for k, v in plan.schedule.info.get("response", {}).items()
                             if k in ("probe_grid", "probe_steps", "generations",
                                      "probe_seconds", "layer_gain", "bucket_gain_by_step")}}
    md = markdown_table(rows, timer.times, meta)
    (out / "results.md").write_text(md)
    files = [str(p) for p in (gif, *pngs, plan_path, out / "results.md", out / "results.json")]
    result = {"columns": list(COLUMNS), "rows": rows, "timings_s": timer.times, "meta": meta,
              "files": files}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(md)
    print(f"[demo] wrote {', '.join(files)}")
    return result


def main(args: argparse.Namespace, video_fit=None) -> int:
    run_demo(args, video_fit=video_fit)
    return 0
