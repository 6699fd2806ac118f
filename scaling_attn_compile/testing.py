"""Test helpers shared by tests and benchmarks: input factories and the one tolerance rule."""

from __future__ import annotations

import torch


def make_qkv(B: int, H: int, S: int, D: int, dtype=torch.float16, device="cpu", seed: int = 0):
    """q, k, v ``(B, H, S, D)`` as diffusers passes them: ``(B, H, S, D)`` views of ``(B, S, H, D)``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(
        torch.randn(B, S, H, D, generator=g).to(device=device, dtype=dtype).permute(0, 2, 1, 3)
        for _ in range(3)
    )


def rounding_step(golden: torch.Tensor, dtype: torch.dtype) -> float:
    """One rounding step of ``dtype`` at the scale of the golden output."""
    return torch.finfo(dtype).eps * golden.abs().max().item()


def assert_close_to_oracle(out: torch.Tensor, golden: torch.Tensor, same_dtype_ref: torch.Tensor,
                           *, k: float = 2.0, what: str = "output") -> None:
    """The tolerance rule (flex / FA3 / attention-gym): our error against the float64 ``golden``
    must be within ``k x`` (the error of an eager same-dtype reference + one rounding step).
    """
    golden = golden.double()
    if torch.isnan(out).any():
        raise AssertionError(f"{what}: contains NaN")
    ours = (out.double() - golden).abs().max().item()
    theirs = (same_dtype_ref.double() - golden).abs().max().item()
    budget = k * (theirs + rounding_step(golden, out.dtype))
    if not ours <= budget:
        raise AssertionError(
            f"{what}: max error vs float64 {ours:.3e} exceeds {k} x (same-dtype reference error "
            f"{theirs:.3e} + rounding {rounding_step(golden, out.dtype):.3e}) = {budget:.3e}"
        )
