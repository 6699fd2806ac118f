"""Few-step schedules (issue 19 item 5): a FAST schedule profiled at 50 steps serves 8- and
4-step runs (distilled LoRAs), because its buckets are timestep ranges (midpoints between the
profiled timesteps), not step indices. Checked: each few-step timestep lands in the bucket of
the nearest profiled timestep; one compiled graph runs an 8-step and a 4-step loop without a
recompile and equals the eager model with the reference processor at every step.
(``scaling-attn fast --steps N`` profiles at N: tests/test_fast.py::test_cli_writes_plan_and_png
and test_fast_steps_sets_the_buckets below.)
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers import transformer_wan

from scaling_attn_compile.contract.masks import num_blocks, timestep_bucket
from scaling_attn_compile.offline.calibrate import default_timesteps
from scaling_attn_compile.offline.fast_fit import bucket_bounds_for
from scaling_attn_compile.plan.plan import FastSchedule, Plan
from scaling_attn_compile.testing import assert_close_to_oracle, sharpen_qk

sys.path.insert(0, os.path.dirname(__file__))
from test_backend import _fresh_dynamo  # noqa: E402,F401  (autouse: a fresh Dynamo per test)
from test_families import COMMON, GRID, HEADS, LATENT, LAYERS, compiled_run, eager  # noqa: E402

PROFILED = default_timesteps(50, 5.0)
# 8 and 4 steps from the scheduler, and a distilled 4-step list: sigmas 1, .75, .5, .25 after
# the flow shift 5.0 (sigma' = 5 s / (1 + 4 s)), in 0..1000 units.
FEW = {"8 steps": default_timesteps(8, 5.0), "4 steps": default_timesteps(4, 5.0),
       "distilled 4 steps": [1000 * 5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25)]}
LEVELS = [0.1, 0.4, 1.0]


def schedule_50() -> FastSchedule:
    """50 buckets; the level differs per layer, bucket and head, so a wrong bucket shows."""
    t = len(PROFILED)
    b = torch.arange(t)[None, :, None]
    lt = (b + torch.arange(HEADS)[None, None, :] + torch.arange(LAYERS)[:, None, None]) % 3
    return FastSchedule(levels=LEVELS, level_tables=lt.to(torch.int32).contiguous(),
                        bucket_bounds=bucket_bounds_for(PROFILED), info={"num_steps": t})


@pytest.mark.parametrize("name", sorted(FEW))
def test_few_step_timesteps_land_in_the_nearest_profiled_bucket(name):
    ts = torch.tensor(FEW[name])
    buckets = timestep_bucket(ts, schedule_50().bucket_bounds).tolist()
    # profiled step j is bucket 49 - j; the nearest profiled timestep's bucket is the one used
    nearest = [len(PROFILED) - 1 - min(range(len(PROFILED)), key=lambda j: abs(PROFILED[j] - t))
               for t in FEW[name]]
    print(f"{name}: timesteps {[round(t, 1) for t in FEW[name]]} -> buckets {buckets}")
    assert buckets == nearest
    assert len(set(buckets)) == len(buckets)  # distinct steps, distinct buckets


def test_one_graph_runs_8_then_4_steps_sparse_as_the_reference():
    torch.manual_seed(0)
    model = WanTransformer3DModel(**COMMON).eval()
    sharpen_qk(block.attn1 for block in model.blocks)  # peaked: a wrong level shows
    nb = num_blocks(math.prod(GRID))
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(1, 256, (LAYERS, HEADS, nb, nb), generator=g, dtype=torch.uint8)
    plan = Plan.from_codes(codes, model, GRID, 1).with_schedule(schedule_50())
    tables = plan.materialize(GRID)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(*LATENT, generator=g),
                  encoder_hidden_states=torch.randn(1, 24, 32, generator=g))
    steps = FEW["8 steps"] + FEW["4 steps"]
    outs, be = compiled_run(model, plan, inputs, steps)  # error_on_recompile inside
    assert len(be.reports) == 1 and be.reports[0].per_layer == {0: 1, 1: 1}
    # Every third step against the reference (CI time); the buckets of all are checked above.
    for t, out in list(zip(steps, outs, strict=True))[::3]:
        same, golden = eager(model, inputs, t, tables, transformer_wan)
        assert_close_to_oracle(out, golden, same, what=f"t={t:.1f}")


def test_fast_steps_sets_the_buckets(tmp_path, capsys):
    """``scaling-attn fast --steps 8`` schedules over the 8-step timesteps (dense-first: no model
    run; the profiled method's N buckets at --steps N: tests/test_fast.py)."""
    from scaling_attn_compile.cli import main
    from scaling_attn_compile.plan.io import load_plan

    torch.manual_seed(0)
    model = WanTransformer3DModel(**COMMON).eval()
    nb = num_blocks(math.prod(GRID))
    codes = torch.randint(1, 256, (LAYERS, HEADS, nb, nb), dtype=torch.uint8)
    src = Plan.from_codes(codes, model, GRID, 1,
                          calibration={"latent_shape": list(LATENT[1:])}).save(tmp_path / "w.st")
    out = tmp_path / "f.plan.safetensors"
    assert main(["fast", "--plan", str(src), "--target-density", "0.5", "--out", str(out),
                 "--method", "dense-first", "--steps", "8", "--shift", "5.0"]) == 0
    capsys.readouterr()
    s = load_plan(out).schedule
    # dense-first: the first 25% of the 8 steps (2) dense; the bound is between steps 2 and 3
    # of the 8-step schedule (at 50 steps it would sit between 50-step timesteps 12 and 13).
    t8 = FEW["8 steps"]
    assert s.level_tables.shape[1] == 2
    assert s.bucket_bounds.tolist() == pytest.approx([(t8[1] + t8[2]) / 2])
