"""Question: how much faster is one HunyuanVideo transformer step (joint [video | text]
attention) compiled with our backend than eager diffusers and Inductor, dense and sparse?

    python benchmarks/bench_hunyuan.py                               # 720x1280x129, 2+4 layers
    python benchmarks/bench_hunyuan.py --double 20 --single 40 --repeats 3   # the full model
    python benchmarks/bench_hunyuan.py --tiny                        # CPU smoke run

Rows as ``bench_compile.py`` (``eager``, ``inductor``, ``ours-dense``, ``ours-0.5``,
``ours-0.25``), random bf16 weights at HunyuanVideo's config (24 heads x 128, 20 double- and 40
single-stream blocks; fewer by default, said in the output: at 720p one layer's attention over
118,800 + 256 tokens is ~1.7e14 FLOP, ~0.35 s, so 60 layers is ~20 s a step). B = 1, 256 text
tokens of which 200 are real (the rest padding: the op's ``kv_lens``). The plans are
``uniform_tables`` over the video grid; the joint tables keep text rows, text columns and the
straddling block dense, so the bound density is a little above the row's.

Writes ``benchmarks/results/hunyuan-<gpu>.json`` (records of other rows kept).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_compile as bc  # noqa: E402

from scaling_attn_compile.models.hunyuan import BUILTIN_CONFIGS  # noqa: E402
from scaling_attn_compile.models.source import build_on_device  # noqa: E402

VIDEO = (720, 1280, 129)  # HunyuanVideoPipeline's default height, width, frames
VAE = (4, 8, 8)
TEXT, REAL_TEXT = 256, 200


def inputs_for(cfg: dict, video, device, dtype):
    h, w, frames = video
    g = torch.Generator().manual_seed(0)
    latent = (1, cfg["in_channels"], (frames - 1) // VAE[0] + 1, h // VAE[1], w // VAE[2])
    mask = torch.zeros(1, TEXT)
    mask[:, :REAL_TEXT] = 1
    return latent, dict(
        hidden_states=torch.randn(latent, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, TEXT, cfg["text_embed_dim"], generator=g).to(
            device, dtype),
        encoder_attention_mask=mask.to(device),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(
            device, dtype),
        guidance=torch.tensor([6000.0], device=device, dtype=dtype),
        timestep=torch.tensor([500], device=device))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--double", type=int, default=2, help="double-stream blocks (of 20)")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks (of 40)")
    ap.add_argument("--rows", nargs="+", default=list(bc.ROWS), choices=list(bc.ROWS))
    ap.add_argument("--pattern", default="local", choices=["local", "random"])
    ap.add_argument("--rep-ms", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=None,
                    help="GPU: median of this many CUDA-event-timed steps instead of do_bench")
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        device, dtype, video = "cpu", torch.float32, (96, 96, 13)
        cfg = dict(BUILTIN_CONFIGS["hunyuan-tiny-random"], num_layers=args.double,
                   num_single_layers=args.single)
        args.out = args.out or os.path.join(tempfile.gettempdir(), "hunyuan-cpu-tiny.json")
    elif not torch.cuda.is_available():
        print("bench_hunyuan: needs a CUDA GPU (use --tiny for a CPU smoke run)", file=sys.stderr)
        return 2
    else:
        device, dtype, video = "cuda", torch.bfloat16, VIDEO
        cfg = dict(BUILTIN_CONFIGS["hunyuanvideo"], num_layers=args.double,
                   num_single_layers=args.single)
    env = bc.environment(device)
    env.update(pattern=args.pattern, text_tokens=TEXT, real_text_tokens=REAL_TEXT)
    print(env, flush=True)
    path, stored = bc.record_file(args, env, "hunyuan")
    name = "HunyuanVideo" + (" (tiny)" if args.tiny else "")
    layers, layers_of = args.double + args.single, 60
    from diffusers import HunyuanVideoTransformer3DModel

    model = build_on_device(HunyuanVideoTransformer3DModel, cfg, dtype=dtype, device=device)
    latent, inputs = inputs_for(cfg, video, device, dtype)
    p, pt = cfg["patch_size"], cfg["patch_size_t"]
    grid = (latent[2] // pt, latent[3] // p, latent[4] // p)
    s = math.prod(grid) + TEXT
    print(f"== {name}: {args.double} double + {args.single} single blocks (of 20 + 40), video "
          f"{video}, latent {latent}, grid {grid}, S={s} (video {math.prod(grid)} + text {TEXT})",
          flush=True)
    spec = dict(config=cfg)
    old = [bc.Record(**{**r, "video": tuple(r["video"]), "grid": tuple(r["grid"])})
           for r in stored.get("records", [])]
    new, eager_ms = [], None
    for row in args.rows:
        torch._dynamo.reset()
        gc.collect()
        rec = bc.Record(name, layers, layers_of, video, grid, s, row, None, None, None, None)
        try:
            ms, first, peak, density, rewritten = bc.run_row(
                row, model, inputs, spec, layers, grid, device, args.pattern, {}, args.rep_ms,
                args.repeats)
            rec.ms, rec.first_call_s, rec.peak_mem_gib = ms, first, peak
            rec.density, rec.rewritten_layers = density, rewritten
            eager_ms = ms if row == "eager" else eager_ms
            rec.speedup_vs_eager = eager_ms / ms if eager_ms else None
        except torch.cuda.OutOfMemoryError as e:
            rec.error = f"OOM: {str(e).splitlines()[0][:120]}"
        print(f"  {row:10s} " + (rec.error or f"{rec.ms:9.1f} ms/step"), flush=True)
        new.append(rec)
        keys = {(r.model, r.layers, r.row) for r in new}
        records = [r for r in old if (r.model, r.layers, r.row) not in keys] + new
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"question": __doc__.split("\n\n")[0], "env": env, "config": cfg,
                       "records": [asdict(r) for r in records]}, f, indent=1)
    bc.print_table(new)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
