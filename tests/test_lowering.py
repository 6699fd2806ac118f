"""The Inductor lowering of the op and its Triton template, on small diffusers Wan transformers
(random weights): moved verbatim out of ``test_backend.py``, whose model, inputs and tables
helpers they share.

CPU (CI): the op lowers to an extern call of the eager op; the Triton template is rendered on
the CPU through Inductor's triton cpu backend and the rendered kernel runs in the Triton
interpreter. GPU (``-m gpu``, on the device): the model in bf16 compiles to our template kernel.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

from scaling_attn_compile.compile import lowering
from scaling_attn_compile.compile import template_source as tsrc
from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.contract.tables import uniform_tables
from scaling_attn_compile.testing import (
    assert_close_to_oracle,
    make_local_qkv,
    make_qkv,
    rendered_kernel,
)

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers live in test_backend.py
from test_backend import (  # noqa: E402
    CUDA,
    GPU,
    GRID,
    HEADS,
    OP,
    Oracle,
    _fresh_dynamo,  # noqa: F401  (autouse: a fresh Dynamo per test)
    compiled,
    device_setup,
    make_inputs,
    make_model,
    two_level_tables,
)
from test_fa4_choice import capture_template_choices  # noqa: E402  (self-contained: no diffusers)

# --------------------------------------------------------------------------------------------
# The Inductor lowering and the template, without a GPU
# --------------------------------------------------------------------------------------------


def test_cpu_lowering_is_an_extern_call_to_the_op():
    from torch._inductor.utils import run_and_get_code

    q, k, v = make_qkv(1, 2, 200, 16, dtype=torch.float32)
    tables = two_level_tables(1, 2, (1, 1, 200))
    masks, lt, bb = tables.layer(0)
    ts = torch.tensor([900])
    f = torch.compile(lambda *a: OP(*a, 0.25) * 2, backend="inductor", fullgraph=True)
    out, (code, *_) = run_and_get_code(f, q, k, v, masks, lt, bb, ts)
    assert "torch.ops.scaling_attn.sparse_attention.default" in code
    # The extern call runs the eager op's CPU path: equal to the bit; and that path is the reference.
    eager = OP(q, k, v, masks, lt, bb, ts, 0.25)
    assert torch.equal(out, 2 * eager)
    torch.testing.assert_close(eager, sparse_attention_reference(q, k, v, masks, lt, bb, ts, 0.25))


def test_template_source_is_the_kernel_source():
    """One source of kernel math: every jit function the tile calls is pasted verbatim."""
    import inspect

    src = tsrc.template_source()
    names = []
    for fn in tsrc._jit_closure(tsrc._TILE_FN):
        body = inspect.getsource(getattr(fn, "fn", fn))
        assert body[body.index("\ndef ") + 1:] in src
        names.append(getattr(fn, "fn", fn).__name__)
    assert {"bsa_forward_tile", "bsa_popcount", "bsa_select_level"} <= set(names)
    assert "bsa_forward_tile(" in src and "{{store_output(" in src


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
@pytest.mark.parametrize("ts_shape", ["per-batch", "shared"])
def test_rendered_template_runs_in_the_interpreter(ts_shape):
    """The template as Inductor renders it (Jinja, def_kernel, stride/size, store_output, the
    pasted jit functions) is run by the Triton interpreter and equals the reference: this
    catches template API drift and stub bugs without a GPU."""

    import triton

    B, H, S, D = 2, 2, 200, 64
    q, k, v = make_qkv(B, H, S, D, dtype=torch.float16)
    tables = two_level_tables(1, H, (1, 1, S))
    masks, lt, _ = tables.layer(0)
    lt, bb = torch.cat([lt, lt[-1:]]), torch.tensor([500.0, float("inf")])  # as the backend binds
    # "shared": one timestep for both batch elements, a (1,) view whose storage goes on with a
    # timestep of the other bucket, so reading it at stride 1 instead of 0 gives a wrong answer.
    ts = torch.tensor([900, 100]) if ts_shape == "per-batch" else torch.tensor([100, 900])[:1]
    scale = D**-0.5
    f = lambda *a: OP(*a, scale)
    with capture_template_choices() as choices:
        with pytest.raises(Exception, match="choices captured"):
            torch.compile(f, backend="inductor", fullgraph=True)(q, k, v, masks, lt, bb, ts)
    assert len(choices) == len(lowering.template_configs())
    golden = sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale,
                                        compute_dtype=torch.float64)
    same = sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale)
    by_block_m = {}
    for choice in choices:
        kernel = rendered_kernel(choice)
        block_m = kernel.inductor_meta["config_args"]["BLOCK_M"]
        by_block_m.setdefault(block_m, kernel)
    assert set(by_block_m) == {64, 128}
    for block_m, kernel in by_block_m.items():  # one per tile height: the interpreter is slow
        out = torch.full_like(q, float("nan"))
        kernel.fn[(triton.cdiv(S, block_m), B, H)](q, k, v, masks, lt, bb, ts, out)
        assert_close_to_oracle(out, golden, same, k=3.0, what=f"template BLOCK_M={block_m}")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
@pytest.mark.parametrize("rule", ["cumulative", "blasst"])
def test_rendered_template_with_energy_filter_matches_its_reference(rule):
    """With the energy filter on, the op still lowers to the template (128-row configs only) and
    the rendered kernel equals the filter's reference, at a threshold that skips blocks: the
    unfiltered reference is further off than the tolerance, so a dropped filter would fail."""

    import triton

    from scaling_attn_compile.contract.masks import ENERGY_RULES
    from scaling_attn_compile.contract.reference import (
        block_masks_for,
        energy_filtered_attention_reference,
    )

    B, H, S, D = 1, 2, 600, 64
    q, k, v = make_local_qkv(B, H, S, D, seed=3, dtype=torch.float16)  # far blocks negligible
    tables = uniform_tables(1, H, (1, 1, S), 1.0)
    masks, lt, bb = tables.layer(0)
    ts = torch.tensor([500.0])
    scale, code = D**-0.5, ENERGY_RULES[rule]
    threshold = 0.0 if rule == "cumulative" else -0.5  # aggressive: the dropped mass shows
    f = lambda *a: OP(*a, scale, code, threshold)
    with capture_template_choices() as choices:
        with pytest.raises(Exception, match="choices captured"):
            torch.compile(f, backend="inductor", fullgraph=True)(q, k, v, masks, lt, bb, ts)
    assert len(choices) == sum(c["block_m"] == 128 for c in lowering.template_configs())
    blocks = block_masks_for(masks, lt, bb, ts, B, S)
    golden, skipped = energy_filtered_attention_reference(q, k, v, blocks, scale, code, threshold,
                                                          return_skipped=True)
    same = energy_filtered_attention_reference(q, k, v, blocks, scale, code, threshold,
                                               compute_dtype=torch.float32)
    assert skipped.any(), "the threshold must make the filter skip something"
    unfiltered = sparse_attention_reference(q, k, v, masks, lt, bb, ts, scale)
    with pytest.raises(AssertionError):
        assert_close_to_oracle(unfiltered, golden, same, k=3.0)
    choice = choices[0]
    kernel = rendered_kernel(choice)
    assert kernel.inductor_meta["config_args"]["ENERGY_RULE"] == code
    assert f"ENERGY_RULE : tl.constexpr = {code}" in open(choice.bmreq.module_path).read()
    out = torch.full_like(q, float("nan"))
    kernel.fn[(triton.cdiv(S, 128), B, H)](q, k, v, masks, lt, bb, ts, out)
    assert_close_to_oracle(out, golden, same, k=3.0, what=f"template, {rule} filter")


def test_wan_graph_lowers_to_template_choices():
    """The whole Wan graph (q/k/v are permuted views of RoPE outputs, not graph inputs) reaches
    the template path on the CPU: every config renders, reading q/k/v as (B, H, S, D) views of
    (B, S, H, D) memory and writing the output in the same fill order."""
    model = make_model(head_dim=64).to(torch.float16)
    inputs = make_inputs(dtype=torch.float16)
    be = scaling_attn_backend(two_level_tables())
    with capture_template_choices() as choices, torch.no_grad():
        with pytest.raises(BackendCompilerFailed, match="choices captured"):
            compiled(model, be)(timestep=torch.tensor([900]), return_dict=False, **inputs)
    assert len(choices) == len(lowering.template_configs())
    S, H, D = 320, HEADS, 64
    for choice in choices:
        src = open(choice.bmreq.module_path).read()
        for t in "qkv":
            line = next(x for x in src.splitlines() if f"stride_{t}b, " in x)
            b, h, s, d = (int(x) for x in line.split("=")[1].split(","))
            assert (h, s, d) == (D, H * D, 1) and b in (0, S * H * D), line
        assert f"idx_d + {D}*idx_h + {H * D}*idx_m" in src  # output: (B, S, H, D) memory


def test_kernel_source_hash_follows_the_files(tmp_path):
    files = []
    for name in ("lowering.py", "backend.py", "kernel.py"):
        p = tmp_path / name
        p.write_text(f"# {name}\n")
        files.append(str(p))
    lowering.get_hash_for_files.cache_clear()  # Inductor's helper caches its last answer
    before = lowering.source_hash(files)
    (tmp_path / "kernel.py").write_text("# kernel.py, edited\n")
    lowering.get_hash_for_files.cache_clear()
    assert lowering.source_hash(files) != before
    assert lowering.KernelSourceHash().uuid() == lowering._SOURCE_HASH


def test_backend_installs_the_hash_pass_and_keeps_a_user_pass():
    class UserPass(lowering.CustomGraphPass):
        def __call__(self, graph):
            pass

        def uuid(self):
            return "user-pass-v1"

    be = scaling_attn_backend(uniform_tables(1, 1, GRID, 1.0),
                              inductor_config={"post_grad_custom_post_pass": UserPass(),
                                               "max_autotune": True})
    patches = be.config_patches()
    assert patches["max_autotune"] is True
    hashed = patches["post_grad_custom_post_pass"]
    assert isinstance(hashed, lowering.KernelSourceHash)
    assert hashed.uuid() != lowering.KernelSourceHash().uuid()  # the user pass is hashed too
    assert scaling_attn_backend(uniform_tables(1, 1, GRID, 1.0), hash_kernel_sources=False
                                ).config_patches() == {}


# --------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------


@GPU
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_generated_code_runs_our_template():
    from torch._inductor.utils import run_and_get_code

    dtype, head_dim = device_setup("cuda")
    model = make_model(head_dim=head_dim).to("cuda", dtype)
    inputs = make_inputs(device="cuda", dtype=dtype)
    tables = two_level_tables()
    oracle = Oracle(model, tables)
    cm = compiled(model, scaling_attn_backend(tables))
    ts = torch.tensor([900], device="cuda")
    with torch.no_grad():
        out, codes = run_and_get_code(cm, timestep=ts, return_dict=False, **inputs)
    code = "\n".join(codes)
    assert "def bsa_forward_tile(" in code, "our template kernel is not in the generated code"
    # The FX graph is echoed in comments; an eager fallback would be a call in the code itself.
    calls = [line for line in code.splitlines() if not line.lstrip().startswith("#")]
    assert not any("torch.ops.scaling_attn.sparse_attention" in line for line in calls), \
        "fell back to the eager op"
    same, golden = oracle(ts, **inputs)
    assert_close_to_oracle(out[0], golden, same, k=3.0)


@GPU
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rule", ["cumulative", "blasst"])
def test_gpu_energy_filter_lowers_to_the_template(rule):
    from torch._inductor.utils import run_and_get_code

    from scaling_attn_compile.contract.masks import ENERGY_RULES
    from scaling_attn_compile.contract.reference import (
        block_masks_for,
        energy_filtered_attention_reference,
    )

    B, H, S, D = 1, 2, 2000, 64
    q, k, v = make_local_qkv(B, H, S, D, seed=3, dtype=torch.bfloat16, device="cuda")
    masks, lt, bb = uniform_tables(1, H, (1, 1, S), 1.0).to("cuda").layer(0)
    ts = torch.tensor([500.0], device="cuda")
    scale, code, threshold = D**-0.5, ENERGY_RULES[rule], (-2.0 if rule == "cumulative" else -1.0)
    torch._dynamo.reset()
    f = torch.compile(lambda *a: OP(*a, scale, code, threshold), fullgraph=True)
    out, codes = run_and_get_code(f, q, k, v, masks, lt, bb, ts)
    src = "\n".join(codes)
    assert "def bsa_forward_tile(" in src and f"ENERGY_RULE : tl.constexpr = {code}" in src
    calls = [line for line in src.splitlines() if not line.lstrip().startswith("#")]
    assert not any("torch.ops.scaling_attn.sparse_attention" in line for line in calls)
    blocks = block_masks_for(masks, lt, bb, ts, B, S)
    golden, skipped = energy_filtered_attention_reference(q, k, v, blocks, scale, code, threshold,
                                                          return_skipped=True)
    same = energy_filtered_attention_reference(q, k, v, blocks, scale, code, threshold,
                                               compute_dtype=torch.bfloat16)
    assert skipped.any()
    assert_close_to_oracle(out, golden, same, k=3.0)


def test_template_paste_rejects_module_globals_but_not_attribute_names(tmp_path):
    """The pasted jit source may not read module constants (NameError in Inductor's module), and
    an attribute such as ``x.T`` is no global read even when the module holds a ``T`` (Triton's
    interpreter injects one into the kernel module)."""
    import types

    src = ("import triton\nBIG = 7\nT = object()\n\n@triton.jit\ndef uses_global(x):\n"
           "    return x * BIG\n\n@triton.jit\ndef uses_attribute(x):\n    return x.T\n")
    path = tmp_path / "k.py"
    path.write_text(src)
    mod = types.ModuleType("k")
    mod.__file__ = str(path)
    exec(compile(src, str(path), "exec"), mod.__dict__)
    with pytest.raises(RuntimeError, match="module global 'BIG'"):
        tsrc._jit_source(mod.uses_global, {"uses_global"})
    assert "def uses_attribute" in tsrc._jit_source(mod.uses_attribute, {"uses_attribute"})
