"""FP8 linear layers through torchao composed with the backend (issue 15, item 3): the compiled
graph holds both our 8-bit attention op and torchao's scaled matmuls, and one graph serves every
timestep. Skips without torchao (not a dependency: ``pip install torchao``).

torchao's float8 dynamic-activation/float8-weight config refuses to quantize without an sm89+
GPU; on the CPU the test bypasses that hardware check (``_check_hardware_support``) to check the
graph wiring only: the CPU runs ``aten._scaled_mm`` but no speed or accuracy claim is made here.
"""

from __future__ import annotations

import collections
import os
import sys
from unittest import mock

import pytest
import torch

torchao = pytest.importorskip("torchao")

from scaling_attn_compile.compile.backend import scaling_attn_backend  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers live in test_backend.py
from test_backend import (  # noqa: E402
    _fresh_dynamo,  # noqa: F401  (autouse: a fresh Dynamo per test)
    make_inputs,
    make_model,
    two_level_tables,
)

CUDA_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def fp8_linears(model):
    """The README's one-liner: rowwise FP8 for every Linear of the transformer blocks."""
    import torchao.quantization.quant_api as qa
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                       set_inductor_config=False)
    tuning = torch._inductor.config.coordinate_descent_tuning
    blocks_only = lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("blocks.")
    if CUDA_FP8:
        quantize_(model, config, filter_fn=blocks_only)
    else:
        with mock.patch.object(qa, "_check_hardware_support", lambda granularity: None):
            quantize_(model, config, filter_fn=blocks_only)
    # the one-liner leaves Inductor's settings alone (torchao's default would turn this on for
    # the whole process, and every later compile in the test session would tune)
    assert torch._inductor.config.coordinate_descent_tuning == tuning
    return model


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_fp8_linears_and_our_op_share_one_graph_across_timesteps(precision):
    from torch._functorch.aot_autograd import aot_module_simplified

    device = "cuda" if CUDA_FP8 else "cpu"
    model = fp8_linears(make_model().to(device, torch.bfloat16))
    graphs = []

    def keep_forward_graph(gm, example_inputs):  # the post-AOT graph Inductor would get
        return aot_module_simplified(gm, example_inputs,
                                     fw_compiler=lambda g, _: graphs.append(g) or g.forward)

    tables = two_level_tables()
    backend = scaling_attn_backend(tables, compiler=keep_forward_graph, precision=precision)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    inputs = make_inputs(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        outs = [compiled(**inputs, timestep=torch.tensor([t], device=device),
                         return_dict=False)[0] for t in (900, 100)]
    assert len(graphs) == 1, f"{len(graphs)} graphs for two timesteps: a recompile"
    ops = collections.Counter(str(n.target) for n in graphs[0].graph.nodes
                              if n.op == "call_function")
    ours = "scaling_attn.sparse_attention_q8.default" if precision != "bf16" else \
        "scaling_attn.sparse_attention.default"
    assert ops[ours] == 2  # one self-attention per layer
    # Every block Linear (q, k, v, out of both attentions, two FFN layers: 10 per layer).
    assert ops["aten._scaled_mm.default"] == 20
    assert all(torch.isfinite(o).all() for o in outs)


def test_a_plan_with_fp8_linears_needs_check_model_config():
    # The weights fingerprint reads the dequantized FP8 weights, which are not the calibrated
    # ones: "weights" refuses with the usual one-line mismatch, "config" (a deliberate reuse)
    # compiles. Before, torchao's Float8Tensor failed inside the fingerprint's reshape.
    from test_backend import GRID, HEADS, LAYERS
    from torch._dynamo.exc import BackendCompilerFailed

    from scaling_attn_compile.contract.masks import num_blocks
    from scaling_attn_compile.plan.plan import Plan

    model = make_model()
    nb = num_blocks(GRID[0] * GRID[1] * GRID[2])
    codes = torch.randint(0, 256, (LAYERS, HEADS, nb, nb), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    plan = Plan.from_codes(codes, model, GRID, num_calibration_inputs=1)
    model = fp8_linears(model.to(torch.bfloat16))
    inputs = make_inputs(dtype=torch.bfloat16)

    def run(check_model):
        torch._dynamo.reset()
        backend = scaling_attn_backend(plan, compiler="eager", precision="int8",
                                       check_model=check_model,
                                       materialize_kwargs={"density": 0.5})
        with torch.no_grad():
            return torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(
                **inputs, timestep=torch.tensor([500]), return_dict=False)[0]

    with pytest.raises(BackendCompilerFailed, match="other weights than the plan's"):
        run("weights")
    assert torch.isfinite(run("config")).all()
