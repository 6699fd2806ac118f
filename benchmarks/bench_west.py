"""Question: does WEST extraction for Wan2.1-14B at 720x1280x81 fit one 80 GB GPU, and how long
does one calibration input take?

    python benchmarks/bench_west.py                                   # 14B, 720p, 81 frames, GPU
    python benchmarks/bench_west.py --layers 8                        # fewer layers (said in output)
    python benchmarks/bench_west.py --config tiny-random --height 64 --width 64 --frames 9 \\
        --device cpu                                                  # CPU smoke run

Random weights (speed and memory do not depend on them). Per calibration input the trajectory
runs ``--steps`` denoising steps and captures every one of them (the worst case). Measured:

* dense forward time per step (no capture), for reference;
* extraction time per calibration input and per captured step (dense forward + q/k capture +
  block mass + threshold update, all layers);
* the block-mass kernel alone at the layer's shape (``triton.testing.do_bench`` median);
* peak GPU memory (``torch.cuda.max_memory_allocated``), and the weights' share of it;
* size of the plan file and of the materialised tables (5 levels) for that grid.

With ``--layers N`` below the config's count, times are also extrapolated linearly to all layers
(marked ``extrapolated``). Writes ``benchmarks/results/west-<gpu>.json`` with GPU, versions and
git SHA.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch

from scaling_attn_compile.models.wan import (
    BUILTIN_CONFIGS,
    BUILTIN_TEXT_LEN,
    latent_shape_for,
    latent_token_grid,
    load_transformer,
)
from scaling_attn_compile.offline import west
from scaling_attn_compile.offline.calibrate import (
    calibrate_west,
    capture_self_attention,
    default_timesteps,
    random_inputs,
)


def environment(device) -> dict:
    return _common.environment(_common.gpu_name(device))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def kernel_ms(q, k, impl, device) -> float:
    fn = lambda: west.block_mass(q, k, impl=impl)
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=3, rep=20, return_mode="median")
    return timed(fn, device)[0] * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="wan2.1-14b", choices=sorted(BUILTIN_CONFIGS))
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--layers", type=int, default=None, help="use only N layers (default: all)")
    p.add_argument("--inputs", type=int, default=1, help="calibration inputs (default 1)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps per input, all captured")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--block-mass", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/west-<gpu>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    full_layers = BUILTIN_CONFIGS[args.config]["num_layers"]
    layers = args.layers or full_layers
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    t_build, src = timed(lambda: load_transformer(args.config, dtype=dtype, device=device,
                                                  num_layers=layers), device)
    model = src.transformer
    cfg = model.config
    weights_gb = sum(t.numel() * t.element_size() for t in model.parameters()) / 1e9
    latent = latent_shape_for(args.frames, args.height, args.width, cfg.in_channels)
    grid = latent_token_grid(model, latent)
    S, H, D = math.prod(grid), cfg.num_attention_heads, cfg.attention_head_dim
    inputs = random_inputs(args.inputs, BUILTIN_TEXT_LEN[args.config], cfg.text_dim)
    ts = default_timesteps(args.steps, 5.0 if args.height >= 720 else 3.0)
    note = "" if layers == full_layers else f" (ONLY {layers} of {full_layers} layers)"
    print(f"{args.config}{note}: {args.frames}x{args.height}x{args.width} -> grid {grid}, S={S}, "
          f"H={H}, D={D}, {dtype}, {device}; weights {weights_gb:.1f} GB, built in {t_build:.1f} s")

    # Kernel alone, at this layer's shape (also compiles it before the timed extraction).
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, S, H, D, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(1, S, H, D, generator=g).to(device, dtype).transpose(1, 2)
    west.block_mass(q, k, impl=args.block_mass)
    ms_kernel = kernel_ms(q, k, args.block_mass, device)
    del q, k
    flops = 4 * H * S * S * D  # two QK^T passes
    print(f"block mass kernel: {ms_kernel:.1f} ms per layer ({flops / ms_kernel / 1e9:.0f} TFLOP/s "
          f"counting both QK^T passes)")

    # Dense step for reference: capture installed but disabled costs nothing extra.
    t_dense, _ = timed(lambda: capture_self_attention(
        model, inputs[:1], ts[:1], lambda c: None, latent_shape=latent, capture_steps=[],
        progress=False), device)
    print(f"dense forward (1 step, no capture): {t_dense:.2f} s")

    t_west, plan = timed(lambda: calibrate_west(model, inputs, ts, latent_shape=latent,
                                                block_mass_impl=args.block_mass), device)
    per_input = t_west / len(inputs)
    per_step = per_input / len(ts)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None

    with tempfile.TemporaryDirectory() as tmp:
        plan_mb = plan.save(Path(tmp) / "p.safetensors").stat().st_size / 1e6
    tables = plan.materialize(grid, levels=[0.1, 0.2, 0.3, 0.5, 1.0], device=device)
    tables_mb = tables.nbytes() / 1e6
    scale = full_layers / layers
    rec = {
        "question": "WEST extraction time per calibration input and peak memory",
        "config": args.config, "layers_run": layers, "layers_full": full_layers,
        "video": [args.frames, args.height, args.width], "grid": list(grid), "S": S, "H": H,
        "D": D, "NB": plan.codes.shape[-1], "dtype": str(dtype), "inputs": len(inputs),
        "steps_per_input": len(ts), "build_s": t_build, "weights_gb": weights_gb,
        "block_mass_ms_per_layer": ms_kernel,
        "block_mass_tflops": flops / ms_kernel / 1e9,
        "dense_step_s": t_dense, "west_s_per_input": per_input, "west_s_per_captured_step": per_step,
        "peak_gpu_gb": peak, "plan_file_mb": plan_mb, "tables_5_levels_mb": tables_mb,
        "extrapolated_all_layers": None if layers == full_layers else {
            "west_s_per_input": per_input * scale, "west_s_per_captured_step": per_step * scale,
            "dense_step_s": t_dense * scale, "plan_file_mb": plan_mb * scale,
            "tables_5_levels_mb": tables_mb * scale,
            "note": "linear in layers; peak memory is not extrapolated (weights scale, "
                    "activations do not)"},
        "env": environment(device),
    }
    print(f"\n{'metric':38s} value{note}")
    rows = [("extraction s / calibration input", f"{per_input:.1f}"),
            ("extraction s / captured step", f"{per_step:.2f}"),
            ("dense forward s / step", f"{t_dense:.2f}"),
            ("block mass ms / layer", f"{ms_kernel:.1f}"),
            ("peak GPU memory GB", "n/a" if peak is None else f"{peak:.1f}"),
            ("plan file MB", f"{plan_mb:.1f}"),
            ("materialised tables (5 levels) MB", f"{tables_mb:.1f}")]
    for name, val in rows:
        print(f"{name:38s} {val}")
    if rec["extrapolated_all_layers"]:
        e = rec["extrapolated_all_layers"]
        print(f"extrapolated to {full_layers} layers: {e['west_s_per_input']:.1f} s / input, "
              f"tables {e['tables_5_levels_mb']:.0f} MB")
    slug = re.sub(r"[^a-z0-9]+", "-", rec["env"]["gpu"].lower()).strip("-")
    out = args.out or Path(__file__).parent / "results" / f"west-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
