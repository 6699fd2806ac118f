"""LTX-Video (``LTXVideoTransformer3DModel``) through its adapter (models/ltx.py): a random-weight
small config saved with ``save_pretrained`` and loaded with ``from_pretrained``; compiled with an
all-dense plan == eager, compiled sparse == eager with the op's reference in diffusers' own
processor, rewrite counts, cross-attention untouched, no recompiles over a denoising loop,
regional compilation, the q/k capture, WEST calibration (transformer-only and through a tiny
``LTXPipeline``) and ``enable_sparse_attention`` on that pipeline."""

from __future__ import annotations

import copy
import math
import os
import sys
from unittest import mock

import pytest
import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.transformers import transformer_ltx

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.contract.tables import uniform_tables
from scaling_attn_compile.errors import UnsupportedModelError
from scaling_attn_compile.models import ltx, registry, wan
from scaling_attn_compile.testing import (
    assert_close_to_oracle,
    eager_two_dtypes,
    recorded_attention_qk,
    run_compiled_steps,
    sharpen_qk,
)

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers live in test_backend.py
from test_backend import _fresh_dynamo, two_level_tables  # noqa: E402,F401  (autouse fixture)

GRID = (4, 8, 10)  # (num_frames, height, width) in tokens: S = 320, 3 blocks of 128
LAYERS, HEADS, HEAD_DIM, CHANNELS, CAPTION = 2, 2, 16, 8, 16
CONFIG = dict(in_channels=CHANNELS, out_channels=CHANNELS, patch_size=1, patch_size_t=1,
              num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
              cross_attention_dim=HEADS * HEAD_DIM, num_layers=LAYERS, caption_channels=CAPTION)
TEXT_LEN = 12


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved once with save_pretrained (peaked self-attention: a wrong mask shows)."""
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(**CONFIG).eval()
    sharpen_qk(block.attn1 for block in model.transformer_blocks)
    folder = tmp_path_factory.mktemp("ltx")
    model.save_pretrained(folder)
    return folder


def load(folder):
    return LTXVideoTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()


def make_inputs(seed=1, grid=GRID):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, TEXT_LEN)
    mask[:, -3:] = 0  # padded text tokens: the cross-attention's mask must stay
    return dict(hidden_states=torch.randn(1, math.prod(grid), CHANNELS, generator=g),
                encoder_hidden_states=torch.randn(1, TEXT_LEN, CAPTION, generator=g),
                encoder_attention_mask=mask, num_frames=grid[0], height=grid[1], width=grid[2])


def reference_processors(model, tables, clock, compute_dtype):
    """Each block's attn1 with self-attention done by the op's readable reference inside
    diffusers' own LTX processor (dispatch_attention_fn patched for that call only)."""

    class Reference(transformer_ltx.LTXVideoAttnProcessor):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            masks, lt, bounds = tables.layer(self.layer)

            def sparse(query, key, value, **_):  # (B, S, H, D), as diffusers' dispatch
                q, k, v = (t.transpose(1, 2) for t in (query, key, value))
                out = sparse_attention_reference(q, k, v, masks, lt, bounds, clock["t"], None,
                                                 compute_dtype=compute_dtype)
                return out.transpose(1, 2)

            with mock.patch.object(transformer_ltx, "dispatch_attention_fn", sparse):
                return super().__call__(attn, hidden_states, encoder_hidden_states,
                                        attention_mask, image_rotary_emb)

    for i, block in enumerate(model.transformer_blocks):
        block.attn1.set_processor(Reference(i))
    return model


def eager(model, inputs, t, tables=None, timestep=None):
    """(same dtype, float64) eager outputs; with ``tables``, self-attention by the reference at
    bucket timestep ``t``. ``timestep``: the model's input, default ``[t]``."""
    reference = None if tables is None else (lambda m, dtype: reference_processors(
        m, tables, {"t": torch.tensor([t])}, dtype))
    return eager_two_dtypes(model, inputs, torch.tensor([t]) if timestep is None else timestep,
                            reference)


def compiled_run(model, plan, inputs, steps, timestep_of=lambda t: torch.tensor([t]), **options):
    be = scaling_attn_backend(plan, compiler="eager", **options)
    return run_compiled_steps(model, be, inputs, steps, timestep_of), be


def test_the_registry_picks_ltx_and_refuses_unknown_classes(saved):
    model = load(saved)
    assert registry.adapter_for(model) is ltx
    assert registry.adapter_for(torch.compile(model)) is ltx  # through the compile wrapper
    assert registry.capture_for(model).__name__.endswith("ltx_capture")
    assert "LTXVideoTransformer3DModel" in registry.supported_classes()

    class CogVideoXTransformer3DModel(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match="model class CogVideoXTransformer3DModel is "
                       "not supported; supported: WanTransformer3DModel, .*"
                       "LTXVideoTransformer3DModel"):
        registry.adapter_for(CogVideoXTransformer3DModel(), "anything")
    # A graph is read with the adapter of the module classes it holds.
    graphs = []
    c = torch.compile(model, backend=lambda gm, _: graphs.append(gm) or gm.forward,
                      fullgraph=True)
    with torch.no_grad():
        c(timestep=torch.tensor([500]), return_dict=False, **make_inputs())
    assert registry.adapter_for_graph(graphs[0]) is ltx
    assert ltx.find_latent_grid(graphs[0]) == (GRID, "rope's position grid (num_frames, height, "
                                               "width)")
    assert ltx.find_timestep(graphs[0]) is not None
    assert wan.find_latent_grid(graphs[0])[0] is None  # Wan's reading finds no patch embedding


def test_ltx_dense_and_sparse_equal_eager_with_counts_and_no_recompiles(saved):
    model, inputs = load(saved), make_inputs()
    # All-dense tables: the compiled model is the eager one.
    (out,), be = compiled_run(model, uniform_tables(LAYERS, HEADS, GRID, 1.0), inputs, [700])
    same, golden = eager(model, inputs, 700)
    assert_close_to_oracle(out, golden, same)
    assert be.reports[0].per_layer == {0: 1, 1: 1}
    assert be.reports[0].left_dense == {"cross-attention": LAYERS}  # attn2 (masked) untouched
    assert be.reports[0].grid == GRID
    torch._dynamo.reset()
    # Sparse, two timestep buckets (t < 500: all sparse; t >= 500: head 0 dense), one graph
    # over the loop (error_on_recompile).
    tables = two_level_tables(LAYERS, HEADS, GRID)
    steps = [900, 700, 300, 100]
    outs, be = compiled_run(model, tables, inputs, steps)
    assert len(be.reports) == 1
    for t, out in zip(steps, outs, strict=True):
        same, golden = eager(model, inputs, t, tables)
        assert_close_to_oracle(out, golden, same, what=f"ltx t={t}")
    dense_out, _ = eager(model, inputs, 100)
    assert (outs[-1] - dense_out).abs().max() > 1e-3  # the sparse bucket is not dense


def test_ltx_image_to_video_per_token_timestep_buckets_by_its_max(saved):
    """LTXImageToVideoPipeline's timestep is per token, (B, S): t * (1 - conditioning mask), so
    the first frame's tokens (the image) carry 0. The bucket is the step's t, the max."""
    model, inputs = load(saved), make_inputs()
    tables = two_level_tables(LAYERS, HEADS, GRID)
    first_frame = GRID[1] * GRID[2]

    def per_token(t):
        ts = torch.full((1, math.prod(GRID)), float(t))
        ts[:, :first_frame] = 0.0
        return ts

    steps = [900, 300]
    outs, be = compiled_run(model, tables, inputs, steps, timestep_of=per_token)
    assert len(be.reports) == 1 and be.reports[0].per_layer == {0: 1, 1: 1}
    for t, out in zip(steps, outs, strict=True):
        same, golden = eager(model, inputs, t, tables, timestep=per_token(t))
        assert_close_to_oracle(out, golden, same, what=f"ltx i2v t={t}")


@pytest.mark.filterwarnings("ignore:.*compiled on its own.*without the plan's tables")
def test_ltx_regional_compilation_equals_the_reference(saved):
    model, inputs = load(saved), make_inputs()
    tables = two_level_tables(LAYERS, HEADS, GRID)
    steps = [900, 300]
    refs = [eager(model, inputs, t, tables) for t in steps]
    be = scaling_attn_backend(tables, compiler="eager")
    be.attach(model)
    model.compile_repeated_blocks(backend=be, fullgraph=True, dynamic=False)
    with torch.no_grad():
        outs = [model(timestep=torch.tensor([t]), return_dict=False, **inputs)[0] for t in steps]
    assert sum(r.block_sites for r in be.reports) == 1  # one block graph for every layer
    for t, out, (same, golden) in zip(steps, outs, refs, strict=True):
        assert_close_to_oracle(out, golden, same, what=f"ltx regional t={t}")


def test_capture_sees_the_q_k_ltx_feeds_sdpa(saved):
    """The calibration's processor swap (ltx_capture.py) computes q/k as LTX's processor does
    (RoPE on the flat q/k, before the head split): what WEST sees is what attention uses."""
    model, inputs = load(saved), make_inputs()
    seen = []
    capture_qk = registry.capture_for(model).capture_qk
    with torch.no_grad(), recorded_attention_qk(transformer_ltx, math.prod(GRID)) as fed, \
            capture_qk(model, lambda c: seen.append((c.layer, c.grid, c.q.clone(), c.k.clone()))):
        model(timestep=torch.tensor([500]), return_dict=False, **inputs)
    assert [(layer, grid) for layer, grid, _, _ in seen] == [(i, GRID) for i in range(LAYERS)]
    assert len(fed) == LAYERS
    for (_, _, q, k), (fq, fk) in zip(seen, fed, strict=True):
        torch.testing.assert_close(q, fq, rtol=0, atol=0)
        torch.testing.assert_close(k, fk, rtol=0, atol=0)


def test_velocity_packs_as_ltx_pipeline_does(saved):
    """The bare calibration's call (5-D latents in and out) equals LTXPipeline's packing."""
    from diffusers import LTXPipeline

    model = load(saved)
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(1, CHANNELS, *GRID, generator=g)
    text = torch.randn(1, TEXT_LEN, CAPTION, generator=g)
    with torch.no_grad():
        got = ltx.velocity(model, lat, torch.tensor([400.0]), text)
        packed = LTXPipeline._pack_latents(lat, 1, 1)
        want = model(hidden_states=packed, encoder_hidden_states=text,
                     timestep=torch.tensor([400.0]), encoder_attention_mask=torch.ones(1, TEXT_LEN),
                     num_frames=GRID[0], height=GRID[1], width=GRID[2], return_dict=False)[0]
    torch.testing.assert_close(got, LTXPipeline._unpack_latents(want, *GRID, 1, 1), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:materialize. mean kept-block density")  # 3 blocks/row
def test_west_on_the_ltx_transformer_makes_a_plan_that_compiles(saved):
    """WEST through the transformer-only path: the plan records LTX (class, patch size,
    fingerprint of transformer_blocks.<i>.attn1), the backend's model check accepts the model it
    came from, and the compiled model equals the reference at the plan's tables."""
    from scaling_attn_compile.offline.calibrate import calibrate_west, random_inputs

    model = load(saved)
    plan = calibrate_west(model, random_inputs(2, TEXT_LEN, CAPTION), [900.0, 600.0, 300.0],
                          latent_shape=(CHANNELS, *GRID), capture_steps=[0, 2], progress=False)
    assert plan.meta.model_class == "LTXVideoTransformer3DModel"
    assert plan.meta.patch_size == [1, 1, 1] and plan.num_layers == LAYERS
    assert plan.meta.weights_fingerprint == ltx.weights_fingerprint(model)
    assert plan.meta.calibration["maps_per_layer"] == 4  # 2 inputs x 2 captured steps
    tables = plan.materialize(GRID, density=0.5)
    inputs = make_inputs()
    (out,), be = compiled_run(model, plan, inputs, [500],
                              materialize_kwargs={"density": 0.5})  # check_model="weights"
    assert be.reports[0].per_layer == {0: 1, 1: 1}
    same, golden = eager(model, inputs, 500, tables)
    assert_close_to_oracle(out, golden, same)
    other = LTXVideoTransformer3DModel(**CONFIG).eval()  # same architecture, other weights
    from scaling_attn_compile.errors import PlanModelMismatch

    torch._dynamo.reset()
    with pytest.raises(Exception, match="other weights than the plan's") as err:
        compiled_run(other, plan, inputs, [500], materialize_kwargs={"density": 0.5})
    assert isinstance(err.value, PlanModelMismatch) or "PlanModelMismatch" in str(err.value)


def test_tile_order_plan_is_refused_for_ltx(saved):
    from scaling_attn_compile.contract.tables import AttentionTables

    tables = uniform_tables(LAYERS, HEADS, GRID, 1.0)
    tiled = AttentionTables(grid=tables.grid, masks=tables.masks, level_tables=tables.level_tables,
                            bucket_bounds=tables.bucket_bounds, token_order="tile")
    with pytest.raises(Exception, match="tile order, which this model family "
                       r"\(LTXVideoTransformer3DModel\) cannot run yet"):
        compiled_run(load(saved), tiled, make_inputs(), [500])


def build_ltx_pipeline(root):
    """A tiny LTXPipeline (random weights, seed 0) written with save_pretrained: the word-level
    tokenizer of test_pipeline.py, a one-layer T5 encoder, a small LTX VAE (4x in space and
    time) and the transformer config above."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline
    from test_pipeline import _tokenizer
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=CHANNELS, block_out_channels=(8,) * 4,
        decoder_block_out_channels=(8,) * 4, layers_per_block=(1,) * 5,
        decoder_layers_per_block=(1,) * 5, spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=32, d_model=CAPTION, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    transformer = LTXVideoTransformer3DModel(**CONFIG)
    sharpen_qk(block.attn1 for block in transformer.transformer_blocks)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                       text_encoder=text_encoder, tokenizer=_tokenizer(), transformer=transformer)
    pipe.save_pretrained(root)
    return root


# 9 frames x 64 x 96 pixels (LTXPipeline wants multiples of 32) -> latents (3, 16, 24):
# S = 1152, 9 blocks of 128.
VIDEO = dict(height=64, width=96, num_frames=9)
PIPE_GRID = (3, 16, 24)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return build_ltx_pipeline(tmp_path_factory.mktemp("pipelines") / "Tiny-LTX")


@pytest.mark.filterwarnings("ignore:materialize. mean kept-block density")
def test_west_through_ltx_pipeline_and_enable_sparse_attention(pipeline_folder, tmp_path):
    """WEST and FAST through a tiny LTXPipeline (CFG: one batched call per step), then
    enable_sparse_attention on the pipeline: one graph for the whole loop (the schedule's
    timestep buckets change no guard), every self-attention rewritten, cross-attention dense,
    the latents close to those of a dense run but not equal to them."""
    from diffusers import LTXPipeline

    from scaling_attn_compile import enable_sparse_attention
    from scaling_attn_compile.offline.pipeline import (
        build_fast_plan_pipeline,
        calibrate_west_pipeline,
        pipeline_calls,
    )

    pipe = LTXPipeline.from_pretrained(pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    steps = 2
    calls = pipeline_calls(["a cat runs on the beach"], **VIDEO, num_inference_steps=steps,
                           guidance_scale=3.0, max_sequence_length=16)
    plan = calibrate_west_pipeline(pipe, calls, progress=False)
    assert plan.meta.model_class == "LTXVideoTransformer3DModel"
    assert tuple(plan.meta.calib_grid) == PIPE_GRID
    assert plan.meta.calibration["latent_shape"] == [CHANNELS, *PIPE_GRID]
    # FAST through the pipeline: buckets at the timesteps its scheduler ran.
    plan, prof = build_fast_plan_pipeline(plan, pipe, calls[0], 0.4, progress=False)
    assert prof.info["pipeline"] == "LTXPipeline" and len(prof.info["capture_steps"]) == steps
    assert plan.schedule is not None
    path = plan.save(tmp_path / "ltx.plan.safetensors")

    def run(p):
        return p(prompt="a dog runs", **VIDEO, num_inference_steps=steps, guidance_scale=3.0,
                 max_sequence_length=16, output_type="latent",
                 generator=torch.Generator().manual_seed(7)).frames

    dense = run(pipe)
    backends = enable_sparse_attention(pipe, path, compiler="eager")  # the schedule's densities
    with torch._dynamo.config.patch(error_on_recompile=True):
        sparse = run(pipe)
    (be,) = backends.values()
    assert len(be.reports) == 1 and be.reports[0].per_layer == {0: 1, 1: 1}
    assert be.reports[0].left_dense == {"cross-attention": LAYERS}
    assert be.reports[0].grid == PIPE_GRID
    assert torch.isfinite(sparse).all() and sparse.shape == dense.shape
    assert (sparse - dense).abs().max() > 1e-4  # sparse attention changed something
    # ... but the result is still the model's: far closer to the dense run than to noise.
    assert (sparse - dense).norm() < 0.5 * dense.norm()


def test_cli_west_on_an_ltx_pipeline_folder(pipeline_folder, tmp_path, capsys):
    """``scaling-attn west --model <LTX pipeline folder>``: the token grid from LTX's VAE
    compression (4x here) and patch size, a plan that records LTX."""
    from scaling_attn_compile.cli import main
    from scaling_attn_compile.plan.io import load_plan

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat runs on the beach\n")
    out = tmp_path / "ltx.plan.safetensors"
    assert main(["west", "--model", str(pipeline_folder), "--frames", "9", "--height", "64",
                 "--width", "96", "--prompts", str(prompts), "--steps", "2", "--capture-steps",
                 "1", "--text-len", "16", "--out", str(out)]) == 0
    assert f"token grid (F, H, W) = {PIPE_GRID}" in capsys.readouterr().out
    plan = load_plan(out)
    assert plan.meta.model_class == "LTXVideoTransformer3DModel"
    assert tuple(plan.meta.calib_grid) == PIPE_GRID


@pytest.mark.filterwarnings("ignore:materialize. mean kept-block density")
def test_cli_west_on_an_ltx_transformer_folder(saved, tmp_path, capsys):
    """``scaling-attn west --model <LTX transformer folder> --latent F,H,W``: the registry's
    loader builds the class the folder names, random embeddings of its caption width."""
    from scaling_attn_compile.cli import main
    from scaling_attn_compile.plan.io import load_plan

    out = tmp_path / "bare.plan.safetensors"
    assert main(["west", "--model", str(saved), "--latent", ",".join(map(str, GRID)),
                 "--steps", "2", "--capture-steps", "1", "--text-len", str(TEXT_LEN),
                 "--out", str(out)]) == 0
    assert f"token grid (F, H, W) = {GRID}" in capsys.readouterr().out
    plan = load_plan(out)
    assert plan.meta.model_class == "LTXVideoTransformer3DModel"
    assert plan.meta.weights_fingerprint == ltx.weights_fingerprint(load(saved))
    assert plan.meta.token_order == "raster"  # --token-order auto: LTX has no order sites
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert main(["west", "--model", str(saved), "--latent", "4,8,10", "--prompts", str(prompts),
                 "--out", str(tmp_path / "x.plan.safetensors")]) == 2
    assert "has no text_encoder/ this path reads; pass precomputed" in capsys.readouterr().err


def bf16_compiled_equals_reference(device: str, **backend_options) -> None:
    """bf16 on ``device``, head_dim 64 (the kernel's), two timestep buckets over a loop without
    recompiles; equal to the reference processors within the oracle's tolerance (float64 and
    same-dtype references on the CPU)."""
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(**dict(CONFIG, attention_head_dim=64,
                                              cross_attention_dim=HEADS * 64)).eval()
    grid = (4, 16, 20)  # S = 1280, 10 blocks
    inputs = make_inputs(grid=grid)
    tables = two_level_tables(LAYERS, HEADS, grid)
    steps = (900, 300, 900)
    refs = {}
    for t in set(steps):
        golden = eager(model, inputs, t, tables)[1]
        m = reference_processors(copy.deepcopy(model).to(torch.bfloat16), tables,
                                 {"t": torch.tensor([t])}, torch.bfloat16)
        with torch.no_grad():
            same = m(timestep=torch.tensor([t]), return_dict=False,
                     **{k: v.to(torch.bfloat16) if torch.is_tensor(v) else v
                        for k, v in inputs.items()})[0]
        refs[t] = (same, golden)
    be = scaling_attn_backend(tables, **backend_options)
    c = torch.compile(model.to(device, torch.bfloat16), backend=be, fullgraph=True, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for t in steps:
            out = c(timestep=torch.tensor([t], device=device), return_dict=False,
                    **{k: v.to(device, torch.bfloat16) if torch.is_tensor(v) else v
                       for k, v in inputs.items()})[0]
            same, golden = refs[t]
            assert_close_to_oracle(out.float().cpu(), golden, same, what=f"ltx {device} t={t}")
    assert len(be.reports) == 1 and be.reports[0].per_layer == {0: 1, 1: 1}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_ltx_on_the_gpu_with_inductor_in_bf16():
    """The device path: Inductor lowering the op to the Triton template."""
    bf16_compiled_equals_reference("cuda")
