"""``benchmarks/bench_quality.py`` on a tiny random-weight Wan (CPU, tiny grid, few steps).

Random weights have no attention structure: this checks the plumbing (schema, density
accounting, finite metrics) and that the benchmark's measured processor path computes what the
backend-compiled model computes, not the quality numbers of the bundled model.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from scaling_attn_compile import fast
from scaling_attn_compile import tiny_wan as tw
from scaling_attn_compile.backend import scaling_attn_backend
from scaling_attn_compile.calibrate import calibrate_west
from scaling_attn_compile.demo import calibration_input
from scaling_attn_compile.energy import EnergyFilter

ROOT = Path(__file__).resolve().parent.parent
GRID, STEPS, LAYERS = (4, 32, 32), 3, 2  # S = 4 x 16 x 16 = 1024 tokens, 8 blocks


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality",
                                                  ROOT / "benchmarks" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bq = _load_bench()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_wan_q")
    tw.save_tiny_wan(tw.make_tiny_wan(seed=0, num_layers=LAYERS, ffn_dim=256), d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return tw.load_tiny_wan("cpu", torch.float32, path=model_dir)


def test_quality_core_schema_and_densities(model, model_dir, tmp_path):
    targets = (0.4,)
    res = bq.run_quality(model, model_path=model_dir, grid=GRID, steps=STEPS, densities=targets,
                         num_prompts=1, num_calib=1, calib_capture_steps=2,
                         fast_capture_steps=STEPS, energy_capture_steps=2, bisect_iters=6,
                         log=lambda *a: None)
    res["env"] = bq.environment(model_dir)
    json.loads(json.dumps(res))  # JSON-able
    assert set(res) >= {"benchmark", "config", "results", "bar", "timings_s", "env"}
    assert set(res["env"]) >= {"torch", "git_sha", "model_weights_sha256_16"}
    cfg = res["config"]
    assert cfg["grid"] == list(GRID) and cfg["steps"] == STEPS and cfg["seeds"] == [0]
    assert not set(cfg["prompts"]) & set(cfg["calibration_captions"] + [
        cfg["fast_and_energy_caption"]])
    assert len(res["results"]) == len(targets) * len(bq.DEFAULT_METHODS)
    for r in res["results"]:
        assert r["status"] == "ok", r
        assert set(r) >= {"method", "target_density", "achieved_density", "psnr_db", "ssim",
                          "rel_l2", "per_prompt"}
        for k in ("psnr_db", "ssim", "rel_l2", "achieved_density"):
            assert math.isfinite(r[k]), (r["method"], k)
        assert -1.0 <= r["ssim"] <= 1.0 and 0 < r["achieved_density"] <= 1.0
        if "planned_density" in r and r["method"] != "west_fast_energy":
            # Mask-only methods: the counted blocks are exactly what the schedule plans.
            assert r["achieved_density"] == pytest.approx(r["planned_density"], abs=1e-9)
        # Tolerances: 8 blocks per row, 2 layers x 4 heads -> coarse steps of density; the
        # energy methods are calibrated on another (dense) trajectory.
        tol = 0.2 if r["method"].startswith(("energy", "west_fast_energy")) else 0.1
        assert abs(r["achieved_density"] - r["target_density"]) <= tol, r
    png = bq.plot_pareto(res, tmp_path / "q.png")
    assert png.stat().st_size > 0
    assert "| method |" in bq.quality_table(res)


def test_measured_path_matches_backend(model, model_dir):
    """The processor path (used by the benchmark) == the model compiled with the backend."""
    tgrid = tw.token_grid(GRID)
    ts_all = [1000.0 * s for s in tw.sigmas(STEPS).tolist()[:-1]]
    latent = (model.config.in_channels, *GRID)
    with torch.no_grad():
        plan = calibrate_west(model, [calibration_input("red square moving left", 1,
                                                        model_path=model_dir)], ts_all,
                              latent_shape=latent, guidance_scale=1.0, progress=False)
        prof = fast.profile_fidelity(plan, model, calibration_input("blue circle bouncing", 2,
                                                                    model_path=model_dir),
                                     timesteps=ts_all, latent_shape=latent, guidance_scale=1.0,
                                     progress=False)
    plan = plan.with_schedule(fast.fit_schedule(prof, 0.5))
    prompts = ["red circle rotating"]
    kw = dict(grid=GRID, steps=STEPS, seed=0, encoder_path=model_dir)
    runner = bq.MeasuredAttention(model)
    for filt in (None, EnergyFilter("cumulative", threshold=-4.0)):
        backend = scaling_attn_backend(plan, compiler="eager", energy_filter=filt)
        compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
        ref = tw.generate(model, prompts, transformer=compiled, **kw)
        assert sum(r.num_rewritten for r in backend.reports) >= LAYERS
        rule, lam = (0, 0.0) if filt is None else filt.for_layer(0, math.prod(tgrid))
        runner.configure(plan.materialize(tgrid), rule, lam)
        with runner.installed():
            got = tw.generate(model, prompts, **kw)
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
        torch._dynamo.reset()
    # Every block visited and no filter: the dense video.
    runner.configure(bq.all_blocks_tables(LAYERS, model.config.num_attention_heads, tgrid))
    with runner.installed():
        got = tw.generate(model, prompts, **kw)
    assert runner.density() == 1.0
    torch.testing.assert_close(got, tw.generate(model, prompts, **kw), atol=2e-4, rtol=1e-4)


def test_warmup_steps():
    assert bq.warmup_steps(0.5, 16) == 4 and bq.warmup_steps(0.35, 16) == 3
    assert bq.warmup_steps(0.25, 16) == 2 and bq.warmup_steps(0.15, 16) == 1


def test_bar_compares_at_equal_density():
    """A uniform threshold that lands below the target density must not flatter WEST+FAST: the
    bar reads the uniform curve at WEST+FAST's own achieved density."""
    def row(method, target, achieved, psnr):
        return {"method": method, "target_density": target, "achieved_density": achieved,
                "psnr_db": psnr, "status": "ok"}

    results = [row("west_uniform", 0.5, 0.5, 30.0), row("west_uniform", 0.25, 0.2, 14.0),
               row("west_fast", 0.5, 0.5, 31.0), row("west_fast", 0.25, 0.25, 18.0)]
    bar = bq.bar_check(results)
    at_025 = next(r for r in bar["rows"] if r["target_density"] == 0.25)
    assert at_025["gain_db"] == pytest.approx(4.0)  # same target, but uniform ran at 0.2
    assert at_025["uniform_psnr_db_at_equal_density"] == pytest.approx(14.0 + 16.0 * 0.05 / 0.3)
    assert at_025["gain_db_equal_density"] == pytest.approx(4.0 - 16.0 * 0.05 / 0.3)
    assert bar["met"] is False  # 1.33 dB < 2 at equal density, though 4 dB at the same target
