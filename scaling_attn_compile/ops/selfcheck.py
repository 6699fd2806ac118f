"""A small self-check: the op against SDPA and the reference, and the Triton kernel against the
reference (on the GPU, or in Triton's interpreter on a CPU-only machine).

    python -m scaling_attn_compile.ops.selfcheck [--dtype auto|fp16|bf16|fp32]

``auto`` is float16 on CUDA and float32 on the CPU (the kernel row runs float16 there).
bfloat16 on the CPU checks the op but not the interpreted kernel: Triton's interpreter computes
bf16 ``tl.dot`` wrongly (errors of 1e8 and more), so that row says why it was not run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from ..contract.masks import dense_tables, num_blocks, pack_blocks
from ..contract.reference import sparse_attention_reference
from ..testing import make_qkv
from .op import sparse_attention

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def budget(dtype: torch.dtype, cuda: bool) -> float:
    """Max abs error allowed: outputs here are below 1 in magnitude, so one rounding to ``dtype``
    costs at most eps/2. 2 eps on the CPU (fp16: 2.0e-3; measured 4.9e-4 for the interpreted
    kernel, 1.2e-4 for the op), 10 eps on CUDA, where the kernel also rounds P to ``dtype``
    (fp16: 9.8e-3, the bound this check always had); never below 1e-5 (fp32)."""
    return max(1e-5, (10 if cuda else 2) * torch.finfo(dtype).eps)


def _row(name: str, err: float, bound: float, seconds: float) -> tuple[str, bool]:
    ok = err <= bound
    return f"| {name} | {err:.2e} | {bound:.1e} | {seconds:.2f} | {'ok' if ok else 'FAIL'} |", ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scaling_attn_compile.ops.selfcheck",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="dtype of q, k, v (default auto: fp16 on CUDA, fp32 on the CPU)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES.get(args.dtype, torch.float16 if cuda else torch.float32)
    print(f"scaling_attn_compile self-check on {torch.cuda.get_device_name() if cuda else 'CPU'}"
          f" (torch {torch.__version__}, {dtype})\n")
    rows = ["| check | max abs error | bound | seconds | |", "|---|---|---|---|---|"]
    oks, notes = [], []

    B, H, S, D = 1, 2, 1000, 64  # S not a multiple of 128: a partial last block
    q, k, v = make_qkv(B, H, S, D, dtype=dtype, device=device)
    ts = torch.tensor([500.0], device=device)
    masks, lt, bb = (t.to(device) for t in dense_tables(H, S))
    t0 = time.perf_counter()
    out = sparse_attention(q, k, v, masks, lt, bb, ts, D**-0.5)
    err = (out.float() - F.scaled_dot_product_attention(q.float(), k.float(), v.float())).abs()
    row, ok = _row("op, every block kept == SDPA", err.max().item(), budget(dtype, cuda),
                   time.perf_counter() - t0)
    rows.append(row)
    oks.append(ok)

    nb = num_blocks(S)
    g = torch.Generator().manual_seed(0)
    sparse = pack_blocks(torch.rand(H, 2, nb, nb, generator=g) < 0.3).to(device)
    lt2 = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32, device=device)
    bb2 = torch.tensor([500.0], device=device)
    golden = sparse_attention_reference(q, k, v, sparse, lt2, bb2, ts, D**-0.5,
                                        compute_dtype=torch.float64)
    t0 = time.perf_counter()
    out = sparse_attention(q, k, v, sparse, lt2, bb2, ts, D**-0.5)
    row, ok = _row("op, 30% blocks, 2 levels == reference", (out.double() - golden).abs().max().item(),
                   budget(dtype, cuda), time.perf_counter() - t0)
    rows.append(row)
    oks.append(ok)

    if not cuda:  # the same kernel the GPU runs, through Triton's interpreter, at a small size
        if os.environ.get("TRITON_INTERPRET") != "1":
            notes.append("(set TRITON_INTERPRET=1 to also run the Triton kernel in the interpreter)")
        else:
            from ..kernels.launch import block_sparse_attention_forward

            kdtype = torch.float16 if args.dtype == "auto" else dtype
            name = f"Triton kernel (interpreter, {str(kdtype).removeprefix('torch.')}) == reference"
            qh, kh, vh = (t[:, :, :300].to(kdtype) for t in (q, k, v))
            m3 = pack_blocks(torch.rand(H, 2, 3, 3, generator=g) < 0.5)
            gold = sparse_attention_reference(qh, kh, vh, m3, lt2, bb2, ts, D**-0.5,
                                              compute_dtype=torch.float64)
            o = torch.empty_like(qh)
            t0 = time.perf_counter()
            try:
                block_sparse_attention_forward(qh, kh, vh, m3, lt2, bb2, ts, o, D**-0.5)
            except TypeError as e:  # bf16: the interpreter's dot is broken; say so, not garbage
                rows.append(f"| {name} | | | | not run |")
                notes.append(f"not run: {e}")
            else:
                row, ok = _row(name, (o.double() - gold).abs().max().item(),
                               budget(kdtype, False), time.perf_counter() - t0)
                rows.append(row)
                oks.append(ok)

    print("\n".join(rows))
    for n in notes:
        print(f"\n{n}")
    print("\nall checks passed" if all(oks) else "\nSOME CHECKS FAILED")
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(main())
