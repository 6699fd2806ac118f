"""Wan VACE and SkyReels-V2 pipelines (``WanVACEPipeline``, ``SkyReelsV2Pipeline``; random
weights, save_pretrained/from_pretrained): WEST through the pipeline captures the main blocks'
self-attention (VACE's control blocks run too, uncaptured), and enable_sparse_attention
compiles the transformer: density 1.0 equals the dense pipeline, density 0.5 differs from it,
one graph for the whole CFG loop.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from diffusers import (
    SkyReelsV2Pipeline,
    SkyReelsV2Transformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)

from scaling_attn_compile import enable_sparse_attention
from scaling_attn_compile.offline.pipeline import calibrate_west_pipeline, pipeline_calls

sys.path.insert(0, os.path.dirname(__file__))
from test_pipeline import STEPS, TEXT_LEN, VIDEO, wan_pipeline_parts  # noqa: E402

PIPELINES = {"vace": WanVACEPipeline, "skyreels": SkyReelsV2Pipeline}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, cls in PIPELINES.items():
        parts = wan_pipeline_parts()
        common = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                      in_channels=16, out_channels=16, text_dim=16, freq_dim=32, ffn_dim=48,
                      num_layers=2, rope_max_seq_len=64)
        if name == "vace":  # control: 16 latent x 2 (inactive, reactive) + 64 mask pixels (8x8)
            transformer = WanVACETransformer3DModel(**common, vace_layers=[0, 1],
                                                    vace_in_channels=96)
        else:
            transformer = SkyReelsV2Transformer3DModel(**common)
        pipe = cls(**parts, transformer=transformer)
        out[name] = tmp_path_factory.mktemp(name)
        pipe.save_pretrained(out[name])
    return out


def _load(name, folders):
    pipe = PIPELINES[name].from_pretrained(folders[name])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe):
    return pipe(prompt="a dog runs", negative_prompt="night", **VIDEO,
                num_inference_steps=STEPS, guidance_scale=5.0, max_sequence_length=TEXT_LEN,
                generator=torch.Generator().manual_seed(7), output_type="latent").frames


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_west_and_enable_sparse_attention(folders, name):
    pipe = _load(name, folders)
    calls = pipeline_calls(["a cat runs"], **VIDEO, num_inference_steps=2,
                           max_sequence_length=TEXT_LEN)
    plan = calibrate_west_pipeline(pipe, calls, progress=False, token_order="raster")
    assert plan.meta.model_class == type(pipe.transformer).__name__ and plan.num_layers == 2
    dense = _generate(pipe)
    outs = {}
    for density in (1.0, 0.5):
        torch._dynamo.reset()
        pipe = _load(name, folders)
        backends = enable_sparse_attention(pipe, plan, density=density, compiler="eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs[density] = _generate(pipe)
        (be,) = backends.values() if isinstance(backends, dict) else (backends,)
        report = be.reports[0]
        assert report.per_layer == {0: 1, 1: 1}
        assert report.left_dense.get("VACE control-block attention", 0) == (
            2 if name == "vace" else 0)
    torch.testing.assert_close(outs[1.0], dense, rtol=1e-4, atol=1e-4)
    assert (outs[0.5] - dense).abs().max() > 1e-3
