"""The 8-bit kernel's fused quantize pre-pass (kernels/quantize_q8.py) against its spec, the torch
form ``contract.quant.quantize_qkv``: the same codes and scales, in the layout the kernel reads.
In Triton's interpreter on the CPU (its e4m3 cast swapped for torch's, as in test_kernel_q8.py),
and on a GPU with ``-m gpu``."""

import os
import sys

import pytest
import torch

from scaling_attn_compile.contract.quant import FP8, quantize_qkv
from scaling_attn_compile.kernels.quantize_q8 import quantize_qkv_fused
from scaling_attn_compile.testing import make_outlier_qkv

sys.path.insert(0, os.path.dirname(__file__))
from test_kernel_q8 import fp8_cast_fix  # noqa: E402,F401  (autouse: the interpreter's e4m3 cast)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                  reason="needs the Triton interpreter or a GPU")


def op_layout_qkv(B, H, S, D, dtype, device, seed):
    """q, k, v as the op receives them: (B, H, S, D) views of (B, S, H, D) memory, outlier
    channels in K (what smoothing is for)."""
    q, k, v = make_outlier_qkv(B, H, S, D, seed, dtype=dtype, device=device)
    return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))


def codes_as_float(x8):
    return x8.float() if x8.dtype == FP8 else x8.to(torch.float32)


def assert_same_quantization(fused, ref, *, exact: bool):
    q8, qs, k8, ks, v8, vs = fused
    rq8, rqs, rk8, rks, rv8, rvs = ref
    B, H, S, D = rq8.shape
    assert q8.shape == k8.shape == v8.shape == (B, H, S, D)
    assert v8.stride(-2) == 1 and v8.stride(-1) % 16 == 0  # (D, S) rows, 16-byte pitch
    assert torch.equal(q8.view(torch.uint8), rq8.view(torch.uint8))  # Q: never smoothed
    assert torch.equal(qs, rqs.reshape(B * H, -1))
    assert torch.equal(v8.contiguous().view(torch.uint8), rv8.view(torch.uint8))
    assert torch.equal(vs, rvs.reshape(B * H, D))
    if exact:
        assert torch.equal(k8.view(torch.uint8), rk8.view(torch.uint8))
        assert torch.equal(ks, rks.reshape(B * H, -1))
        return
    # K's mean is summed in another order: scales within float32 rounding, codes within a step.
    torch.testing.assert_close(ks, rks.reshape(B * H, -1), rtol=1e-5, atol=0)
    a, b = codes_as_float(k8), codes_as_float(rk8)
    step = 1.0 if k8.dtype == torch.int8 else b.abs().clamp_min(2.0**-6) / 8  # e4m3: 3 bits
    assert ((a - b).abs() <= step * 1.0001).all()
    assert (a != b).float().mean().item() < 1e-3


@needs_kernel
@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("S,dtype", [(300, torch.float32), (256, torch.bfloat16)])
def test_fused_prepass_equals_the_torch_form(precision, smooth, S, dtype):
    # S = 300: a partial last block, and V^T rows that need padding to 16 bytes (fp8: 300 B).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = op_layout_qkv(2, 3, S, 64, dtype, device, seed=3)
    fused = quantize_qkv_fused(q, k, v, precision, smooth=smooth)
    ref = quantize_qkv(q, k, v, precision, smooth=smooth)
    assert_same_quantization(fused, ref, exact=not smooth)


@needs_kernel
def test_fused_prepass_zero_blocks_get_scale_one():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.zeros(1, 2, 200, 64, device=device) for _ in range(3))
    q[:, :, 150:] = 1.0  # block 0 all zero, block 1 not
    q8, qs, k8, ks, v8, vs = quantize_qkv_fused(q, k, v, "int8")
    assert qs[:, 0].eq(1.0).all() and ks.eq(1.0).all() and vs.eq(1.0).all()
    assert q8[:, :, :128].eq(0).all() and q8[:, :, 150:].eq(127).all()


def test_fused_prepass_refuses_bf16():
    q = torch.zeros(1, 1, 128, 64)
    with pytest.raises(ValueError, match="precision must be 'int8' or 'fp8', got 'bf16'"):
        quantize_qkv_fused(q, q, q, "bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_fused_prepass_gpu_wan_shape(precision):
    """Wan 1.3B's sequence (S = 32,760: partial block, unpadded V^T rows) at 2 heads, bf16."""
    q, k, v = op_layout_qkv(1, 2, 32760, 128, torch.bfloat16, "cuda", seed=1)
    assert_same_quantization(quantize_qkv_fused(q, k, v, precision, smooth=False),
                             quantize_qkv(q, k, v, precision, smooth=False), exact=True)
    assert_same_quantization(quantize_qkv_fused(q, k, v, precision),
                             quantize_qkv(q, k, v, precision), exact=False)
