"""``quality/timing.py`` and ``quality/timing_diag.py``: the CUDA-graph step clock (its replay
check and its fallbacks), the profiled-step summary, the blocks the tables visit, the kernel
config sweep and the bench flags. The graph clock itself runs on the GPU only (``gpu`` mark)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scaling_attn_compile.contract.masks import pack_blocks
from scaling_attn_compile.contract.tables import AttentionTables, uniform_tables
from scaling_attn_compile.quality import timing as T
from scaling_attn_compile.quality import timing_diag as D
from scaling_attn_compile.quality.methods import pad_tables
from scaling_attn_compile.testing import load_module
from scaling_attn_compile.tiny import tiny_wan as tw

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 2


def _ev(name, start, end, cuda=True):
    dt = SimpleNamespace(name="CUDA" if cuda else "CPU")
    return SimpleNamespace(name=name, device_type=dt, time_range=SimpleNamespace(start=start,
                                                                               end=end))


def test_summarize_kernels_on_a_fake_step():
    events = [
        _ev("cudaLaunchKernel", 0, 5, cuda=False), _ev("cudaLaunchKernel", 5, 9, cuda=False),
        _ev("cuLaunchKernelEx", 9, 12, cuda=False), _ev("aten::add", 0, 30, cuda=False),
        _ev("triton_tem_fused_sparse_attention_0", 100, 400),   # ours, 0.3 ms
        _ev("triton_poi_fused_add_1", 400, 450),                 # 0.05 ms
        _ev("flash_fwd_kernel", 1450, 1550),                     # cross-attention SDPA, 0.1 ms
        _ev("triton_tem_fused_sparse_attention_0", 1500, 1700),  # overlaps the SDPA by 50 us
        _ev("Memcpy HtoD (Pageable -> Device)", 90, 95),
    ]
    s = D.summarize_kernels(events, wall_ms=2.5)
    assert s["kernel_launches"] == 4 and s["attention_launches"] == 2 and s["copies"] == 1
    assert s["attention_kernel_ms"] == pytest.approx([0.3, 0.2])
    assert s["host_launch_calls"] == 2 + 1
    assert s["attention_ms"] == pytest.approx(0.5) and s["sdpa_ms"] == pytest.approx(0.1)
    assert s["kernel_ms"] == pytest.approx(0.65)
    assert s["attention_share"] == pytest.approx(0.5 / 0.65)
    # span 100..1700 us = 1.6 ms; busy: 100-450 and 1450-1700 = 0.6 ms; idle 1.0 ms
    assert s["gpu_span_ms"] == pytest.approx(1.6) and s["gpu_busy_ms"] == pytest.approx(0.6)
    assert s["gpu_idle_ms"] == pytest.approx(1.0) and s["wall_ms"] == 2.5
    top = s["top_kernels"][0]
    assert top["name"].startswith("triton_tem") and top["count"] == 2
    assert D.summarize_kernels([], 1.0)["attention_share"] is None


def test_kernel_names():
    assert D.is_ours("triton_tem_fused_sparse_attention_0") and D.is_ours("_bsa_forward_kernel")
    assert D.is_ours("triton_scaling_attn_bsa_1")
    assert not D.is_ours("triton_poi_fused_add_0") and not D.is_ours("flash_fwd_kernel")
    assert D.is_sdpa("void pytorch_flash::flash_fwd_kernel<...>") and D.is_sdpa("cudnn_sdpa")
    assert not D.is_sdpa("triton_tem_fused_sparse_attention_0")


def _two_level_tables():
    """1 layer, 2 heads, S = 512 (4 blocks): level 0 the diagonal, level 1 every block; bucket 0
    (t < 500) gives head 0 level 0 and head 1 level 1, bucket 1 both level 1."""
    nb = 4
    diag = torch.eye(nb, dtype=torch.bool)
    full = torch.ones(nb, nb, dtype=torch.bool)
    masks = pack_blocks(torch.stack([torch.stack([diag, full])] * 2))  # (H, L, NB, W)
    lt = torch.tensor([[0, 1], [1, 1]], dtype=torch.int32)
    return AttentionTables((2, 16, 16), [masks], [lt], torch.tensor([500.0]))


def test_table_work_counts_the_selected_levels():
    t = _two_level_tables()
    w = D.table_work(t, [torch.tensor([100.0]), torch.tensor([900.0])])
    # t=100: 4 + 16 of 32 pairs; t=900: 32 of 32.
    assert w["visited_density_by_step"] == pytest.approx([20 / 32, 1.0])
    assert w["visited_density"] == pytest.approx((20 / 32 + 1) / 2)
    assert w["visited_blocks_per_step"] == pytest.approx(26.0)
    assert w["mean_row_blocks"] == pytest.approx((2.5 + 4.0) / 2) and w["max_row_blocks"] == 4
    assert w["num_blocks"] == 4 and w["upper_bound"] is False
    assert w["by_layer_middle_step"] == [{"visited_density": 1.0, "max_row_blocks": 4}]
    # Padding to the study's common shape must not change what is visited (hypothesis (c)).
    assert D.table_work(pad_tables(t, 10, 6), [100.0, 900.0], filtered=True) == dict(
        w, upper_bound=True)


class _Fn:
    """A step function on the CPU: y = 2 x + t."""

    def __call__(self, x, t, e):
        return (2 * x + t.reshape(-1, *([1] * (x.dim() - 1))),)


def _steps(n=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(1, 3, 2, 4, 4, generator=g), torch.tensor([float(900 - 100 * i)]),
             torch.randn(1, 5, 8, generator=g)) for i in range(n)]


def test_graph_fallback_records_why():
    steps = _steps()
    r = T.time_graphed(_Fn(), steps)
    assert r == {"used": False, "reason": "capture failed: ValueError: CUDA graphs need CUDA "
                                          "inputs; the inputs are on cpu"}

    def no_capture(fn, example):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    r = T.time_graphed(_Fn(), steps, capture=no_capture)
    assert r["used"] is False
    assert r["reason"] == "capture failed: RuntimeError: operation not permitted when stream " \
                          "is capturing"


def test_graph_replay_is_checked_against_the_plain_call():
    """A replay that baked in the captured step's timestep (the bug the check is for) is not
    trusted: the verification at the last step sees the other timestep."""
    steps = _steps()

    def stale_capture(fn, example):
        static = [a.clone() for a in example]
        out = fn(*static)[0].clone()
        frozen_t = static[1].clone()

        class G:
            def replay(self):
                out.copy_(fn(static[0], frozen_t, static[2])[0])

        return G(), static, out

    r = T.time_graphed(_Fn(), steps, capture=stale_capture)
    assert r["used"] is False and r["reason"].startswith("replay differs from the compiled call "
                                                         "at step 2: max |diff| 200")


@pytest.fixture(scope="module")
def tiny():
    return tw.make_tiny_wan(seed=0, num_layers=LAYERS, ffn_dim=128).eval()


def _inputs(model, device, dtype, n=2):
    g = torch.Generator().manual_seed(1)
    grid = (2, 16, 16)  # token grid (2, 8, 8): S = 128, one block
    return [(torch.randn(1, 3, *grid, generator=g).to(device, dtype),
             torch.tensor([900.0 - 400 * i], device=device),
             torch.randn(1, 6, 64, generator=g).to(device, dtype)) for i in range(n)]


def test_time_compiled_on_cpu_records_wall_clock_and_diagnostics(tiny):
    tables = uniform_tables(LAYERS, 4, (2, 8, 8), 1.0)
    inputs = _inputs(tiny, "cpu", torch.float32)
    for retune in (False, True):
        r = T.time_compiled(tiny, tables, inputs, repeats=1, compiler="eager", retune=retune)
        assert r["timing_clock"] == "wall" and r["ms_per_step"] == r["ms_per_step_wall"] > 0
        assert r["graph"]["used"] is False and "inputs are on cpu" in r["graph"]["reason"]
        assert r["retune"] is retune and r["rewritten_attention_calls"] == LAYERS
        assert r["profile"]["wall_ms"] > 0 and r["profile"]["timestep"] == 500.0
        assert r["profile"]["kernel_launches"] == 0  # no CUDA here
        assert r["work"]["visited_density"] == 1.0 and r["work"]["num_blocks"] == 1
        assert r["autotune"] == []  # the eager compiler lowers nothing
    r = T.time_compiled(tiny, tables, inputs, repeats=1, compiler="eager", graphs=False,
                        profile=False)
    assert r["graph"] == {"used": False, "reason": "off (graphs=False)"} and "profile" not in r


def test_sweep_configs_in_the_interpreter():
    from scaling_attn_compile.kernels.launch import DEFAULT_CONFIG

    t = uniform_tables(1, 1, (2, 8, 16), 0.5)  # S = 256, 2 blocks
    r = D.sweep_configs(t, 500.0, head_dim=64, dtype=torch.float32, configs=[DEFAULT_CONFIG],
                        device="cpu")
    key = str(tuple(DEFAULT_CONFIG))
    assert isinstance(r["ms"][key], float) and r["best"] == key
    assert isinstance(r["ms_all_blocks"][key], float) and r["layers"] == [0]


def test_bench_flags_reach_the_study(monkeypatch):
    bq = load_module(ROOT / "benchmarks" / "bench_quality.py", "bench_quality_t")
    seen = {}

    class Stop(Exception):
        pass

    def fake_run_quality(model, spec, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(bq, "run_quality", fake_run_quality)
    with pytest.raises(Stop):
        bq.main(["--model", "tiny-wan", "--device", "cpu", "--skip-claims", "--time-cpu",
                 "--retune-per-method", "--no-graphs", "--sweep-configs", "--prompts", "1",
                 "--retune-also", "sta,radial"])
    assert seen["retune_per_method"] is True and seen["timing_graphs"] is False
    assert seen["retune_also"] == ["sta", "radial"]
    assert seen["timing_profile"] is True and seen["sweep_configs"] is True
    seen.clear()
    with pytest.raises(Stop):
        bq.main(["--model", "tiny-wan", "--device", "cpu", "--skip-claims", "--no-profile",
                 "--prompts", "1"])
    assert seen["retune_per_method"] is False and seen["timing_graphs"] is True
    assert seen["timing_profile"] is False and seen["sweep_configs"] is False
    assert seen["retune_also"] == []
    assert seen["token_order"] == "auto"  # as `scaling-attn west`
    seen.clear()
    with pytest.raises(Stop):
        bq.main(["--model", "tiny-wan", "--device", "cpu", "--skip-claims", "--prompts", "1",
                 "--token-order", "raster"])
    assert seen["token_order"] == "raster"
    with pytest.raises(SystemExit):  # a typo in --retune-also is an error, not a silent no-op
        bq.main(["--model", "tiny-wan", "--device", "cpu", "--retune-also", "stta"])


@pytest.mark.gpu
def test_graph_timing_on_the_gpu(tiny):
    """The replayed graph equals the plain compiled call (checked inside, at the first and last
    step, whose timesteps select other buckets), and its clock is the one recorded."""
    model = tw.make_tiny_wan(seed=0, num_layers=LAYERS, ffn_dim=128).to("cuda", torch.bfloat16)
    tables = uniform_tables(LAYERS, 4, (2, 8, 8), 1.0)
    inputs = _inputs(model, "cuda", torch.bfloat16, n=3)
    # retune: a fresh Inductor cache, so the template is lowered and autotuned here even when
    # an earlier run left this graph in the FX graph cache.
    r = T.time_compiled(model, tables, inputs, repeats=2, retune=True)
    assert r["graph"]["used"] is True, r["graph"]
    assert r["timing_clock"] == "cuda_graph" and r["ms_per_step"] == r["graph"]["ms_per_step"]
    assert [v["step"] for v in r["graph"]["verified"]] == [0, 2]
    assert all(v["max_abs_diff"] < 1e-2 for v in r["graph"]["verified"])
    assert r["ms_per_step_wall"] > 0 and len(r["ms_per_step_by_step"]) == 3
    p = r["profile"]
    assert p["attention_launches"] == LAYERS, p["top_kernels"]
    assert 0 < p["attention_ms"] <= p["kernel_ms"] and p["kernel_launches"] > LAYERS
    assert r["autotune"] and r["autotune"][0]["chosen"] is not None
    assert r["work"]["visited_density"] == 1.0 and r["retune"] is True


def test_study_rows_carry_the_new_timing(tmp_path):
    """run_quality (timing only, eager compiler): each row's timing has the clock, the graph's
    reason, the profiled step and the table work; ``retune_also`` adds a retuned timing."""
    from scaling_attn_compile.quality.study import run_quality
    from scaling_attn_compile.tiny import registry as QM

    tw.save_tiny_wan(tw.make_tiny_wan(seed=0, num_layers=LAYERS, ffn_dim=256), tmp_path)
    model = tw.load_tiny_wan("cpu", torch.float32, path=tmp_path)
    logs = []
    res = run_quality(model, QM.tiny_wan(tmp_path), grid=(4, 32, 32), steps=3, densities=(0.4,),
                      methods=("west_uniform", "sta"), num_prompts=1, num_calib=1,
                      calib_capture_steps=2, fast_capture_steps=3, energy_capture_steps=2,
                      bisect_iters=2, time_steps=True, timing_repeats=1, timing_steps=2,
                      timing_compiler="eager", timing_only=True, retune_also=("sta",),
                      log=logs.append)
    cfg = res["config"]["timing"]
    assert cfg["graphs"] is True and cfg["profile"] is True and cfg["retune_also"] == ["sta"]
    rows = {r["method"]: r for r in res["results"]}
    for r in rows.values():
        tm = r["timing"]
        assert tm["timing_clock"] == "wall" and r["ms_per_step"] == tm["ms_per_step_wall"]
        assert "inputs are on cpu" in tm["graph"]["reason"] and tm["retune"] is False
        assert tm["profile"]["wall_ms"] > 0
        assert 0 < tm["work"]["visited_density"] <= 1 and len(
            tm["work"]["visited_density_by_step"]) == 2
    assert "timing_retuned" not in rows["west_uniform"]
    assert rows["sta"]["timing_retuned"]["retune"] is True
    assert any("sta" in line and "retuned" in line for line in logs)
    assert any("[wall; wall" in line and "graph off" in line for line in logs)


def test_diag_table_rows():
    tm = {"graph": {"used": True, "ms_per_step": 3.25}, "ms_per_step_wall": 4.5,
          "profile": {"attention_ms": 1.5, "kernel_ms": 2.75, "kernel_launches": 90,
                      "gpu_idle_ms": 1.25},
          "work": {"visited_density": 0.18, "mean_row_blocks": 23.0, "max_row_blocks": 60},
          "autotune": [{"chosen": "x"}],
          "config_sweep": {"best": "(64, 4, 2, False, False)", "best_all_blocks": "(128, 8, 3)",
                           "ms": {"(64, 4, 2, False, False)": 0.9}}}
    res = {"reference_timing": {"dense_ours": dict(tm, graph={"used": False, "reason": "r"})},
           "results": [{"method": "sta", "target_density": 0.15, "timing": tm,
                        "timing_retuned": tm}, {"method": "radial", "target_density": 0.15}]}
    lines = D.diag_table(res).splitlines()
    assert len(lines) == 2 + 3  # header, rule, dense_ours, sta, sta*
    assert lines[2].startswith("| dense_ours | - | n/a | 4.50 |")
    assert lines[3] == ("| sta | 0.15 | 3.25 | 4.50 | 1.50 | 2.75 | 90 | 1.25 | 0.180 | 23.0/60 "
                        "| 1 | (64, 4, 2, False, False) 0.900 ((128, 8, 3)) |")
    assert lines[4].startswith("| sta* | 0.15 |")
