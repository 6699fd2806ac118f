"""Bad inputs get one clear line (issue #16, items 5 and 6): the CLI, plan metadata (with
Hypothesis fuzzing), grid sizes, and densities far from the one asked for."""

from __future__ import annotations

import json
import math
import struct
import time
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling_attn_compile.cli import main
from scaling_attn_compile.contract.masks import num_blocks
from scaling_attn_compile.errors import PlanError, PlanFileError
from scaling_attn_compile.models.wan import load_transformer
from scaling_attn_compile.offline import west
from scaling_attn_compile.plan.io import load_plan
from scaling_attn_compile.plan.plan import MAX_CACHED_GRIDS, META_KEY, FastSchedule, Plan
from scaling_attn_compile.plan.schema import CHECKSUM_KEY, FIELDS, meta_checksum

GRID = (3, 8, 20)  # S = 480, 4 blocks


@pytest.fixture(scope="module")
def tiny():
    return load_transformer("tiny-random", seed=0).transformer


def make_plan(model, grid=GRID, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(math.prod(grid))
    mass = torch.rand(2, len(model.blocks), model.config.num_attention_heads, nb, nb, generator=g)
    return Plan.from_codes(west.threshold_codes(mass).amin(0), model, grid, 2,
                           {"timesteps": [999.0, 500.0], "source": "test"})


@pytest.fixture(scope="module")
def plan_file(tiny, tmp_path_factory):
    return make_plan(tiny).save(tmp_path_factory.mktemp("plan") / "p.plan.safetensors")


def read_meta(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return json.loads(header["__metadata__"][META_KEY])


def write_meta(src, dst, meta, *, sign=True):
    """Copy plan ``src`` to ``dst`` with JSON ``meta`` (any JSON value) as its metadata; signed
    with a fresh checksum (when ``meta`` is an object) so the schema, not the checksum, fails."""
    if sign and isinstance(meta, dict):
        meta = {**meta, CHECKSUM_KEY: meta_checksum(meta)}
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"][META_KEY] = json.dumps(meta)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    dst.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    return dst


def run_cli(argv, capsys):
    """(exit status, stderr) of the CLI, whether it returned or argparse exited."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# CLI: one line, exit status 2
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, cmd, match", [
    (["show", "{tmp}/missing.safetensors"], "show", "no plan file at"),
    (["show", "{plan}", "--grid", "81,720,1280"], "show",
     r"not pixels.*token grid is \(21, 45, 80\)"),
    (["show", "{plan}", "--layer", "7"], "show", r"layer must be in 0\.\.1, got 7"),
    (["show", "{plan}", "--heads", "0,9"], "show", "heads must be a non-empty subset"),
    (["show", "{plan}", "--density", "1.5"], "show", r"density p must be in \[0, 1\]"),
    (["west", "--out", "{tmp}"], "west", "is a folder; expected a file path"),
    (["west", "--out", "{plan}/x.safetensors"], "west", "is a file, not a folder"),
    (["west", "--out", "{tmp}/p.safetensors", "--prompts", "{tmp}/nope.txt"], "west",
     "--prompts .*nope.txt: no such file"),
    (["fast", "--plan", "{plan}", "--target-density", "0", "--out", "{tmp}/f.safetensors"],
     "fast", r"--target-density: expected the kept-block fraction in \(0, 1\]"),
    (["fast", "--plan", "{tmp}/missing.safetensors", "--target-density", "0.3",
      "--out", "{tmp}/f.safetensors"], "fast", "no plan file at"),
])
def test_user_errors_print_one_line_and_exit_2(argv, cmd, match, plan_file, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, plan=plan_file) for a in argv]
    t0 = time.perf_counter()
    rc, err = run_cli(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"scaling-attn {cmd}: error: "), err
    import re

    assert re.search(match, lines[0]), lines[0]
    # show --grid 81,720,1280 (pixels) used 6 GB and 33 s before its 1.36 TB allocation failed.
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("argv, match", [
    (["west", "--out", "x.safetensors", "--height", "0", "--width", "0"],
     "argument --height: expected a positive integer, got '0'"),
    (["west", "--out", "x.safetensors", "--capture-steps", "0"],
     "argument --capture-steps: expected a positive integer, got '0'"),
    (["west", "--out", "x.safetensors", "--steps", "-3"],
     "argument --steps: expected a positive integer, got '-3'"),
    (["fast", "--plan", "p", "--target-density", "0.3", "--out", "o", "--capture-steps", "0"],
     "argument --capture-steps: expected a positive integer, got '0'"),
    (["demo", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["show", "p", "--heads", "a"],
     "argument --heads: expected comma-separated indices like 0,1,3, got 'a'"),
])
def test_argument_errors_exit_2_before_any_work(argv, match, capsys):
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and err.strip().splitlines()[-1].endswith(match), err


def test_west_checks_its_output_path_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from scaling_attn_compile.models import wan

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(wan, "load_transformer", must_not_load)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, err = run_cli(["west", "--out", str(blocker / "sub" / "p.safetensors")], capsys)
    assert rc == 2 and f"{blocker} is a file, not a folder" in err
    # A writable path gets past the check (and then reaches the model loading).
    with pytest.raises(AssertionError, match="before --out was checked"):
        main(["west", "--out", str(tmp_path / "new" / "p.safetensors")])
    assert not list((tmp_path / "new").iterdir())  # the probe file is gone


def test_bugs_keep_their_traceback(plan_file, monkeypatch, capsys):
    """Only the package's own checks are one-liners: the same exception types raised from
    elsewhere are bugs and propagate, and SCALING_ATTN_DEBUG=1 shows a user error's traceback."""
    from scaling_attn_compile.plan import io as plan_io
    from scaling_attn_compile.plan import plan as plan_mod

    def foreign(*a, **k):
        raise ValueError("raised outside scaling_attn_compile")

    monkeypatch.setattr(plan_io, "load_plan", foreign)
    with pytest.raises(ValueError, match="outside"):
        main(["show", str(plan_file)])
    monkeypatch.undo()
    monkeypatch.setattr(plan_mod.Plan, "summary", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["show", str(plan_file)])
    monkeypatch.undo()
    monkeypatch.setenv("SCALING_ATTN_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no plan file"):
        main(["show", str(plan_file) + ".missing"])


# ---------------------------------------------------------------------------------------------
# Plan metadata: schema, checksum, fuzzing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("meta", [[], [1, 2], 3, 2.5, None, "plan", True])
def test_metadata_that_is_not_an_object(meta, plan_file, tmp_path):
    with pytest.raises(PlanFileError, match="metadata must be a JSON object"):
        load_plan(write_meta(plan_file, tmp_path / "bad.safetensors", meta))


@pytest.mark.parametrize("edit, match", [
    (dict(num_layers="2"), "field 'num_layers': expected an integer >= 1, got '2'"),
    (dict(num_heads=True), "field 'num_heads': expected an integer >= 1, got true"),
    (dict(head_dim=0), "field 'head_dim': expected an integer >= 1, got 0"),
    (dict(calib_grid=[3, 0, 20]), "field 'calib_grid': expected a list of 3 integers >= 1"),
    (dict(calib_grid=[-3, 8, 20]), "field 'calib_grid': expected a list of 3 integers >= 1"),
    (dict(calib_grid=[3, 8]), "field 'calib_grid': expected a list of 3 integers"),
    (dict(patch_size="1,2,2"), "field 'patch_size': expected a list of 3 integers"),
    (dict(block_size=64), "field 'block_size': expected 128, got 64"),
    (dict(code_max=127), "field 'code_max': expected 255, got 127"),
    (dict(model_config=[1]), "field 'model_config': expected a JSON object, got \\[1\\]"),
    (dict(model_class=None), "field 'model_class': expected a non-empty string"),
    (dict(calibration=5), "field 'calibration': expected a JSON object, got 5"),
    (dict(calibration={"latent_shape": "4,3,8,20"}), "field 'calibration.latent_shape'"),
    (dict(calibration={"num_steps": 0}), "field 'calibration.num_steps'"),
    (dict(schedule=[1]), "field 'schedule': expected a JSON object or null"),
    (dict(schedule={"info": {"target_density": "0.3"}}), "field 'schedule.info.target_density'"),
    (dict(sha256={"west.codes": 5}), "field 'sha256'"),
    (dict(weights_fingerprint=12), "field 'weights_fingerprint'"),
    (dict(energy_filter=3), "field 'energy_filter': expected a JSON object or null"),
    (dict(energy_filter={"rule": "nope", "threshold": 1.0}), "'energy_filter' is not a valid"),
    (dict(energy_filter={"rul": "blasst"}), "'energy_filter' is not a valid"),
    (dict(extra_field=1), r"unknown field\(s\) \['extra_field'\]"),
    (dict(num_layers=3), "field 'num_layers': expected model_config.num_layers = 2, got 3"),
    (dict(config_fingerprint="0" * 16), "model_config does not match its config_fingerprint"),
])
def test_metadata_fields_are_checked_by_name(edit, match, plan_file, tmp_path):
    meta = {**read_meta(plan_file), **edit}
    meta.pop(CHECKSUM_KEY)
    with pytest.raises(PlanFileError, match=match):
        load_plan(write_meta(plan_file, tmp_path / "bad.safetensors", meta))


@pytest.mark.parametrize("field", [k for k, (required, _) in FIELDS.items() if required])
def test_missing_required_field(field, plan_file, tmp_path):
    meta = read_meta(plan_file)
    del meta[field], meta[CHECKSUM_KEY]
    match = {"format": "metadata format is None, expected 'scaling-attn-plan'",
             "format_version": "is plan format version None; this scaling_attn_compile reads "
                               "version 1"}.get(field, f"field '{field}' is missing")
    with pytest.raises(PlanError, match=match):
        load_plan(write_meta(plan_file, tmp_path / "bad.safetensors", meta))


def test_metadata_checksum_covers_the_json(plan_file, tmp_path):
    meta = read_meta(plan_file)
    edited = {**meta, "calibration": {**meta["calibration"], "source": "edited"}}
    with pytest.raises(PlanFileError, match="metadata fails its sha256 check"):
        load_plan(write_meta(plan_file, tmp_path / "edit.safetensors", edited, sign=False))
    older = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}  # written before the checksum
    with pytest.warns(UserWarning, match="no metadata checksum"):
        plan = load_plan(write_meta(plan_file, tmp_path / "old.safetensors", older, sign=False))
    assert plan.calib_grid == GRID


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=10)


def _loads_or_plan_error(path):
    """Loading may succeed or raise PlanError (incl. PlanFileError): nothing else."""
    try:
        plan = load_plan(path)
    except PlanError:
        return None
    assert isinstance(plan, Plan)
    plan.summary()  # what `scaling-attn show` prints first
    return plan


@settings(max_examples=60)
@given(meta=JSON)
def test_fuzz_whole_metadata(meta, plan_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "p.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _loads_or_plan_error(write_meta(plan_file, path, meta)) is None


@settings(max_examples=120)
@given(field=st.sampled_from(sorted(FIELDS)), value=JSON, sign=st.booleans(),
       drop=st.booleans())
def test_fuzz_one_field(field, value, sign, drop, plan_file, tmp_path_factory):
    meta = read_meta(plan_file)
    meta.pop(CHECKSUM_KEY)
    if drop:
        meta.pop(field, None)
    else:
        meta[field] = value
    path = tmp_path_factory.mktemp("fuzz") / "p.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _loads_or_plan_error(write_meta(plan_file, path, meta, sign=sign))


@settings(max_examples=60)
@given(key=st.sampled_from(["calibration", "schedule", "energy_filter", "model_config"]),
       sub=st.text(max_size=16) | st.sampled_from(["latent_shape", "num_steps", "info", "rule",
                                                  "threshold", "layers", "num_layers"]),
       value=JSON)
def test_fuzz_nested_fields(key, sub, value, plan_file, tmp_path_factory):
    meta = read_meta(plan_file)
    meta.pop(CHECKSUM_KEY)
    meta[key] = {**(meta.get(key) or {}), sub: value}
    path = tmp_path_factory.mktemp("fuzz") / "p.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _loads_or_plan_error(write_meta(plan_file, path, meta))


# ---------------------------------------------------------------------------------------------
# Grid sizes: checked before allocating
# ---------------------------------------------------------------------------------------------

def test_pixel_grid_is_refused_before_allocating(tiny):
    plan = make_plan(tiny)
    t0 = time.perf_counter()
    for call in (lambda: plan.thresholds((81, 720, 1280)),
                 lambda: plan.mask(0, 0.3, grid=(81, 720, 1280)),
                 lambda: plan.materialize((81, 720, 1280), density=0.3)):
        with pytest.raises(PlanError, match=r"not pixels.*\(21, 45, 80\)"):
            call()
    assert time.perf_counter() - t0 < 5 and not plan._remapped
    with pytest.raises(ValueError, match="over the 1e-06 GB budget"):
        west.remap_codes(plan.codes, GRID, (3, 16, 40), max_bytes=1000)
    for bad in ((3, 0, 20), (3, -8, 20), (3, 8), (3.5, 8, 20), "3,8,20"):
        with pytest.raises(PlanError, match="three positive ints"):
            plan.thresholds(bad)
        with pytest.raises(PlanError, match="three positive ints"):
            plan.materialize(bad)


def test_remap_size_bound_holds_the_output():
    for src, dst in [((3, 8, 20), (3, 16, 40)), ((2, 8, 8), (21, 45, 80)), ((4, 4, 4), (1, 1, 1))]:
        n = num_blocks(math.prod(dst))
        assert west.remap_nbytes(10, src, dst) >= 10 * n * n
    # Wan2.1-14B, 480p calibration -> 720p, 40 x 40 maps: fits the default budget.
    assert west.remap_nbytes(1600, (21, 30, 52), (21, 45, 80)) < west.MAX_REMAP_BYTES


def test_remap_cache_is_bounded(tiny):
    plan = make_plan(tiny, grid=(1, 8, 16))
    for w in range(1, MAX_CACHED_GRIDS + 4):
        plan.thresholds((1, 8, 16 * w + 1))
    assert len(plan._remapped) == MAX_CACHED_GRIDS
    assert (1, 8, 16 * (MAX_CACHED_GRIDS + 3) + 1) in plan._remapped


# ---------------------------------------------------------------------------------------------
# Density far from the one asked
# ---------------------------------------------------------------------------------------------

def test_one_block_calibration_used_at_eight_blocks_warns(tiny):
    plan = make_plan(tiny, grid=(2, 8, 8))  # S = 128: one block
    with pytest.warns(UserWarning, match=r"is 1\.000, far from the 0\.3 asked.*calibrated at "
                                         r"grid \(2, 8, 8\) \(1 blocks per row\)"):
        tables = plan.materialize((2, 16, 32), density=0.3)  # S = 1024: 8 blocks
    assert float(tables.level_densities[0].mean()) == 1.0
    lt = torch.zeros(plan.num_layers, 2, plan.num_heads, dtype=torch.int32)
    sched = FastSchedule([0.3, 1.0], lt, torch.tensor([500.0]), {"target_density": 0.3})
    with pytest.warns(UserWarning, match="far from the 0.3 asked"):
        plan.with_schedule(sched).materialize((2, 16, 32))


def test_reachable_density_does_not_warn(tiny):
    plan = make_plan(tiny, grid=(4, 16, 32))  # 16 blocks: the diagonal adds at most 1/16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tables = plan.materialize((4, 16, 32), density=0.5)
    got = float(torch.stack([d[:, 0] for d in tables.level_densities]).mean())
    assert 0.5 <= got <= 0.5 + 1 / 16 + 1e-6
