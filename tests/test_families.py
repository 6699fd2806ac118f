"""The Wan family beyond Wan2.1 through the one adapter (models/wan.py): VACE
(``WanVACETransformer3DModel``) and SkyReels-V2 (``SkyReelsV2Transformer3DModel``), random small
configs written with ``save_pretrained`` and read back with ``from_pretrained``.

CPU, ``compiler="eager"``: the rewritten graph runs the op's readable reference. Checked per
family: all-dense tables == eager; sparse two-level tables == eager with the reference
processor at both timestep buckets; rewrite counts (one self-attention per layer, the
cross-attention and VACE's control blocks left dense); no recompile over a short loop; VACE in
tile token order (its control tokens permuted with the video tokens); an unknown class refused.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from unittest import mock

import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel, WanVACETransformer3DModel
from diffusers.models.transformers import transformer_skyreels_v2, transformer_wan

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.contract import token_order as to
from scaling_attn_compile.contract.masks import num_blocks
from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.contract.tables import uniform_tables
from scaling_attn_compile.models.wan import (
    SUPPORTED_CLASSES,
    check_supported,
    latent_shape_for,
    latent_token_grid,
    load_transformer,
)
from scaling_attn_compile.plan.plan import Plan
from scaling_attn_compile.testing import (
    assert_close_to_oracle,
    eager_two_dtypes,
    recorded_attention_qk,
    run_compiled_steps,
    sharpen_qk,
)

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers live in test_backend.py
from test_backend import _fresh_dynamo, two_level_tables  # noqa: E402,F401  (autouse fixture)

LATENT = (1, 4, 4, 16, 20)  # [B, C, F, H, W]
GRID = (4, 8, 10)  # after patch (1, 2, 2)
LAYERS, HEADS, HEAD_DIM = 2, 2, 16
COMMON = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
              in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
              num_layers=LAYERS, rope_max_seq_len=64)
VACE_IN = 8
FAMILIES = {
    "vace": (WanVACETransformer3DModel, dict(vace_layers=[0, 1], vace_in_channels=VACE_IN),
             transformer_wan),
    "skyreels": (SkyReelsV2Transformer3DModel, {}, transformer_skyreels_v2),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family saved once with save_pretrained (peaked self-attention: a wrong mask shows)."""
    out = {}
    for name, (cls, extra, _mod) in FAMILIES.items():
        torch.manual_seed(0)
        model = cls(**COMMON, **extra).eval()
        sharpen_qk(block.attn1 for block in model.blocks)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = folder
    return out


def load(saved, name):
    cls = FAMILIES[name][0]
    return cls.from_pretrained(saved[name], torch_dtype=torch.float32).eval()


def make_inputs(name, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = dict(hidden_states=torch.randn(*LATENT, generator=g),
               encoder_hidden_states=torch.randn(1, 24, 32, generator=g))
    if name == "vace":
        out["control_hidden_states"] = torch.randn(1, VACE_IN, *LATENT[2:], generator=g)
    return out


def reference_processors(model, module, tables, clock, compute_dtype, order="raster"):
    """Each block's attn1 with self-attention done by the op's readable reference (in ``order``:
    q/k/v permuted after RoPE, output un-permuted); VACE's control blocks stay dense."""
    base = type(model.blocks[0].attn1.processor)
    perm = to.permutation(tables.grid, order)
    inv = to.inverse_permutation(tables.grid, order)

    class Reference(base):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     rotary_emb=None):
            masks, lt, bounds = self.tables_layer

            def sparse(query, key, value, **_):  # (B, S, H, D), as diffusers' dispatch
                q, k, v = (t[:, perm].transpose(1, 2) for t in (query, key, value))
                out = sparse_attention_reference(q, k, v, masks, lt, bounds, clock["t"], None,
                                                 compute_dtype=compute_dtype)
                return out.transpose(1, 2)[:, inv]

            with mock.patch.object(module, "dispatch_attention_fn", sparse):
                return super().__call__(attn, hidden_states, encoder_hidden_states,
                                        attention_mask, rotary_emb)

    for i, block in enumerate(model.blocks):
        proc = Reference(i)
        proc.tables_layer = tables.layer(i)
        block.attn1.set_processor(proc)
    return model


def eager(model, inputs, t, tables=None, module=None, order="raster", timestep=None):
    """(same dtype, float64) eager outputs; with ``tables``, self-attention by the reference at
    bucket timestep ``t``. ``timestep``: the model's input, default ``[t]``."""
    reference = None if tables is None else (lambda m, dtype: reference_processors(
        m, module, tables, {"t": torch.tensor([t])}, dtype, order))
    return eager_two_dtypes(model, inputs, torch.tensor([t]) if timestep is None else timestep,
                            reference)


def compiled_run(model, plan, inputs, steps, timestep_of=lambda t: torch.tensor([t])):
    be = scaling_attn_backend(plan, compiler="eager")
    return run_compiled_steps(model, be, inputs, steps, timestep_of), be


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_dense_and_sparse_equal_eager_with_counts(saved, name):
    model, inputs = load(saved, name), make_inputs(name)
    assert type(model).__name__ in SUPPORTED_CLASSES
    # All-dense tables: the compiled model is the eager one.
    (out,), be = compiled_run(model, uniform_tables(LAYERS, HEADS, GRID, 1.0), inputs, [700])
    same, golden = eager(model, inputs, 700)
    assert_close_to_oracle(out, golden, same)
    report = be.reports[0]
    assert report.per_layer == {0: 1, 1: 1}
    want_dense = {"cross-attention": LAYERS}
    if name == "vace":  # two control blocks, each a self- and a cross-attention
        want_dense = {"cross-attention": LAYERS + 2, "VACE control-block attention": 2}
    assert report.left_dense == want_dense
    torch._dynamo.reset()
    # Sparse, two timestep buckets (t < 500: all sparse; t >= 500: head 0 dense), one graph.
    tables = two_level_tables(LAYERS, HEADS, GRID)
    steps = [900, 700, 300, 100]
    outs, be = compiled_run(model, tables, inputs, steps)
    assert len(be.reports) == 1  # one compile for the whole loop
    for t, out in zip(steps, outs, strict=True):
        same, golden = eager(model, inputs, t, tables, FAMILIES[name][2])
        assert_close_to_oracle(out, golden, same)
    dense_out, _ = eager(model, inputs, 100)
    assert (outs[-1] - dense_out).abs().max() > 1e-3  # the sparse bucket is not dense


def test_vace_in_tile_order_permutes_the_control_tokens(saved):
    model, inputs = load(saved, "vace"), make_inputs("vace")
    nb = num_blocks(math.prod(GRID))
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(1, 256, (LAYERS, HEADS, nb, nb), generator=g, dtype=torch.uint8)
    plan = Plan.from_codes(codes, model, GRID, 1, token_order="tile")
    tables = plan.materialize(GRID)
    (out,), be = compiled_run(model, plan, inputs, [700])
    assert be.reports[0].token_order == "tile"
    same, golden = eager(model, inputs, 700, tables, transformer_wan, order="tile")
    assert_close_to_oracle(out, golden, same)


def test_load_transformer_builds_the_class_the_folder_names(saved, tmp_path):
    for name, (cls, _extra, _mod) in FAMILIES.items():
        assert type(load_transformer(str(saved[name])).transformer) is cls
    bad = tmp_path / "ltx"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"_class_name": "LTXVideoTransformer3DModel"}))
    with pytest.raises(TypeError, match="names model class LTXVideoTransformer3DModel, which is "
                       "not supported; supported: WanTransformer3DModel"):
        load_transformer(str(bad))


def test_bare_vace_folder_in_the_cli_asks_for_the_pipeline(saved, tmp_path, capsys):
    from scaling_attn_compile.cli import main

    rc = main(["west", "--model", str(saved["vace"]), "--latent", "4,16,20",
               "--out", str(tmp_path / "p.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "WanVACETransformer3DModel needs its control video" in err
    assert "pass the whole pipeline folder" in err


@pytest.mark.filterwarnings("ignore:materialize. mean kept-block density")  # 3 blocks/row
def test_west_on_a_skyreels_folder_makes_its_plan_and_compiles(saved, tmp_path, capsys):
    """``scaling-attn west`` on a SkyReels-V2 folder: the plan records that class, and the
    backend's model check accepts the model it came from; sparse at the plan's levels."""
    from scaling_attn_compile.cli import main
    from scaling_attn_compile.plan.io import load_plan

    out = tmp_path / "sky.plan.safetensors"
    assert main(["west", "--model", str(saved["skyreels"]), "--latent", "4,16,20", "--steps",
                 "4", "--capture-steps", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    plan = load_plan(out)
    assert plan.meta.model_class == "SkyReelsV2Transformer3DModel"
    assert plan.meta.token_order == "tile"  # --token-order auto: a Wan-family model is tiled
    model, inputs = load(saved, "skyreels"), make_inputs("skyreels")
    tables = plan.materialize(GRID, density=0.5)
    be = scaling_attn_backend(plan, compiler="eager", materialize_kwargs={"density": 0.5})
    c = torch.compile(model, backend=be, fullgraph=True, dynamic=False)
    with torch.no_grad():
        out_c = c(timestep=torch.tensor([500]), return_dict=False, **inputs)[0]
    assert be.reports[0].per_layer == {0: 1, 1: 1}
    same, golden = eager(model, inputs, 500, tables, transformer_skyreels_v2, order="tile")
    assert_close_to_oracle(out_c, golden, same)


def test_unknown_model_class_is_refused_naming_the_supported_ones():
    class CogVideoXTransformer3DModel(torch.nn.Module):
        pass

    from scaling_attn_compile import enable_sparse_attention
    from scaling_attn_compile.models.registry import supported_classes

    names = ", ".join(supported_classes())  # every family's, Wan's first
    assert names.startswith("WanTransformer3DModel, WanVACETransformer3DModel, "
                            "SkyReelsV2Transformer3DModel") and "LTXVideoTransformer3DModel" in names
    msg = f"CogVideoXTransformer3DModel is not supported; supported: {names}"
    with pytest.raises(TypeError, match=msg) as err:  # TypeError stays its builtin base
        check_supported(CogVideoXTransformer3DModel(), "anything")
    from scaling_attn_compile import UnsupportedModelError
    assert isinstance(err.value, UnsupportedModelError)

    class CogVideoXPipeline:  # a pipeline of an unknown family: refused before any plan is read
        transformer = CogVideoXTransformer3DModel()

    with pytest.raises(TypeError, match="enable_sparse_attention: model class " + msg):
        enable_sparse_attention(CogVideoXPipeline(), "no-such.plan.safetensors")


def test_ti2v_5b_grid_from_its_vae_and_per_token_timestep_buckets(tmp_path):
    """Wan2.2 TI2V-5B: a WanTransformer3DModel (in == out channels) behind a VAE of stride
    (4, 16, 16), run with expand_timesteps: the timestep is per token, 0 on the first frame (the
    conditioning image), t elsewhere. The grid comes from the folder's VAE config; the bucket is
    the step's t (the max), so at t=700 head 0 is dense, not the t=0 bucket's sparse."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**COMMON, "in_channels": 8, "out_channels": 8}).eval()
    sharpen_qk(block.attn1 for block in model.blocks)
    model.save_pretrained(tmp_path / "transformer")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(
        {"_class_name": "AutoencoderKLWan", "scale_factor_temporal": 4,
         "scale_factor_spatial": 16, "z_dim": 8}))
    src = load_transformer(str(tmp_path))
    assert src.vae_stride == (4, 16, 16)
    latent = latent_shape_for(13, 256, 320, 8, src.vae_stride)  # Wan2.1's VAE: 4x the tokens
    assert latent == (8, 4, 16, 20) and latent_token_grid(src.transformer, latent) == GRID
    model = src.transformer
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, *latent, generator=g),
                  encoder_hidden_states=torch.randn(1, 24, 32, generator=g))
    first_frame = torch.arange(math.prod(GRID)) < GRID[1] * GRID[2]

    def per_token(t):  # WanPipeline with expand_timesteps: mask[0][0][:, ::2, ::2] * t
        return torch.where(first_frame, 0.0, float(t))[None]

    tables = two_level_tables(LAYERS, HEADS, GRID)
    steps = [700, 300]
    outs, be = compiled_run(model, tables, inputs, steps, timestep_of=per_token)
    assert len(be.reports) == 1 and be.reports[0].per_layer == {0: 1, 1: 1}
    for t, out in zip(steps, outs, strict=True):
        same, golden = eager(model, inputs, t, tables, transformer_wan, timestep=per_token(t))
        assert_close_to_oracle(out, golden, same, what=f"TI2V per-token timestep t={t}")
    wrong, _ = eager(model, inputs, 0, tables, transformer_wan, timestep=per_token(700))
    assert (outs[0] - wrong).abs().max() > 1e-3  # the t=0 bucket would differ
    # Regional compilation reads the same per-token timestep (its pre-hook takes the max).
    torch._dynamo.reset()
    regional = copy.deepcopy(model)
    be = scaling_attn_backend(tables, compiler="eager")
    be.attach(regional)
    regional.compile_repeated_blocks(backend=be, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for t, out in zip(steps, outs, strict=True):
            got = regional(timestep=per_token(t), return_dict=False, **inputs)[0]
            torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)


def test_skyreels_diffusion_forcing_causal_mask_stays_dense():
    """SkyReels-V2 diffusion forcing (num_frame_per_block > 1): per-frame timesteps and a causal
    frame-block mask on self-attention, which the plan's block masks do not encode: every
    self-attention is left dense ("attn_mask given") and the model equals eager."""
    torch.manual_seed(0)
    model = SkyReelsV2Transformer3DModel(**COMMON, num_frame_per_block=2).eval()
    inputs = make_inputs("skyreels")
    ts = torch.tensor([[900, 900, 500, 500]])  # per latent frame
    be = scaling_attn_backend(two_level_tables(LAYERS, HEADS, GRID), compiler="eager")
    c = torch.compile(model, backend=be, fullgraph=True, dynamic=False)
    with torch.no_grad(), pytest.warns(UserWarning, match="attn_mask given"):
        out = c(timestep=ts, enable_diffusion_forcing=True, return_dict=False, **inputs)[0]
    with torch.no_grad():
        ref = model(timestep=ts, enable_diffusion_forcing=True, return_dict=False, **inputs)[0]
    assert be.reports[0].left_dense == {"attn_mask given": LAYERS, "cross-attention": LAYERS}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*compiled on its own.*without the plan's tables")
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_regional_compilation_equals_the_reference(saved, name):
    """compile_repeated_blocks after backend.attach: the main blocks run sparse from their
    attached tables; VACE's control blocks (their own block class, two graphs: diffusers' first
    control block has a proj_in the others lack) find no tables and stay dense."""
    model, inputs = load(saved, name), make_inputs(name)
    tables = two_level_tables(LAYERS, HEADS, GRID)
    steps = [900, 300]
    refs = [eager(model, inputs, t, tables, FAMILIES[name][2]) for t in steps]  # before compiling
    be = scaling_attn_backend(tables, compiler="eager")
    be.attach(model)
    model.compile_repeated_blocks(backend=be, fullgraph=True, dynamic=False)
    with torch.no_grad():
        outs = [model(timestep=torch.tensor([t]), return_dict=False, **inputs)[0] for t in steps]
    assert sum(r.block_sites for r in be.reports) == 1  # one main-block graph for every layer
    if name == "vace":
        assert [r.left_dense.get("regional block without attached tables", 0)
                for r in be.reports].count(1) == 2
    for t, out, (same, golden) in zip(steps, outs, refs, strict=True):
        assert_close_to_oracle(out, golden, same, what=f"{name} regional t={t}")
    dense, _ = eager(load(saved, name), inputs, 300)
    assert (outs[1] - dense).abs().max() > 1e-3  # the sparse bucket is not dense


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_capture_sees_the_q_k_the_family_feeds_sdpa(saved, name):
    """The calibration's processor swap (models/wan_capture.py) computes q/k as each family's
    own processor does (SkyReels-V2 has its own attention class and RoPE): what WEST sees is
    what the attention uses. VACE's control blocks are not captured (they stay dense)."""
    from scaling_attn_compile.models.wan_capture import capture_qk

    model, inputs = load(saved, name), make_inputs(name)
    module = FAMILIES[name][2]
    seen = []
    with torch.no_grad(), recorded_attention_qk(module, math.prod(GRID)) as fed, \
            capture_qk(model, lambda c: seen.append((c.layer, c.q.clone(), c.k.clone()))):
        model(timestep=torch.tensor([500]), return_dict=False, **inputs)
    if name == "vace":
        fed = fed[2:]  # the two control blocks run first
    assert [layer for layer, _, _ in seen] == list(range(LAYERS)) and len(fed) == LAYERS
    for (_, q, k), (fq, fk) in zip(seen, fed, strict=True):
        torch.testing.assert_close(q, fq, rtol=0, atol=0)
        torch.testing.assert_close(k, fk, rtol=0, atol=0)
