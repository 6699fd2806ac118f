"""The eager op runs FlashAttention-4 where it can (``ops/fa4_op.fa4_eager_refusal``), else the
Triton kernel; one switch (``SCALING_ATTN_FA4=0``, ``fa4_choice(False)``) rules it and the
compiled path's choice alike.

CPU: FA4's availability and its forward are mocked (flash_attn is never imported), so the
dispatch and every refusal reason are exercised; the mocked forward returns the reference in
FA4's ``(B, S, H, D)`` memory. GPU (``-m gpu``, skipped without CUDA or ``flash_attn.cute``):
the eager op's FA4 output equals the reference, and the switch gives the Triton kernel's.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from scaling_attn_compile.contract.reference import sparse_attention_reference
from scaling_attn_compile.contract.tables import uniform_tables
from scaling_attn_compile.kernels.fa4 import fa4_available
from scaling_attn_compile.ops import fa4_op
from scaling_attn_compile.testing import assert_close_to_oracle, make_qkv

OP = torch.ops.scaling_attn.sparse_attention.default
B, H, S, D = 2, 2, 128 * 3 + 7, 64
SCALE = 0.1


def args(dtype=torch.float16, density=0.5, device="cpu"):
    # (B, H, S, D) views of (B, S, H, D) memory, as diffusers passes them
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)
               for t in make_qkv(B, H, S, D, dtype=dtype, device=device, seed=3))
    masks, lt, bb = uniform_tables(1, H, (1, 1, S), density, seed=4).to(device).layer(0)
    return q, k, v, masks, lt, bb, torch.tensor([900.0, 100.0], device=device)


@contextlib.contextmanager
def fake_fa4():
    """FA4 "installed": available everywhere, its forward the reference in (B, S, H, D) memory.
    Yields the list of calls."""
    calls = []

    def forward(q, k, v, masks, lt, bb, ts, scale):
        calls.append(scale)
        ref = sparse_attention_reference(q.float(), k.float(), v.float(), masks, lt, bb, ts,
                                         scale).to(q.dtype)
        return ref.transpose(1, 2).contiguous().transpose(1, 2)

    with mock.patch.object(fa4_op, "fa4_available", lambda device=None, **kw: True), \
            mock.patch.object(fa4_op, "fa4_block_sparse_attention", forward):
        yield calls


def test_refusal_names_each_reason(monkeypatch):
    q, k, v, *_ = args()
    refuse = fa4_op.fa4_eager_refusal
    if not torch.cuda.is_available():
        assert refuse(q, k, v) == "flash_attn.cute not importable or not an sm90 GPU"
    with fake_fa4():
        assert refuse(q, k, v) is None
        assert refuse(q, k, v, energy_rule=1) == "energy filter"
        assert refuse(q, k, v, kv_lens=torch.full((B,), S, dtype=torch.int32)) == "kv_lens"
        assert refuse(q, k, v, launch_order=torch.zeros(1, 1, dtype=torch.int32)) == "launch_order"
        assert refuse(q.float(), k.float(), v.float()) == "dtype torch.float32"
        wide = torch.zeros(B, H, S, 192, dtype=torch.float16)
        assert refuse(wide, wide, wide) == "head_dim 192"
        strided = k.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert refuse(q, strided, v) == "q/k/v last dim not contiguous"
        monkeypatch.setenv(fa4_op.FA4_ENV, "off")
        assert refuse(q, k, v) == f"{fa4_op.FA4_ENV}=off"
        monkeypatch.delenv(fa4_op.FA4_ENV)
        with fa4_op.fa4_choice(False):
            assert refuse(q, k, v) == "fa4_choice(False)"
        assert refuse(q, k, v) is None


def test_eager_op_runs_fa4_where_it_can_and_the_kernel_elsewhere(monkeypatch):
    a = args()
    golden = sparse_attention_reference(*a, SCALE, compute_dtype=torch.float64)
    with fake_fa4() as calls:
        out = OP(*a, SCALE)
        assert calls == [SCALE]  # FA4 ran, with the op's scale
        assert out.stride() == a[0].stride()  # q's strides, as the fake promises
        assert_close_to_oracle(out, golden, sparse_attention_reference(*a, SCALE), k=3.0,
                               what="eager op through FA4 (mocked)")
        OP(*a, SCALE, energy_rule=1, energy_threshold=-30.0)  # the filter: the CPU path
        with fa4_op.fa4_choice(False):
            OP(*a, SCALE)
        monkeypatch.setenv(fa4_op.FA4_ENV, "0")
        OP(*a, SCALE)
        assert calls == [SCALE]  # none of the three reached FA4


# -- GPU ----------------------------------------------------------------------------------------

needs_fa4 = pytest.mark.skipif(not fa4_available(), reason="needs flash_attn.cute on an sm90 GPU")


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("density", [1.0, 0.25])
def test_gpu_eager_op_through_fa4_matches_reference(monkeypatch, density):
    a = args(torch.bfloat16, density, "cuda")
    golden = sparse_attention_reference(*a, SCALE, compute_dtype=torch.float64)
    same = sparse_attention_reference(*a, SCALE)
    real = fa4_op.fa4_block_sparse_attention
    calls = []

    def spy(*x, **kw):
        calls.append(1)
        return real(*x, **kw)

    with mock.patch.object(fa4_op, "fa4_block_sparse_attention", spy):
        fa4_out = OP(*a, SCALE)
        assert calls == [1]
        monkeypatch.setenv(fa4_op.FA4_ENV, "0")
        triton_out = OP(*a, SCALE)
        assert calls == [1]
    assert fa4_out.stride() == a[0].stride()
    assert_close_to_oracle(fa4_out, golden, same, k=3.0, what=f"eager FA4, density {density}")
    assert_close_to_oracle(triton_out, golden, same, k=3.0, what=f"eager Triton, density {density}")
