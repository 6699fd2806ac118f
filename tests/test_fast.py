"""FAST (issue 5): fidelity identity, stratified rows, A(l, t), the density fit, head-wise choice,
buckets, baselines, plan round-trip and the CLI. A tiny random-weight Wan (2 layers x 2 heads,
token grid (4, 16, 16) = 8 query blocks) drives the mechanics; pure functions use synthetic q/k.
"""

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scaling_attn_compile.contract.masks import timestep_bucket
from scaling_attn_compile.models.wan import load_transformer
from scaling_attn_compile.offline import fast, west
from scaling_attn_compile.offline.calibrate import calibrate_west, default_timesteps, random_inputs
from scaling_attn_compile.plan.io import load_plan

LATENT = (4, 4, 32, 32)  # patch (1, 2, 2) -> grid (4, 16, 16), S = 1024, NB = 8
STEPS = 10


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------

def _direct(q, k, codes, levels, rows):
    """Definition: full rows, key masks, Hellinger with explicit renormalisation."""
    S, D = q.shape[2], q.shape[3]
    p = (q[:, :, rows].double() @ k.double().transpose(-1, -2) * D**-0.5).softmax(-1)
    out = []
    for lv in levels:
        m = west.mask_at(codes, lv)[:, rows // 128]  # (H, R, NB)
        keep = m.repeat_interleave(128, -1)[..., :S][None]
        out.append(fast.hellinger_fidelity_direct(p, keep))
    return torch.stack(out, 2), p


@pytest.mark.parametrize("S", [300, 512])
def test_hellinger_identity_matches_direct_formula(S):
    g = torch.Generator().manual_seed(S)
    B, H, D = 2, 3, 16
    q = torch.randn(B, H, S, D, generator=g, dtype=torch.float64) * 2
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64) * 2
    nb = math.ceil(S / 128)
    codes = torch.randint(1, 256, (H, nb, nb), generator=g, dtype=torch.uint8)
    rows = fast.sample_rows(S, 16, seed=1)
    levels = list(fast.DEFAULT_LEVELS)
    got = fast.row_fidelity(q, k, codes, levels, rows)  # (B, H, NL, R)
    want, p = _direct(q, k, codes, levels, rows)
    assert torch.allclose(got, want, atol=1e-5)
    # ... and F = 1 - sqrt(1 - sqrt(kept mass)) in closed form
    lv = levels[3]
    m = west.mask_at(codes, lv)[:, rows // 128].repeat_interleave(128, -1)[..., :S][None]
    kept = torch.where(m, p, torch.zeros_like(p)).sum(-1)
    assert torch.allclose(got[:, :, 3], 1 - (1 - kept.sqrt()).clamp(min=0).sqrt(), atol=1e-5)
    assert bool((got[:, :, -1] == 1.0).all())  # dense level: exactly 1
    assert bool((got[:, :, 1:] >= got[:, :, :-1] - 1e-12).all())  # nested levels


def test_dropped_mass_is_chunk_invariant():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, 384, 8, generator=g)
    codes = torch.randint(1, 256, (2, 3, 3), generator=g, dtype=torch.uint8)
    rows = fast.sample_rows(384, 5)
    a = fast.dropped_mass(q, k, codes, [0.1, 0.5, 1.0], rows)
    b = fast.dropped_mass(q, k, codes, [0.1, 0.5, 1.0], rows, max_chunk_elements=1)
    assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("S", [300, 512])
def test_output_error_matches_masked_attention(S):
    """level_errors' output error is |O~ - O|^2 / |O|^2 with O~ attention over the kept blocks
    (renormalised, diagonal kept), computed here from whole rows."""
    g = torch.Generator().manual_seed(S + 1)
    B, H, D = 2, 3, 16
    q, k, v = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    nb = math.ceil(S / 128)
    codes = torch.randint(1, 256, (H, nb, nb), generator=g, dtype=torch.uint8)
    rows = fast.sample_rows(S, 16, seed=1)
    levels = list(fast.DEFAULT_LEVELS)
    dropped, err = fast.level_errors(q, k, v, codes, levels, rows)
    assert torch.equal(dropped, fast.dropped_mass(q, k, codes, levels, rows))
    p = (q[:, :, rows] @ k.transpose(-1, -2) * D**-0.5).softmax(-1)
    dense_o = p @ v
    for i, lv in enumerate(levels):
        keep = west.mask_at(codes, lv)[:, rows // 128].repeat_interleave(128, -1)[..., :S][None]
        pk = torch.where(keep, p, torch.zeros_like(p))
        o = (pk / pk.sum(-1, keepdim=True)) @ v
        want = (o - dense_o).square().sum(-1) / dense_o.square().sum(-1)
        assert torch.allclose(err[:, :, i].double(), want, rtol=1e-3, atol=1e-6), lv
    assert float(err[:, :, -1].abs().max()) < 1e-6  # the dense level loses nothing
    chunked = fast.level_errors(q, k, v, codes, levels, rows, max_chunk_elements=1)[1]
    assert torch.allclose(chunked, err, rtol=1e-5, atol=1e-7)


@given(cells=st.integers(1, 3), nl=st.integers(2, 3), seed=st.integers(0, 10**6),
       lam=st.floats(0, 10))
def test_lagrange_choice_is_optimal_at_its_density(cells, nl, seed, lam):
    """No schedule over the same levels with at most the Lagrangian choice's density has a lower
    summed cost (brute force over every schedule of a few cells)."""
    import itertools

    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(cells, 1, 1, nl, generator=g, dtype=torch.float64)
    dens = torch.rand(cells, 1, nl, generator=g, dtype=torch.float64)
    choice = fast.lagrange_choice(cost, dens, lam)  # (cells, 1, 1)
    idx = torch.arange(cells)
    c_star = float(cost[idx, 0, 0, choice[:, 0, 0]].sum())
    d_star = float(dens[idx, 0, choice[:, 0, 0]].sum())
    for pick in itertools.product(range(nl), repeat=cells):
        pick = torch.tensor(pick)
        d = float(dens[idx, 0, pick].sum())
        if d <= d_star + 1e-12:
            assert float(cost[idx, 0, 0, pick].sum()) >= c_star - 1e-9


def test_sample_rows_is_stratified_and_seeded():
    r = fast.sample_rows(300, 16, seed=3)
    counts = torch.bincount(r // 128)
    assert counts.tolist() == [16, 16, 16]
    assert r.unique().numel() == r.numel() and int(r.max()) < 300
    assert torch.equal(r, fast.sample_rows(300, 16, seed=3))
    assert not torch.equal(r, fast.sample_rows(300, 16, seed=4))
    assert torch.bincount(fast.sample_rows(130, 16) // 128).tolist() == [16, 2]  # partial block
    with pytest.raises(ValueError, match="rows_per_block"):
        fast.sample_rows(300, 0)


@given(L=st.integers(1, 12), T=st.integers(1, 20), a_min=st.floats(-2, 1), span=st.floats(0, 2),
       gamma=st.floats(0.2, 4), omega=st.one_of(st.none(), st.floats(0, 5)))
def test_target_non_increasing_in_layer_and_step(L, T, a_min, span, gamma, omega):
    a = fast.target_fidelity(L, T, a_min, a_min + span, gamma=gamma, omega=omega)
    assert a.shape == (L, T)
    assert bool((a[1:] <= a[:-1] + 1e-12).all()) and bool((a[:, 1:] <= a[:, :-1] + 1e-12).all())
    assert bool((a >= a_min - 1e-12).all()) and bool((a <= a_min + span + 1e-12).all())


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, float("nan"), "x"])
def test_bad_targets_raise_naming_the_argument(bad, profile):
    with pytest.raises(ValueError, match="target_density"):
        fast.fit_schedule(profile[2], bad)
    with pytest.raises(ValueError, match="target_density"):
        fast.build_fast_plan(None, None, None, bad, timesteps=[1.0], latent_shape=LATENT)
    with pytest.raises(ValueError, match="density"):
        fast.uniform_schedule(profile[1], bad)


def test_levels_must_end_dense():
    with pytest.raises(ValueError, match="1.0"):
        fast.check_levels([0.1, 0.5])
    with pytest.raises(ValueError, match="ascending"):
        fast.check_levels([0.5, 0.1, 1.0])


def test_bucket_bounds_order():
    ts = [999.0, 750.0, 400.0, 10.0]
    b = fast.bucket_bounds_for(ts)
    assert b.tolist() == [205.0, 575.0, 874.5]
    # step j lands in bucket T - 1 - j
    assert timestep_bucket(torch.tensor(ts), b).tolist() == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="descending"):
        fast.bucket_bounds_for([10.0, 999.0])


# ---------------------------------------------------------------------------------------------
# Tiny model: profile once per module
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def profile():
    model = load_transformer("tiny-random", seed=0).transformer
    plan = calibrate_west(model, random_inputs(1, 16, 32, seed=0), default_timesteps(3, 3.0),
                          latent_shape=LATENT, progress=False)
    ts = default_timesteps(STEPS, 3.0)
    prof = fast.profile_fidelity(plan, model, random_inputs(1, 16, 32, seed=7)[0], timesteps=ts,
                                 latent_shape=LATENT, rows_per_block=8, progress=False)
    return model, plan, prof, ts


def _fit(prof, target, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a miss beyond tol warns: make it a failure here
        return fast.fit_schedule(prof, target, **kw)


def test_profile_shapes(profile):
    _, plan, prof, ts = profile
    L, H, NL = plan.num_layers, plan.num_heads, len(fast.DEFAULT_LEVELS)
    assert prof.fidelity_mean.shape == (L, STEPS, H, NL) == prof.fidelity_min.shape
    assert prof.level_density.shape == (L, H, NL)
    assert prof.timesteps == ts
    assert bool((prof.fidelity_min <= prof.fidelity_mean + 1e-12).all())
    assert bool((prof.fidelity_mean[..., -1] == 1).all())


@pytest.mark.parametrize("target", [0.3, 0.5, 0.75])
@pytest.mark.parametrize("reduce", ["mean", "min"])
def test_global_density_hits_target(profile, target, reduce):
    _, plan, prof, ts = profile
    s = _fit(prof, target, reduce=reduce)
    assert abs(s.info["achieved_density"] - target) <= 0.01
    # recompute independently: run the schedule at the profiled timesteps on the plan's masks
    dens = fast.schedule_density(s, plan.codes, ts)
    assert abs(float(dens.mean()) - s.info["achieved_density"]) < 1e-9


def test_density_increases_with_target(profile):
    prof = profile[2]
    got = [_fit(prof, t).info["achieved_density"] for t in (0.25, 0.4, 0.55, 0.7, 0.85, 1.0)]
    assert got == sorted(got) and got[-1] == pytest.approx(1.0)


def test_unreachable_low_target_raises(profile):
    with pytest.raises(ValueError, match="target_density"):
        fast.fit_schedule(profile[2], 0.01)  # below every head at the lowest level (+ diagonal)


@pytest.mark.parametrize("reduce", ["mean", "min"])
def test_fidelity_constraint_holds_on_profiled_rows(profile, reduce):
    prof = profile[2]
    s = _fit(prof, 0.5, allocation="curve", reduce=reduce, gamma=2.0)
    i = s.info
    L, T, H, NL = prof.fidelity_mean.shape
    a = fast.target_fidelity(L, T, i["a_min"], i["a_max"], gamma=i["gamma"], omega=i["omega"])
    choice = s.level_tables.long().flip(1)  # buckets -> steps
    fid = prof.fidelity(reduce)
    chosen = fid.gather(-1, choice[..., None])[..., 0]
    assert bool((chosen >= a[:, :, None]).all())  # level 1.0 has F = 1 >= A always
    below = (choice - 1).clamp(min=0)
    prev = fid.gather(-1, below[..., None])[..., 0]
    assert bool(((choice == 0) | (prev < a[:, :, None])).all())  # the smallest such level


def test_profile_has_output_error(profile):
    prof = profile[2]
    assert prof.output_error is not None
    assert prof.output_error.shape == prof.fidelity_mean.shape
    assert float(prof.output_error[..., -1].abs().max()) < 1e-5  # dense level
    assert bool((prof.output_error >= 0).all())


@pytest.mark.parametrize("objective", ["output_error", "fidelity"])
def test_lagrange_fit_beats_the_curve_on_its_own_cost(profile, objective):
    """At (nearly) the same global density, the Lagrangian schedule's summed cost is no higher
    than the paper curve's (its optimality, on the profile it was fitted to)."""
    prof = profile[2]
    fid = prof.fidelity("mean")
    cost = prof.output_error if objective == "output_error" else 1.0 - fid
    compared = 0
    for target in (0.3, 0.4, 0.5):
        lag = _fit(prof, target, objective=objective)
        cur = _fit(prof, target, allocation="curve")
        assert lag.info["allocation"] == "lagrange" and cur.info["allocation"] == "curve"

        def total(s):
            ch = s.level_tables.long().flip(1)
            return float(cost.gather(-1, ch[..., None]).mean())

        if lag.info["achieved_density"] <= cur.info["achieved_density"] + 1e-12:
            assert total(lag) <= total(cur) + 1e-9
            compared += 1
        assert lag.info["profile_cost"] == pytest.approx(total(lag))
    assert compared >= 2  # the step-function densities line up for most targets


def test_weights_steer_the_allocation(profile):
    """A gain no sparse level can pay for keeps that (layer, step) dense; zero gain makes it
    free, so it goes to the sparsest level."""
    prof = profile[2]
    L, T = prof.fidelity_mean.shape[:2]
    w = torch.ones(L, T, dtype=torch.float64)
    w[:, 0] = 1e9
    w[:, -1] = 0.0
    s = _fit(prof, 0.5, weights=w)
    choice = s.level_tables.long().flip(1)  # buckets -> steps
    err = prof.output_error.gather(-1, choice[..., None])[..., 0]
    assert float(err[:, 0].max()) < 1e-6  # the first step: no error left
    assert bool((choice[:, -1] == 0).all())  # the free step: the sparsest level
    assert s.info["weighted"] is True
    with pytest.raises(ValueError, match="weights"):
        fast.fit_schedule(prof, 0.5, weights=torch.ones(L + 1, T))
    with pytest.raises(ValueError, match="weights"):
        fast.fit_schedule(prof, 0.5, weights=-w)


def test_fit_options_are_checked(profile):
    prof = profile[2]
    with pytest.raises(ValueError, match="allocation"):
        fast.fit_schedule(prof, 0.5, allocation="greedy")
    with pytest.raises(ValueError, match="objective"):
        fast.fit_schedule(prof, 0.5, objective="psnr")
    import dataclasses
    with pytest.raises(ValueError, match="output_error"):
        fast.fit_schedule(dataclasses.replace(prof, output_error=None), 0.5)


def test_schedule_round_trips_through_plan_file(profile, tmp_path):
    _, plan, prof, ts = profile
    s = _fit(prof, 0.4)
    p2 = load_plan(plan.with_schedule(s).save(tmp_path / "p.safetensors"))
    t = p2.schedule
    assert torch.equal(t.level_tables, s.level_tables)
    assert torch.equal(t.bucket_bounds, s.bucket_bounds)
    assert t.levels == pytest.approx(s.levels)
    assert t.info["achieved_density"] == s.info["achieved_density"]
    tables = p2.materialize(plan.calib_grid)
    assert tables.level_tables[0].shape == (STEPS, plan.num_heads)
    # any step count maps onto the buckets: 30 steps' densities stay near the profiled ones
    d30 = fast.schedule_density(t, plan.codes, default_timesteps(30, 3.0)).mean()
    assert abs(float(d30) - 0.4) < 0.1


def test_baselines(profile):
    _, plan, _, ts = profile
    u = fast.uniform_schedule(plan, 0.5)
    assert u.level_tables.shape == (plan.num_layers, 1, plan.num_heads)
    d = fast.schedule_density(u, plan.codes, ts)
    assert abs(float(d.mean()) - 0.5) < 0.05 and float(d.std()) < 0.2
    s = fast.dense_first_schedule(plan, 0.6, ts, 0.3)
    d = fast.schedule_density(s, plan.codes, ts)  # (L, T, H)
    assert bool((d[:, :3] == 1).all()) and bool((d[:, 3:] < 1).all())
    assert abs(float(d.mean()) - 0.6) < 0.05
    s2 = fast.dense_first_schedule(plan, 0.4, ts, 0.3, match_global=False)
    d2 = float(fast.schedule_density(s2, plan.codes, ts)[:, 3:].mean())
    # one threshold for all rows moves in steps of ~1/NB here (NB = 8): nearest, not exact
    assert d2 == pytest.approx(s2.info["sparse_density"]) and abs(d2 - 0.4) < 0.1
    with pytest.raises(ValueError, match="density"):
        fast.dense_first_schedule(plan, 0.2, ts, 0.3)  # below the dense steps' share
    for sched in (u, s, s2):
        sched.validate(plan.num_layers, plan.num_heads)


def test_cli_writes_plan_and_png(profile, tmp_path, capsys):
    from scaling_attn_compile.cli import main

    _, plan, _, _ = profile
    src = plan.save(tmp_path / "west.safetensors")
    out = tmp_path / "fast.plan.safetensors"
    png = tmp_path / "sched.png"
    rc = main(["fast", "--model", "tiny-random", "--seed", "0", "--plan", str(src),
               "--target-density", "0.5", "--out", str(out), "--png", str(png),
               "--steps", "4", "--rows-per-block", "4"])
    assert rc == 0 and png.stat().st_size > 1000
    p = load_plan(out)
    assert p.schedule is not None and p.schedule.level_tables.shape[1] == 4
    assert abs(p.schedule.info["achieved_density"] - 0.5) <= 0.02  # 16 cells only here
    rc = main(["fast", "--plan", str(src), "--target-density", "0.4", "--out", str(out),
               "--method", "dense-first", "--steps", "8"])
    assert rc == 0 and (tmp_path / "fast.schedule.png").is_file()
    capsys.readouterr()
    assert main(["fast", "--plan", str(src), "--target-density", "1.5", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("scaling-attn fast: error: --target-density")
