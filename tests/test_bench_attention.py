"""``benchmarks/bench_attention.py`` on the CPU: what it times (the mask plan) and the figures it
derives from timings (speedup over cuDNN, the ragged-row figure, the FA4 comparison). The
timings themselves need the GPU (``python benchmarks/bench_attention.py``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as module ``name`` (registered: its dataclasses look their
    module up), with ``benchmarks/`` importable while it loads (_common, mask_families)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(name, mod)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def BA():
    return load_benchmark("bench_attention")


def rec(BA, impl, mask, density, ms):
    return BA.Record(impl, mask, "s", 1, 2, 32760, 128, density, density, 0.1, ms, 0.0)


def test_mask_plan_times_density_one_once(BA):
    plan = BA.mask_plan(["balanced", "local"], [0.1, 1.0, 0.5])
    assert plan == [("all", 1.0), ("balanced", 0.1), ("balanced", 0.5), ("local", 0.1),
                    ("local", 0.5)]
    assert BA.mask_plan(["bernoulli"], [0.25]) == [("bernoulli", 0.25)]


def test_shapes_are_the_wan_grids(BA):
    import math

    assert {k: (v[2], math.prod(v[3]), v[4]) for k, v in BA.SHAPES.items()} == \
        {"1.3b": (12, 32760, 128), "14b": (40, 75600, 128), "ltx": (32, 6930, 64)}


def test_derive_ragged_figure_and_speedup(BA):
    records = [rec(BA, "sdpa-cudnn", "none", 1.0, 10.0),
               rec(BA, "ours-triton", "all", 1.0, 8.0),
               rec(BA, "ours-triton", "bernoulli", 0.1, 1.2),
               rec(BA, "ours-triton-lpt", "all", 1.0, 8.0),
               rec(BA, "ours-triton-lpt", "bernoulli", 0.1, 0.96),
               rec(BA, "fa4", "none", 1.0, 7.0),
               rec(BA, "fa4", "all", 1.0, 7.5),
               rec(BA, "fa4", "bernoulli", 0.1, 0.9)]
    out = {(r.impl, r.mask): r for r in BA.derive(records)}
    assert out["ours-triton", "bernoulli"].time_over_d_dense == pytest.approx(1.2 / (0.1 * 8.0))
    assert out["fa4", "bernoulli"].time_over_d_dense == pytest.approx(0.9 / (0.1 * 7.5))
    assert out["fa4", "none"].time_over_d_dense is None  # a dense kernel has no sparse figure
    assert out["ours-triton", "all"].time_over_d_dense == pytest.approx(1.0)
    assert out["ours-triton", "bernoulli"].speedup_vs_cudnn_dense == pytest.approx(10.0 / 1.2)
    text = BA.versus_fa4(BA.derive(records))
    # fa4 0.9 ms / triton 1.2 ms (index order) and 0.96 ms (longest first); 0.96 / (0.1 x 8.0)
    assert "| s | bernoulli | 0.100 | nan | 0.75 | 0.94 | 1.50 | 1.20 |" in text
    assert "| s | none |" not in text
    assert "| s | bernoulli | ours-triton | 0.100 | 0.10 | 1.200 |" in BA.table(BA.derive(records))


def test_plot_writes_the_ragged_figure(BA, tmp_path):
    records = BA.derive([rec(BA, "ours-triton", "all", 1.0, 8.0),
                         rec(BA, "ours-triton", "local", 0.1, 1.0),
                         rec(BA, "ours-triton", "local", 0.25, 2.2),
                         rec(BA, "fa4", "all", 1.0, 7.0), rec(BA, "fa4", "local", 0.1, 0.8)])
    path = tmp_path / "fig.png"
    BA.plot(records, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_compile_ragged_patterns_are_per_layer_mask_families():
    """``bench_compile.py --pattern windows|bernoulli``: one mask per layer from
    ``mask_families.py`` (ragged rows), near the row's density; local/random stay balanced."""
    import torch

    from scaling_attn_compile.contract.masks import unpack_blocks

    bc = load_benchmark("bench_compile")
    grid = (4, 16, 32)  # 2048 tokens, 16 blocks
    for pattern in ("windows", "bernoulli"):
        t = bc.plan_tables(pattern, 3, 4, grid, 0.25)
        assert t.num_layers == 3 and t.masks[0].shape[:2] == (4, 1)
        rows = [unpack_blocks(m[:, 0], 16).sum(-1) for m in t.masks]
        assert all(abs(r.float().mean().item() / 16 - 0.25) < 0.1 for r in rows)
        assert any(r.float().std() > 0 for r in rows), "ragged rows"
    flat = bc.plan_tables("local", 2, 4, grid, 0.25)
    assert torch.equal(unpack_blocks(flat.masks[0][:, 0], 16).sum(-1).unique(),
                       torch.tensor([4]))


def test_interleaved_rounds_alternate_the_impls(BA, monkeypatch):
    """--rounds: A B A B ..., so a drift of the GPU's clock over the run falls on every impl
    alike; one list of per-round medians per impl, in the impls' order."""
    calls = []
    monkeypatch.setattr(BA, "bench", lambda fn: fn())
    runs = [lambda: calls.append("a") or 1.0, lambda: calls.append("b") or 2.0]
    assert BA.interleaved(runs, 3) == [[1.0] * 3, [2.0] * 3]
    assert calls == ["a", "b"] * 3
    with pytest.raises(SystemExit, match="2"):  # argparse's error exit, before any GPU check
        BA.main(["--rounds", "0"])


def test_bench_compile_tiny_runs_the_8bit_rows_regional(tmp_path):
    """The command the 14B 8-bit step runs on the GPU (``device_session.sh q8step14``), on the
    tiny CPU config: eager, bf16 sparse and FP8-attention rows under regional compilation each
    record a time and the density of their tables (test_precision.py checks which op the
    block binds)."""
    import json

    bc = load_benchmark("bench_compile")
    out = tmp_path / "compile.json"
    assert bc.main(["--tiny", "--rows", "eager", "ours-0.25", "ours-0.25-fp8", "--regional",
                    "--rep-ms", "1", "--out", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["records"]}
    assert set(rows) == {"eager", "ours-0.25/regional", "ours-0.25-fp8/regional"}
    assert all(r["ms"] > 0 and r["error"] is None for r in rows.values())
    for name in ("ours-0.25/regional", "ours-0.25-fp8/regional"):
        assert rows[name]["density"] is not None and rows[name]["rewritten_layers"] == 2
