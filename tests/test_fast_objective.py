"""``scaling-attn fast --objective video`` (issue 13): the response fit of
``offline/fast_response.py``, the weighted allocation it feeds, the CLI on the built-in sampler
and through a diffusers pipeline, the plan's metadata, and the study's ``west_fast_weighted``
producing the same tables as the CLI from the same gains.

Synthetic profiles drive the fit's properties (predictable answers); a 2-layer random Wan at
S = 384 tokens (3 blocks) drives the end-to-end runs.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from scaling_attn_compile.cli import main
from scaling_attn_compile.contract.masks import timestep_bucket
from scaling_attn_compile.errors import CliError
from scaling_attn_compile.offline import fast
from scaling_attn_compile.offline import fast_response as R
from scaling_attn_compile.plan.io import load_plan

LATENT = "2,16,48"  # (C, F, H, W) = (4, 2, 16, 48) -> tokens (2, 8, 24), S = 384, three blocks


def synthetic_profile(L=3, T=4, H=2, seed=0, identical=False) -> fast.FastProfile:
    """Errors falling with the level (0 at the dense level), densities rising with it;
    ``identical``: every (layer, step, head) has the same curves."""
    g = torch.Generator().manual_seed(seed)
    levels = list(fast.DEFAULT_LEVELS)
    NL = len(levels)
    base = torch.linspace(1.0, 0.0, NL, dtype=torch.float64) ** 2
    dens = torch.tensor(levels, dtype=torch.float64)
    if identical:
        err = base.expand(L, T, H, NL).clone()
        ld = dens.expand(L, H, NL).clone()
    else:
        err = base * torch.rand(L, T, H, 1, generator=g, dtype=torch.float64).add(0.1)
        ld = (dens + 0.05 * torch.rand(L, H, NL, generator=g, dtype=torch.float64)).clamp(max=1)
        ld[..., -1] = 1.0
    ts = torch.linspace(950, 50, T).tolist()
    return fast.FastProfile(levels, 1 - err, 1 - err, ld, ts, {"grid": [2, 8, 24]}, err)


# ---- the weighted fit -----------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.2, 0.35, 0.5, 0.8])
def test_weights_of_one_give_the_unweighted_fit(target):
    prof = synthetic_profile()
    plain = fast.fit_schedule(prof, target)
    ones = fast.fit_schedule(prof, target, weights=torch.ones(3, 4, dtype=torch.float64))
    assert torch.equal(plain.level_tables, ones.level_tables)
    assert ones.info["achieved_density"] == plain.info["achieved_density"]


def test_a_larger_gain_gets_more_density():
    """Identical cells: only the gains differ, so a cell with a larger gain never gets a
    sparser level than one with a smaller gain, and the heavy layer and step end up denser."""
    prof = synthetic_profile(identical=True)
    w = torch.ones(3, 4, dtype=torch.float64)
    w[1] *= 30.0  # layer 1 costs 30x in the video
    w[:, 0] *= 100.0  # the first (noisiest) step 100x, as small-wan measured
    s = fast.fit_schedule(prof, 0.4, weights=w)
    choice = s.level_tables.flip(1).long()  # (L, T, H), step order
    lv = choice.double().mean(-1)  # (L, T)
    flat_w, flat_lv = w.flatten(), lv.flatten()
    for a in range(flat_w.numel()):
        for b in range(flat_w.numel()):
            if flat_w[a] > flat_w[b]:
                assert flat_lv[a] >= flat_lv[b], (a, b)
    assert lv[1].mean() > lv[0].mean() and lv[1].mean() > lv[2].mean()
    assert lv[:, 0].mean() > lv[:, 1:].mean()
    assert abs(s.info["achieved_density"] - 0.4) <= 0.02


def test_fit_gains_recovers_a_separable_response():
    g0 = torch.Generator().manual_seed(1)
    g = torch.rand(4, generator=g0, dtype=torch.float64) * 3 + 0.1
    h = torch.rand(6, generator=g0, dtype=torch.float64) ** 4 * 5 + 1e-3
    C = torch.rand(4, 6, generator=g0, dtype=torch.float64) + 0.1
    fit = R.fit_gains(C, h * (g[:, None] * C).sum(0), g * (h[None, :] * C).sum(1))
    assert torch.allclose(torch.tensor(fit["layer_gain"], dtype=torch.float64), g / g.mean(),
                          rtol=1e-6)
    assert torch.allclose(torch.tensor(fit["bucket_gain_by_step"], dtype=torch.float64),
                          h / h.mean(), rtol=1e-6)
    w = g[:, None] * h[None, :]
    assert torch.allclose(fit["weights"], w / w.mean(), rtol=1e-6)
    assert fit["fit_residual"] < 1e-9
    with pytest.raises(ValueError, match="fit_gains"):
        R.fit_gains(C, [1.0] * 5, [1.0] * 4)


def test_probes_read_the_schedule_as_the_kernel_does():
    """A fake generation whose error is ``sum g_l h_t C_lt`` over the cells the probe made
    sparse, the cells read through the op's own bucket rule at the profiled timesteps: the
    fit returns ``g`` and ``h`` in step order (the bucket order is the reverse)."""
    prof = synthetic_profile(L=3, T=4)
    C = prof.output_error[..., prof.levels.index(R.REF_LEVEL)].sum(-1)
    g = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    h = torch.tensor([50.0, 4.0, 1.0, 0.1], dtype=torch.float64)  # the first step weighs most
    calls = []

    def run(schedule):
        calls.append(schedule)
        if schedule is None:
            return torch.zeros(3)
        b = timestep_bucket(torch.tensor(prof.timesteps), schedule.bucket_bounds)  # (T,)
        sparse = (schedule.level_tables[:, b] == 0).all(-1)  # (L, T) step order
        assert schedule.levels == [R.REF_LEVEL, 1.0]
        err = (g[:, None] * h[None, :] * C)[sparse].sum()
        return torch.full((3,), float(err.sqrt()))

    out = R.measure_response(prof, 2, run, progress=False)
    assert calls[0] is None and len(calls) == out["generations"] == 3 + 4 + 1
    assert torch.allclose(torch.tensor(out["bucket_gain_by_step"], dtype=torch.float64),
                          h / h.mean(), rtol=1e-5)
    assert torch.allclose(torch.tensor(out["layer_gain"], dtype=torch.float64), g / g.mean(),
                          rtol=1e-5)
    info = R.fit_video_schedule(prof, 0.4, out, 1.5).info
    assert info["objective"] == "video" and info["error"] == "output_error"
    assert info["response"]["probe_seconds"] == 1.5 and "weights" not in info["response"]
    with pytest.raises(ValueError, match="ref_level"):
        R.measure_response(prof, 2, run, ref_level=0.25)


# ---- the study's method and the CLI's fit: same gains, same tables ---------------------------

@pytest.fixture(scope="module")
def tiny_profile():
    from scaling_attn_compile.models.wan import load_transformer
    from scaling_attn_compile.offline.calibrate import (
        calibrate_west,
        default_timesteps,
        random_inputs,
    )

    model = load_transformer("tiny-random", seed=0).transformer
    latent = (4, 2, 16, 48)
    plan = calibrate_west(model, random_inputs(1, 16, 32, seed=0), default_timesteps(2, 3.0),
                          latent_shape=latent, progress=False)
    ts = default_timesteps(4, 3.0)
    prof = fast.profile_fidelity(plan, model, random_inputs(1, 16, 32, seed=7)[0], timesteps=ts,
                                 latent_shape=latent, rows_per_block=4, progress=False)
    return plan, prof, ts


def test_study_weighted_method_builds_the_cli_tables(tiny_profile):
    from scaling_attn_compile.quality import methods as M

    plan, prof, ts = tiny_profile
    L, T = plan.num_layers, len(ts)
    g = torch.linspace(0.2, 2.0, L, dtype=torch.float64)[:, None]
    h = torch.logspace(2, -2, T, dtype=torch.float64)[None, :]
    resp = {"weights": g * h / (g * h).mean(), "layer_gain": g.flatten().tolist(),
            "bucket_gain_by_step": h.flatten().tolist()}
    grid = tuple(prof.info["grid"])
    cal = M.Calibration(plan, prof, [], None, ts, grid, L, plan.num_heads, response=resp)
    study = M.build("west_fast_weighted", 0.5, cal).tables
    cli = plan.with_schedule(R.fit_video_schedule(prof, 0.5, resp, 0.0)).materialize(grid)
    assert all(torch.equal(a, b) for a, b in zip(study.masks, cli.masks, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(study.level_tables, cli.level_tables,
                                                 strict=True))
    assert torch.equal(study.bucket_bounds, cli.bucket_bounds)
    unweighted = plan.with_schedule(fast.fit_schedule(prof, 0.5)).materialize(grid)
    assert not all(torch.equal(a, b) for a, b in zip(study.level_tables,
                                                     unweighted.level_tables, strict=True))


# ---- the CLI --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wan_folder(tiny_wan_folder, tmp_path_factory):
    """conftest's small random Wan folder and a WEST plan of it."""
    root = tiny_wan_folder
    west = tmp_path_factory.mktemp("west") / "w.plan.safetensors"
    assert main(["west", "--model", str(root), "--latent", LATENT, "--num-prompts", "1",
                 "--steps", "4", "--capture-steps", "2", "--text-len", "8",
                 "--out", str(west)]) == 0
    return root, west


def _fast(folder, west, out, *extra):
    return main(["fast", "--model", str(folder), "--plan", str(west), "--target-density", "0.6",
                 "--capture-steps", "3", "--text-len", "8", "--rows-per-block", "4",
                 "--out", str(out), *extra])


def test_cli_video_objective_writes_the_gains(wan_folder, tmp_path, capsys):
    """The video objective is `fast`'s default on Wan; --objective attention skips the probes."""
    folder, west = wan_folder
    assert _fast(folder, west, tmp_path / "a.plan.safetensors", "--objective", "attention") == 0
    assert "FAST video probes" not in capsys.readouterr().err
    assert _fast(folder, west, tmp_path / "v.plan.safetensors") == 0  # the default
    cap = capsys.readouterr()
    assert "FAST video probes" in cap.err  # the probes' progress bar
    # 3 blocks: half the height and width would leave 1, so full size; 3 of the 4 steps
    assert "--objective video: 6 probe generations at latent 2x16x48, 3 steps" in cap.out
    att = load_plan(tmp_path / "a.plan.safetensors").schedule
    vid = load_plan(tmp_path / "v.plan.safetensors").schedule
    assert not torch.equal(att.level_tables, vid.level_tables)
    assert "response" not in att.info and att.info["objective"] == "output_error"
    r = vid.info["response"]
    assert vid.info["objective"] == "video" and vid.info["weighted"] is True
    assert len(r["layer_gain"]) == 2 and len(r["bucket_gain_by_step"]) == 3
    assert r["generations"] == 2 + 3 + 1 and r["probe_seconds"] > 0
    assert max(r["probe_mse_by_step"]) > 0  # the probes ran sparse
    assert main(["show", str(tmp_path / "v.plan.safetensors"), "--out",
                 str(tmp_path / "l.png")]) == 0
    out = capsys.readouterr().out
    assert out.count("FAST fit: objective video") == 1 and "6 probe generations" in out


def test_cli_video_objective_refusals(wan_folder, tmp_path, capsys):
    folder, west = wan_folder
    for extra, says in ((["--allocation", "curve"], "--allocation lagrange"),
                        (["--method", "uniform"], "--method fast"),
                        (["--error", "fidelity"], "--error output_error"),
                        (["--levels", "0.1,0.3,1.0"], "add 0.2")):
        assert _fast(folder, west, tmp_path / "x.plan.safetensors", "--objective", "video",
                     *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    from scaling_attn_compile.cli_fast import sparse_run

    with pytest.raises(CliError, match="--objective attention"):
        sparse_run(torch.nn.Linear(2, 2), None, (1, 1, 1), lambda: None)


def test_cli_video_objective_probes_on_a_smaller_latent(wan_folder, tmp_path, capsys):
    """``--probe-latent`` / ``--probe-steps``: the probes (and their own profile) run on a
    smaller latent and a coarser schedule; their gains weight the full profile's fit, so the
    schedule keeps the full profile's buckets. Misuse is one line each."""
    folder, west = wan_folder
    small = "2,8,48"  # tokens (2, 4, 24): 192, two blocks (the calibration's: 384, three)
    out = tmp_path / "p.plan.safetensors"
    assert _fast(folder, west, out, "--objective", "video", "--probe-latent", small,
                 "--probe-steps", "3") == 0
    assert "FAST probe profile" in capsys.readouterr().err
    sched = load_plan(out).schedule
    full = load_plan(west).meta.calibration["latent_shape"]
    r = sched.info["response"]
    assert r["probe_steps"] == 3 and r["generations"] == 2 + 3 + 1
    assert r["probe_grid"] == [2, 4, 24] and list(full[1:]) == [2, 16, 48]
    assert sched.info["objective"] == "video" and sched.level_tables.shape[1] == 3
    for extra, says in ((["--probe-steps", "2"], "need at least 3 steps"),
                        (["--objective", "attention", "--probe-steps", "3"],
                         "pass --objective video")):
        extra = extra if "--objective" in extra else ["--objective", "video", *extra]
        assert _fast(folder, west, tmp_path / "x.plan.safetensors", *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    # Too small to be sparse (48 tokens, one block): found after the probes, still one line.
    assert _fast(folder, west, tmp_path / "x.plan.safetensors", "--objective", "video",
                 "--probe-latent", "1,8,24") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "left the video unchanged" in err.splitlines()[-1]


def test_help_says_what_video_costs(capsys):
    with pytest.raises(SystemExit):
        main(["fast", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "L + T + 1 extra generations" in text and "42.0/36.4/32.0/26.6 dB" in text


def test_default_objective_falls_back_with_a_line(capsys):
    """--objective left out: the video objective where its probes can run, else the attention
    objective and one line saying why; the cheap probe setting halves H, W and the steps."""
    import argparse

    from scaling_attn_compile.cli_fast import resolve_objective
    from scaling_attn_compile.offline.fast_response import cheap_probe_setting

    def args(**kw):
        base = dict(objective=None, method="fast", allocation="lagrange", error="output_error",
                    levels=None, probe_latent=None, probe_steps=None, capture_steps=6)
        return argparse.Namespace(**{**base, **kw})

    kw = dict(latent=(21, 60, 104), num_steps=50, num_profiled=6, num_layers=30)
    class WanTransformer3DModel(torch.nn.Module):  # the probed class, by name, with a patch
        config = argparse.Namespace(patch_size=(1, 2, 2))

    a = args(capture_steps=None)  # every one of 50 steps profiled: the line says how to cut it
    resolve_objective(a, WanTransformer3DModel(), **{**kw, "num_profiled": 50})
    out = capsys.readouterr().out
    assert a.objective == "video" and (a.probe_latent, a.probe_steps) == ((21, 30, 52), None)
    assert "81 probe generations at latent 21x30x52, 50 steps" in out
    assert out.rstrip().endswith("--capture-steps 6 makes 37"), out
    a = args()  # --capture-steps 6: no hint
    resolve_objective(a, WanTransformer3DModel(), **kw)
    out = capsys.readouterr().out
    assert "37 probe generations at latent 21x30x52, 25 steps" in out and "makes" not in out
    for a, says in ((args(), "not Linear's"), (args(allocation="curve"), "--allocation curve"),
                    (args(error="fidelity"), "--error fidelity"),
                    (args(levels=[0.1, 1.0]), "reference level 0.2")):
        resolve_objective(a, torch.nn.Linear(2, 2), **kw)
        out = capsys.readouterr().out
        assert a.objective == "attention" and out.count("\n") == 1 and says in out, out
    a = args(objective="attention")
    resolve_objective(a, torch.nn.Linear(2, 2), **kw)
    assert a.objective == "attention" and capsys.readouterr().out == ""
    with pytest.raises(CliError, match="got Linear; pass --objective attention"):
        resolve_objective(args(objective="video"), torch.nn.Linear(2, 2), **kw)
    # Wan 1.3B at 480p (latent 21x60x104, patch 1x2x2): probes at 21x30x52 and 25 steps
    assert cheap_probe_setting((21, 60, 104), (1, 2, 2), 50, 6) == ((21, 30, 52), 25)
    # 720p (latent 90 high): 45 rounds down to the patch
    assert cheap_probe_setting((21, 90, 160), (1, 2, 2), 50, 6) == ((21, 44, 80), 25)
    # few steps: at least the profiled ones; a tiny grid (under 8 blocks at half size): full
    assert cheap_probe_setting((21, 60, 104), (1, 2, 2), 8, 6) == ((21, 30, 52), 6)
    assert cheap_probe_setting((2, 16, 48), (1, 2, 2), 4, 4) == (None, None)


# ---- through a diffusers pipeline: the probes run its scheduler ------------------------------

def test_pipeline_video_objective_probes_the_pipelines_timesteps(tmp_path, capsys):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_pipeline import STEPS, TEXT_LEN, VIDEO_ARGS, build_pipeline_folder

    folder = build_pipeline_folder(tmp_path / "Tiny-Wan-T2V")
    (tmp_path / "p.txt").write_text("a cat runs on the beach\n")
    common = ["--prompts", str(tmp_path / "p.txt"), "--negative-prompt", "night",
              "--text-len", str(TEXT_LEN)]
    west, out = tmp_path / "w.plan.safetensors", tmp_path / "v.plan.safetensors"
    assert main(["west", "--model", str(folder), *VIDEO_ARGS, "--steps", str(STEPS),
                 "--capture-steps", "2", "--out", str(west), *common]) == 0
    assert main(["fast", "--plan", str(west), "--target-density", "0.7", "--rows-per-block", "8",
                 "--objective", "video", "--out", str(out), *common]) == 0
    sched = load_plan(out).schedule
    ran = load_plan(west).meta.calibration["pipeline_timesteps"]  # UniPC's, not the own sampler's
    assert sched.info["profiled_timesteps"] == ran and sched.info["objective"] == "video"
    r = sched.info["response"]
    assert r["generations"] == 2 + STEPS + 1
    # Each bucket holds exactly one of the pipeline's steps, and each bucket probe moved the
    # video: the probes ran the scheduler's timesteps, not another sampler's.
    b = timestep_bucket(torch.tensor(ran), sched.bucket_bounds)
    assert sorted(b.tolist()) == list(range(STEPS))
    assert min(r["probe_mse_by_step"]) > 0
    capsys.readouterr()
    # Every probe starts from the profile's noise: the call's generator is re-seeded each time.
    from scaling_attn_compile.cli_pipeline import load_pipeline
    from scaling_attn_compile.offline.pipeline import pipeline_calls

    pipe = load_pipeline(folder, "cpu", torch.float32)
    call = pipeline_calls(["a cat"], height=128, width=192, num_frames=5, num_inference_steps=2,
                          max_sequence_length=TEXT_LEN, seed=3)[0]
    sample = R.pipeline_run_fn(pipe, call)
    assert torch.equal(sample(), sample())
    # Cheap probes through the pipeline: --probe-steps (its scheduler at 2 steps) and
    # --probe-latent (times the VAE's strides: 2,16,24 -> 5 frames of 128x192, the calibration
    # video here, the smallest this two-block model stays sparse at).
    out = tmp_path / "p.plan.safetensors"
    assert main(["fast", "--plan", str(west), "--target-density", "0.7", "--rows-per-block", "8",
                 "--objective", "video", "--capture-steps", "2", "--probe-steps", "2",
                 "--probe-latent", "2,16,24", "--out", str(out), *common]) == 0
    assert "video probes: 5x128x192, 2 steps" in capsys.readouterr().out
    r = load_plan(out).schedule.info["response"]
    assert r["probe_steps"] == 2 and r["probe_grid"] == [2, 8, 12]
    assert r["generations"] == 2 + 2 + 1 and min(r["probe_mse_by_step"]) > 0
