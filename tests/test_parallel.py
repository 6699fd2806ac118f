"""Ulysses sequence parallelism through diffusers' context parallelism, 2 CPU processes (gloo).

A 4-head tiny Wan, a plan whose masks differ per head and per layer and whose level table
differs per head (``two_level_tables``; at t=900 head 0 is dense, heads 1-3 sparse). Each rank
runs ``enable_ulysses`` (diffusers' ``ContextParallelConfig(ulysses_degree=2)``) and compiles the
model with our backend and Inductor (CPU: the op lowers to an extern call of the reference op),
so the all-to-all, the SDPA the FX pass rewrites and the head slicing are all the engine's code.

Checks: the 2-process output equals the 1-process compiled output and the float64 eager oracle
(reference sparse processor) by the tolerance rule; binding the other rank's heads fails that
same check (the test can see wrong heads); no head information is a clear compile error.

The GPU run (nccl, bf16, the Triton kernel) is ``benchmarks/bench_parallel.py`` on the device.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))  # the spawned workers import test_backend too

import test_backend as tb  # noqa: E402

from scaling_attn_compile.compile.backend import scaling_attn_backend
from scaling_attn_compile.compile.parallel import (
    enable_ulysses,  # noqa: E402
    ulysses_head_range,
)
from scaling_attn_compile.errors import PlanMismatchError
from scaling_attn_compile.testing import assert_close_to_oracle  # noqa: E402

WORLD, HEADS, LAYERS = 2, 4, 2
T = 900  # bucket 1: head 0 dense (rank 0's slice), heads 1-3 sparse


def make_model():
    tb.HEADS = HEADS  # make_model reads the module constant
    try:
        return tb.make_model()
    finally:
        tb.HEADS = 2


def tables():
    return tb.two_level_tables(LAYERS, HEADS, tb.GRID)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compile(model, backend):
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True, dynamic=False)


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share the CI's cores
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    result = {}
    try:
        probe = torch.arange(world, dtype=torch.float32)
        try:
            dist.all_to_all_single(torch.empty_like(probe), probe)
        except RuntimeError as e:  # an old gloo without all-to-all: nothing below can run
            result["skip"] = f"gloo all_to_all_single: {e}"
            return
        model = make_model()
        inputs = tb.make_inputs()
        ts = torch.tensor([T])
        enable_ulysses(model, world)
        with torch.no_grad():
            be = scaling_attn_backend(tables(), parallel=model)
            result["out"] = _compile(model, be)(timestep=ts, return_dict=False, **inputs)[0]
            result["reports"] = [(r.per_layer, r.head_range, r.left_dense) for r in be.reports]
            # The other rank's heads: must not pass the tolerance check.
            wrong = ulysses_head_range(HEADS, world - 1 - rank, world)
            be = scaling_attn_backend(tables(), head_range=wrong, compiler="eager")
            result["wrong"] = _compile(model, be)(timestep=ts, return_dict=False, **inputs)[0]
            # No way to know the offset: an error, not a guess.
            try:
                _compile(model, scaling_attn_backend(tables(), compiler="eager"))(
                    timestep=ts, return_dict=False, **inputs)
            except Exception as e:  # noqa: BLE001 - Dynamo wraps it; the text is checked
                result["no_offset_error"] = f"{type(e).__name__}: {e}"
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    out_dir = str(tmp_path_factory.mktemp("ulysses"))
    mp.spawn(_worker, args=(WORLD, _free_port(), out_dir), nprocs=WORLD, join=True)
    results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
               for r in range(WORLD)]
    if "skip" in results[0]:
        pytest.skip(results[0]["skip"])
    return results


def test_two_rank_ulysses_matches_one_process_and_oracle(parallel_results):
    model = make_model()
    inputs = tb.make_inputs()
    ts = torch.tensor([T])
    torch._dynamo.reset()
    with torch.no_grad():
        single = _compile(copy.deepcopy(model), scaling_attn_backend(tables()))(
            timestep=ts, return_dict=False, **inputs)[0]
    same, golden = tb.Oracle(model, tables())(ts, **inputs)
    assert_close_to_oracle(single, golden, same, what="1 process")
    for rank, res in enumerate(parallel_results):
        # Each rank gathers the full output (proj_out's ContextParallelOutput).
        assert_close_to_oracle(res["out"], golden, same, what=f"2 processes, rank {rank}")
        assert_close_to_oracle(res["out"], golden, single, what=f"rank {rank} vs 1 process")
        # Both layers rewritten on the rank's own heads; cross-attention left dense.
        lo, hi = ulysses_head_range(HEADS, rank, WORLD)
        assert res["reports"] == [({0: 1, 1: 1}, (lo, hi), {"cross-attention": LAYERS})]


def test_wrong_head_offset_is_detected(parallel_results):
    """Binding the other rank's heads changes the output by far more than the tolerance: the
    check above would fail if the offset were wrong."""
    model = make_model()
    inputs = tb.make_inputs()
    ts = torch.tensor([T])
    same, golden = tb.Oracle(model, tables())(ts, **inputs)
    for rank, res in enumerate(parallel_results):
        with pytest.raises(AssertionError, match="exceeds"):
            assert_close_to_oracle(res["wrong"], golden, same, what=f"wrong heads, rank {rank}")


def test_fewer_heads_without_an_offset_is_a_clear_error(parallel_results):
    for res in parallel_results:
        err = res.get("no_offset_error", "")
        assert "PlanMismatchError" in err and "has 2 heads" in err and "parallel=" in err, err


def test_head_range_must_fit_the_model():
    from scaling_attn_compile.compile.parallel import ulysses_rank

    with pytest.raises(PlanMismatchError, match="does not divide"):
        ulysses_head_range(40, 0, 3)
    assert ulysses_head_range(40, 3, 4) == (30, 40)
    assert ulysses_rank((1, 2)) == (1, 2)
    with pytest.raises(ValueError, match="not both"):
        scaling_attn_backend(tables(), head_range=(0, 2), parallel=(0, 2))
    with pytest.raises(ValueError, match="0 <= rank < degree"):
        ulysses_rank((2, 2))
