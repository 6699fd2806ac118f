"""A small self-check: the op against SDPA and the reference, and the Triton kernel against the
reference (on the GPU, or in Triton's interpreter on a CPU-only machine).

    python -m scaling_attn_compile.selfcheck
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

from .masks import dense_tables, num_blocks, pack_blocks
from .op import sparse_attention
from .reference import sparse_attention_reference
from .testing import make_qkv


def _row(name: str, err: float, budget: float, seconds: float) -> tuple[str, bool]:
    ok = err <= budget
    return f"| {name} | {err:.2e} | {budget:.1e} | {seconds:.2f} | {'ok' if ok else 'FAIL'} |", ok


def main() -> int:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    print(f"scaling_attn_compile self-check on {torch.cuda.get_device_name() if cuda else 'CPU'}"
          f" (torch {torch.__version__})\n")
    rows = ["| check | max abs error | bound | seconds | |", "|---|---|---|---|---|"]
    oks = []

    B, H, S, D = 1, 2, 1000, 64  # S not a multiple of 128: a partial last block
    dtype = torch.float16 if cuda else torch.float32
    q, k, v = make_qkv(B, H, S, D, dtype=dtype, device=device)
    ts = torch.tensor([500.0], device=device)
    masks, lt, bb = (t.to(device) for t in dense_tables(H, S))
    t0 = time.perf_counter()
    out = sparse_attention(q, k, v, masks, lt, bb, ts, D**-0.5)
    err = (out.float() - F.scaled_dot_product_attention(q.float(), k.float(), v.float())).abs()
    row, ok = _row("op, every block kept == SDPA", err.max().item(), 1e-2 if cuda else 1e-5,
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
                   1e-2 if cuda else 1e-5, time.perf_counter() - t0)
    rows.append(row)
    oks.append(ok)

    if not cuda:  # the same kernel the GPU runs, through Triton's interpreter, at a small size
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("(set TRITON_INTERPRET=1 to also run the Triton kernel in the interpreter)\n")
        else:
            from .kernels.block_sparse_attention import block_sparse_attention_forward

            qh, kh, vh = (t[:, :, :300].half() for t in (q, k, v))
            m3 = pack_blocks(torch.rand(H, 2, 3, 3, generator=g) < 0.5)
            gold = sparse_attention_reference(qh, kh, vh, m3, lt2, bb2, ts, D**-0.5,
                                              compute_dtype=torch.float64)
            o = torch.empty_like(qh)
            t0 = time.perf_counter()
            block_sparse_attention_forward(qh, kh, vh, m3, lt2, bb2, ts, o, D**-0.5)
            row, ok = _row("Triton kernel (interpreter, fp16) == reference",
                           (o.double() - gold).abs().max().item(), 2e-3, time.perf_counter() - t0)
            rows.append(row)
            oks.append(ok)

    print("\n".join(rows))
    print("\nall checks passed" if all(oks) else "\nSOME CHECKS FAILED")
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(main())
