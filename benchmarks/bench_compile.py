"""Question: how much faster is one Wan2.1 transformer step compiled with our backend than eager
diffusers and than ``torch.compile`` with Inductor, with dense and with sparse plans?

    python benchmarks/bench_compile.py                          # 1.3B @ 480x832x81 and 14B @ 720x1280x81
    python benchmarks/bench_compile.py --models 1.3b            # one model per run fits 10 minutes
    python benchmarks/bench_compile.py --models 14b --layers 20 # fewer layers (said in the output)
    python benchmarks/bench_compile.py --models 14b --rows eager ours-0.25   # some rows; merged
    python benchmarks/bench_compile.py --tiny                   # CPU smoke run, tiny config
    python benchmarks/bench_compile.py --models ltx             # LTX-Video 2B @ 480x704x161
    python benchmarks/bench_compile.py --models 1.3b --rows ours-0.25 --regional  # regional compile

Rows, one transformer forward (B=1, CFG off) each, random bf16 weights (speed does not depend on
the weights): ``eager`` (diffusers' default SDPA), ``inductor`` (``torch.compile``, dense
attention), ``ours-dense`` (our backend, all-dense plan), ``ours-0.5`` and ``ours-0.25`` (plans of
that global block density, ``uniform_tables(..., pattern)``); where ``flash_attn.cute`` imports
on an sm90 GPU their lowering also offers FlashAttention-4 (the record's ``picks`` says which
kernel the autotuner kept), and ``ours-dense-nofa4`` / ``ours-0.25-nofa4`` are the same rows with
``SCALING_ATTN_FA4=0`` (the template alone). ``ours-dense-fp8`` / ``ours-0.25-fp8`` /
``ours-0.25-int8`` run 8-bit attention (``precision=``, issue 15) and ``...-fp8-fp8lin`` adds
torchao's float8 linears on every block Linear (in place, so those rows run last; skipped
without torchao). Median ms per step from
``triton.testing.do_bench`` on the GPU (``time.perf_counter`` medians on the CPU), speedup over
eager, first-call (compile) seconds, peak memory.

Compile times are on a cold cache by default: Inductor's and Triton's cache directories point to
a new temporary directory (``--warm-cache`` keeps the usual ones). Rows after the first compiled
one may still reuse in-process caches (autotuning of the same shapes; ``ours-0.5`` has the same
graph as ``ours-dense`` with other table values, so its FX graph cache hits): that is what a user
who swaps plans sees.

``--regional`` compiles as diffusers' regional compilation does,
``transformer.compile_repeated_blocks(...)`` (one compiled block reused by every layer; ours
rows call ``backend.attach(transformer)`` first so each layer reads its own tables), and records
the rows as ``<row>/regional``. Cold compile time, full vs regional (issue 18's bar: regional
under 30 s at 1.3B), is two runs, each in its own process so each starts cold:
``--models 1.3b --rows ours-0.25`` and the same with ``--regional``.

CPU timings (``--tiny``) only show that the script runs; the machine is shared.

Writes ``benchmarks/results/compile-<gpu>.json`` (GPU, torch, triton, diffusers, git SHA, the
configs and the records). Records of earlier runs for other (model, layers, row) keys are kept,
so a model can be measured a few rows at a time within the device's 10-minute limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

if __name__ == "__main__" and "--warm-cache" not in sys.argv:
    # Before torch/triton are imported: both read these when they first touch their caches.
    _cold = tempfile.mkdtemp(prefix="bench_compile_cache_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_cold, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(_cold, "triton")

import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import _common  # noqa: E402
import torch  # noqa: E402

from scaling_attn_compile.compile import lowering  # noqa: E402
from scaling_attn_compile.contract.masks import unpack_blocks  # noqa: E402
from scaling_attn_compile.contract.tables import AttentionTables, uniform_tables  # noqa: E402
from scaling_attn_compile.models.ltx import BUILTIN_CONFIGS as LTX_CONFIGS  # noqa: E402
from scaling_attn_compile.models.source import build_on_device  # noqa: E402
from scaling_attn_compile.models.wan import BUILTIN_CONFIGS  # noqa: E402

# Wan2.1 1.3B/14B are the adapter's BUILTIN_CONFIGS; COMMON is the rest of the tiny smoke model.
COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
              rope_max_seq_len=1024)
MODELS = {
    "1.3b": dict(name="Wan2.1-T2V-1.3B", video=(480, 832, 81), text_len=512,
                 config=dict(BUILTIN_CONFIGS["wan2.1-1.3b"])),
    "14b": dict(name="Wan2.1-T2V-14B", video=(720, 1280, 81), text_len=512,
                config=dict(BUILTIN_CONFIGS["wan2.1-14b"])),
    # Wan2.2: each A14B expert has the 14B architecture; TI2V-5B's VAE has stride (4, 16, 16),
    # so 720p (704x1280x121, its default) is a grid of (31, 22, 40), S = 27,280.
    "a14b": dict(name="Wan2.2-T2V-A14B (one expert)", video=(720, 1280, 81), text_len=512,
                 config=dict(BUILTIN_CONFIGS["wan2.1-14b"])),
    "ti2v-5b": dict(name="Wan2.2-TI2V-5B", video=(704, 1280, 121), text_len=512, vae=(4, 16, 16),
                    config=dict(BUILTIN_CONFIGS["wan2.2-ti2v-5b"])),
    # LTX-Video 2B (family "ltx": packed [B, S, C] latents, grid as forward ints) at
    # LTXPipeline's default 704x480x161: VAE stride (8, 32, 32), grid (21, 15, 22), S = 6,930.
    "ltx": dict(name="LTX-Video-2B", family="ltx", video=(480, 704, 161), text_len=128,
                vae=(8, 32, 32), config=dict(LTX_CONFIGS["ltx-video-2b"])),
    "ltx-tiny": dict(name="tiny LTX (CPU smoke test)", family="ltx", video=(256, 320, 17),
                     text_len=12, vae=(8, 32, 32), config=dict(
                         in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                         num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                         num_layers=2, caption_channels=16)),
    "tiny": dict(name="tiny (CPU smoke test)", video=(128, 160, 13), text_len=24, config=dict(
        COMMON, in_channels=4, out_channels=4, text_dim=32, freq_dim=32, rope_max_seq_len=64,
        num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64)),
}
ROWS = ("eager", "inductor", "ours-dense", "ours-0.5", "ours-0.25", "ours-dense-nofa4",
        "ours-0.25-nofa4", "ours-dense-fp8", "ours-0.25-fp8", "ours-0.25-int8",
        "ours-dense-fp8-fp8lin", "ours-0.25-fp8-fp8lin")
DENSITY = {"ours-dense": 1.0, "ours-0.5": 0.5, "ours-0.25": 0.25}
# "-nofa4": the same row compiled with SCALING_ATTN_FA4=0 (the template alone), for A/B against
# the row without the suffix, whose lowering also offers FlashAttention-4 where it imports.
NOFA4 = "-nofa4"
# Issue 15: "-fp8" / "-int8" compile with precision= (8-bit attention: the pre-pass and the
# 8-bit template since 2876aa4, the eager 8-bit op before); "-fp8lin" also quantizes every block Linear with torchao's float8
# dynamic-activation / float8-weight config (rowwise scales), as the README's one-liner does. The
# quantization is in place, so "-fp8lin" rows run after every other row of a model.
PRECISIONS = ("-fp8", "-int8")
FP8LIN = "-fp8lin"


def row_parts(row: str) -> tuple[str, str | None, bool]:
    """``(density row, precision or None, fp8 linears?)`` of a row name."""
    fp8lin = row.endswith(FP8LIN)
    row = row.removesuffix(FP8LIN)
    precision = next((p[1:] for p in PRECISIONS if row.endswith(p)), None)
    return row.removesuffix(f"-{precision}" if precision else "").removesuffix(NOFA4), \
        precision, fp8lin


def quantize_linears_fp8(model) -> None:
    """torchao float8 (rowwise) on every ``blocks.*`` Linear, in place (README's one-liner).

    ``set_inductor_config=False``: torchao's default turns on Inductor's coordinate-descent
    tuning of every kernel, process-wide; at 14B/720p (H200, 2026-12-06) one block's compile was
    still tuning after 205 s, past the device's limits, and it would also retune the other
    rows' kernels run after it."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                               set_inductor_config=False),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("blocks."))


@dataclass
class Record:
    model: str
    layers: int
    layers_of: int
    video: tuple
    grid: tuple
    seq_len: int
    row: str
    ms: float | None
    speedup_vs_eager: float | None
    first_call_s: float | None
    peak_mem_gib: float | None
    density: float | None = None  # kept blocks / all blocks of the bound tables
    rewritten_layers: int | None = None
    error: str | None = None
    picks: dict | None = None  # what the lowering's autotuner kept: {"fa4" | "template": calls}


def environment(device: str) -> dict:
    import diffusers

    return _common.environment(
        _common.gpu_name(device), diffusers=diffusers.__version__,
        cold_cache="TORCHINDUCTOR_CACHE_DIR" in os.environ
        and "bench_compile_cache_" in os.environ["TORCHINDUCTOR_CACHE_DIR"])


def latent_shape(spec) -> tuple[int, int, int, int, int]:
    """``[B, C, F, H, W]`` of the VAE latents for a video ``(height, width, frames)``."""
    h, w, frames = spec["video"]
    c = spec["config"]["in_channels"]
    st, sh, sw = spec.get("vae", (4, 8, 8))
    return (1, c, (frames - 1) // st + 1, h // sh, w // sw)


def patch_size(spec) -> tuple[int, int, int]:
    """``(pt, ph, pw)``: Wan's ``patch_size`` triple, or LTX's ``patch_size_t`` and ``patch_size``."""
    p = spec["config"]["patch_size"]
    if isinstance(p, int):
        return (spec["config"].get("patch_size_t", 1), p, p)
    return tuple(p)


record_file = _common.record_file  # bench_parallel and bench_tile_order use it from here


def build_model(spec, layers: int, device: str, dtype: torch.dtype):
    """Random weights, built on the device in ``dtype`` (a 14B model never exists in fp32 on the
    host); the modules diffusers keeps in fp32 when loading in bf16 are cast back to fp32."""
    import diffusers

    cls = diffusers.LTXVideoTransformer3DModel if spec.get("family") == "ltx" else \
        diffusers.WanTransformer3DModel
    model = build_on_device(cls, dict(spec["config"], num_layers=layers), dtype=dtype,
                            device=device)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    return model.eval()


def make_inputs(spec, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if spec.get("family") == "ltx":  # packed tokens [B, S, C], the grid as forward ints
        b, c, f, h, w = latent_shape(spec)
        pt, ph, pw = patch_size(spec)
        grid = (f // pt, h // ph, w // pw)
        hidden = torch.randn(b, c, f, h, w, generator=g)
        hidden = hidden.reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw).permute(
            0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)
        text = torch.randn(1, spec["text_len"], spec["config"]["caption_channels"], generator=g)
        return dict(hidden_states=hidden.to(device, dtype), encoder_hidden_states=text.to(
            device, dtype), encoder_attention_mask=torch.ones(1, spec["text_len"], device=device),
            num_frames=grid[0], height=grid[1], width=grid[2],
            timestep=torch.tensor([500], device=device))
    text_dim = spec["config"]["text_dim"]
    return dict(
        hidden_states=torch.randn(latent_shape(spec), generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, spec["text_len"], text_dim, generator=g).to(
            device, dtype),
        timestep=torch.tensor([500], device=device),
    )


def bench_ms(fn, device: str, reps: int, repeats: int | None = None) -> float:
    """Median ms per call. GPU: ``do_bench`` (it makes ~8 calls at least, so for a 10 s step
    ``repeats`` gives a median of that many CUDA-event-timed calls instead)."""
    if device == "cuda" and repeats:
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=1, rep=reps, return_mode="median")  # warmup/rep in ms
    times = []
    for _ in range(max(3, reps // 100)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def uncompile_blocks(model) -> None:
    """Undo ``compile_repeated_blocks`` (``nn.Module.compile`` sets ``_compiled_call_impl``)."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None


# Block patterns of the sparse rows: "local" (a band around the diagonal) and "random" are
# uniform_tables' balanced rows (every row keeps the same count); "windows" (3D windows on the
# latent grid with per-head radii) and "bernoulli" are mask_families.py's ragged rows, closer to
# a WEST plan (heads of different densities, rows of different lengths).
PATTERNS = ("local", "random", "windows", "bernoulli")


def plan_tables(pattern: str, layers: int, heads: int, grid, density: float):
    """One layer's tables per layer at ``density``, in ``pattern`` (:data:`PATTERNS`)."""
    if pattern in ("local", "random") or density >= 1.0:
        return uniform_tables(layers, heads, grid, density, seed=0,
                              pattern="random" if pattern == "random" else "local")
    import mask_families as MF

    family = "local" if pattern == "windows" else pattern
    per_layer = [MF.mask_tables(MF.block_mask(family, heads, grid, density, seed=i), grid)
                 for i in range(layers)]
    first = per_layer[0]
    return AttentionTables(first.grid, [t.masks[0] for t in per_layer],
                           [t.level_tables[0] for t in per_layer], first.bucket_bounds)


def run_row(row, model, inputs, spec, layers, grid, device, pattern, inductor_config, reps,
            repeats=None, regional=False):
    from scaling_attn_compile.compile.backend import scaling_attn_backend

    heads = spec["config"]["num_attention_heads"]
    density = rewritten = None
    backend = None
    fn_model = model  # eager, and regional rows (compile_repeated_blocks compiles in place)
    options = dict(fullgraph=True, dynamic=False)
    if row == "inductor" and regional:
        model.compile_repeated_blocks(backend="inductor", options=dict(inductor_config) or None,
                                      **options)
    elif row == "inductor":
        fn_model = torch.compile(model, backend="inductor", options=dict(inductor_config) or None,
                                 **options)
    elif row != "eager":
        base, precision, _ = row_parts(row)
        tables = plan_tables(pattern, layers, heads, grid, DENSITY[base])
        nb = tables.masks[0].shape[2]
        density = statistics.fmean(unpack_blocks(m[:, 0], nb).float().mean().item()
                                   for m in tables.masks)
        backend = scaling_attn_backend(tables, inductor_config=inductor_config,
                                       **({"precision": precision} if precision else {}))
        if regional:
            backend.attach(model)
            model.compile_repeated_blocks(backend=backend, **options)
        else:
            fn_model = torch.compile(model, backend=backend, **options)

    def step():
        with torch.no_grad():
            return fn_model(**inputs, return_dict=False)[0]

    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    if backend is not None:  # a regional block graph serves every layer
        rewritten = sum(len(r.per_layer) + layers * bool(r.block_sites) for r in backend.reports)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = bench_ms(step, device, reps, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    if regional:
        uncompile_blocks(model)
        for handle in list(getattr(backend, "attached", ())):
            handle.detach()
    return ms, (None if row == "eager" else first), peak, density, rewritten


def print_table(records: list[Record]) -> None:
    print("\n| model | layers | video (HxWxF) | S | row | density | ms / step | speedup vs eager "
          "| first call s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        f = lambda x, fmt: "" if x is None else format(x, fmt)
        video = "x".join(str(v) for v in r.video)
        layers = f"{r.layers}/{r.layers_of}"
        tail = f" ({r.error})" if r.error else ""
        print(f"| {r.model} | {layers} | {video} | {r.seq_len} | {r.row}{tail} | "
              f"{f(r.density, '.3f')} | {f(r.ms, '.1f')} | "
              f"{f(r.speedup_vs_eager, '.2f') + ('x' if r.speedup_vs_eager else '')} | "
              f"{f(r.first_call_s, '.1f')} | {f(r.peak_mem_gib, '.1f')} |")


def check_bars(records: list[Record]) -> None:
    """The issue's bars (H100): ours@0.25 >= 1.9x eager; ours-dense <= 1.25x inductor; compile
    of the full 1.3B model with our backend < 180 s on a cold cache."""
    by = {(r.model, r.layers, r.row): r for r in records if r.ms is not None}
    for (model, layers, row), r in sorted(by.items()):
        if row in ("ours-0.25", "ours-0.25/regional") and r.speedup_vs_eager:
            print(f"bar {model} ({layers} layers): ours@0.25 {r.speedup_vs_eager:.2f}x eager "
                  f"(>= 1.9x: {'met' if r.speedup_vs_eager >= 1.9 else 'NOT met'})")
        ind = by.get((model, layers, "inductor"))
        if row == "ours-dense" and ind:
            ratio = r.ms / ind.ms
            print(f"bar {model} ({layers} layers): ours-dense / inductor = {ratio:.2f} "
                  f"(<= 1.25: {'met' if ratio <= 1.25 else 'NOT met'})")
    # Compile time: only the first of our rows in a run can be cold, and only when no Inductor
    # row ran before it in the same process (they share Inductor's caches).
    for model, layers in {(r.model, r.layers) for r in records if r.model == MODELS["1.3b"]["name"]}:
        rows = [r for r in records if (r.model, r.layers) == (model, layers)]
        for r in rows:  # issue 18: each --regional run is its own process, so cold
            if r.row.startswith("ours") and r.row.endswith("/regional") and r.first_call_s:
                full = next((x for x in rows if x.row == r.row.split("/")[0]), None)
                vs = f"; full graph {full.first_call_s:.0f} s" if full and full.first_call_s else ""
                print(f"bar {model} ({layers} layers): regional compile (first call of {r.row}) "
                      f"{r.first_call_s:.1f} s (< 30 s: "
                      f"{'met' if r.first_call_s < 30 else 'NOT met'}{vs})")
        rows = [r for r in rows if not r.row.endswith("/regional")]
        first = next((i for i, r in enumerate(rows) if r.row.startswith("ours")
                      and r.first_call_s), None)
        if first is None:
            continue
        r, cold = rows[first], not any(x.row == "inductor" for x in rows[:first])
        full = layers == r.layers_of
        verdict = ("met" if r.first_call_s < 180 else "NOT met") if cold else \
            "not cold: an Inductor row ran first and shared its caches; run --rows ours-0.25 alone"
        print(f"bar {model} ({layers} layers): compile (first call of {r.row}) "
              f"{r.first_call_s:.0f} s (< 180 s on a cold cache: {verdict}"
              f"{'' if full else ', and not the full model'})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["1.3b", "14b"], choices=["1.3b", "14b", "a14b", "ti2v-5b", "ltx"])
    ap.add_argument("--layers", type=int, default=None,
                    help="build every model with this many layers (e.g. 14B with 20 of 40)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--pattern", default="local", choices=list(PATTERNS),
                    help="block pattern of the sparse plans: local / random (balanced rows, "
                         "uniform_tables), windows / bernoulli (ragged rows, mask_families.py)")
    ap.add_argument("--max-autotune", action="store_true",
                    help="Inductor max_autotune for the inductor and ours rows")
    ap.add_argument("--rep-ms", type=int, default=2000, help="do_bench repetition time (ms)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="GPU: median of this many CUDA-event-timed steps instead of do_bench "
                    "(for slow steps, e.g. 14B at 720p: ~10 s each)")
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test)")
    ap.add_argument("--tiny-ltx", action="store_true", help="tiny LTX config on the CPU (smoke test)")
    ap.add_argument("--regional", action="store_true",
                    help="compile with transformer.compile_repeated_blocks (regional "
                    "compilation); rows are recorded as <row>/regional")
    ap.add_argument("--warm-cache", action="store_true",
                    help="keep the usual Inductor/Triton caches (default: cold, fresh temp dirs)")
    ap.add_argument("--out", default=None, help="JSON path (default "
                    "benchmarks/results/compile-<gpu>.json; --tiny: $TMPDIR/compile-cpu-tiny.json)")
    args = ap.parse_args(argv)

    if args.tiny_ltx and not args.out:  # CPU timings are no record (as --tiny)
        args.out = os.path.join(tempfile.gettempdir(), "compile-cpu-tiny-ltx.json")
    if args.tiny or args.tiny_ltx:
        device, dtype = "cpu", torch.float32
        keys = (["tiny"] if args.tiny else []) + (["ltx-tiny"] if args.tiny_ltx else [])
    else:
        if not torch.cuda.is_available():
            print("bench_compile: needs a CUDA GPU (use --tiny for a CPU smoke run)",
                  file=sys.stderr)
            return 2
        device, dtype, keys = "cuda", torch.bfloat16, args.models
    inductor_config = {"max_autotune": True} if args.max_autotune else {}
    env = environment(device)
    env["inductor_config"] = inductor_config
    env["pattern"] = args.pattern
    env["regional"] = args.regional
    env["timing"] = (f"median of {args.repeats} CUDA-event-timed steps" if args.repeats
                     and device == "cuda" else "do_bench median" if device == "cuda"
                     else "perf_counter median")
    print(env, flush=True)

    path, stored = record_file(args, env, "compile")
    old = [Record(**{**r, "video": tuple(r["video"]), "grid": tuple(r["grid"])})
           for r in stored.get("records", [])]
    old_models = stored.get("models", {})

    def save(new: list[Record]) -> list[Record]:
        """Write old + new records; called after every row, so a run cut short keeps its rows."""
        keys_new = {(r.model, r.layers, r.row) for r in new}
        records = [r for r in old if (r.model, r.layers, r.row) not in keys_new] + new
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"question": __doc__.split("\n\n")[0], "env": env,
                       "models": {**old_models, **{k: {**v, "config": {**v["config"], "patch_size": list(
                           patch_size(v))}} for k, v in MODELS.items() if k in keys}},
                       "records": [asdict(r) for r in records]}, f, indent=1)
        return records

    new: list[Record] = []
    for key in keys:
        spec = MODELS[key]
        layers_of = spec["config"]["num_layers"]
        layers = args.layers or layers_of
        shape = latent_shape(spec)
        pt, ph, pw = patch_size(spec)
        grid = (shape[2] // pt, shape[3] // ph, shape[4] // pw)
        s = math.prod(grid)
        note = "" if layers == layers_of else f" ({layers} of {layers_of} layers)"
        print(f"== {spec['name']}{note}, video {spec['video']}, latent {shape}, grid {grid}, "
              f"S={s}", flush=True)
        model = build_model(spec, layers, device, dtype)
        inputs = make_inputs(spec, device, dtype)
        eager_ms = next((r.ms for r in old if (r.model, r.layers, r.row) ==
                         (spec["name"], layers, "eager")), None)
        quantized = False
        # fp8-linear rows quantize the model in place: after every other row.
        for row in sorted(args.rows, key=lambda r: row_parts(r)[2]):
            if row_parts(row)[2] and not quantized:
                try:
                    quantize_linears_fp8(model)
                except ImportError:
                    print(f"skip {row}: needs torchao (pip install torchao)", flush=True)
                    continue
                quantized = True
            torch._dynamo.reset()
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            name = f"{row}/regional" if args.regional and row != "eager" else row
            rec = Record(spec["name"], layers, layers_of, spec["video"], grid, s, name,
                         None, None, None, None)
            del lowering.PICKS[:]
            fa4_env = os.environ.get(lowering.FA4_ENV)
            if row.endswith(NOFA4):
                os.environ[lowering.FA4_ENV] = "0"
            try:
                ms, first, peak, density, rewritten = run_row(
                    row, model, inputs, spec, layers, grid, device, args.pattern,
                    inductor_config, args.rep_ms, args.repeats, regional=args.regional)
                rec.ms, rec.first_call_s, rec.peak_mem_gib = ms, first, peak
                rec.density, rec.rewritten_layers = density, rewritten
                if row == "eager":
                    eager_ms = ms
                rec.speedup_vs_eager = eager_ms / ms if eager_ms else None
            except torch.cuda.OutOfMemoryError as e:  # a row that does not fit is a result too
                rec.error = f"OOM: {str(e).splitlines()[0][:120]}"
            finally:
                if fa4_env is None:
                    os.environ.pop(lowering.FA4_ENV, None)
                else:
                    os.environ[lowering.FA4_ENV] = fa4_env
            rec.picks = dict(Counter(str(p["picked"]) for p in lowering.PICKS)) or None
            print(f"  {name:10s} " + (rec.error or f"{rec.ms:9.1f} ms/step"
                  + (f"  first call {rec.first_call_s:6.1f} s" if rec.first_call_s else "")
                  + (f"  density {rec.density:.3f}" if rec.density is not None else "")
                  + (f"  peak {rec.peak_mem_gib:.1f} GiB" if rec.peak_mem_gib else "")
                  + (f"  picked {rec.picks}" if rec.picks else "")),
                  flush=True)
            new.append(rec)
            save(new)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    records = save(new)
    print_table(new)
    check_bars(records)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
