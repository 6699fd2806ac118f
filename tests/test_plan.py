"""The plan file: round trips, materialised tables, validation errors, memory budget, CLI."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from scaling_attn_compile.contract.masks import num_blocks, num_words, unpack_blocks
from scaling_attn_compile.errors import (
    PlanError,
    PlanFileError,
    PlanModelMismatch,
    PlanVersionError,
)
from scaling_attn_compile.models.wan import load_transformer
from scaling_attn_compile.offline import west
from scaling_attn_compile.offline.calibrate import default_timesteps
from scaling_attn_compile.plan.io import load_plan
from scaling_attn_compile.plan.plan import (
    FORMAT_VERSION,
    META_KEY,
    FastSchedule,
    Plan,
    tables_nbytes,
)

GRID = (3, 8, 20)  # S = 480, NB = 4


@pytest.fixture(scope="module")
def tiny():
    return load_transformer("tiny-random", seed=0).transformer


def make_plan(model, grid=GRID, seed=0, n_inputs=3):
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(math.prod(grid))
    layers, heads = len(model.blocks), model.config.num_attention_heads
    mass = torch.rand(n_inputs, layers, heads, nb, nb, generator=g)
    codes = west.threshold_codes(mass).amin(0)
    return Plan.from_codes(codes, model, grid, n_inputs, {"timesteps": [999.0, 500.0]})


def make_schedule(plan, nt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = [0.25, 0.5, 1.0]
    lt = torch.randint(0, len(levels), (plan.num_layers, nt, plan.num_heads), generator=g,
                       dtype=torch.int32)
    return FastSchedule(levels, lt, torch.tensor([300.0, 700.0]), {"target_density": 0.4})


def test_save_load_round_trip(tiny, tmp_path):
    plan = make_plan(tiny).with_schedule(None)
    path = plan.save(tmp_path / "p.plan.safetensors")
    back = load_plan(path)
    assert torch.equal(back.codes, plan.codes) and back.meta == plan.meta
    assert back.schedule is None
    assert back.meta.format_version == FORMAT_VERSION and back.meta.block_size == 128
    assert back.meta.num_layers == 2 and back.meta.num_heads == 2 and back.meta.head_dim == 32
    assert back.meta.patch_size == [1, 2, 2] and back.meta.calib_grid == list(GRID)
    assert back.meta.num_calibration_inputs == 3
    back.check_model(tiny)  # same model: no error

    sched = make_schedule(plan)
    path2 = plan.with_schedule(sched).save(tmp_path / "s.plan.safetensors")
    back2 = load_plan(path2)
    assert back2.schedule.levels == sched.levels
    assert torch.equal(back2.schedule.level_tables, sched.level_tables)
    assert torch.equal(back2.schedule.bucket_bounds, sched.bucket_bounds)
    assert back2.schedule.info == {"target_density": 0.4}


def test_materialize_levels_density_and_schedule(tiny):
    plan = make_plan(tiny)
    nb, nw = num_blocks(math.prod(GRID)), num_words(math.prod(GRID))
    t = plan.materialize(GRID, levels=[0.25, 0.5])
    assert t.grid == GRID and t.num_layers == 2 and t.seq_len == 480
    for layer in range(2):
        assert t.masks[layer].shape == (2, 2, nb, nw) and t.masks[layer].dtype == torch.int32
        for i, p in enumerate((0.25, 0.5)):
            assert torch.equal(unpack_blocks(t.masks[layer][:, i], nb), plan.mask(layer, p))
        assert torch.equal(t.level_tables[layer], torch.zeros(1, 2, dtype=torch.int32))
        assert bool((t.level_densities[layer][:, 1] >= t.level_densities[layer][:, 0]).all())
    assert t.bucket_bounds.numel() == 0
    assert t.nbytes() == tables_nbytes(2, 2, GRID, 2)  # the formula is the real size

    d = plan.materialize(GRID, density=0.6)
    for layer in range(2):
        dens = unpack_blocks(d.masks[layer][:, 0], nb).float().mean((-1, -2))
        assert bool((dens >= 0.6 - 1e-6).all())
        torch.testing.assert_close(d.level_densities[layer][:, 0], dens)
    default = plan.materialize(GRID)  # no schedule, no arguments: one level at density 0.5
    assert default.masks[0].shape[1] == 1 and bool((default.level_densities[0] >= 0.5).all())

    sched = make_schedule(plan)
    s = plan.with_schedule(sched).materialize(GRID)
    assert s.masks[0].shape == (2, 3, nb, nw)
    assert torch.equal(s.level_tables[1], sched.level_tables[1])
    assert torch.equal(s.bucket_bounds, sched.bucket_bounds)
    assert torch.equal(unpack_blocks(s.masks[1][:, 2], nb), plan.mask(1, 1.0))
    with pytest.raises(PlanError, match="use_schedule=False"):
        plan.with_schedule(sched).materialize(GRID, density=0.3)
    assert plan.with_schedule(sched).materialize(GRID, density=0.3,
                                                 use_schedule=False).masks[0].shape[1] == 1


def test_materialize_other_grid_uses_remap(tiny):
    plan = make_plan(tiny)
    big = (3, 16, 30)  # S = 1440, NB = 12
    t = plan.materialize(big, levels=[0.4])
    want = west.mask_at(west.remap_codes(plan.codes, GRID, big), 0.4)
    for layer in range(2):
        assert torch.equal(unpack_blocks(t.masks[layer][:, 0], 12), want[layer])
    assert plan.thresholds(big) is plan.thresholds(big)  # cached per grid


def test_materialize_argument_errors(tiny):
    plan = make_plan(tiny)
    with pytest.raises(PlanError, match="density must be in"):
        plan.materialize(GRID, density=0.0)
    with pytest.raises(PlanError, match="levels must be"):
        plan.materialize(GRID, levels=[0.5, 1.2])
    with pytest.raises(PlanError, match="not both"):
        plan.materialize(GRID, levels=[0.5], density=0.5)
    with pytest.raises(PlanError, match="budget"):
        plan.materialize(GRID, levels=[0.5], max_bytes=10)
    with pytest.raises(PlanError, match="grid"):
        plan.thresholds((3, 8))


def test_wan14b_720p_tables_fit_600mb():
    """Wan2.1-14B at 720x1280x81: grid (21, 45, 80), S = 75,600, NB = 591, W = 19."""
    grid = (21, 45, 80)
    assert num_blocks(math.prod(grid)) == 591 and num_words(math.prod(grid)) == 19
    per_level = 40 * 40 * 591 * 19 * 4
    assert per_level == 71_865_600  # 71.9 MB per density level
    for levels in range(1, 9):
        n = tables_nbytes(40, 40, grid, levels, num_buckets=50)
        assert n == levels * per_level + 40 * 50 * 40 * 4 + 49 * 4
        assert n < 600e6, (levels, n)
    assert tables_nbytes(40, 40, grid, 9) > 600e6  # 9 levels would not fit


# ---------------------------------------------------------------------------------------------
# Bad files fail clearly
# ---------------------------------------------------------------------------------------------

def _header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, n, json.loads(raw[8:8 + n])


def _rewrite_meta(path, edit):
    """Edit the plan metadata and re-sign it, so the check after the checksum is what fails."""
    from scaling_attn_compile.plan.schema import CHECKSUM_KEY, meta_checksum

    raw, n, header = _header(path)
    meta = json.loads(header["__metadata__"][META_KEY])
    edit(meta)
    meta[CHECKSUM_KEY] = meta_checksum(meta)
    header["__metadata__"][META_KEY] = json.dumps(meta)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])


def test_corrupted_bytes_fail_clearly(tiny, tmp_path):
    path = make_plan(tiny).save(tmp_path / "p.safetensors")
    raw, n, _ = _header(path)

    flipped = bytearray(raw)
    flipped[8 + n + 5] ^= 0xFF  # a byte of tensor data: only the checksum can see it
    bad = tmp_path / "data.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(PlanFileError, match="sha256.*corrupted"):
        load_plan(bad)

    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) - 7])
    with pytest.raises(PlanFileError, match="truncated or corrupted"):
        load_plan(trunc)

    garbage = tmp_path / "header.safetensors"
    garbage.write_bytes(raw[:8] + b"{not json" + raw[17:])
    with pytest.raises(PlanFileError, match="not a readable safetensors"):
        load_plan(garbage)

    with pytest.raises(FileNotFoundError, match="scaling-attn west"):
        load_plan(tmp_path / "missing.safetensors")


def test_not_a_plan_and_wrong_version(tiny, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(PlanFileError, match="not a scaling-attn plan"):
        load_plan(other)

    path = make_plan(tiny).save(tmp_path / "v.safetensors")
    _rewrite_meta(path, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(PlanVersionError, match=f"version {FORMAT_VERSION + 1}.*reads version "
                                               f"{FORMAT_VERSION}"):
        load_plan(path)

    path2 = make_plan(tiny).save(tmp_path / "shape.safetensors")
    _rewrite_meta(path2, lambda m: m.update(calib_grid=[3, 8, 40]))  # NB no longer matches
    with pytest.raises(PlanError, match="calib_grid"):
        load_plan(path2)


def test_model_mismatch(tiny):
    plan = make_plan(tiny)
    other_arch = load_transformer("tiny-random", num_layers=3).transformer
    with pytest.raises(PlanModelMismatch, match="num_layers: plan 2, model 3"):
        plan.check_model(other_arch)
    other_weights = load_transformer("tiny-random", seed=1).transformer
    with pytest.raises(PlanModelMismatch, match="other weights"):
        plan.check_model(other_weights)
    with pytest.warns(UserWarning, match="other weights"):
        plan.check_model(other_weights, weights="warn")
    plan.check_model(other_weights, weights="ignore")
    same_in_bf16 = load_transformer("tiny-random", seed=0).transformer.to(torch.bfloat16)
    plan.check_model(same_in_bf16)  # the same checkpoint run in another dtype still matches
    with pytest.raises(PlanModelMismatch, match="plan is for a WanTransformer3DModel"):
        plan.check_model(torch.nn.Linear(2, 2))


def test_schedule_validation(tiny):
    plan = make_plan(tiny)
    good = make_schedule(plan)
    with pytest.raises(PlanError, match="values must index levels"):
        plan.with_schedule(FastSchedule(good.levels, good.level_tables + 5, good.bucket_bounds))
    with pytest.raises(PlanError, match="ascending"):
        plan.with_schedule(FastSchedule([0.5, 0.25, 1.0], good.level_tables, good.bucket_bounds))
    with pytest.raises(PlanError, match="bucket_bounds"):
        plan.with_schedule(FastSchedule(good.levels, good.level_tables, torch.tensor([1.0])))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def test_cli_west_then_show(tmp_path, capsys):
    from scaling_attn_compile.cli import main

    out = tmp_path / "tiny.plan.safetensors"
    assert main(["west", "--model", "tiny-random", "--latent", "2,16,16", "--num-prompts", "2",
                 "--steps", "3", "--capture-steps", "2", "--out", str(out)]) == 0
    plan = load_plan(out)
    assert plan.calib_grid == (2, 8, 8) and plan.meta.num_calibration_inputs == 2
    ts = default_timesteps(3, 3.0)  # 16 x 16 latents are far below 720p: Wan's shift 3.0
    assert plan.meta.calibration["timesteps"] == pytest.approx([ts[0], ts[2]])
    png = tmp_path / "layer1.png"
    assert main(["show", str(out), "--layer", "1", "--density", "0.5", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png2 = tmp_path / "remapped.png"
    assert main(["show", str(out), "--grid", "2,16,16", "--heads", "1", "--out", str(png2)]) == 0
    assert png2.stat().st_size > 1000
    text = capsys.readouterr().out
    assert "calibration grid (F, H, W) = (2, 8, 8)" in text
    with pytest.raises(SystemExit):
        main(["show", str(out), "--grid", "2,16"])
