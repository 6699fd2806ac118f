"""Issue 20: does tile token order beat raster order at equal density, and what does a step cost?

    python benchmarks/bench_tile_order.py                      # quality, bundled tiny Wan, CPU
    python benchmarks/bench_tile_order.py --orders raster,tile,tile:2x8x8,tile:1x8x16
    python benchmarks/bench_tile_order.py --methods west_fast,west_uniform --densities 0.5,0.35,0.25
    python benchmarks/bench_tile_order.py --recall --orders raster,tile,tile:2x8x8,tile:1x8x16 \\
        --densities 0.15,0.25,0.35,0.5   # oracle kept attention mass per block partition
    python benchmarks/bench_tile_order.py --step --config 14b     # GPU: 14B/720p step, raster vs tile

Quality (default): for each token order in ``--orders`` the demo's pipeline runs on the bundled
tiny Wan (``demo.calibration_captions``/``calibration_input``: WEST on 2 training captions, 4
captured steps; FAST profiled on a third, 6 steps), then the held-out captions are generated
dense (eager model) and sparse (the model compiled with ``scaling_attn_backend``, compiler
"eager": the op's CPU reference) with the same seeds. Methods, at each ``--densities`` target:

``west_fast``     WEST + FAST fitted to the target (what the demo runs);
``west_uniform``  WEST, one threshold everywhere (``fast.uniform_schedule``);
``dense_warmup``  first steps dense, the rest uniform (``fast.dense_first_schedule``; warm-up
                  length by ``quality.methods.warmup_steps``: a quarter, fewer at low targets).

(The energy-filter methods of ``bench_quality.py`` are order-independent in their calibration
only through the masks; they are not run here.) ``density`` is the schedule's kept-block
fraction at the generation grid, averaged over layers, heads and the sampler's steps
(``fast.schedule_density``, as the demo reports it). Metrics against the dense video of the same
caption and seed: ``demo.video_metrics``. One record per (order, method, density, prompt) with
``order``, ``grid``, ``density``, ``psnr``, ``ssim``, ``prompt``, ``seed`` (+ ``rel_l2``,
``method``, ``target_density``, ``token_order``, ``tile_shape``, ``coverage``). A PNG shows, per
prompt, frames of the dense video and of each order's ``west_fast`` video at the first density.

Step (``--step``, CUDA): one transformer forward of a Wan config with random bf16 weights
(``bench_compile.py``'s model and inputs), compiled with the backend on banded ("local") tables
of ``--step-density`` in raster and in tile order; median of ``--repeats`` synchronised
wall-clock steps each, and the permutation's own cost (the four ``index_select`` on the step's
tensors, timed alone). Records go to ``benchmarks/results/tile-order-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
METHODS = ("west_fast", "west_uniform", "dense_warmup")


def _sha() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       cwd=ROOT)
    return r.stdout.strip() or "unknown"


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    return "cpu"


# ---- quality --------------------------------------------------------------------------------

def build_west(model, order, *, latent, ts_all, steps, model_path, num_calib=2,
               calib_capture_steps=4, progress=False):
    """WEST plan in ``order``, on the demo's calibration captions and seeds."""
    from scaling_attn_compile.offline.calibrate import calibrate_west, evenly_spaced
    from scaling_attn_compile.tiny.demo import calibration_captions, calibration_input

    caps = calibration_captions(num_calib + 1)
    inputs = [calibration_input(c, 1000 + i, model_path=model_path)
              for i, c in enumerate(caps[:-1])]
    plan = calibrate_west(model, inputs, ts_all, latent_shape=latent, guidance_scale=1.0,
                          capture_steps=evenly_spaced(steps, calib_capture_steps),
                          progress=progress, source="bench_tile_order", token_order=order)
    return plan, caps[-1]


def schedule_for(method, plan, profile, target, ts_all, tgrid):
    from scaling_attn_compile.offline import fast

    if method == "west_fast":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fast.fit_schedule(profile, target)
    if method == "west_uniform":
        return fast.uniform_schedule(plan, target, grid=tgrid)
    if method == "dense_warmup":
        from scaling_attn_compile.quality.methods import warmup_steps  # the study's rule

        k = warmup_steps(target, len(ts_all))
        return fast.dense_first_schedule(plan, target, ts_all, dense_fraction=k / len(ts_all),
                                         grid=tgrid)
    raise ValueError(f"--methods: expected some of {METHODS}, got {method!r}")


def sparse_videos(model, plan, prompts, gen_kw):
    """The held-out prompts generated by ``model`` compiled with the backend on ``plan``."""
    from scaling_attn_compile.compile.backend import scaling_attn_backend
    from scaling_attn_compile.tiny.tiny_wan import generate

    torch._dynamo.reset()
    backend = scaling_attn_backend(plan, compiler="eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    videos = generate(model, prompts, transformer=compiled, **gen_kw).float().cpu()
    if not backend.reports or backend.reports[-1].num_rewritten == 0:
        raise RuntimeError("bench_tile_order: the backend rewrote no self-attention")
    want = None if plan.token_order.is_raster else str(plan.token_order)
    if backend.reports[-1].token_order != want:
        raise RuntimeError(f"bench_tile_order: compiled in order {backend.reports[-1].token_order}"
                           f", plan is {plan.token_order}")
    return videos


def _cached(path: Path, make):
    """``torch.load(path)`` if it exists, else ``make()`` saved there (CPU runs take minutes)."""
    if path.exists():
        return torch.load(path)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    return value


def run_quality(args, save) -> dict:
    """Quality records; ``save(result)`` is called after each order (a run cut short keeps
    what it measured); sparse and dense videos are cached in ``--cache-dir``."""
    from scaling_attn_compile.contract.token_order import TokenOrder, coverage
    from scaling_attn_compile.offline import fast
    from scaling_attn_compile.offline.calibrate import evenly_spaced
    from scaling_attn_compile.tiny.demo import calibration_input
    from scaling_attn_compile.tiny.metrics import video_metrics
    from scaling_attn_compile.tiny.tiny_wan import ASSET_DIR, generate, load_tiny_wan, sigmas
    from scaling_attn_compile.tiny.tiny_wan import token_grid as tiny_token_grid
    from scaling_attn_compile.tiny.toy_video import held_out_captions

    model_path = Path(args.model_path) if args.model_path else ASSET_DIR
    grid = tuple(args.grid)
    tgrid = tiny_token_grid(grid)
    model = load_tiny_wan("cpu", torch.float32, path=model_path)
    latent = (model.config.in_channels, *grid)
    ts_all = [1000.0 * s for s in sigmas(args.steps).tolist()[:-1]]
    prompts = held_out_captions()[: args.num_prompts]
    gen_kw = dict(grid=grid, steps=args.steps, seed=args.seed, encoder_path=model_path)
    cache = Path(args.cache_dir)
    tag = f"{'x'.join(map(str, grid))}-s{args.steps}-p{len(prompts)}-seed{args.seed}"
    t0 = time.perf_counter()
    with torch.no_grad():
        dense = _cached(cache / f"dense-{tag}.pt",
                        lambda: generate(model, prompts, **gen_kw).float().cpu())
    print(f"[tile-order] dense {len(prompts)} prompts x {args.steps} steps at {grid}: "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    records, videos = [], {}
    config = {"grid": list(grid), "token_grid": list(tgrid), "steps": args.steps,
              "prompts": prompts, "seeds": list(range(args.seed, args.seed + len(prompts))),
              "methods": list(args.methods), "densities": list(args.densities),
              "calibration": "demo: WEST on 2 training captions (4 captured steps), FAST "
                             "profile on a third (6 steps)",
              "sparse": "model compiled with scaling_attn_backend (compiler eager: the op's "
                        "CPU reference), float32"}
    for spec in args.orders:
        order = TokenOrder.parse(spec)
        t0 = time.perf_counter()
        with torch.no_grad():
            plan, fast_cap = build_west(model, order, latent=latent, ts_all=ts_all,
                                        steps=args.steps, model_path=model_path)
            profile = fast.profile_fidelity(
                plan, model, calibration_input(fast_cap, 2000, model_path=model_path),
                timesteps=ts_all, latent_shape=latent, guidance_scale=1.0, progress=False,
                capture_steps=evenly_spaced(args.steps, 6))
        print(f"[tile-order] {order}: WEST + FAST profile {time.perf_counter() - t0:.0f} s",
              flush=True)
        for target in args.densities:
            for method in args.methods:
                t0 = time.perf_counter()
                try:
                    sched = schedule_for(method, plan, profile, target, ts_all, tgrid)
                except ValueError as e:  # e.g. FAST cannot reach the target on this topology
                    print(f"[tile-order] {order} {method} {target}: unreachable ({e})")
                    continue
                sp = plan.with_schedule(sched)
                dens = float(fast.schedule_density(sched, plan.thresholds(tgrid), ts_all).mean())
                with torch.no_grad():
                    sparse = _cached(cache / f"sparse-{tag}-{order}-{method}-{target}.pt",
                                     lambda sp=sp: sparse_videos(model, sp, prompts, gen_kw))
                if method == "west_fast" and target == args.densities[0]:
                    videos[str(order)] = sparse
                for i, p in enumerate(prompts):
                    m = video_metrics(sparse[i], dense[i])
                    records.append({
                        "order": "raster" if order.is_raster else "tile",
                        "token_order": str(order),
                        "tile_shape": list(order.tile_shape(tgrid) or []) or None,
                        "coverage": coverage(tgrid, order), "method": method,
                        "grid": list(grid), "token_grid": list(tgrid),
                        "target_density": target, "density": dens,
                        "psnr": m["psnr_db"], "ssim": m["ssim"], "rel_l2": m["rel_l2"],
                        "prompt": p, "seed": args.seed + i})
                mean = [r for r in records[-len(prompts):]]
                print(f"[tile-order] {str(order):14s} {method:12s} target {target:.2f} density "
                      f"{dens:.3f}  PSNR {sum(r['psnr'] for r in mean) / len(mean):6.2f}  SSIM "
                      f"{sum(r['ssim'] for r in mean) / len(mean):.4f}  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        png = frames_png(dense, videos, prompts, Path(args.png)) if args.png else None
        save({"records": records, "summary": summarise(records), "config": config,
              "png": str(png) if png else None})
    return {"records": records, "summary": summarise(records), "config": config}


def summarise(records) -> list[dict]:
    """Mean PSNR/SSIM per (token order, method, target density)."""
    keys = []
    for r in records:
        k = (r["token_order"], r["method"], r["target_density"])
        if k not in keys:
            keys.append(k)
    out = []
    for k in keys:
        rs = [r for r in records if (r["token_order"], r["method"], r["target_density"]) == k]
        out.append({"token_order": k[0], "method": k[1], "target_density": k[2],
                    "density": rs[0]["density"],
                    "psnr": sum(r["psnr"] for r in rs) / len(rs),
                    "ssim": sum(r["ssim"] for r in rs) / len(rs), "prompts": len(rs)})
    return out


def frames_png(dense, videos: dict, prompts, path: Path, *, frames=(0, 3, 7), scale=3) -> Path:
    """Rows: per prompt, dense then each order's sparse video; columns: ``frames``."""
    from PIL import Image, ImageDraw

    frames = [f for f in frames if f < dense.shape[2]]
    rows = [("dense", dense)] + list(videos.items())
    _, _, _, H, W = dense.shape
    h, w, gap, lab = H * scale, W * scale, 4, 110
    img = Image.new("RGB", (lab + len(frames) * (w + gap), len(prompts) * len(rows) * (h + gap)),
                    "white")
    draw = ImageDraw.Draw(img)
    y = 0
    for i, p in enumerate(prompts):
        for name, v in rows:
            draw.text((2, y + 2), f"{p[:18]}\n{name}", fill=(0, 0, 0))
            for j, f in enumerate(frames):
                fr = ((v[i, :, f].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                fr = fr.permute(1, 2, 0).numpy()
                tile = Image.fromarray(fr).resize((w, h), Image.NEAREST)
                img.paste(tile, (lab + j * (w + gap), y))
            y += h + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# ---- oracle recall: how much attention mass the best mask of each partition can keep -------------

def run_recall(args) -> dict:
    """Per order: the softmax mass the *best* block mask of density ``p`` keeps (each row's top
    ``p`` blocks by mass, the oracle WEST approximates), mean over rows, heads, layers, captured
    steps and captions. A partition whose blocks follow the attention keeps more at equal
    density. Dense runs of training captions (never the held-out prompts)."""
    from scaling_attn_compile.contract.masks import num_blocks
    from scaling_attn_compile.contract.token_order import TokenOrder, permutation
    from scaling_attn_compile.offline import west
    from scaling_attn_compile.offline.calibrate import capture_self_attention, evenly_spaced
    from scaling_attn_compile.tiny.demo import calibration_captions, calibration_input
    from scaling_attn_compile.tiny.tiny_wan import ASSET_DIR, load_tiny_wan, sigmas
    from scaling_attn_compile.tiny.tiny_wan import token_grid as tiny_token_grid

    model_path = Path(args.model_path) if args.model_path else ASSET_DIR
    grid = tuple(args.grid)
    tgrid = tiny_token_grid(grid)
    model = load_tiny_wan("cpu", torch.float32, path=model_path)
    ts_all = [1000.0 * s for s in sigmas(args.steps).tolist()[:-1]]
    orders = [TokenOrder.parse(o) for o in args.orders]
    S = math.prod(tgrid)
    nb = num_blocks(S)
    sums = {str(o): {p: 0.0 for p in args.densities} for o in orders}
    count = [0]

    def on_layer(cap):
        for o in orders:
            perm = permutation(tgrid, o)
            mass = west.block_mass(cap.q[:, :, perm], cap.k[:, :, perm], impl="torch")
            rows = (mass * 128).sort(-1, descending=True).values.cumsum(-1)  # (B, H, NB, NB)
            for p in args.densities:
                k = max(1, math.floor(p * nb))
                sums[str(o)][p] += float(rows[..., k - 1].mean())
        count[0] += 1

    caps = calibration_captions(args.num_prompts)
    inputs = [calibration_input(c, 1000 + i, model_path=model_path) for i, c in enumerate(caps)]
    with torch.no_grad():
        capture_self_attention(model, inputs, ts_all, on_layer,
                               latent_shape=(model.config.in_channels, *grid),
                               capture_steps=evenly_spaced(args.steps, 4), guidance_scale=1.0,
                               progress=False)
    rows = [{"token_order": o, "density": p, "oracle_kept_mass": v / count[0]}
            for o, d in sums.items() for p, v in d.items()]
    for r in rows:
        print(f"[tile-order] recall {r['token_order']:12s} p={r['density']:.2f} kept mass "
              f"{r['oracle_kept_mass']:.4f}", flush=True)
    return {"rows": rows, "config": {"grid": list(grid), "token_grid": list(tgrid),
                                     "captions": caps, "steps": args.steps, "captured_steps": 4,
                                     "maps": count[0]}}


# ---- step time --------------------------------------------------------------------------------

def run_step(args) -> dict:
    """Compiled step time in raster vs tile order (CUDA), and the permutation alone."""
    import bench_compile as bc  # its model and inputs (this script's folder is on sys.path)

    from scaling_attn_compile.compile.backend import scaling_attn_backend
    from scaling_attn_compile.contract.tables import uniform_tables
    from scaling_attn_compile.contract.token_order import (
        TokenOrder,
        inverse_permutation,
        permutation,
    )

    cuda = torch.cuda.is_available()
    if not cuda and args.config != "tiny":
        raise SystemExit("bench_tile_order --step: needs a CUDA GPU (or --config tiny, a CPU "
                         "smoke run whose timings are no record)")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    spec = dict(bc.MODELS[args.config])
    if args.config != "tiny":
        spec["video"] = (args.height, args.width, args.frames)
    L = args.layers or spec["config"]["num_layers"]
    model = bc.build_model(spec, L, device, dtype)
    inputs = bc.make_inputs(spec, device, dtype)
    _, _, f, h, w = bc.latent_shape(spec)
    pt, ph, pw = spec["config"]["patch_size"]
    grid = (f // pt, h // ph, w // pw)
    H = model.config.num_attention_heads
    out = {"config": args.config, "video": list(spec["video"]), "grid": list(grid), "layers": L,
           "density": args.step_density, "pattern": "local", "rows": []}

    def timed(fn, n):
        ts = []
        for _ in range(n):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            ts.append(1e3 * (time.perf_counter() - t0))
        return sorted(ts)[len(ts) // 2], ts

    for spec in args.orders:
        order = TokenOrder.parse(spec)
        tables = uniform_tables(L, H, grid, args.step_density, pattern="local")
        tables.token_order = str(order)
        torch._dynamo.reset()
        backend = scaling_attn_backend(tables)
        compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(**inputs)
            if cuda:
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            med, all_ms = timed(lambda c=compiled: c(**inputs), args.repeats)
        out["rows"].append({"order": "raster" if order.is_raster else "tile",
                            "token_order": str(order), "ms_per_step": med, "all_ms": all_ms,
                            "first_call_s": first,
                            "token_order_applied": backend.reports[-1].token_order})
        print(f"[tile-order] step {str(order):8s} {med:9.1f} ms (first call {first:.0f} s)",
              flush=True)
    # The permutation alone: what the FX step adds, on tensors of the step's shapes.
    S = math.prod(grid)
    C = model.config.num_attention_heads * model.config.attention_head_dim
    D = model.config.attention_head_dim
    x = torch.randn(1, S, C, device=device, dtype=dtype)
    y = torch.randn(1, S, model.config.out_channels * math.prod(model.config.patch_size),
                    device=device, dtype=dtype)  # the output projection's [B, S, C_out]
    rope = torch.randn(1, S, 1, D, device=device, dtype=torch.float32)
    perm = permutation(grid, "tile").to(device)
    inv = inverse_permutation(grid, "tile").to(device)

    def perms():
        x.index_select(1, perm)
        rope.index_select(1, perm)
        rope.index_select(1, perm)
        y.index_select(1, inv)

    perms()
    med, _ = timed(perms, 20)
    out["permutation_ms"] = med
    raster = next((r for r in out["rows"] if r["order"] == "raster"), None)
    tile = next((r for r in out["rows"] if r["order"] == "tile"), None)
    if raster and tile:
        out["tile_over_raster"] = tile["ms_per_step"] / raster["ms_per_step"]
        out["permutation_share_of_step"] = med / raster["ms_per_step"]
    print(f"[tile-order] permutations alone {med:.3f} ms", flush=True)
    return out


# ---- main -------------------------------------------------------------------------------------

def _floats(s):
    return [float(x) for x in s.split(",")]


def main(argv=None) -> int:
    from scaling_attn_compile.args import parse_triple

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orders", type=lambda s: s.split(","), default=["raster", "tile"])
    p.add_argument("--grid", type=parse_triple, default=(8, 64, 64), metavar="F,H,W",
                   help="pixel grid of the tiny Wan (default 8,64,64: 8x32x32 tokens, 64 blocks)")
    p.add_argument("--densities", type=_floats, default=[0.35])
    p.add_argument("--methods", type=lambda s: s.split(","), default=["west_fast"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-path", default=None)
    p.add_argument("--png", default=None,
                   help="frames PNG (default results/tile-order-cpu-frames-<grid>.png)")
    p.add_argument("--out", default=None, help="JSON (default results/tile-order-<device>.json)")
    p.add_argument("--cache-dir", default="/tmp/bench_tile_order_cache",
                   help="dense and sparse videos of earlier runs (same grid, steps, prompts)")
    p.add_argument("--step", action="store_true", help="time a compiled step instead (CUDA)")
    p.add_argument("--recall", action="store_true",
                   help="oracle kept attention mass per order instead (CPU, training captions)")
    p.add_argument("--config", default="14b", choices=["1.3b", "14b", "tiny"])
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--layers", type=int, default=None, help="first N layers only (--step)")
    p.add_argument("--step-density", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: expected some of {METHODS}, got {bad}")
    out = Path(args.out) if args.out else RESULTS / f"tile-order-{_device_name()}.json"
    if args.png is None and not args.step:
        args.png = str(RESULTS / f"tile-order-{_device_name()}-frames-{'x'.join(map(str, args.grid))}.png")
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__,
           "python": platform.python_version(), "git_sha": _sha(), "device": _device_name(),
           "threads": torch.get_num_threads()}
    gname = "x".join(map(str, args.grid))
    part = "step" if args.step else f"recall_{gname}" if args.recall else f"quality_{gname}"

    def save(result: dict) -> None:
        """Merge into the record file: records of other orders/methods/densities stay."""
        old = json.loads(out.read_text()) if out.exists() else {}
        prev = old.get(part, {})
        if part.startswith("quality") and prev.get("records"):
            key = lambda r: (r["token_order"], r["method"], r["target_density"], r["prompt"])  # noqa: E731
            new = {key(r) for r in result["records"]}
            result["records"] = [r for r in prev["records"] if key(r) not in new] + \
                result["records"]
            result["summary"] = summarise(result["records"])
        old[part] = {**result, "environment": env}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(old, indent=1))
        print(f"[tile-order] wrote {out}", flush=True)

    if args.step:
        save(run_step(args))
    elif args.recall:
        save(run_recall(args))
    else:
        run_quality(args, save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
