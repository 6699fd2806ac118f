"""The 8-bit kernel's GPU code compiles for Hopper (sm_90) on any machine, with INT8 / FP8 wgmma
(the interpreter runs the math as Python and cannot see this). Same method as
``test_kernel_compile.py``: a subprocess without TRITON_INTERPRET, launch-like specialisation
(unit strides 1, 16-divisible pointers and strides) at the Wan 1.3B shape."""

import pytest

from scaling_attn_compile.testing import run_script_compiled

COMPILE = r'''
import json, sys
from scaling_attn_compile.kernels import block_sparse_attention_q8 as K
from scaling_attn_compile.kernels import launch as L
from scaling_attn_compile.testing import compile_for_sm90, sm90_launch_hints, sm90_ptx_facts

qk_int8 = sys.argv[1] == "int8"
tma = sys.argv[2] == "tma"
POINTERS, FLOATS, DIV16, UNIT = sm90_launch_hints(sys.argv[1])  # the Wan 1.3B launch's hints
energy = int(sys.argv[3]) if len(sys.argv) > 3 else 0
constexprs = dict(L.launch_meta(32760, 8, 2, 128), BLOCK_M=128, QK_INT8=qk_int8, USE_TMA=tma,
                  ENERGY_RULE=energy, **UNIT)
kernel = compile_for_sm90(K._bsa_q8_forward_kernel, POINTERS, FLOATS, DIV16, constexprs,
                          num_warps=8, num_stages=4 if tma else 2)
ptx = kernel.asm["ptx"]
wg = [l.strip().split()[0] for l in ptx.splitlines() if "wgmma.mma_async" in l]
# ptxas's own spills show only in the SASS: local loads and stores (LDL / STL)
import pathlib, re, subprocess, tempfile, triton
with tempfile.TemporaryDirectory() as tmp:
    cubin = pathlib.Path(tmp) / "k.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    nvdisasm = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
print(json.dumps({"wgmma": sorted(set(wg)), "tma_copies": ptx.count("cp.async.bulk.tensor"),
                  "sass_spills": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
                  **sm90_ptx_facts(kernel)}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("loads", ["plain", "tma"])
@pytest.mark.parametrize("precision, qk_kind", [("int8", ".s32.s8.s8"), ("fp8", ".f32.e4m3.e4m3")])
def test_q8_kernel_compiles_for_sm90_with_8bit_wgmma(precision, qk_kind, loads):
    """Plain loads at 2 stages (cp.async) and the TMA config at its deepest, 4 stages."""
    result = run_script_compiled(COMPILE, precision, loads)
    print(result)
    kinds = result["wgmma"]
    assert any(qk_kind in w for w in kinds), f"no {qk_kind} wgmma for Q.K^T in {kinds}"
    assert any(".f32.e4m3.e4m3" in w for w in kinds), f"no FP8 wgmma for P.V in {kinds}"
    assert result["cubin"], "ptxas produced no cubin"
    assert result["shared"] <= 232448, "more shared memory than an H100 block can have"
    if loads == "tma":
        assert result["tma_copies"] > 0, "no TMA copy (cp.async.bulk.tensor) in the TMA config"
    else:
        assert result["async_copies"] > 0, "the KV loop is not pipelined (no cp.async)"
    assert result["spills"] == 0, f"{result['spills']} local-memory spill instructions"


@pytest.mark.slow
@pytest.mark.parametrize("rule", [1, 2])
def test_q8_kernel_with_energy_filter_compiles_for_sm90_without_spills(rule):
    """The energy filter's branch in the 8-bit loop (two-level P.V, what the autotuner runs with
    it) still pipelines its loads and keeps everything in registers at 8 warps."""
    result = run_script_compiled(COMPILE, "int8", "plain", str(rule))
    print(result)
    assert result["cubin"] and result["async_copies"] > 0
    assert result["sass_spills"] == 0, f"{result['sass_spills']} LDL/STL in the sm_90 code"
