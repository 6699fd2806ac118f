"""The backend checks a plan against the model it compiles (issue #16, item 2), and the README's
snippet, ``torch.compile(transformer, backend=scaling_attn_backend(plan))`` with no
``dynamic=False``, runs sparse at every resolution (item 4).

Small random diffusers Wan models (2 layers, 2 heads, head_dim 16); ``compiler="eager"`` runs
the rewritten graph without Inductor, except in the one Inductor test.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch._dynamo.exc import BackendCompilerFailed

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.contract.masks import num_blocks
from scaling_attn_compile.errors import DynamicShapeError, PlanModelMismatch
from scaling_attn_compile.plan.plan import Plan

CALIB_GRID = (4, 8, 10)  # S = 320: 3 blocks
SMALL = (1, 4, 4, 16, 20)  # [B, C, F, H, W] -> grid (4, 8, 10)
OTHER = (1, 4, 2, 32, 32)  # -> grid (2, 16, 16), S = 512: 4 blocks
CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
              out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
              rope_max_seq_len=64)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo keeps compiled code and its automatic-dynamic state per code object, i.e. shared
    by every WanTransformer3DModel: each test starts from a clean slate."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model(seed=0, **changes):
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**CONFIG, **changes}).eval()


def make_plan(model):
    g = torch.Generator().manual_seed(0)
    nb = num_blocks(320)
    codes = torch.randint(1, 256, (2, 2, nb, nb), generator=g, dtype=torch.uint8)
    return Plan.from_codes(codes, model, CALIB_GRID, num_calibration_inputs=1)


def call(cm, latent=SMALL, text_dim=32, t=700):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return cm(hidden_states=torch.randn(*latent, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, text_dim, generator=g),
                  timestep=torch.tensor([t]), return_dict=False)[0]


class Recorder:
    """A ``compiler`` option that records whether compilation was reached."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.calls += 1
        return gm.forward


# ---------------------------------------------------------------------------------------------
# The plan/model check
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, match", [
    (dict(ffn_dim=128), r"differs in ffn_dim: blocks\.0\.ffn\.net\.0\.proj\.weight is "
                        r"\(128, 32\) in the model, \(64, 32\) in the plan's"),
    (dict(text_dim=16), "differs in text_dim: condition_embedder.text_embedder"),
    (dict(freq_dim=16), "differs in freq_dim: condition_embedder.time_embedder"),
    (dict(num_layers=3), r"differs in num_layers: blocks\.2\."),
    (dict(num_attention_heads=4, attention_head_dim=8),  # same inner dim: only RoPE differs
     r"differs in attention_head_dim/rope_max_seq_len: rope\.freqs_cos is \(64, 8\)"),
])
def test_plan_from_another_config_raises_before_compiling(changes, match):
    plan = make_plan(make_model())
    other = make_model(**changes)
    rec = Recorder()
    cm = torch.compile(other, backend=scaling_attn_backend(plan, compiler=rec))
    with pytest.raises(BackendCompilerFailed, match=match) as info:
        call(cm, text_dim=other.config.text_dim)
    assert isinstance(info.value.inner_exception, PlanModelMismatch)
    assert "check_model=False" in str(info.value.inner_exception) and rec.calls == 0


def test_other_weights_raise_unless_reuse_is_deliberate(caplog):
    plan = make_plan(make_model(seed=0))
    finetune = make_model(seed=1)  # same architecture, other weights
    rec = Recorder()
    with pytest.raises(BackendCompilerFailed, match="same architecture but other weights") as info:
        call(torch.compile(finetune, backend=scaling_attn_backend(plan, compiler=rec)))
    assert "check_model='config'" in str(info.value.inner_exception) and rec.calls == 0

    torch._dynamo.reset()
    be = scaling_attn_backend(plan, compiler="eager", check_model="config")
    with caplog.at_level(logging.WARNING, logger="scaling_attn_compile"):
        call(torch.compile(finetune, backend=be))
    assert "weights differ from the plan's" in caplog.text and be.reports[0].per_layer

    torch._dynamo.reset()
    caplog.clear()
    be = scaling_attn_backend(plan, compiler="eager", check_model=False)
    with caplog.at_level(logging.WARNING, logger="scaling_attn_compile"):
        call(torch.compile(make_model(ffn_dim=128), backend=be))
    assert "check_model=False: the plan is not checked" in caplog.text
    assert be.reports[0].per_layer == {0: 1, 1: 1}


def test_the_calibrated_model_passes_in_any_dtype():
    model = make_model()
    plan = make_plan(model)
    be = scaling_attn_backend(plan, compiler="eager")
    call(torch.compile(model, backend=be))
    torch._dynamo.reset()
    half = make_model().to(torch.bfloat16)  # the fingerprint rounds weights to bf16
    be2 = scaling_attn_backend(plan, compiler="eager")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        torch.compile(half, backend=be2)(
            hidden_states=torch.randn(*SMALL, generator=g).bfloat16(),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=g).bfloat16(),
            timestep=torch.tensor([700]), return_dict=False)
    assert be.reports[0].per_layer and be2.reports[0].per_layer


def test_bad_check_model_option():
    plan = make_plan(make_model())
    for bad in ("yes", True, "strict"):
        with pytest.raises(ValueError, match="check_model must be 'weights'"):
            scaling_attn_backend(plan, check_model=bad)


# ---------------------------------------------------------------------------------------------
# New resolutions without dynamic=False
# ---------------------------------------------------------------------------------------------

def static_reference(plan, latent):
    """The same plan compiled with dynamic=False by a fresh backend: what each resolution
    must give."""
    torch._dynamo.reset()
    be = scaling_attn_backend(plan, compiler="eager", materialize_kwargs={"density": 0.5})
    out = call(torch.compile(make_model(), backend=be, dynamic=False), latent)
    return out, be.reports[-1]


@pytest.mark.parametrize("how", ["default", "dynamic=True", "by name"])
def test_readme_snippet_runs_sparse_at_every_resolution(how):
    model = make_model()
    plan = make_plan(model)
    want = {lat: static_reference(plan, lat) for lat in (SMALL, OTHER)}
    torch._dynamo.reset()
    opts = dict(compiler="eager", materialize_kwargs={"density": 0.5})
    if how == "by name":  # the torch_dynamo_backends entry point
        cm = torch.compile(model, backend="scaling_attn", options={"plan": plan, **opts})
    else:
        be = scaling_attn_backend(plan, **opts)
        cm = torch.compile(model, backend=be, **({"dynamic": True} if how != "default" else {}))
    for lat in (SMALL, OTHER, SMALL, OTHER):
        out, report = call(cm, lat), want[lat][1]
        assert torch.equal(out, want[lat][0]), lat
        assert report.per_layer == {0: 1, 1: 1}
    if how != "by name":
        # One compile per resolution, in call order, each rewriting both layers. By default
        # the first resolution compiles again when it comes back: Dynamo tries its newest
        # (symbolic) graph first, and that graph compiles each size at its first call.
        # (dynamic=True: duck sizing gives C and F one symbol at the first size, so Dynamo
        # recompiles at the second; the same three compiles result.)
        assert [r.grid for r in be.reports] == [CALIB_GRID, (2, 16, 16), CALIB_GRID]
        assert all(r.per_layer == {0: 1, 1: 1} for r in be.reports)
    # Sparse, not dense: a dense model gives another output at the 4-block grid.
    dense = call(torch.compile(make_model(), backend="eager"), OTHER)
    assert not torch.allclose(dense, want[OTHER][0], atol=1e-6)


def test_error_option_still_raises_on_symbolic_graphs():
    plan = make_plan(make_model())
    be = scaling_attn_backend(plan, compiler="eager", on_dynamic_shapes="error",
                              materialize_kwargs={"density": 0.5})
    cm = torch.compile(make_model(), backend=be)
    call(cm, SMALL)
    with pytest.raises(BackendCompilerFailed, match="dynamic=False") as info:
        call(cm, OTHER)
    assert isinstance(info.value.inner_exception, DynamicShapeError)


@pytest.mark.slow
def test_second_resolution_through_inductor():
    """What the specialisation hands Inductor (AOT needs each placeholder's Dynamo source)."""
    model = make_model(num_layers=1)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(1, 256, (1, 2, 3, 3), generator=g, dtype=torch.uint8)
    plan = Plan.from_codes(codes, model, CALIB_GRID, num_calibration_inputs=1)
    torch._dynamo.reset()
    be = scaling_attn_backend(plan, materialize_kwargs={"density": 0.5})
    cm = torch.compile(model, backend=be)
    eager_be = scaling_attn_backend(plan, compiler="eager", materialize_kwargs={"density": 0.5})
    ref = torch.compile(make_model(num_layers=1), backend=eager_be, dynamic=False)
    for lat in (SMALL, OTHER):
        torch.testing.assert_close(call(cm, lat), call(ref, lat), rtol=1e-4, atol=1e-5)
    assert [r.grid for r in be.reports] == [CALIB_GRID, (2, 16, 16)]
    assert all(r.per_layer == {0: 1} for r in be.reports)


@pytest.mark.gpu
def test_gpu_second_resolution_runs_the_template():
    """On CUDA in bf16: the README snippet (no dynamic=False) at two resolutions goes through
    the Triton template at both and matches a dynamic=False compile of the same plan."""
    model = make_model(attention_head_dim=64).to("cuda", torch.bfloat16)
    plan = make_plan(make_model(attention_head_dim=64))  # fingerprints round to bf16
    opts = dict(materialize_kwargs={"density": 0.5})
    be = scaling_attn_backend(plan, **opts)
    ref_be = scaling_attn_backend(plan, **opts)
    cm = torch.compile(model, backend=be)
    ref = torch.compile(make_model(attention_head_dim=64).to("cuda", torch.bfloat16),
                        backend=ref_be, dynamic=False)
    g = torch.Generator().manual_seed(1)
    for lat in (SMALL, OTHER, SMALL):
        x = torch.randn(*lat, generator=g).to("cuda", torch.bfloat16)
        text = torch.randn(1, 8, 32, generator=g).to("cuda", torch.bfloat16)
        kw = dict(hidden_states=x, encoder_hidden_states=text,
                  timestep=torch.tensor([700], device="cuda"), return_dict=False)
        with torch.no_grad():
            torch.testing.assert_close(cm(**kw)[0], ref(**kw)[0], rtol=2e-2, atol=2e-2)
    assert [r.grid for r in be.reports] == [CALIB_GRID, (2, 16, 16), CALIB_GRID]
    assert all(r.per_layer == {0: 1, 1: 1} for r in be.reports)
