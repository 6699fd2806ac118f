"""HunyuanVideo calibration: the video q/k capture (models/hunyuan_capture.py), WEST and FAST
through the transformer-only path (``hunyuan.velocity``), the plan compiling the model sparse
through the joint pass, and the weights fingerprint check.

CPU, the tiny config and helpers of test_hunyuan.py (grid (4, 12, 12) = 576 video tokens,
20 text tokens, one double- and one single-stream block).
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from diffusers.models.transformers import transformer_hunyuan_video as hv

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.contract.masks import num_blocks, unpack_blocks
from scaling_attn_compile.errors import PlanMismatchError, PlanModelMismatch
from scaling_attn_compile.models import hunyuan, registry
from scaling_attn_compile.testing import assert_close_to_oracle, recorded_attention_qk, sharpen_qk

sys.path.insert(0, os.path.dirname(__file__))
from test_backend import _fresh_dynamo  # noqa: E402,F401  (autouse fixture)
from test_hunyuan import (  # noqa: E402
    GRID,
    HEADS,
    LATENT,
    LAYERS,
    TEXT,
    eager_pair,
    load,
    make_inputs,
    run,
    with_reference_attention,
)

VIDEO = 576  # F*H*W of GRID


def test_capture_sees_the_video_q_k_hunyuan_feeds_sdpa(hunyuan_folder):
    """Both block kinds: the captured q/k are the video rows of what the processor hands
    attention (after norm and RoPE), one layer numbering, the forward's grid."""
    model, inputs = load(hunyuan_folder), make_inputs()
    seen = []
    capture_qk = registry.capture_for(model).capture_qk
    # The joint attentions (video + text tokens, not the text refiner's): their video rows.
    with torch.no_grad(), recorded_attention_qk(hv, VIDEO + TEXT, VIDEO) as fed, \
            capture_qk(model, lambda c: seen.append((c.layer, c.grid, c.q.clone(), c.k.clone()))):
        run(model, inputs, 500.0)
    assert [(layer, grid) for layer, grid, _, _ in seen] == [(i, GRID) for i in range(LAYERS)]
    assert len(fed) == LAYERS
    for (_, _, q, k), (fq, fk) in zip(seen, fed, strict=True):
        assert q.shape == (LATENT[0], HEADS, VIDEO, 32)
        torch.testing.assert_close(q, fq, rtol=0, atol=0)
        torch.testing.assert_close(k, fk, rtol=0, atol=0)
    # The processors are restored: a second run is not captured.
    run(model, inputs, 500.0)
    assert len(seen) == LAYERS
    assert all(type(a.processor).__name__ == "HunyuanVideoAttnProcessor2_0"
               for a in hunyuan.self_attention_modules(model))


def test_velocity_is_the_model_with_real_text_and_default_guidance(hunyuan_folder):
    """The bare call: latents in and out as 5-D, every text token real, zero pooled embedding,
    embedded guidance 6.0 x 1000."""
    model = load(hunyuan_folder)
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(1, *LATENT[1:], generator=g)
    text = torch.randn(1, TEXT, 16, generator=g)
    with torch.no_grad():
        got = hunyuan.velocity(model, lat, torch.tensor([400.0]), text)
        want = model(hidden_states=lat, timestep=torch.tensor([400.0]),
                     encoder_hidden_states=text, encoder_attention_mask=torch.ones(1, TEXT),
                     pooled_projections=torch.zeros(1, 8), guidance=torch.tensor([6000.0]),
                     return_dict=False)[0]
    assert got.shape == lat.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


STEPS = [900.0, 600.0, 300.0]


@pytest.fixture(scope="module")
def west_plan(hunyuan_folder):
    """WEST through the transformer-only path: 2 random-text inputs, 2 of 3 steps captured."""
    from scaling_attn_compile.offline.calibrate import calibrate_west, random_inputs

    return calibrate_west(load(hunyuan_folder), random_inputs(2, TEXT, 16), STEPS,
                          latent_shape=LATENT[1:], capture_steps=[0, 2], progress=False)


@pytest.mark.filterwarnings("ignore:materialize. mean kept-block density")
def test_west_on_the_hunyuan_transformer_makes_a_plan_that_compiles(hunyuan_folder, west_plan,
                                                                   tmp_path):
    """WEST through the transformer-only path: the plan records HunyuanVideo (class, patch
    size, fingerprint of both block kinds' to_q/to_k); the default check_model="weights"
    accepts the model it came from and refuses other weights; the compiled model (joint tables
    from the plan's video tables, kv_lens from the padded text) equals the reference."""
    from scaling_attn_compile.plan.io import load_plan

    # Through the file: its schema counts single-stream blocks as layers (1 + 1 here).
    model, plan = load(hunyuan_folder), load_plan(west_plan.save(tmp_path / "h.plan.safetensors"))
    assert plan.meta.model_class == "HunyuanVideoTransformer3DModel"
    assert plan.meta.patch_size == [1, 2, 2] and plan.num_layers == LAYERS
    assert tuple(plan.meta.calib_grid) == GRID
    assert plan.meta.weights_fingerprint == hunyuan.weights_fingerprint(model)
    assert plan.meta.calibration["maps_per_layer"] == 4  # 2 inputs x 2 captured steps
    video = plan.materialize(GRID, density=0.5)
    assert not unpack_blocks(video.masks[0], num_blocks(VIDEO)).all(), "0.5 must drop blocks"
    inputs = make_inputs()
    be = scaling_attn_backend(plan, compiler="eager", materialize_kwargs={"density": 0.5})
    c = torch.compile(model, backend=be, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = run(c, inputs, 500.0)
    assert be.reports[0].per_layer == {0: 1, 1: 1}
    same, golden = eager_pair(model, inputs, 500.0, video)
    assert_close_to_oracle(out, golden, same, k=3.0, what="WEST plan, sparse")

    other = hunyuan.make_transformer("hunyuan-tiny-random", seed=1)  # other weights
    torch._dynamo.reset()
    be = scaling_attn_backend(plan, compiler="eager", materialize_kwargs={"density": 0.5})
    with pytest.raises(Exception, match="other weights than the plan's") as err:
        run(torch.compile(other, backend=be, fullgraph=True, dynamic=False), inputs, 500.0)
    assert isinstance(err.value, PlanModelMismatch) or "PlanModelMismatch" in str(err.value)


@pytest.mark.filterwarnings("ignore:materialize. mean kept-block density")
@pytest.mark.filterwarnings("ignore:fit_schedule. nearest achievable")  # 4 cells per layer/step
def test_fast_schedule_on_the_hunyuan_transformer_compiles(hunyuan_folder, west_plan):
    """FAST through the same bare call: a schedule at 0.4 density, and the scheduled plan
    compiles sparse (its bucketed tables) and equals the reference at two timesteps."""
    from scaling_attn_compile.offline.calibrate import random_inputs
    from scaling_attn_compile.offline.fast import build_fast_plan

    model = load(hunyuan_folder)
    plan, prof = build_fast_plan(west_plan, model, random_inputs(1, TEXT, 16, seed=5)[0], 0.4,
                                 timesteps=STEPS, latent_shape=LATENT[1:], capture_steps=[0, 2],
                                 progress=False)
    assert plan.schedule is not None and plan.meta.weights_fingerprint == \
        hunyuan.weights_fingerprint(model)
    video = plan.materialize(GRID)
    inputs = make_inputs()
    be = scaling_attn_backend(plan, compiler="eager")
    c = torch.compile(model, backend=be, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in (900.0, 300.0):
            out = run(c, inputs, t)
            same, golden = eager_pair(model, inputs, t, video)
            assert_close_to_oracle(out, golden, same, k=3.0, what=f"FAST plan, t={t}")
            if t == 900.0:
                dense, _ = eager_pair(model, inputs, t)
                assert not torch.allclose(out, dense, atol=1e-3), "the schedule must be sparse"
    assert len(be.reports) == 1 and be.reports[0].per_layer == {0: 1, 1: 1}


@pytest.mark.filterwarnings("ignore:materialize. mean kept-block density")
def test_cli_west_on_a_hunyuan_transformer_folder(hunyuan_folder, tmp_path, capsys):
    """``scaling-attn west --model <HunyuanVideo transformer folder> --latent F,H,W``: random
    embeddings of its text width through the bare call, a plan that records HunyuanVideo."""
    from scaling_attn_compile.cli import main
    from scaling_attn_compile.plan.io import load_plan

    out = tmp_path / "cli.plan.safetensors"
    assert main(["west", "--model", str(hunyuan_folder), "--latent", ",".join(map(str, LATENT[2:])),
                 "--steps", "2", "--capture-steps", "1", "--text-len", str(TEXT),
                 "--out", str(out)]) == 0
    assert f"token grid (F, H, W) = {GRID}" in capsys.readouterr().out
    plan = load_plan(out)
    assert plan.meta.model_class == "HunyuanVideoTransformer3DModel" and plan.num_layers == 2
    assert plan.meta.weights_fingerprint == hunyuan.weights_fingerprint(load(hunyuan_folder))


def test_fingerprint_names_split_by_the_plans_config():
    cfg = hunyuan.BUILTIN_CONFIGS["hunyuan-tiny-random"]
    assert hunyuan.fingerprint_names(2, cfg) == [
        "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight",
        "single_transformer_blocks.0.attn.to_q.weight",
        "single_transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(PlanMismatchError, match="model_config"):
        hunyuan.fingerprint_names(2)
    with pytest.raises(PlanMismatchError, match="more than the plan's 0 layers"):
        hunyuan.fingerprint_names(0, cfg)


def build_hunyuan_pipeline():
    """A tiny HunyuanVideoPipeline (random weights, seed 0; built in 0.1 s): the word-level
    tokenizer of test_pipeline.py for both encoders, a 3-layer LLaMA (the pipeline reads the
    hidden states 2 layers before the last), a 1-layer CLIP text model (pooled width 8), a small
    HunyuanVideo VAE (8x space, 4x time) and the peaked tiny transformer."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
    )
    from test_pipeline import _tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8,) * 4,
        layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=False)
    llama = LlamaModel(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=64))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=77, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=0))
    transformer = hunyuan.make_transformer("hunyuan-tiny-random")
    sharpen_qk(hunyuan.self_attention_modules(transformer))
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=_tokenizer(),
                                transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=clip, tokenizer_2=_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# 9 frames x 128 x 192 pixels -> latents (3, 16, 24) -> grid (3, 8, 12): S = 288 + 16 text.
# The prompt template is the identity: HunyuanVideo's crops 95 LLaMA tokens of its own words.
PIPE_VIDEO = dict(height=128, width=192, num_frames=9, max_sequence_length=16,
                  prompt_template={"template": "{}", "crop_start": 0})
PIPE_GRID = (3, 8, 12)


@pytest.mark.filterwarnings("ignore:materialize. mean kept-block density")
def test_west_and_fast_through_hunyuan_pipeline_and_enable_sparse_attention(tmp_path):
    """WEST and FAST through HunyuanVideoPipeline (its text encoders, pooled CLIP embedding,
    embedded guidance and scheduler), then enable_sparse_attention on the pipeline: one graph
    for the loop, both joint layers rewritten, the refiner dense, latents close to a dense run
    but not equal to it."""
    from scaling_attn_compile import enable_sparse_attention
    from scaling_attn_compile.offline.pipeline import (
        build_fast_plan_pipeline,
        calibrate_west_pipeline,
        pipeline_calls,
    )

    pipe, steps = build_hunyuan_pipeline(), 2
    calls = pipeline_calls(["a cat runs on the beach"], num_inference_steps=steps, **PIPE_VIDEO)
    plan = calibrate_west_pipeline(pipe, calls, progress=False)
    assert plan.meta.model_class == "HunyuanVideoTransformer3DModel"
    assert tuple(plan.meta.calib_grid) == PIPE_GRID
    assert plan.meta.calibration["latent_shape"] == [4, 3, 16, 24]
    plan, prof = build_fast_plan_pipeline(plan, pipe, calls[0], 0.5, progress=False)
    assert prof.info["pipeline"] == "HunyuanVideoPipeline" and plan.schedule is not None
    path = plan.save(tmp_path / "hunyuan.plan.safetensors")

    def go(p):
        return p(prompt="a dog runs", num_inference_steps=steps, output_type="latent",
                 generator=torch.Generator().manual_seed(7), **PIPE_VIDEO).frames

    dense = go(pipe)
    backends = enable_sparse_attention(pipe, path, compiler="eager")  # check_model="weights"
    with torch._dynamo.config.patch(error_on_recompile=True):
        sparse = go(pipe)
    (be,) = backends.values()
    assert len(be.reports) == 1 and be.reports[0].per_layer == {0: 1, 1: 1}
    assert be.reports[0].left_dense == {"text refiner attention (text only)": 1}
    assert be.reports[0].grid == PIPE_GRID
    assert torch.isfinite(sparse).all() and sparse.shape == dense.shape
    assert (sparse - dense).abs().max() > 1e-4  # sparse attention changed something
    assert (sparse - dense).norm() < 0.5 * dense.norm()  # ... but it is still the model's


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:materialize. mean kept-block density")
def test_gpu_west_plan_compiles_sparse_bf16():
    """On CUDA in bf16 (head_dim 64, the kernel's): WEST with the Triton block mass on the
    captured video q/k keeps the codes of the torch block mass (at most 5% of code cells may
    move by rounding), and the plan compiles through Inductor + the template with kv_lens to
    the reference."""
    from scaling_attn_compile.offline.calibrate import calibrate_west, random_inputs

    model = hunyuan.make_transformer("hunyuan-tiny-random", attention_head_dim=64,
                                     rope_axes_dim=(16, 24, 24)).cuda().to(torch.bfloat16)
    plans = [calibrate_west(model, random_inputs(2, TEXT, 16), STEPS, latent_shape=LATENT[1:],
                            capture_steps=[0, 2], block_mass_impl=impl, progress=False)
             for impl in ("triton", "torch")]
    moved = (plans[0].codes.int() - plans[1].codes.int()).abs().gt(1).float().mean()
    assert moved <= 0.05, f"{moved:.3f} of the codes differ between Triton and torch"
    plan, inputs = plans[0], make_inputs()
    video = plan.materialize(GRID, density=0.5)
    be = scaling_attn_backend(plan, materialize_kwargs={"density": 0.5})
    c = torch.compile(model, backend=be, fullgraph=True, dynamic=False)
    out = run(c, {k: v.cuda().to(torch.bfloat16) for k, v in inputs.items()}, 500.0)
    assert be.reports[0].per_layer == {0: 1, 1: 1}
    refs = {}  # as test_hunyuan's GPU test: bf16 model with float32 math, and float64
    for dtype, math_dtype in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        m = copy.deepcopy(model).to(dtype)
        with_reference_attention(m, video.to("cuda"), 500.0, math_dtype)
        refs[dtype] = run(m, {k: v.cuda().to(dtype) for k, v in inputs.items()}, 500.0)
    assert_close_to_oracle(out, refs[torch.float64], refs[torch.bfloat16], k=3.0,
                           what="bf16 compiled WEST plan")


@pytest.mark.filterwarnings("ignore:materialize. mean kept-block density")
def test_cli_west_on_a_saved_hunyuan_pipeline_folder(tmp_path, capsys):
    """``scaling-attn west --model <hunyuan_folder HunyuanVideoPipeline folder>`` as a user runs it: the
    folder loads through from_pretrained, the layer count covers both kinds of block, and the
    guidance is the pipeline's own embedded 6.0 (not Wan's CFG 5.0)."""
    from scaling_attn_compile.cli import main
    from scaling_attn_compile.plan.io import load_plan

    build_hunyuan_pipeline().save_pretrained(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat runs on the beach\n")
    out = tmp_path / "hy.plan.safetensors"
    assert main(["west", "--model", str(tmp_path / "pipe"), "--frames", "9", "--height", "128",
                 "--width", "192", "--prompts", str(prompts), "--steps", "2", "--capture-steps",
                 "1", "--text-len", "16", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "2 layers x 2 heads" in log and "guidance 6.0 embedded in the model" in log
    plan = load_plan(out)
    assert plan.meta.model_class == "HunyuanVideoTransformer3DModel"
    assert tuple(plan.meta.calib_grid) == PIPE_GRID and plan.num_layers == 2
