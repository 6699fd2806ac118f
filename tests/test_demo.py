"""``scaling-attn demo`` end to end on a tiny random-weight Wan saved to a tmp dir (CPU, ~30 s).

Random weights have no attention structure, so this checks the plumbing (WEST -> FAST -> backend
-> dense/sparse sampling -> files, table, metrics), not the quality the bundled model shows.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from scaling_attn_compile.cli import main
from scaling_attn_compile.tiny import tiny_wan as tw
from scaling_attn_compile.tiny.demo import COLUMNS
from scaling_attn_compile.tiny.metrics import psnr, ssim_video

LAYERS, HEADS, STEPS = 2, 4, 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_wan")
    tw.save_tiny_wan(tw.make_tiny_wan(seed=0, num_layers=LAYERS, ffn_dim=256), d)
    return d


def test_ssim_and_psnr_basics():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 2, 16, 16, generator=g) * 2 - 1
    assert ssim_video(a, a) == pytest.approx(1.0, abs=1e-9) and psnr(a, a) == math.inf
    noisy = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    assert 0.0 < ssim_video(noisy, a) < 0.9
    noisier = (a + 0.6 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    assert ssim_video(noisier, a) < ssim_video(noisy, a)
    assert ssim_video(torch.zeros(3, 1, 8, 8), torch.zeros(3, 1, 8, 8)) == pytest.approx(1.0)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no tiny-wan weights"):
        main(["demo", "--model-path", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])


def test_demo_end_to_end(model_dir, tmp_path):
    out = tmp_path / "demo"
    target = 0.35
    rc = main(["demo", "--model-path", str(model_dir), "--out", str(out), "--grid", "4,32,32",
               "--steps", str(STEPS), "--num-calib", "1", "--calib-capture-steps", "2",
               "--fast-capture-steps", str(STEPS), "--num-prompts", "2",
               "--target-density", str(target), "--device", "cpu", "--quiet"])
    assert rc == 0
    for name in ("side_by_side.gif", "masks_layer0.png", f"masks_layer{LAYERS - 1}.png",
                 "schedule.png", "plan.safetensors", "results.md", "results.json"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["columns"] == list(COLUMNS)
    assert [r["prompt"] for r in res["rows"]][-1] == "mean" and len(res["rows"]) == 3
    for r in res["rows"]:
        assert set(COLUMNS) <= set(r)
        assert math.isfinite(r["psnr_db"]) and -1.0 <= r["ssim"] <= 1.0 and r["rel_l2"] > 0
    # Every sampler step is profiled, so the density the sampler runs at is FAST's fitted one.
    # That fit lands on the side of a jump nearest the target; one (layer, step, head) cell
    # moving one level changes the global density by at most 1 / (L * T * H) = 1/24 here (the
    # whole block range of that head), so |density - target| <= 1/24 plus fit_schedule's 0.01
    # tolerance bounds the error, unless several cells jump at once (tied fidelity targets).
    d = res["rows"][0]["density"]
    assert d < 1.0
    assert abs(d - target) <= 1 / (LAYERS * STEPS * HEADS) + 0.01, d
    assert abs(d - res["meta"]["fast_fit_density"]) < 1e-6
    assert res["meta"]["rewritten_attention_calls"] >= LAYERS
    md = (out / "results.md").read_text()
    assert "| prompt | density | PSNR (dB) | SSIM | rel L2 |" in md and "generate sparse" in md
    assert set(res["timings_s"]) >= {"WEST calibration", "FAST profile + fit", "generate dense",
                                     "generate sparse"}
    # The demo's default FAST objective is the video one; at 8 blocks the probes run at full
    # size (half the height and width would leave 2 blocks, below PROBE_MIN_BLOCKS).
    assert res["meta"]["fast_objective"] == "video"
    probes = res["meta"]["video_probes"]
    assert probes["probe_grid"] == [4, 16, 16] and probes["generations"] == LAYERS + STEPS + 1


def test_demo_video_objective_falls_back_with_a_line(model_dir, tmp_path, capsys):
    """One block per video (so only density 1.0 is reachable): the probes cannot be sparse, so
    the demo says so and fits the attention objective instead of failing or writing NaN
    gains."""
    out = tmp_path / "demo_one_block"
    rc = main(["demo", "--model-path", str(model_dir), "--out", str(out), "--grid", "2,16,16",
               "--target-density", "1.0", "--steps", "2", "--num-calib", "1", "--calib-capture-steps", "1",
               "--fast-capture-steps", "2", "--num-prompts", "1", "--compiler", "eager",
               "--device", "cpu", "--quiet"])
    assert rc == 0
    assert "fitting the attention objective" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["fast_objective"] == "output_error" and not res["meta"]["video_probes"]


def test_demo_in_bf16_runs(model_dir, tmp_path, monkeypatch):
    """The GPU default dtype, on the CPU. Every GPU demo died in WEST calibration with "Input type
    (float) and bias type (c10::BFloat16) should be the same": calibration took its dtype from
    the model's first parameter, Wan's fp32-kept scale_shift_table. Fails without the fix."""
    from scaling_attn_compile import args

    monkeypatch.setattr(args, "resolve_dtype", lambda name, device: torch.bfloat16)
    out = tmp_path / "demo_bf16"
    rc = main(["demo", "--model-path", str(model_dir), "--out", str(out), "--grid", "2,32,32",
               "--steps", "2", "--num-calib", "1", "--calib-capture-steps", "1",
               "--fast-capture-steps", "2", "--num-prompts", "1", "--compiler", "eager",
               "--device", "cpu", "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["dtype"] == "torch.bfloat16"
    assert res["meta"]["calibration_dtype"] == "torch.float32"
    assert res["meta"]["rewritten_attention_calls"] >= LAYERS
    assert all(math.isfinite(r["psnr_db"]) or r["psnr_db"] == math.inf for r in res["rows"])


def test_demo_runs_small_wan(tmp_path):
    """``--model small-wan`` (what ``--device cuda`` runs by default) through the same stages, on
    the bundled weights at a small grid: 4x64x64 pixels = 4x16x16 tokens, 8 blocks."""
    out = tmp_path / "demo_sw"
    rc = main(["demo", "--model", "small-wan", "--out", str(out), "--grid", "4,64,64",
               "--steps", "2", "--num-calib", "1", "--calib-capture-steps", "1",
               "--fast-capture-steps", "2", "--num-prompts", "1", "--compiler", "eager",
               "--device", "cpu", "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    meta = res["meta"]
    assert meta["model_name"] == "small-wan" and meta["token_grid"] == [4, 16, 16]
    assert meta["rewritten_attention_calls"] >= meta["num_layers"] == 8
    assert "photo" in meta["prompts"][0]  # a held-out small-wan prompt, not a toy caption
    assert math.isfinite(res["rows"][0]["psnr_db"]) and res["rows"][0]["rel_l2"] < 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("grid", [None, "16,64,64"], ids=["default-grid", "grid-16x64x64"])
def test_gpu_demo_runs(grid, tmp_path):
    """``scaling-attn demo --device cuda``: small-wan in bf16, the Triton kernel through the
    Inductor template; short (4 steps, 1 prompt). The default grid is small-wan's native
    16x128x128 (128 blocks)."""

    out = tmp_path / "demo_gpu"
    args = ["demo", "--out", str(out), "--steps", "4", "--fast-capture-steps", "4",
            "--num-prompts", "1", "--device", "cuda", "--quiet"]
    rc = main(args + (["--grid", grid] if grid else []))
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    meta = res["meta"]
    assert meta["device"].startswith("cuda") and meta["dtype"] == "torch.bfloat16"
    assert meta["model_name"] == "small-wan"
    assert meta["grid"] == ([int(x) for x in grid.split(",")] if grid else [16, 128, 128])
    assert meta["rewritten_attention_calls"] >= meta["num_layers"]
    for r in res["rows"]:
        # Sparse near dense, not garbage: rel L2 0.40 at density 0.35 on the CPU (16 steps, README
        # quality table); an unrelated video of the same norm is ~1.4.
        assert math.isfinite(r["psnr_db"]) and r["rel_l2"] < 1.0, r


def test_auto_model_picks_by_folder_patch_size(model_dir, tmp_path):
    """``--model auto``: small-wan by default (CPU and CUDA); a ``--model-path`` folder picks the
    bundled model with its config's patch size; a missing folder is tiny-wan's (its trainer)."""
    from scaling_attn_compile.tiny import small_wan as sw
    from scaling_attn_compile.tiny.demo import SMALL_WAN_CPU, _auto_model

    assert _auto_model("cpu", None) == _auto_model("cuda", None) == "small-wan"
    assert _auto_model("cpu", model_dir) == "tiny-wan"  # patch (1, 2, 2)
    assert _auto_model("cpu", sw.ASSET_DIR) == "small-wan"  # patch (1, 4, 4)
    assert _auto_model("cpu", tmp_path / "nope") == "tiny-wan"
    grid, steps = SMALL_WAN_CPU
    assert math.prod(sw.token_grid(grid)) // 128 >= 32 and steps == 16
