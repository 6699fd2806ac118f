"""Calibration through the user's diffusers pipeline and `enable_sparse_attention` (issue 18).

Small T2V and I2V pipeline folders with random weights (transformer, AutoencoderKLWan, a
1-layer UMT5 with a tokenizer built offline, UniPC; a CLIP vision encoder for I2V) are written
with `save_pretrained` and loaded back with `from_pretrained`. Then `scaling-attn west` ->
`fast` -> `enable_sparse_attention` -> generate, checking that the plan holds the timesteps the
pipeline's scheduler ran (UniPC's [999, 900, 750, 500], which the transformer-only sampler never
runs), that sparse output equals Wan's processor with the reference op, that density 1.0 equals
dense, Hub ids from a fake cache, and the plan file's permissions.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

from scaling_attn_compile import enable_sparse_attention
from scaling_attn_compile.cli import main
from scaling_attn_compile.plan.io import load_plan

sys.path.insert(0, os.path.dirname(__file__))  # the reference processor lives in test_backend.py
from test_backend import (  # noqa: E402
    _fresh_dynamo,  # noqa: F401  (autouse: a fresh Dynamo per test)
    with_reference_processors,
)

# 5 frames x 128 x 192 pixels -> latents (2, 16, 24) -> tokens (2, 8, 12): S = 192, two blocks.
VIDEO = dict(num_frames=5, height=128, width=192)
VIDEO_ARGS = ["--frames", "5", "--height", "128", "--width", "192"]
STEPS = 4
TEXT_LEN = 16  # max_sequence_length: the tiny UMT5 needs no 512 tokens


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", *"a cat dog runs on the beach red car city night".split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def wan_pipeline_parts() -> dict:
    """Tokenizer, tiny UMT5, tiny VAE (random weights, seed 0) and Wan2.1's scheduler: what
    every Wan-family pipeline here shares besides its transformer."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    # Wan2.1's scheduler: UniPC with flow sigmas (model_index of Wan-AI/Wan2.1-T2V-1.3B-Diffusers)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0)
    return dict(tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler)


def build_pipeline_folder(root: Path, i2v: bool = False, head_dim: int = 16,
                          experts: bool = False) -> Path:
    """A Wan T2V or I2V pipeline with random weights, written with save_pretrained;
    ``experts``: a second transformer for the low-noise steps (Wan2.2's layout), t < 875."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    parts = wan_pipeline_parts()

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
            in_channels=36 if i2v else 16, out_channels=16, text_dim=16, freq_dim=32,
            ffn_dim=48, num_layers=2, rope_max_seq_len=64, image_dim=8 if i2v else None)

    parts["transformer"] = transformer()
    if experts:
        parts.update(transformer_2=transformer(), boundary_ratio=0.875)
    if i2v:
        encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=8, projection_dim=8, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, intermediate_size=16, patch_size=4))
        pipe = WanImageToVideoPipeline(**parts, image_encoder=encoder,
                                       image_processor=CLIPImageProcessor(crop_size=32, size=32))
    else:
        pipe = WanPipeline(**parts)
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("pipelines")
    (root / "prompts.txt").write_text("a cat runs on the beach\na red car in the city\n")
    Image.new("RGB", (192, 128), (200, 40, 90)).save(root / "first.png")
    return {"t2v": build_pipeline_folder(root / "Tiny-Wan-T2V"),
            "i2v": build_pipeline_folder(root / "Tiny-Wan-I2V", i2v=True), "root": root}


def _load(folder, i2v=False):
    cls = WanImageToVideoPipeline if i2v else WanPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, i2v, folders, guidance_scale=5.0):
    from PIL import Image

    extra = {"image": Image.open(folders["root"] / "first.png")} if i2v else {}
    return pipe(prompt="a dog runs", negative_prompt="night", **VIDEO,
                num_inference_steps=STEPS, guidance_scale=guidance_scale,
                max_sequence_length=TEXT_LEN, generator=torch.Generator().manual_seed(7),
                output_type="latent", **extra).frames


def _scheduler_timesteps(pipe) -> list[float]:
    pipe.scheduler.set_timesteps(STEPS)
    return [float(t) for t in pipe.scheduler.timesteps]


def _west_fast(folders, kind, tmp_path, capsys, guidance="5.0"):
    folder, image = folders[kind], ["--image", str(folders["root"] / "first.png")]
    common = ["--prompts", str(folders["root"] / "prompts.txt"), "--negative-prompt", "night",
              "--guidance-scale", guidance, "--text-len", str(TEXT_LEN),
              *(image if kind == "i2v" else [])]
    west = tmp_path / "w.plan.safetensors"
    assert main(["west", "--model", str(folder), *VIDEO_ARGS, "--steps", str(STEPS),
                 "--capture-steps", "2", "--out", str(west), *common]) == 0
    fast = tmp_path / "f.plan.safetensors"
    assert main(["fast", "--plan", str(west), "--target-density", "0.7", "--rows-per-block", "8",
                 "--out", str(fast), *common]) == 0
    out = capsys.readouterr().out
    assert "S = 192 tokens, 2 blocks of 128" in out  # printed before calibration starts
    assert f"--model not given: profiling the plan's model {folder}" in out
    # fast's default objective through the pipeline, I2V's image conditioning included: the
    # video probes: 2 blocks, so full size; all 4 steps profiled, so all 4; 2 layers + 4 + 1
    assert "--objective video: 7 probe generations at latent 2x16x24, 4 steps" in out, out
    assert load_plan(fast).schedule.info["objective"] == "video"
    return load_plan(west), load_plan(fast)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_west_fast_enable_generate_through_the_pipeline(folders, kind, tmp_path, capsys):
    i2v = kind == "i2v"
    west, fast = _west_fast(folders, kind, tmp_path, capsys, guidance="1.0" if i2v else "5.0")
    pipe = _load(folders[kind], i2v)
    ran = _scheduler_timesteps(pipe)
    calib = west.meta.calibration
    # The plan holds what the pipeline's UniPC ran, not the transformer-only Euler sampler's.
    assert calib["pipeline_timesteps"] == ran and calib["timesteps"] == [ran[0], ran[-1]]
    assert calib["scheduler"] == "UniPCMultistepScheduler" and calib["cfg"] is not i2v
    assert calib["latent_shape"] == [36 if i2v else 16, 2, 16, 24]
    assert fast.schedule.info["profiled_timesteps"] == ran
    assert fast.schedule.level_tables.shape[1] == STEPS and torch.equal(fast.codes, west.codes)
    assert west.meta.token_order == "tile"  # --token-order auto; the reference follows it

    dense = _generate(pipe, i2v, folders)
    reference = _load(folders[kind], i2v)
    clock = {"t": torch.tensor([0.0])}
    reference.transformer.register_forward_pre_hook(
        lambda m, a, kw: clock.update(t=kw["timestep"]), with_kwargs=True)
    with_reference_processors(reference.transformer, fast.materialize(fast.calib_grid), clock)
    expected = _generate(reference, i2v, folders)

    backends = enable_sparse_attention(pipe, fast, compiler="eager")
    sparse = _generate(pipe, i2v, folders)
    report = backends["transformer"].reports[-1]
    assert report.per_layer == {0: 1, 1: 1} and report.grid == (2, 8, 12)
    torch.testing.assert_close(sparse, expected, rtol=1e-4, atol=1e-4)
    assert (sparse - dense).abs().max() > 1e-2  # the schedule dropped blocks: not dense again


def test_density_one_equals_dense_with_model_cpu_offload(folders, tmp_path, caplog):
    """A WEST-only plan at density=1.0 equals dense, on a pipeline under
    enable_model_cpu_offload (accelerate's hooks: fullgraph would fail, the helper drops it)."""
    from scaling_attn_compile.offline.pipeline import calibrate_west_pipeline, pipeline_calls

    pipe = _load(folders["t2v"])
    calls = pipeline_calls(["a cat runs"], **VIDEO, num_inference_steps=2,
                           max_sequence_length=TEXT_LEN)
    plan = calibrate_west_pipeline(pipe, calls, progress=False)
    dense = _generate(pipe, False, folders)
    # The plan kept next to the model: from_pretrained ignores the folder, the helper finds it.
    plan.save(folders["t2v"] / "sparse_attention" / "transformer.plan.safetensors")
    pipe = _load(folders["t2v"])
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks as on a GPU machine
    with caplog.at_level(logging.INFO, logger="scaling_attn_compile"):
        enable_sparse_attention(pipe, density=1.0, compiler="eager")
        sparse = _generate(pipe, False, folders)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
    text = caplog.text
    assert "transformer: 2 layers x 2 heads, WEST density 1.0; calibrated at grid (2, 8, 12)" \
        in text and "fullgraph=False) (offloaded)" in text
    assert "rewrote 2/2 self-attention layers, grid (2, 8, 12) (the calibration grid)" in text
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 1.5"):
        enable_sparse_attention(_load(folders["t2v"]), plan, density=1.5)
    with pytest.raises(ValueError, match=r"plan=None looks for .*Tiny-Wan-I2V/sparse_attention/"
                                         r"transformer.plan.safetensors, which is not there"):
        enable_sparse_attention(_load(folders["i2v"], i2v=True))


def test_pipeline_west_needs_the_video_size_and_the_image(folders, tmp_path, capsys):
    prompts = ["--prompts", str(folders["root"] / "prompts.txt")]
    out = ["--out", str(tmp_path / "p.safetensors")]
    assert main(["west", "--model", str(folders["t2v"]), "--height", "128", *prompts, *out]) == 2
    assert "pass the video size with --frames, --height and --width (missing --frames, --width" \
        in capsys.readouterr().err
    assert main(["west", "--model", str(folders["i2v"]), *VIDEO_ARGS, *prompts, *out]) == 2
    assert "conditions on an image; pass --image" in capsys.readouterr().err
    # The bare I2V transformer (its transformer/ folder alone): one line, not a shape error.
    assert main(["west", "--model", str(folders["i2v"] / "transformer"), *VIDEO_ARGS,
                 *prompts, *out]) == 2
    assert "an image-to-video transformer (36 input channels, 16 output) needs its image " \
        "conditioning; pass the whole pipeline folder" in capsys.readouterr().err


def _fake_hub_cache(cache: Path, repo: str, folder: Path) -> Path:
    """The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    (entry / "snapshots").mkdir()
    snapshot = entry / "snapshots" / commit
    snapshot.symlink_to(folder, target_is_directory=True)
    return snapshot


def test_hub_ids_resolve_through_the_local_cache(folders, tmp_path, monkeypatch, capsys):
    from scaling_attn_compile.models.hub import resolve_model

    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "Wan-AI/Tiny-Wan-T2V", folders["t2v"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert Path(resolve_model("Wan-AI/Tiny-Wan-T2V")) == snapshot
    assert resolve_model("tiny-random") == "tiny-random"  # built-in names stay
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"--model Wan-AI/Absent: not a local folder, and not in the local Hugging Face cache "
            f"({cache}); download it first (`hf download Wan-AI/Absent`)")):
        resolve_model("Wan-AI/Absent")
    # The CLI: a one-line error for an absent id, and the pipeline for a cached one.
    out = ["--out", str(tmp_path / "p.safetensors")]
    assert main(["west", "--model", "Wan-AI/Absent", *VIDEO_ARGS, *out]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    with mock.patch("scaling_attn_compile.cli_pipeline.run_west_pipeline",
                    return_value=0) as run:
        assert main(["west", "--model", "Wan-AI/Tiny-Wan-T2V", *VIDEO_ARGS, *out]) == 0
    assert run.call_args.args[1] == snapshot


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_plan_files_follow_the_umask(tmp_path, umask, mode):
    from scaling_attn_compile.plan.plan import Plan, PlanMeta

    plan = Plan(torch.zeros(1, 1, 1, 1, dtype=torch.uint8), PlanMeta(
        model_class="WanTransformer3DModel", model_config={}, config_fingerprint="",
        weights_fingerprint=None, num_layers=1, num_heads=1, head_dim=16, patch_size=[1, 2, 2],
        calib_grid=[1, 1, 1], num_calibration_inputs=1, calibration={}))
    old = os.umask(umask)
    try:
        path = plan.save(tmp_path / "p.plan.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def _readme_pipeline_snippet() -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## With a diffusers pipeline", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_pipeline_snippet_runs(folders, tmp_path, caplog):
    """The README's snippet, as written but for its four constants (a 1.3B folder at 81 x 480
    x 832 for 50 steps is not a CPU test): the default backend, Inductor, compiles the pipeline
    and the log names what runs."""
    from scaling_attn_compile.offline.pipeline import (
        build_fast_plan_pipeline,
        calibrate_west_pipeline,
        pipeline_calls,
    )

    pipe = _load(folders["t2v"])
    call = pipeline_calls(["a cat runs"], **VIDEO, num_inference_steps=STEPS,
                          max_sequence_length=TEXT_LEN)[0]
    west = calibrate_west_pipeline(pipe, [call], progress=False)
    call["generator"] = torch.Generator().manual_seed(0)
    fast, _ = build_fast_plan_pipeline(west, pipe, call, 0.7, rows_per_block=8, progress=False)
    fast.save(tmp_path / "f.plan.safetensors")
    code = _readme_pipeline_snippet()
    constants = ('MODEL, PLAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan13.fast.plan.safetensors"\n'
                 'VIDEO, STEPS = dict(num_frames=81, height=480, width=832), 50\n')
    assert constants in code
    code = code.replace(constants, f"MODEL, PLAN = {str(folders['t2v'])!r}, "
                                   f"{str(tmp_path / 'f.plan.safetensors')!r}\n"
                                   f"VIDEO, STEPS = {VIDEO!r}, 2\n")
    with caplog.at_level(logging.INFO, logger="scaling_attn_compile"):
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
    assert scope["video"].shape == (5, 128, 192, 3)  # frames, height, width, RGB
    assert "transformer: 2 layers x 2 heads, FAST schedule (fast, 4 timestep buckets" in caplog.text
    assert "rewrote 2/2 self-attention layers" in caplog.text
    assert "torch.compile(dynamic=False, fullgraph=True)" in caplog.text  # not offloaded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_pipeline_on_the_gpu_with_inductor_in_bf16(tmp_path):
    """The device path: bf16 on CUDA, head_dim 64 (the kernel's), Inductor lowering to the
    Triton template. 9 x 256 x 384 pixels -> tokens (3, 16, 24): S = 1152, 9 blocks."""
    from scaling_attn_compile.offline.pipeline import (
        build_fast_plan_pipeline,
        calibrate_west_pipeline,
        pipeline_calls,
    )

    folder = build_pipeline_folder(tmp_path / "t2v", head_dim=64)

    def load():
        pipe = WanPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def calls():
        return pipeline_calls(["a cat runs"], num_frames=9, height=256, width=384,
                              num_inference_steps=6, negative_prompt="night",
                              max_sequence_length=TEXT_LEN)

    pipe = load()
    plan = calibrate_west_pipeline(pipe, calls(), capture_steps=3, progress=False)
    fast, _ = build_fast_plan_pipeline(plan, pipe, calls()[0], 0.5, progress=False)
    dense = pipe(**calls()[0], output_type="latent").frames.float()
    for kwargs, bound in ((dict(plan=plan, density=1.0), 0.02), (dict(plan=fast), None)):
        torch._dynamo.reset()
        pipe = load()
        backends = enable_sparse_attention(pipe, **kwargs)
        out = pipe(**calls()[0], output_type="latent").frames.float()
        assert backends["transformer"].reports[-1].per_layer == {0: 1, 1: 1}
        assert torch.isfinite(out).all()
        rel = float((out - dense).norm() / dense.norm())
        if bound is not None:  # density 1.0: dense up to bf16 rounding
            assert rel < bound, rel


def test_two_experts_each_get_their_steps_and_their_plan(tmp_path):
    """Wan2.2's layout: transformer for t >= 875, transformer_2 below. Each expert's plan holds
    the steps it ran, and enable_sparse_attention compiles both with their own plans."""
    from scaling_attn_compile.offline.pipeline import (
        build_fast_plan_pipeline,
        calibrate_west_pipeline,
        pipeline_calls,
    )

    folder = build_pipeline_folder(tmp_path / "experts", experts=True)
    pipe = _load(folder)
    ran = _scheduler_timesteps(pipe)  # [999, 900, 750, 500]

    def call():
        return pipeline_calls(["a cat runs"], **VIDEO, num_inference_steps=STEPS,
                              max_sequence_length=TEXT_LEN, guidance_scale=1.0)[0]

    plans, expected_t = {}, {"transformer": ran[:2], "transformer_2": ran[2:]}
    for name in ("transformer", "transformer_2"):
        west = calibrate_west_pipeline(pipe, [call()], component=name, progress=False)
        assert west.meta.calibration["pipeline_timesteps"] == expected_t[name]
        plans[name], prof = build_fast_plan_pipeline(west, pipe, call(), 0.7, rows_per_block=8,
                                                     component=name, progress=False)
        assert prof.timesteps == expected_t[name]
    dense = _generate(pipe, False, {"root": tmp_path}, guidance_scale=1.0)
    reference = _load(folder)
    for name in plans:
        clock = {"t": torch.tensor([0.0])}
        module = getattr(reference, name)
        module.register_forward_pre_hook(lambda m, a, kw, c=clock: c.update(t=kw["timestep"]),
                                         with_kwargs=True)
        with_reference_processors(module, plans[name].materialize(plans[name].calib_grid), clock)
    expected = _generate(reference, False, {"root": tmp_path}, guidance_scale=1.0)
    backends = enable_sparse_attention(pipe, plans, compiler="eager")
    sparse = _generate(pipe, False, {"root": tmp_path}, guidance_scale=1.0)
    assert all(b.reports[-1].per_layer == {0: 1, 1: 1} for b in backends.values())
    torch.testing.assert_close(sparse, expected, rtol=1e-4, atol=1e-4)
    assert (sparse - dense).abs().max() > 1e-2
    # The command line: --component picks the expert.
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat runs\n")
    out = tmp_path / "t2.plan.safetensors"
    assert main(["west", "--model", str(folder), "--component", "transformer_2", *VIDEO_ARGS,
                 "--steps", str(STEPS), "--guidance-scale", "1.0", "--text-len", str(TEXT_LEN),
                 "--prompts", str(prompts), "--out", str(out)]) == 0
    calib = load_plan(out).meta.calibration
    assert calib["component"] == "transformer_2" and calib["pipeline_timesteps"] == ran[2:]


def test_two_experts_compile_once_each_over_a_40_step_cfg_loop(tmp_path):
    """Issue 19's Wan2.2 bar: enable_sparse_attention gives one compiled graph per expert and no
    recompile over a 40-step loop with CFG (two transformer calls a step, the timestep new each
    step, the expert switched at boundary_ratio)."""
    from scaling_attn_compile.offline.pipeline import calibrate_west_pipeline, pipeline_calls

    folder = build_pipeline_folder(tmp_path / "experts", experts=True)
    pipe = _load(folder)
    call = pipeline_calls(["a cat runs"], **VIDEO, num_inference_steps=STEPS,
                          max_sequence_length=TEXT_LEN, guidance_scale=1.0)[0]
    plans = {name: calibrate_west_pipeline(pipe, [call], component=name, progress=False)
             for name in ("transformer", "transformer_2")}
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:  # outside the compiled graphs (a traced hook would guard on the count)
        count = torch._dynamo.disable(lambda m, a, n=name: calls.__setitem__(n, calls[n] + 1))
        getattr(pipe, name).register_forward_pre_hook(count)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backends = enable_sparse_attention(pipe, plans, density=0.7, compiler="eager")
    # Not error_on_recompile: the experts share WanTransformer3DModel.forward's code object, so
    # dynamo files the second expert's first compile (its own backend) as a recompile of it. The
    # count of graphs compiled over the whole loop is the check.
    pipe(prompt="a dog runs", negative_prompt="night", **VIDEO, num_inference_steps=40,
         guidance_scale=5.0, guidance_scale_2=3.0, max_sequence_length=TEXT_LEN,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    assert set(backends) == {"transformer", "transformer_2"}
    # CFG: a conditional and an unconditional call per step, split between the experts
    assert calls["transformer"] + calls["transformer_2"] == 80 and min(calls.values()) > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one per expert
    assert all(b.reports[-1].per_layer == {0: 1, 1: 1} for b in backends.values())
