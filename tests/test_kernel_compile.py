"""The kernel's GPU code paths compile for Hopper (sm_90) on any machine: Triton's compiler and
ptxas run without a GPU. This catches GPU-only compile errors that the interpreter cannot see
(it runs the kernel as Python), and checks that tensor-core wgmma instructions are emitted.

The compile runs in a subprocess: in this process TRITON_INTERPRET=1 may have turned the jit
functions into interpreted ones. It gives the compiler what a real launch at the Wan shapes gives
it: unit strides specialised to 1 and 16-divisible pointers and strides marked so. Without those
hints no vector loads are provable and the K/V loop is not pipelined (seen: no cp.async, spills).

The Inductor template's TMA variant is compiled as Inductor renders it (through its triton cpu
backend, as ``tests/test_lowering.py`` renders the template), from the rendered module's file.
"""

import json
import os
import sys

import pytest

from scaling_attn_compile.testing import run_script_compiled

COMPILE = r'''
import json, sys
from scaling_attn_compile.kernels import block_sparse_attention as K
from scaling_attn_compile.kernels import launch as L
from scaling_attn_compile.testing import compile_for_sm90, sm90_launch_hints, sm90_ptx_facts

POINTERS, FLOATS, DIV16, UNIT = sm90_launch_hints("bf16")  # the Wan 1.3B launch's hints
constexprs = dict(L.launch_meta(32760, 8, 2, 128), BLOCK_M=128, USE_TMA=False,
                  WARP_SPECIALIZE=False, ENERGY_RULE=0, WRITE_SKIPPED=False, HAS_KV_LENS=False,
                  HAS_LAUNCH_ORDER=False, **UNIT)
constexprs.update(json.loads(sys.argv[1]))
kernel = compile_for_sm90(K._bsa_forward_kernel, POINTERS, FLOATS, DIV16, constexprs,
                          num_warps=8, num_stages=3)
print(json.dumps({"wgmma": "wgmma" in kernel.asm["ptx"], **sm90_ptx_facts(kernel)}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("variant", [{}, {"ENERGY_RULE": 1, "WRITE_SKIPPED": True},
                                     {"ENERGY_RULE": 2, "EVEN_S": True}, {"HAS_KV_LENS": True},
                                     {"HAS_LAUNCH_ORDER": True}],
                         ids=["dense-path", "cumulative-energy", "blasst-even-S", "kv-lens",
                              "launch-order"])
def test_kernel_compiles_for_sm90_with_wgmma(variant):
    result = run_script_compiled(COMPILE, json.dumps(variant))
    assert result["wgmma"], "no Hopper tensor-core (wgmma) instructions in the PTX"
    assert result["cubin"], "ptxas produced no cubin"
    assert result["shared"] <= 232448, "more shared memory than an H100 block can have"
    # The K/V loads of the bit-walk loop are software-pipelined (async copies into shared memory)
    # and nothing spills to local memory: 48 copies / 229 KB / 0 spills with Triton 3.9 here.
    assert result["async_copies"] > 0, "the KV loop is not pipelined (no cp.async)"
    assert result["spills"] == 0, f"{result['spills']} local-memory spill instructions"


COMPILE_RENDERED = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from scaling_attn_compile.testing import load_module, sm90_ptx_facts
path, name, num_warps, num_stages = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
kernel = getattr(load_module(path, "tmpl"), name)
sig = kernel.triton_meta["signature"]
params = list(sig)
# Inductor marks 16-byte aligned pointers so on the GPU (fresh allocations always are).
attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
src = ASTSource(fn=kernel.fn, signature=sig, attrs=attrs, constexprs={})
compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
ptx = compiled.asm["ptx"]
print(json.dumps({"wgmma": "wgmma" in ptx, "tma_loads": ptx.count("cp.async.bulk.tensor"),
                  "global_scratch": getattr(compiled.metadata, "global_scratch_size", None),
                  **sm90_ptx_facts(compiled)}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("with_order", [False, True], ids=["index-order", "launch-order"])
def test_template_tma_variant_compiles_for_sm90(with_order):
    """The Inductor template's TMA config (K/V through device-side tensor descriptors), rendered
    at the Wan 1.3B shape (S = 32,760, H = 12, D = 128, (B, S, H, D) memory) and compiled for
    sm_90: TMA loads, wgmma, and a global scratch buffer, which Inductor's launcher allocates
    (``triton.set_allocator`` in ``CachingAutotuner.run``); also the variant that reads a launch
    order (``contract/masks.launch_order``), as the backend binds it."""
    from unittest import mock

    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from test_fa4_choice import OP, capture_template_choices

    from scaling_attn_compile.compile import lowering
    from scaling_attn_compile.contract.masks import launch_order
    from scaling_attn_compile.contract.tables import uniform_tables

    B, H, S, D = 1, 12, 32760, 128
    q, k, v = (torch.empty(B, S, H, D, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    masks, lt, bb = uniform_tables(1, H, (1, 1, S), 0.25).layer(0)
    extra = {"launch_order": launch_order(masks, lt, S)} if with_order else {}
    torch._dynamo.reset()
    with mock.patch.object(lowering, "_tma_device", lambda device: True), \
            mock.patch.object(lowering, "_fa4_device", lambda device: False), \
            capture_template_choices() as choices:
        with pytest.raises(Exception, match="choices captured"):
            torch.compile(lambda *a, **kw: OP(*a, D**-0.5, **kw), backend="inductor",
                          fullgraph=True, dynamic=False)(q, k, v, masks, lt, bb,
                                                         torch.tensor([500.0]), **extra)
    torch._dynamo.reset()
    src = open(choices[0].bmreq.module_path).read()
    assert ("off_h, pid_m = bsa_launch_slot(" in src) == with_order
    tma = [c for c in choices if "USE_TMA : tl.constexpr = True" in open(c.bmreq.module_path).read()]
    assert len(tma) == sum(bool(c.get("use_tma")) for c in lowering.template_configs(tma=True))
    result = run_script_compiled(COMPILE_RENDERED, tma[0].bmreq.module_path,
                                 tma[0].bmreq.kernel_name, str(tma[0].bmreq.num_warps),
                                 str(tma[0].bmreq.num_stages))
    assert result["cubin"] and result["wgmma"], result
    assert result["tma_loads"] > 0, f"no TMA loads (cp.async.bulk.tensor) in the PTX: {result}"
    assert result["global_scratch"], f"descriptors need global scratch: {result}"
    assert result["shared"] <= 232448 and result["spills"] == 0, result
    print(result)
