"""The 8-bit kernel's GPU code compiles for Hopper (sm_90) on any machine, with INT8 / FP8 wgmma
(the interpreter runs the math as Python and cannot see this). Same method as
``test_kernel_compile.py``: a subprocess without TRITON_INTERPRET, launch-like specialisation
(unit strides 1, 16-divisible pointers and strides) at the Wan 1.3B shape."""

import json
import os
import subprocess
import sys

import pytest

COMPILE = r'''
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from scaling_attn_compile.kernels import block_sparse_attention_q8 as K
from scaling_attn_compile.kernels import launch as L

qk_int8 = sys.argv[1] == "int8"
qk_ty = "*i8" if qk_int8 else "*fp8e4nv"
POINTERS = {"Q": qk_ty, "K": qk_ty, "V": "*fp8e4nv", "OUT": "*bf16", "MASKS": "*i32",
            "LEVEL_TABLE": "*i32", "BOUNDS": "*fp32", "TS": "*fp32", "QS": "*fp32",
            "KS": "*fp32", "VS": "*fp32"}
FLOATS = {"qk_scale"}
# q8/k8 (B, H, S, D) contiguous; v8 a (B, H, S, D) view of (B, H, D, S) memory: stride_vs = 1.
UNIT = {"stride_qd": 1, "stride_kd": 1, "stride_vs": 1, "stride_od": 1, "stride_mw": 1}
DIV16 = {"Q", "K", "V", "OUT", "MASKS", "LEVEL_TABLE", "BOUNDS", "TS", "QS", "KS", "VS",
         "stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks",
         "stride_vb", "stride_vh", "stride_vd", "stride_ob", "stride_oh", "stride_os"}
constexprs = dict(L.launch_meta(32760, 8, 2, 128), BLOCK_M=128, QK_INT8=qk_int8, **UNIT)
fn = K._bsa_q8_forward_kernel
params = list(inspect.signature(fn.fn).parameters)
sig = {p: "constexpr" if p in constexprs else POINTERS.get(p, "fp32" if p in FLOATS else "i32")
       for p in params}
attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in params
         if p in DIV16 and p not in constexprs}
src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                constexprs={(params.index(k),): v for k, v in constexprs.items()})
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": 8, "num_stages": 2})
ptx = kernel.asm["ptx"]
wg = [l.strip().split()[0] for l in ptx.splitlines() if "wgmma.mma_async" in l]
print(json.dumps({"wgmma": sorted(set(wg)), "cubin": bool(kernel.asm.get("cubin")),
                  "shared": kernel.metadata.shared, "async_copies": ptx.count("cp.async.cg"),
                  "spills": ptx.count("ld.local") + ptx.count("st.local")}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("precision, qk_kind", [("int8", ".s32.s8.s8"), ("fp8", ".f32.e4m3.e4m3")])
def test_q8_kernel_compiles_for_sm90_with_8bit_wgmma(precision, qk_kind):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE, precision], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(result)
    kinds = result["wgmma"]
    assert any(qk_kind in w for w in kinds), f"no {qk_kind} wgmma for Q.K^T in {kinds}"
    assert any(".f32.e4m3.e4m3" in w for w in kinds), f"no FP8 wgmma for P.V in {kinds}"
    assert result["cubin"], "ptxas produced no cubin"
    assert result["shared"] <= 232448, "more shared memory than an H100 block can have"
    assert result["async_copies"] > 0, "the KV loop is not pipelined (no cp.async)"
    assert result["spills"] == 0, f"{result['spills']} local-memory spill instructions"
