"""Time per denoising step through the real compiled path.

``torch.compile(model, backend=scaling_attn_backend(tables, energy_filter=...), dynamic=False,
fullgraph=True)``, called with the inputs the *dense* trajectory of the study's first prompt fed
the transformer at each step (so the energy filter sees real activations, and FAST's density
follows the real timesteps). One warm-up pass over the timed steps compiles and autotunes; then
``repeats`` passes, each step timed alone with CUDA events (``time.perf_counter`` around a
synchronised call on the CPU): ``ms_per_step_wall``, the median over passes of the mean over
steps, what one step of a generation costs on average, FAST's per-step density changes included.

Why CUDA graphs too: on the H200 (small-wan, 8 layers x 4 heads x 64, S = 16,384) that clock had
a floor near 4.0 ms from density 0.25 down, and orderings that did not follow density (STA at
0.15 8.0 ms, slower than dense's 7.6 ms), so it may time the host (Python, guards, ~100 kernel
launches per step) rather than attention. ``ms_per_step`` is therefore, where capture works, the
time of one captured step replayed per step, its timestep and latents copied into the static
input buffers first (:func:`time_graphed`); the replay is checked against the plain compiled call
on two steps before its times are trusted. Where capture fails the record says why and
``ms_per_step`` is the wall clock. :mod:`.timing_diag` adds a profiled step (the attention
kernels' share of the CUDA time) and the blocks the tables visit.

Each method compiles anew (a new backend, other tables): ``torch._dynamo.reset()`` afterwards, or
Dynamo's recompile limit (8) would fall back to running the model eagerly without saying so.
``retune=True`` compiles in a fresh Inductor cache (FX graph and autotune caches empty), so the
template is autotuned again for this method instead of reusing the first method's choice.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from .timing_diag import AutotuneLog, profile_step, table_work


@contextmanager
def record_inputs(model, index: int = 0):
    """Collect the transformer's inputs of batch element ``index`` at every forward call:
    yields a list of ``(hidden_states (1, ...), timestep (1,), encoder_hidden_states (1, ...))``."""
    seen = []

    def hook(module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        ts = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        enc = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        sl = slice(index, index + 1)
        seen.append((hs[sl].detach().clone(), ts.reshape(-1)[sl].detach().clone(),
                     enc[sl].detach().clone()))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _summary(passes: list[list[float]]) -> dict:
    means = [sum(p) / len(p) for p in passes]
    return {"ms_per_step": statistics.median(means), "ms_per_step_passes": means,
            "ms_per_step_by_step": [statistics.median(c) for c in zip(*passes, strict=True)]}


def time_steps(fn, inputs, *, repeats: int = 3) -> dict:
    """Time ``fn(hidden_states, timestep, encoder_hidden_states)`` over ``inputs`` (one call per
    denoising step): first pass is warm-up (compile); returns ms statistics."""
    cuda = inputs[0][0].is_cuda
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, t, e in inputs:
            fn(x, t, e)
        if cuda:
            torch.cuda.synchronize()
    first_pass_s = time.perf_counter() - t0
    passes = []
    with torch.no_grad():
        for _ in range(repeats):
            if cuda:
                ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in inputs]
                for (x, t, e), (a, b) in zip(inputs, ev, strict=True):
                    a.record()
                    fn(x, t, e)
                    b.record()
                torch.cuda.synchronize()
                passes.append([a.elapsed_time(b) for a, b in ev])
            else:
                ms = []
                for x, t, e in inputs:
                    s = time.perf_counter()
                    fn(x, t, e)
                    ms.append(1e3 * (time.perf_counter() - s))
                passes.append(ms)
    return {**_summary(passes), "first_pass_s": first_pass_s, "steps_timed": len(inputs),
            "repeats": repeats}


def _first(out) -> torch.Tensor:
    """The sample of a transformer output (a tensor, or ``(sample, ...)`` with return_dict=False)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def capture_step(fn, example):
    """Capture ``fn(*static)`` into a CUDA graph; returns ``(graph, static_inputs, output)``.

    Warm-up on a side stream first (as ``torch.cuda.graphs`` asks): lazily created state (cuBLAS
    workspaces, Triton launchers) must exist before capture. Raises what capture raises (a host
    sync such as ``.item()`` in the step: 'operation not permitted when stream is capturing')."""
    dev = example[0].device
    if dev.type != "cuda":
        raise ValueError(f"CUDA graphs need CUDA inputs; the inputs are on {dev}")
    static = [a.detach().clone() for a in example]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = _first(fn(*static))
    return graph, static, out


def time_graphed(fn, inputs, *, repeats: int = 3, verify_steps=(0, -1), capture=capture_step,
                 ) -> dict:
    """Time one captured step replayed over ``inputs``: ``{"used": True, "ms_per_step", ...}``,
    or ``{"used": False, "reason": ...}`` when the graph cannot be trusted (not CUDA, capture
    failed, or the replay differs from ``fn`` on a ``verify_steps`` input, by more than bf16's
    rtol plus 1% of the output's largest magnitude; ``verified`` holds the differences seen).
    ``fn`` must be warm (compiled and autotuned): capture records launches, it cannot compile."""
    cuda = inputs[0][0].is_cuda
    try:
        graph, static, out = capture(fn, inputs[0])
    except Exception as e:  # noqa: BLE001  (any capture failure: record it, keep the wall clock)
        if cuda:
            torch.cuda.synchronize()
        return {"used": False, "reason": f"capture failed: {_one_line(e)}"}

    def load(step):
        for dst, src in zip(static, step, strict=True):
            dst.copy_(src)

    checked = []
    with torch.no_grad():
        for j in dict.fromkeys(i % len(inputs) for i in verify_steps):
            ref = _first(fn(*inputs[j])).clone()
            load(inputs[j])
            graph.replay()
            got = out.clone()
            try:
                # bf16's rtol; atol 1% of the output's scale: a stale timestep or latent (what
                # this is for) changes the output by O(its scale), and cuBLAS may pick another
                # algorithm under capture (a last-bit difference near zero is not a bug).
                torch.testing.assert_close(got, ref, rtol=1.6e-2,
                                           atol=1e-2 * float(ref.abs().max()))
            except AssertionError as e:
                diff = (got.float() - ref.float()).abs().max().item()
                return {"used": False, "reason": f"replay differs from the compiled call at step "
                        f"{j}: max |diff| {diff:.3g} ({_one_line(e)})"}
            checked.append({"step": j, "timestep": float(inputs[j][1].reshape(-1)[0]),
                            "max_abs_diff": (got.float() - ref.float()).abs().max().item()})
        passes = []
        for _ in range(repeats):
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in inputs]
            for step, (a, b) in zip(inputs, ev, strict=True):
                load(step)  # outside the events: two small device copies, not the step's work
                a.record()
                graph.replay()
                b.record()
            torch.cuda.synchronize()
            passes.append([a.elapsed_time(b) for a, b in ev])
    return {"used": True, **_summary(passes), "verified": checked}


@contextmanager
def fresh_inductor_cache():
    """Inductor with empty FX graph and autotune caches (a temporary cache folder), so a compile
    inside autotunes again. ``fresh_cache`` from torch 2.8, ``fresh_inductor_cache`` before."""
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache
    with fresh():
        yield


def time_compiled(model, plan, inputs, *, energy_filter=None, repeats: int = 3,
                  compiler: str = "inductor", graphs: bool = True, profile: bool = True,
                  retune: bool = False, precision: str | None = None) -> dict:
    """ms per step of ``model`` compiled with our backend bound to ``plan`` (tables or a
    plan-like object); ``plan=None`` times plain ``torch.compile`` (Inductor, dense SDPA).
    ``compiler="eager"`` skips Inductor (the rewritten graph runs eagerly): for tests only.

    ``graphs``: also time CUDA-graph replays; ``ms_per_step`` is theirs when ``graph["used"]``,
    else the wall clock (``timing_clock`` says which; ``ms_per_step_wall`` is always there).
    ``profile``: one step under ``torch.profiler`` (``profile``: attention vs all CUDA kernel
    time, launches). ``retune``: compile in a fresh Inductor cache (own autotune).
    ``precision``: the backend's (``"int8"`` / ``"fp8"``: 8-bit attention)."""
    from ..compile.backend import scaling_attn_backend
    from ..contract.tables import AttentionTables

    if plan is None:
        compiled = torch.compile(model, dynamic=False, fullgraph=True,
                                 **({"backend": "eager"} if compiler == "eager" else {}))
        rewritten = None
    else:
        backend = scaling_attn_backend(plan, energy_filter=energy_filter, compiler=compiler,
                                       **({"precision": precision} if precision else {}))
        compiled = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)

    def fn(x, t, e):
        return compiled(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)

    tune = AutotuneLog()
    try:
        with fresh_inductor_cache() if retune else nullcontext(), tune:
            res = time_steps(fn, inputs, repeats=repeats)
            if plan is not None:
                rewritten = sum(r.num_rewritten for r in backend.reports)
                if rewritten == 0:
                    raise RuntimeError("time_compiled: the backend rewrote no self-attention "
                                       "call; the timing would be of dense attention")
            res["ms_per_step_wall"] = res["ms_per_step"]
            graph = (time_graphed(fn, inputs, repeats=repeats) if graphs
                     else {"used": False, "reason": "off (graphs=False)"})
            if graph["used"]:
                res["ms_per_step"] = graph["ms_per_step"]
            res["timing_clock"] = "cuda_graph" if graph["used"] else "wall"
            res["graph"] = graph
            if profile:
                mid = inputs[len(inputs) // 2]
                res["profile"] = dict(profile_step(fn, mid), timestep=float(mid[1].reshape(-1)[0]))
    finally:
        torch._dynamo.reset()
    res["rewritten_attention_calls"] = rewritten
    res["retune"] = retune
    res["autotune"] = tune.records
    if isinstance(plan, AttentionTables):
        res["work"] = table_work(plan, [t for _, t, _ in inputs],
                                 filtered=energy_filter is not None)
    return res
