"""The 8-bit op's Inductor lowering (compile/lowering.py): on CUDA the quantize pre-pass
(``torch.ops.scaling_attn.quantize_q8``, an extern call) and the 8-bit Triton template over its
outputs, the configs and exact P.V forms autotuned; elsewhere the eager op.

Without a GPU the template is rendered on the CPU (Inductor's triton cpu backend, the lowering's
device list patched) and the rendered kernel runs in Triton's interpreter against the eager
8-bit kernel: the same tile function, so the outputs agree bit for bit. ``-m gpu``: the compiled
graph holds the template, and its output equals the eager op's.
"""

import importlib.util
import os
import sys

import pytest
import torch
import triton

from scaling_attn_compile.compile import lowering, lowering_q8
from scaling_attn_compile.contract.masks import dense_tables
from scaling_attn_compile.kernels.launch_q8 import PV_EXACT, PV_EXACT_ENERGY, PV_MODES
from scaling_attn_compile.testing import make_outlier_qkv

sys.path.insert(0, os.path.dirname(__file__))
from test_fa4_choice import capture_template_choices  # noqa: E402
from test_kernel_q8 import fp8_cast_fix, random_tables  # noqa: E402, F401  (the fixture)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
OP_Q8 = torch.ops.scaling_attn.sparse_attention_q8


def capture(fn, *args):
    """The 8-bit template's choices for ``fn(*args)``, rendered on the CPU, not benchmarked."""
    with capture_template_choices() as choices, \
            pytest.raises(Exception, match="choices captured"):
        torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False)(*args)
    return choices


def case(S=300, H=2, D=64, seed=0, p=0.5):
    q, k, v = (t.half() for t in make_outlier_qkv(1, H, S, D, seed=seed))  # interpreter: no bf16
    masks, lt, bb = random_tables(H, S, levels=2, buckets=2, seed=seed, p=p)
    return q, k, v, masks, lt, bb, torch.tensor([300.0])


def source(choice) -> str:
    with open(choice.bmreq.module_path) as f:
        return f.read()


@pytest.mark.parametrize("energy_rule", [0, 1])
def test_the_choices_are_every_config_with_every_exact_pv_form(energy_rule):
    args = case()
    choices = capture(lambda *a: OP_Q8(*a, 0.125, "int8", energy_rule, 0.5 * energy_rule), *args)
    pvs = PV_EXACT_ENERGY if energy_rule else PV_EXACT
    expected = lowering_q8.template_configs_q8(energy_rule)
    assert len(choices) == len(expected) and {pv for _, pv in expected} == set(pvs)
    rendered = [source(c) for c in choices]
    for pv in pvs:
        assert sum(f"PV_MODE : tl.constexpr = {PV_MODES[pv]}" in s for s in rendered) == \
            sum(1 for _, p in expected if p == pv)
    assert all("bsa_q8_forward_tile" in s and "QK_INT8 : tl.constexpr = True" in s
               for s in rendered)
    if energy_rule:
        assert all("BLOCK_M : tl.constexpr = 128" in s and "ENERGY_RULE : tl.constexpr = 1" in s
                   for s in rendered)


def test_the_graph_quantizes_once_before_the_template():
    """The pre-pass is an extern call of ``quantize_q8`` on q, k, v; the template's inputs are
    its six outputs and the four tables. q, k, v as diffusers passes them to SDPA: (B, H, S, D)
    views of (B, S, H, D) memory (a permuted view failed the first GPU run's model test)."""
    q, k, v, *tables = case()
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, S, H, D) memory

    def attend(q, k, v, *tables):  # a computed q (as after RoPE), permuted inside the graph
        return OP_Q8((q * 0.5).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *tables,
                     0.125, "fp8")

    choices = capture(attend, q, k, v, *tables)
    names = [n.get_name() for n in choices[0].input_nodes]
    assert len(names) == 10
    dtypes = [n.get_dtype() for n in choices[0].input_nodes[:6]]
    assert dtypes == [torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float8_e4m3fn,
                      torch.float32, torch.float32, torch.float32]


@pytest.mark.skipif(not INTERPRET, reason="needs the interpreter")
@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("energy_rule", [0, 2])
def test_rendered_template_equals_the_eager_kernel(precision, energy_rule):
    """Every rendered choice, run in the interpreter on the pre-pass's outputs, equals the eager
    8-bit kernel at that config and P.V form, bit for bit (one tile function)."""
    from scaling_attn_compile.kernels.launch_q8 import block_sparse_attention_q8_forward

    q, k, v, masks, lt, bb, ts = case()
    thr = 0.01 if energy_rule else 0.0
    choices = capture(lambda *a: OP_Q8(*a, 0.125, precision, energy_rule, thr),
                      q, k, v, masks, lt, bb, ts)
    q8, qs, k8, ks, vt8, vs = torch.ops.scaling_attn.quantize_q8(q, k, v, precision)
    configs = lowering_q8.template_configs_q8(energy_rule)
    for choice, (config, pv) in zip(choices, configs, strict=True):
        text = source(choice)
        assert f"BLOCK_M : tl.constexpr = {config['block_m']}" in text
        assert f"PV_MODE : tl.constexpr = {PV_MODES[pv]}" in text
        spec = importlib.util.spec_from_file_location("tmpl_q8", choice.bmreq.module_path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out = torch.full_like(q, float("nan"))
        grid = (triton.cdiv(300, 128) * (128 // config["block_m"]), 1, 2)
        getattr(mod, choice.bmreq.kernel_name).fn[grid](q8, k8, vt8, qs, ks, vs, masks, lt, bb, ts, out)
        eager = torch.full_like(q, float("nan"))
        block_sparse_attention_q8_forward(
            q, k, v, masks, lt, bb, ts, eager, 0.125, precision,
            (config["block_m"], config["num_warps"], config["num_stages"]), pv=pv,
            energy_rule=energy_rule, energy_threshold=thr)
        assert not out.isnan().any(), f"{config} {pv}: the template left elements unwritten"
        assert torch.equal(out, eager), f"{config} {pv}: template != eager kernel"


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantize_op_passes_opcheck_and_returns_the_kernels_layout(precision):
    """The pre-pass op: schema, fake and eager agree (``opcheck``); V^T is the whole padded
    (B, H, D, pitch) buffer, zeros past S, equal to the launcher's V view where it is read."""
    from scaling_attn_compile.kernels.launch_q8 import quantize_for_kernel

    q, k, v = case()[:3]
    torch.library.opcheck(torch.ops.scaling_attn.quantize_q8.default, (q, k, v, precision))
    q8, qs, k8, ks, vt8, vs = torch.ops.scaling_attn.quantize_q8(q, k, v, precision)
    ref = quantize_for_kernel(q, k, v, precision, impl="torch")
    assert vt8.shape == (1, 2, 64, 304) and vt8.is_contiguous()
    assert torch.equal(vt8[..., :300].transpose(-1, -2).float(), ref[4].float())
    assert not vt8[..., 300:].float().any()
    for got, want in zip((q8, qs, k8, ks, vs), (ref[0], ref[1], ref[2], ref[3], ref[5]),
                         strict=True):
        assert torch.equal(got.float(), want.float())


def test_cpu_graph_calls_the_eager_op():
    """No template on the CPU: the compiled op is the eager op (the reference there)."""
    q, k, v, masks, lt, bb, ts = case(S=256)
    masks, lt, bb = dense_tables(2, 256)
    fn = torch.compile(lambda *a: OP_Q8(*a, 0.125, "int8"), backend="inductor", fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, masks, lt, bb, ts),
                               OP_Q8(q, k, v, masks, lt, bb, ts, 0.125, "int8"))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_gpu_compiled_graph_runs_the_8bit_template(precision):
    from torch._inductor.utils import run_and_get_code

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the device)")
    torch.manual_seed(0)
    S, H, D = 3000, 4, 128
    q, k, v = (t.to("cuda", torch.bfloat16) for t in make_outlier_qkv(1, H, S, D, seed=0))
    masks, lt, bb = (t.cuda() for t in random_tables(H, S, levels=2, buckets=2, seed=0, p=0.4))
    ts = torch.tensor([300.0], device="cuda")
    eager = OP_Q8(q, k, v, masks, lt, bb, ts, D ** -0.5, precision)
    fn = torch.compile(lambda *a: OP_Q8(*a, D ** -0.5, precision), fullgraph=True)
    out, code = run_and_get_code(fn, q, k, v, masks, lt, bb, ts)
    text = "\n".join(code)
    assert "bsa_q8_forward_tile" in text and "quantize_q8" in text
    assert lowering.PICKS[-1]["picked"] == "template"
    # The autotuner may pick another config than the eager one: same arithmetic per row but the
    # wgmma's order within a block; both are within the 8-bit bound, so compare them closely.
    err = ((out.float() - eager.float()).norm() / eager.float().norm()).item()
    assert err < 2e-3, f"compiled template vs eager 8-bit op: rel-L2 {err:.2e}"
