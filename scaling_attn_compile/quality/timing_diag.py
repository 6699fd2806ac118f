"""What a timed step spends its time on: the attention kernels' share of the CUDA time, the
kernel launches, the GPU's idle time inside the step, the blocks the tables make the kernel
visit, the template's autotune choice, and (on the GPU) how each kernel config does on a
method's own tables.

Built to separate four explanations of the H200 small-wan timings (a ~4.0 ms floor from density
0.25 down; STA at 0.15 8.0 ms, slower than dense's 7.6 ms):
(a) host / launch overhead: ``gpu_idle_ms`` near the step's time, kernels a small part of it;
(b) a tile config autotuned once (on full masks, ``compile/lowering.py``'s benchmark inputs) that
    is slow on a method's tables: :func:`sweep_configs` times every config on the real tables;
(c) the kernel visiting more blocks than the achieved density: ``table_work``'s
    ``visited_density`` against the target;
(d) a few long rows: ``max_row_blocks`` against ``mean_row_blocks`` (the kernel runs one program
    per (query tile, head), so the longest row sets the tail of each launch).
"""

from __future__ import annotations

import math
import time

import torch

# Our kernel: the Inductor template (its choices are named ``triton_scaling_attn_bsa_<i>``; the
# kernel in the generated code is ``triton_tem_fused_...``, the only template in a default
# compile) and the eager launcher's ``_bsa_forward_kernel``.
OURS = ("scaling_attn", "_bsa_", "sparse_attention", "triton_tem")
# Dense SDPA (cross-attention, and every attention of the plain Inductor reference).
SDPA = ("flash", "fmha", "cudnn", "attention", "sdpa")
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                "cudaGraphLaunch")


def is_ours(name: str) -> bool:
    n = name.lower()
    return any(p in n for p in OURS)


def is_sdpa(name: str) -> bool:
    n = name.lower()
    return not is_ours(n) and any(p in n for p in SDPA)


def _is_device(e) -> bool:
    dt = getattr(e, "device_type", None)
    return dt is not None and getattr(dt, "name", str(dt)).upper().endswith("CUDA")


def _union_us(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize_kernels(events, wall_ms: float | None = None, top: int = 8) -> dict:
    """Summary of one profiled step from profiler events (``prof.events()``: objects with
    ``name``, ``device_type`` and ``time_range.start/.end`` in us). Device events whose names
    start with Memcpy/Memset are copies, the rest kernels."""
    kernels, copies, launches = [], 0, 0
    for e in events:
        if _is_device(e):
            if e.name.startswith(("Memcpy", "Memset")):
                copies += 1
            else:
                kernels.append((e.name, float(e.time_range.start), float(e.time_range.end)))
        elif e.name in LAUNCH_CALLS:
            launches += 1
    ms = [(n, (b - a) / 1e3) for n, a, b in kernels]
    by_name: dict[str, list] = {}
    for n, t in ms:
        by_name.setdefault(n, [0.0, 0])
        by_name[n][0] += t
        by_name[n][1] += 1
    span = (max(b for _, _, b in kernels) - min(a for _, a, _ in kernels)) / 1e3 if kernels else 0.0
    busy = _union_us([(a, b) for _, a, b in kernels]) / 1e3
    out = {"kernel_ms": sum(t for _, t in ms), "kernel_launches": len(kernels),
           "attention_ms": sum(t for n, t in ms if is_ours(n)),
           "attention_launches": sum(1 for n, _ in ms if is_ours(n)),
           # in launch order: one per layer, to set against each layer's table rows
           "attention_kernel_ms": [(b - a) / 1e3 for n, a, b in sorted(kernels, key=lambda x: x[1])
                                   if is_ours(n)],
           "sdpa_ms": sum(t for n, t in ms if is_sdpa(n)), "copies": copies,
           "host_launch_calls": launches, "gpu_span_ms": span, "gpu_busy_ms": busy,
           "gpu_idle_ms": span - busy, "wall_ms": wall_ms,
           "top_kernels": [{"name": n, "ms": v[0], "count": v[1]} for n, v in
                           sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]}
    out["attention_share"] = out["attention_ms"] / out["kernel_ms"] if out["kernel_ms"] else None
    return out


def profile_step(fn, step) -> dict:
    """One call ``fn(*step)`` (warm: called once before) under ``torch.profiler``, summarised by
    :func:`summarize_kernels`; ``wall_ms`` is the synchronised host time of the profiled call
    (the profiler's own overhead included)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = step[0].is_cuda
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        fn(*step)
        sync()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            fn(*step)
            sync()
            wall = 1e3 * (time.perf_counter() - t0)
    return summarize_kernels(prof.events(), wall)


def table_work(tables, timesteps, *, filtered: bool = False) -> dict:
    """Blocks the kernel visits at each timestep in ``timesteps``, from the tables alone (the
    level each (layer, head) selects, its kept (query block, key block) pairs).

    ``visited_density``: visited pairs over ``L x H x NB x NB``, per step and its mean;
    ``mean_row_blocks`` / ``max_row_blocks``: key blocks per query row (one kernel program per
    row and head), averaged over layers and steps, and the largest seen;
    ``by_layer_middle_step``: per layer at the middle timestep (the profiled step's), to set
    against the profile's ``attention_kernel_ms``. ``filtered``: an
    energy filter skips blocks at run time, so these are upper bounds (``upper_bound``)."""
    from ..contract.masks import num_blocks, select_levels, unpack_blocks

    nb = num_blocks(tables.seq_len)
    L, H = tables.num_layers, tables.num_heads
    # (H, levels, NB) kept key blocks per row, once per layer.
    counts = [unpack_blocks(m.cpu(), nb)[:, :, :nb].sum(-1) for m in tables.masks]
    bounds = tables.bucket_bounds.cpu()
    heads = torch.arange(H)
    by_step, mean_rows, max_rows, mid = [], [], [], []
    for j, t in enumerate(timesteps):
        t = torch.as_tensor(t).reshape(-1)[:1].float().cpu()
        total, row_mean, row_max = 0, 0.0, 0
        for c, lt in zip(counts, tables.level_tables, strict=True):
            lv = select_levels(lt.cpu(), bounds, t, 1)[0].clamp(max=c.shape[1] - 1)
            rows = c[heads, lv]  # (H, NB)
            total += int(rows.sum())
            if j == len(timesteps) // 2:  # the step time_compiled profiles
                mid.append({"visited_density": float(rows.sum()) / (H * nb * nb),
                            "max_row_blocks": int(rows.max())})
            row_mean += float(rows.float().mean()) / L
            row_max = max(row_max, int(rows.max()))
        by_step.append(total / (L * H * nb * nb))
        mean_rows.append(row_mean)
        max_rows.append(row_max)
    n = max(len(by_step), 1)
    return {"visited_density": sum(by_step) / n, "visited_density_by_step": by_step,
            "visited_blocks_per_step": sum(by_step) / n * L * H * nb * nb,
            "mean_row_blocks": sum(mean_rows) / n, "max_row_blocks": max(max_rows, default=0),
            "num_blocks": nb, "upper_bound": filtered, "by_layer_middle_step": mid}


class AutotuneLog:
    """Inside ``with``: every Inductor autotune of our template (``scaling_attn_bsa*``) as
    ``{"name", "timings": {choice: ms}, "chosen"}`` in ``records``. No record for a compile
    means the template was not lowered again (an FX graph cache hit reused the code and its
    earlier choice). Timings may come from Inductor's autotune cache, not a new benchmark."""

    def __init__(self, prefix: str = "scaling_attn_bsa"):
        self.prefix, self.records, self._cache = prefix, [], None

    def _saver(self, timings, name, *rest):
        if not str(name).startswith(self.prefix):
            return
        t = {f"{getattr(c, 'name', c)} {getattr(c, 'description', '')}".strip(): float(ms)
             for c, ms in timings.items()}
        self.records.append({"name": str(name), "timings_ms": t,
                             "chosen": min(t, key=t.get) if t else None})

    def __enter__(self):
        try:
            from torch._inductor import select_algorithm as sa

            sa.add_feedback_saver(self._saver)
            self._cache = (sa.get_algorithm_selector_cache()
                           if hasattr(sa, "get_algorithm_selector_cache")
                           else sa._ALGORITHM_SELECTOR_CACHE)
        except (ImportError, AttributeError):  # no feedback hook in this torch: no records
            self._cache = None
        return self

    def __exit__(self, *exc):
        fns = getattr(self._cache, "feedback_saver_fns", None)
        if fns is not None and self._saver in fns:
            fns.remove(self._saver)
        return False


_ALL_BLOCKS: dict[tuple, dict] = {}


def sweep_configs(tables, timestep: float, *, head_dim: int, dtype=torch.bfloat16,
                  batch: int = 1, configs=None, layers=None, device="cuda") -> dict:
    """Every kernel config of ``kernels/launch.py`` on ``tables`` (random q/k/v, the level each
    layer selects at ``timestep``), through the eager launcher: ``ms`` per config summed over
    ``layers`` (default all), ``best``, and the same for all-blocks masks of the table shape
    (what the template's autotune benchmarks). CUDA: ``triton.testing.do_bench`` medians; else
    one timed call (the interpreter, for tests)."""
    from ..contract.masks import num_blocks, pack_blocks
    from ..kernels.launch import CONFIGS, block_sparse_attention_forward

    configs = list(configs or CONFIGS)
    layers = list(range(tables.num_layers) if layers is None else layers)
    H, S = tables.num_heads, tables.seq_len
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(batch, H, S, head_dim, generator=g).to(device, dtype) for _ in range(3))
    out = torch.empty_like(q)
    ts = torch.full((1,), float(timestep), device=device)
    bounds = tables.bucket_bounds.to(device).float()
    m0 = tables.masks[0]
    full = pack_blocks(torch.ones(*m0.shape[:3], num_blocks(S), dtype=torch.bool)).to(device)

    def bench(f):
        if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
            from triton.testing import do_bench

            # 2 + 10 ms a call: 96 calls per method (6 configs x 8 layers x real/all-blocks)
            # must stay ~2 s in a study; config gaps that matter are > 5%, well above the noise.
            return do_bench(f, warmup=2, rep=10, return_mode="median")
        t0 = time.perf_counter()
        f()
        return 1e3 * (time.perf_counter() - t0)

    lts = {i: tables.level_tables[i].to(device) for i in layers}  # on the device before timing

    def run(masks: dict) -> dict:
        res = {}
        for cfg in configs:
            try:
                res[str(tuple(cfg))] = sum(
                    bench(lambda i=i, cfg=cfg: block_sparse_attention_forward(
                        q, k, v, masks[i], lts[i], bounds, ts, out, head_dim ** -0.5, cfg))
                    for i in layers)
            except Exception as e:  # noqa: BLE001  (a config that does not fit this GPU)
                res[str(tuple(cfg))] = f"failed: {type(e).__name__}"
        return res

    real = run({i: tables.masks[i].to(device) for i in layers})
    key = (tuple(m0.shape), S, head_dim, dtype, batch, tuple(layers), tuple(map(tuple, configs)),
           str(device))
    if key not in _ALL_BLOCKS:  # the same for every method of a study (one table shape)
        _ALL_BLOCKS[key] = run(dict.fromkeys(layers, full))
    dense = _ALL_BLOCKS[key]
    ok = {c: t for c, t in real.items() if isinstance(t, float)}
    okd = {c: t for c, t in dense.items() if isinstance(t, float)}
    return {"timestep": float(timestep), "layers": layers, "ms": real,
            "best": min(ok, key=ok.get) if ok else None, "ms_all_blocks": dense,
            "best_all_blocks": min(okd, key=okd.get) if okd else None,
            "fields": "(block_m, num_warps, num_stages, use_tma, warp_specialize)"}


def diag_table(res: dict) -> str:
    """A markdown table of a quality result's timing diagnostics, one row per timed (method,
    target) and one per retuned timing (``method*``), references first."""
    head = ("| method | target | ms graph | ms wall | attn ms | kernel ms | launches | idle ms | "
            "visits | rows mean/max | autotuned | sweep best (all-blocks best) |")
    lines = [head, "|" + "---|" * 12]

    def row(name, target, tm):
        if not tm:
            return
        pr, wk, sw = tm.get("profile") or {}, tm.get("work") or {}, tm.get("config_sweep") or {}
        g = tm.get("graph", {})
        f = (lambda v, d=2: "-" if v is None else f"{v:.{d}f}")
        sweep = "-"
        if sw.get("best"):
            ms = sw["ms"]
            sweep = f"{sw['best']} {f(ms[sw['best']], 3)} ({sw['best_all_blocks']})"
        lines.append(
            f"| {name} | {target} | {f(g.get('ms_per_step')) if g.get('used') else 'n/a'} | "
            f"{f(tm.get('ms_per_step_wall'))} | {f(pr.get('attention_ms'))} | "
            f"{f(pr.get('kernel_ms'))} | {pr.get('kernel_launches', '-')} | "
            f"{f(pr.get('gpu_idle_ms'))} | {f(wk.get('visited_density'), 3)} | "
            f"{f(wk.get('mean_row_blocks'), 1)}/{wk.get('max_row_blocks', '-')} | "
            f"{len(tm.get('autotune') or [])} | {sweep} |")

    for name, tm in (res.get("reference_timing") or {}).items():
        row(name, "-", tm)
    for e in res.get("results", []):
        row(e["method"], e["target_density"], e.get("timing"))
        row(e["method"] + "*", e["target_density"], e.get("timing_retuned"))
    return "\n".join(lines)
