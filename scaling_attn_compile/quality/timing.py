"""Time per denoising step through the real compiled path.

``torch.compile(model, backend=scaling_attn_backend(tables, energy_filter=...), dynamic=False,
fullgraph=True)``, called with the inputs the *dense* trajectory of the study's first prompt fed
the transformer at each step (so the energy filter sees real activations, and FAST's density
follows the real timesteps). One warm-up pass over the timed steps compiles and autotunes; then
``repeats`` passes, each step timed alone with CUDA events (``time.perf_counter`` around a
synchronised call on the CPU). ``ms_per_step`` = the median over passes of the mean over steps:
what one step of a generation costs on average, FAST's per-step density changes included.

Each method compiles anew (a new backend, other tables): ``torch._dynamo.reset()`` afterwards, or
Dynamo's recompile limit (8) would fall back to running the model eagerly without saying so.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch


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
    means = [sum(p) / len(p) for p in passes]
    per_step = [statistics.median(col) for col in zip(*passes, strict=True)]
    return {"ms_per_step": statistics.median(means), "ms_per_step_passes": means,
            "ms_per_step_by_step": per_step, "first_pass_s": first_pass_s,
            "steps_timed": len(inputs), "repeats": repeats}


def time_compiled(model, plan, inputs, *, energy_filter=None, repeats: int = 3,
                  compiler: str = "inductor") -> dict:
    """ms per step of ``model`` compiled with our backend bound to ``plan`` (tables or a
    plan-like object); ``plan=None`` times plain ``torch.compile`` (Inductor, dense SDPA).
    ``compiler="eager"`` skips Inductor (the rewritten graph runs eagerly): for tests only."""
    from ..compile.backend import scaling_attn_backend

    if plan is None:
        compiled = torch.compile(model, dynamic=False, fullgraph=True,
                                 **({"backend": "eager"} if compiler == "eager" else {}))
        rewritten = None
    else:
        backend = scaling_attn_backend(plan, energy_filter=energy_filter, compiler=compiler)
        compiled = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)

    def fn(x, t, e):
        return compiled(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)

    try:
        res = time_steps(fn, inputs, repeats=repeats)
        if plan is not None:
            rewritten = sum(r.num_rewritten for r in backend.reports)
            if rewritten == 0:
                raise RuntimeError("time_compiled: the backend rewrote no self-attention call; "
                                   "the timing would be of dense attention")
    finally:
        torch._dynamo.reset()
    res["rewritten_attention_calls"] = rewritten
    return res
