"""Test helpers shared by tests and benchmarks: input factories, the one tolerance rule, the
eager float32/float64 reference and per-step compiled runs of a transformer, peaked attention
(:func:`sharpen_qk`) and what diffusers' attention receives (:func:`recorded_attention_qk`), the
sm_90 compile checks, and loading a file as a module. Torch only: no package imports (the
layout test puts this module on the lowest floor)."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import torch


def make_qkv(B: int, H: int, S: int, D: int, dtype=torch.float16, device="cpu", seed: int = 0):
    """q, k, v ``(B, H, S, D)`` as diffusers passes them: ``(B, H, S, D)`` views of ``(B, S, H, D)``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(
        torch.randn(B, S, H, D, generator=g).to(device=device, dtype=dtype).permute(0, 2, 1, 3)
        for _ in range(3)
    )


def make_local_qkv(B, H, S, D, seed, dtype=torch.float32, device="cpu", sharp=3.0):
    """q, k whose attention is concentrated near the diagonal (a 1-D positional code plus
    noise), so the energy filter has negligible far blocks to skip; v random. Contiguous."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(S, dtype=torch.float64)[:, None]
    freqs = torch.linspace(0.5, 6, D // 2, dtype=torch.float64)[None] / S * math.pi
    code = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], -1) * sharp
    noise = lambda: 0.3 * torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    q, k = code + noise(), code + noise()
    v = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def sharpen_qk(attentions, gain: float = 4.0) -> None:
    """Scale each attention module's q and k RMS-norm weights by ``gain`` (logits x gain^2), in
    place: random-init attention is so diffuse, and its gated residual so small, that dropping
    blocks moves the output by about one rounding step; peaked attention makes a wrong mask
    visible far above the tolerance. ``attentions``: the modules (``norm_q``, ``norm_k``), e.g.
    a family adapter's ``self_attention_modules(model)``."""
    with torch.no_grad():
        for attn in attentions:
            for norm in (attn.norm_q, attn.norm_k):
                norm.weight.mul_(gain)


@contextlib.contextmanager
def recorded_attention_qk(module, tokens: int, rows: int | None = None):
    """Record the q and k every attention call of a diffusers transformer ``module`` (e.g.
    ``transformer_ltx``: its ``dispatch_attention_fn``, patched for the block) receives over
    ``tokens`` queries and keys, as ``(B, H, rows, D)`` copies of their first ``rows`` tokens
    (default all): what a q/k capture must equal. Yields the list of ``(q, k)``, in call order."""
    fed, real = [], module.dispatch_attention_fn

    def spy(query, key, value, **kw):  # (B, S, H, D), as diffusers dispatches
        if query.shape[1] == key.shape[1] == tokens:
            fed.append((query[:, :rows].transpose(1, 2).clone(),
                        key[:, :rows].transpose(1, 2).clone()))
        return real(query, key, value, **kw)

    with mock.patch.object(module, "dispatch_attention_fn", spy):
        yield fed


def load_module(path, name: str):
    """The Python file ``path`` as a fresh module named ``name`` (not put in ``sys.modules``): a
    ``benchmarks/`` script (that folder is no package) or a kernel module Inductor rendered."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rendered_kernel(choice):
    """The ``@triton.jit`` kernel Inductor rendered for a template autotune ``choice`` (its
    ``bmreq`` names the module file and the kernel)."""
    return getattr(load_module(choice.bmreq.module_path, "tmpl"), choice.bmreq.kernel_name)


def eager_two_dtypes(model, inputs: dict, timestep: torch.Tensor, reference=None) -> list:
    """``[float32, float64]`` eager outputs of copies of ``model`` (what
    :func:`assert_close_to_oracle` takes as the same-dtype reference and the golden), called
    with ``timestep`` and ``inputs`` (tensors cast, other values as they are);
    ``reference(copy, dtype)``, if given, first swaps in reference attention processors."""
    import copy

    outs = []
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(model).to(dtype)
        if reference is not None:
            reference(m, dtype)
        with torch.no_grad():
            outs.append(m(timestep=timestep.to(dtype), return_dict=False,
                          **{k: v.to(dtype) if torch.is_tensor(v) else v
                             for k, v in inputs.items()})[0])
    return outs


def run_compiled_steps(model, backend, inputs: dict, steps,
                       timestep_of=lambda t: torch.tensor([t])) -> list:
    """``model`` compiled with ``backend`` (fullgraph, static shapes), its output at each step's
    ``timestep_of(t)``, without grad; a recompile is an error: one graph serves every step."""
    c = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        return [c(timestep=timestep_of(t), return_dict=False, **inputs)[0] for t in steps]


def rounding_step(golden: torch.Tensor, dtype: torch.dtype) -> float:
    """One rounding step of ``dtype`` at the scale of the golden output."""
    return torch.finfo(dtype).eps * golden.abs().max().item()


def assert_close_to_oracle(out: torch.Tensor, golden: torch.Tensor, same_dtype_ref: torch.Tensor,
                           *, k: float = 2.0, what: str = "output") -> None:
    """The tolerance rule (flex / FA3 / attention-gym): our error against the float64 ``golden``
    must be within ``k x`` (the error of an eager same-dtype reference + one rounding step).
    """
    golden = golden.double()
    if torch.isnan(out).any():
        raise AssertionError(f"{what}: contains NaN")
    ours = (out.double() - golden).abs().max().item()
    theirs = (same_dtype_ref.double() - golden).abs().max().item()
    budget = k * (theirs + rounding_step(golden, out.dtype))
    if not ours <= budget:
        raise AssertionError(
            f"{what}: max error vs float64 {ours:.3e} exceeds {k} x (same-dtype reference error "
            f"{theirs:.3e} + rounding {rounding_step(golden, out.dtype):.3e}) = {budget:.3e}"
        )


def make_outlier_qkv(B, H, S, D, seed, dtype=torch.float32, device="cpu", n_outliers=4,
                     q_bias=3.0, k_bias=4.0, stress=1.0):
    """q, k, v with the outlier channels of a trained DiT: ``n_outliers`` channels per head carry
    a large offset shared by every token (k: ``k_bias``, q: ``q_bias``, random signs) over noise
    of std 0.5-0.6; v has std 0.7 plus a per-channel offset of std 0.3. The defaults match q/k/v
    captured from the bundled small-wan (per-channel token mean up to 3-4 where the median is
    0.1-0.2, amax 5-8, token std 0.3-0.8). ``stress`` multiplies the outlier channels' noise and
    offsets (e.g. 5 for a stress test far past what small-wan shows)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    ch = torch.randperm(D, generator=g)[:n_outliers]
    sign = lambda: torch.where(rand(B, H, 1, n_outliers) > 0, 1.0, -1.0)
    q, k = 0.6 * rand(B, H, S, D), 0.5 * rand(B, H, S, D)
    q[..., ch] = stress * (q[..., ch] + q_bias * sign())
    k[..., ch] = stress * (k[..., ch] + k_bias * sign())
    v = 0.7 * rand(B, H, S, D) + 0.3 * rand(B, H, 1, D)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def compile_for_sm90(fn, pointers: dict, floats: set, div16: set, constexprs: dict, *,
                     num_warps: int, num_stages: int):
    """Compile the ``@triton.jit`` kernel ``fn`` for Hopper (sm_90) on any machine (Triton's
    compiler and ptxas need no GPU), given what a real launch gives the compiler: ``pointers``
    the pointer arguments' types (``"*bf16"``), ``floats`` the fp32 scalars (other scalars are
    i32), ``div16`` the arguments a launch proves 16-divisible, ``constexprs`` the specialised
    ones (unit strides as 1 among them). Without those hints no vector load is provable and the
    K/V loop is not pipelined (seen: no cp.async, spills). Call it where TRITON_INTERPRET is not
    set (:func:`run_script_compiled`): under the interpreter ``fn`` is not compiled."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(fn.fn).parameters)
    # A constexpr left at its default is still a constexpr at launch; omitted here it would be
    # compiled as a runtime i32 and its `if` kept as a branch (seen: the 8-bit kernel's
    # PV_TWO_LEVEL default compiled both P.V forms into one loop, 707 instructions, not 551).
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default},
                  **constexprs}
    sig = {p: "constexpr" if p in constexprs else pointers.get(p, "fp32" if p in floats else "i32")
           for p in params}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in params
             if p in div16 and p not in constexprs}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(params.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def sm90_launch_hints(kernel: str) -> tuple[dict, set, set, dict]:
    """What a launch at the Wan 1.3B shape (S = 32,760, H = 12, D = 128) tells the compiler, as
    :func:`compile_for_sm90`'s ``(pointers, floats, div16, unit strides)``: ``"bf16"`` for the
    bf16 kernel (q/k/v/out ``(B, H, S, D)`` views of ``(B, S, H, D)`` memory), ``"int8"`` /
    ``"fp8"`` for the 8-bit one (q8/k8 contiguous, v8 a view of ``(B, H, D, S)`` memory, so
    ``stride_vs = 1``). Unit strides are specialised to 1 at launch; the other strides and the
    pointers are multiples of 16."""
    tables = {"MASKS": "*i32", "LEVEL_TABLE": "*i32", "BOUNDS": "*fp32", "TS": "*fp32"}
    if kernel == "bf16":
        pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "OUT": "*bf16", **tables,
                    "SKIPPED": "*i32", "KV_LENS": "*i32", "LAUNCH_ORDER": "*i32"}
        unit = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1, "stride_mw": 1}
        return (pointers, {"qk_scale", "energy_thr"},
                set(pointers) - {"KV_LENS"} | {f"stride_{t}{d}" for t in "qkvo" for d in "bhs"},
                unit)
    if kernel not in ("int8", "fp8"):
        raise ValueError(f"sm90_launch_hints: kernel must be 'bf16', 'int8' or 'fp8', got {kernel!r}")
    qk = "*i8" if kernel == "int8" else "*fp8e4nv"
    pointers = {"Q": qk, "K": qk, "V": "*fp8e4nv", "OUT": "*bf16", **tables, "QS": "*fp32",
                "KS": "*fp32", "VS": "*fp32"}
    unit = {"stride_qd": 1, "stride_kd": 1, "stride_vs": 1, "stride_od": 1, "stride_mw": 1}
    strides = {f"stride_{t}{d}" for t in "qkvo" for d in "bhsd"} - set(unit)
    return pointers, {"qk_scale", "energy_thr"}, set(pointers) | strides, unit


def sm90_ptx_facts(kernel) -> dict:
    """What the sm_90 compile tests check of a compiled kernel: a cubin, shared memory bytes,
    pipelined K/V copies (``cp.async.cg``) and local-memory spills, from its PTX."""
    ptx = kernel.asm["ptx"]
    return {"cubin": bool(kernel.asm.get("cubin")), "shared": kernel.metadata.shared,
            "async_copies": ptx.count("cp.async.cg"),
            "spills": ptx.count("ld.local") + ptx.count("st.local")}


def run_script_compiled(script: str, *args: str) -> dict:
    """Run ``python -c script args...`` without TRITON_INTERPRET (in this process it may have
    turned the jit functions into interpreted ones) and return the JSON object its last output
    line prints; a failed run raises with its stderr's tail."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                         text=True, timeout=300)
    if run.returncode != 0:
        raise AssertionError(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])
