"""Question (issue 14): which of Triton 3.6's ways to overlap the softmax with the tensor cores on
Hopper makes block-sparse attention faster than our kernel, on the same masks?

Our kernel walks a row's mask bits and runs Q.K^T, softmax, P.V one after another; in its sm_90
code no exponential runs while a wgmma is in flight (``benchmarks/kernel_sass.py``). FA4 (and
FA3) overlap them, with warp specialisation and two consumer warpgroups. Triton 3.6 offers:

* ``ws``: automatic warp specialisation (``tl.range(..., warp_specialize=True)``). Compiled for
  sm_90 here it applies only with ``num_warps=4`` and a loop whose block index comes from memory
  (an FA4-style block list); over our bit-walk, or with 8 warps, the compiler leaves the loop as
  it is (no ``ttg.warp_specialize`` op in the TTGIR).
* ``pipe``: the next block's Q.K^T issued before this block's softmax, in the source
  (FlashAttention-3's intra-warpgroup overlap). Whether the exponentials then run under the
  wgmma is up to ptxas; on this loop it interleaves them.
* ``ours-overlap`` (the first H100 run only, commit 346450d): the same order inside our
  bit-walk kernel. Its loads then fit 2 stages, not 3 (256 KiB), and ptxas put the exponentials
  before the wgmma rather than under it; 23% slower dense, 9% at 0.25. Removed from the kernel.

Measured on one H100 (2026-12-06, torch 2.11, Triton 3.6, FA4 4.0.0b36; records
``results/overlap*-nvidia-h100-80gb-hbm3.json``). Of the warp-specialised forms only the one
that stores through a TMA descriptor (``list-ws-tmastore w4s2``) is correct: the ``tl.store``
forms leave exactly half of the output unwritten, the 64-key forms write wrong rows (NaNs). It is
1.00-1.14x ``ours-tma`` (median about 1.05x; run to run the same row moves 5%), and beside FA4 in
one process 0.82-0.84x FA4 at densities 0.05-0.1 and 0.87-0.93x at 0.25. 8 warps with
``warp_specialize`` lose (0.80-0.94x ours), 4 warps without it spill (0.41-0.44x), the pipelined
order loses (0.83-0.90x). FA4's lead is what Triton 3.6 cannot express on sm_90: two consumer
warpgroups in ping-pong with register reallocation.

The list kernels below are study kernels, not the op: K/V through TMA, one program per
(128-query tile, batch x head), the row's blocks from ``full_cnt`` / ``full_idx`` (the lists
``kernels/fa4.fa4_block_sparse_tensors`` builds). ``S`` is a multiple of 128 (32,768 = the
16x32x64 latent grid): no partial block. Every output is compared with our kernel's.

    python benchmarks/hopper_overlap.py [--out FILE] [--heads 12] [--impls NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

from scaling_attn_compile.kernels.block_sparse_attention import bsa_softmax_update
from scaling_attn_compile.kernels.fa4 import fa4_available, fa4_block_sparse_tensors, fa4_forward
from scaling_attn_compile.kernels.launch import (
    KernelConfig,
    _ensure_tma_allocator,
    block_sparse_attention_forward,
)
from scaling_attn_compile.testing import make_qkv


@triton.jit
def _step(acc, l_i, m_i, qk, v, qk_scale):
    """Our kernel's online-softmax step (``bsa_softmax_update``) on one block's scores."""
    return bsa_softmax_update(acc, l_i, m_i, qk, v, tl.max(qk, 1) * qk_scale, qk_scale)


@triton.jit
def _list_attention(Q, K, V, O, CNT, IDX, S, NB, MAXK, qk_scale,
                    BLOCK_M: tl.constexpr, D: tl.constexpr, WS: tl.constexpr,
                    PIPE: tl.constexpr, ALL_BLOCKS: tl.constexpr = False,
                    TMA_STORE: tl.constexpr = False, IDX_REGS: tl.constexpr = False,
                    MAXK_P2: tl.constexpr = 16, BLOCK_N: tl.constexpr = 128):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * D
    q_desc = tl.make_tensor_descriptor(Q + base, shape=[S, D], strides=[D, 1],
                                       block_shape=[BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[S, D], strides=[D, 1],
                                       block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V + base, shape=[S, D], strides=[D, 1],
                                       block_shape=[BLOCK_N, D])
    SUB: tl.constexpr = 128 // BLOCK_N  # loop trips per 128-key mask block
    q = q_desc.load([pid * BLOCK_M, 0])
    row = bh * NB + (pid * BLOCK_M) // 128
    n = tl.load(CNT + row)
    idx = IDX + row.to(tl.int64) * MAXK
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if PIPE:
        if n > 0:
            cur = tl.load(idx) * 128
            qk = tl.dot(q, k_desc.load([cur, 0]).T)
            for j in tl.range(1, n):
                nxt = tl.load(idx + j) * 128
                qk_next = tl.dot(q, k_desc.load([nxt, 0]).T)
                acc, l_i, m_i = _step(acc, l_i, m_i, qk, v_desc.load([cur, 0]), qk_scale)
                qk = qk_next
                cur = nxt
            acc, l_i, m_i = _step(acc, l_i, m_i, qk, v_desc.load([cur, 0]), qk_scale)
    elif ALL_BLOCKS:  # every block, in order, no list read (the dense case)
        for start in tl.range(0, S, 128, warp_specialize=WS):
            qk = tl.dot(q, k_desc.load([start, 0]).T)
            acc, l_i, m_i = _step(acc, l_i, m_i, qk, v_desc.load([start, 0]), qk_scale)
    elif IDX_REGS:  # the row's list read before the loop: no pointer load inside it
        # (triton-lang/triton#8311: a warp-specialised loop mixing pointer loads with TMA loads
        # computes wrong results; this variant tests whether that is our fault)
        slots = tl.arange(0, MAXK_P2)
        row_idx = tl.load(idx + slots, mask=slots < MAXK, other=0)
        for j in tl.range(0, n, warp_specialize=WS):
            start = tl.sum(tl.where(slots == j, row_idx, 0)) * 128
            qk = tl.dot(q, k_desc.load([start, 0]).T)
            acc, l_i, m_i = _step(acc, l_i, m_i, qk, v_desc.load([start, 0]), qk_scale)
    else:
        for j in tl.range(0, n * SUB, warp_specialize=WS):
            start = tl.load(idx + j // SUB) * 128 + (j % SUB) * BLOCK_N
            qk = tl.dot(q, k_desc.load([start, 0]).T)
            acc, l_i, m_i = _step(acc, l_i, m_i, qk, v_desc.load([start, 0]), qk_scale)
    if TMA_STORE:
        o_desc = tl.make_tensor_descriptor(O + base, shape=[S, D], strides=[D, 1],
                                           block_shape=[BLOCK_M, D])
        o_desc.store([pid * BLOCK_M, 0], (acc / l_i[:, None]).to(O.dtype.element_ty))
    else:
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        tl.store(O + base + offs_m[:, None] * D + offs_d[None, :],
                 (acc / l_i[:, None]).to(O.dtype.element_ty))


# (name, num_warps, num_stages, WS, PIPE, ALL_BLOCKS, TMA_STORE, IDX_REGS[, BLOCK_N]); ALL_BLOCKS runs only
# on all-blocks masks. Compiled for sm_90 with triton 3.6 (ptxas -v): the plain list loop 188
# registers; warp-specialised 168, 176 KiB of shared memory at 2 stages (3 need 256 KiB, past the
# 227 KiB limit); 4 warps without it spill (1 KiB) and serialize the wgmmas; the pipelined order
# 255 registers, no spill. On the H100 (2026-12-05) the first list-ws run wrote NaNs dense and then
# faulted (illegal address) on a Bernoulli mask, where the interpreter gives the reference:
# the all-blocks loop, the TMA store and the list held in registers isolate which part the
# compiler gets wrong.
LIST_VARIANTS = [("list w8s3", 8, 3, False, False, False, False, False),
                 ("list-ws w4s2", 4, 2, True, False, False, False, False),
                 ("list-ws-tmastore w4s2", 4, 2, True, False, False, True, False),
                 ("list-ws-regidx w4s2", 4, 2, True, False, False, False, True),
                 ("all-ws w4s2", 4, 2, True, False, True, False, False),
                 ("all w8s3", 8, 3, False, False, True, False, False),
                 ("list-pipe w8s2", 8, 2, False, True, False, False, False),
                 # first H100 run (2026-12-06): list-ws-tmastore w4s2 was the one correct
                 # warp-specialised variant, 1.09x ours-tma dense, 1.14x at Bernoulli 0.1; the
                 # tl.store forms left half the output unwritten. Keys of 64: 3-4 stages fit.
                 ("list-ws-tmastore-n64 w4s3", 4, 3, True, False, False, True, False, 64),
                 ("list-ws-tmastore-n64 w4s4", 4, 4, True, False, False, True, False, 64),
                 ("list-ws-tmastore w4s1", 4, 1, True, False, False, True, False),
                 ("list-tmastore w4s2", 4, 2, False, False, False, True, False),
                 ("list-ws-tmastore w8s2", 8, 2, True, False, False, True, False)]
OURS = [("ours-tma", KernelConfig(128, 8, 3, use_tma=True))]


def run_list(variant, q, k, v, lists, out, scale):
    name, warps, stages, ws, pipe, all_blocks, tma_store, idx_regs, *block_n = variant
    cnt, idx = lists
    B, H, S, D = q.shape
    _list_attention[(S // 128, B * H)](q, k, v, out, cnt, idx, S, S // 128, idx.shape[-1],
                                       scale * 1.4426950408889634, BLOCK_M=128, D=D, WS=ws,
                                       PIPE=pipe, ALL_BLOCKS=all_blocks, TMA_STORE=tma_store,
                                       IDX_REGS=idx_regs,
                                       MAXK_P2=max(16, triton.next_power_of_2(idx.shape[-1])),
                                       BLOCK_N=block_n[0] if block_n else 128,
                                       num_warps=warps, num_stages=stages)
    return out


def main(argv=None) -> int:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import _common
    from mask_families import block_mask, mask_tables
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--impls", nargs="*", default=None,
                    help="only these (a faulting kernel poisons the process: run it alone)")
    args = ap.parse_args(argv)
    grid, B, H, D = (16, 32, 64), 1, args.heads, 128
    S = grid[0] * grid[1] * grid[2]
    q, k, v = (t.contiguous() for t in make_qkv(B, H, S, D, dtype=torch.bfloat16, device="cuda"))
    scale = D ** -0.5
    ts = torch.tensor([500.0], device="cuda")
    _ensure_tma_allocator()
    rows = []
    for family, density in (("balanced", 1.0), ("balanced", 0.25), ("bernoulli", 0.25),
                            ("bernoulli", 0.1), ("local", 0.1), ("bernoulli", 0.05)):
        block = block_mask(family, H, grid, density)
        tables = mask_tables(block, grid).to("cuda")
        masks, lt, bb = tables.layer(0)
        fa4_lists = fa4_block_sparse_tensors(masks, lt, bb, ts, B, S, impl="torch")
        lists = (fa4_lists[0].contiguous(), fa4_lists[1].contiguous())
        kept = block.float().mean().item()
        flops = 4 * B * H * S * S * D * kept
        ref = torch.empty_like(q)
        block_sparse_attention_forward(q, k, v, masks, lt, bb, ts, ref, scale, OURS[0][1])
        tabs = (masks, lt, bb)
        cases = [(n, lambda o, c=c, t=tabs: block_sparse_attention_forward(q, k, v, *t, ts, o,
                                                                          scale, c))
                 for n, c in OURS]
        if fa4_available():  # FlashAttention-4 block-sparse on the same lists, side by side
            cases.append(("fa4", lambda o, li=fa4_lists: fa4_forward(q, k, v, scale, li)))
        cases += [(var[0], lambda o, var=var, li=lists: run_list(var, q, k, v, li, o, scale))
                  for var in LIST_VARIANTS if density == 1.0 or not var[5]]
        for name, fn in cases:
            if args.impls is not None and name not in args.impls:
                continue
            out = torch.full_like(q, float("nan"))
            try:
                res = fn(out)  # `out`, or FA4's own output tensor
                torch.cuda.synchronize()
                err = ((res.float() - ref.float()).norm() / ref.float().norm()).item()
                nans = int(res.isnan().sum().item())  # elements left unwritten or NaN
                ms = do_bench(lambda f=fn, o=out: f(o), warmup=25, rep=100, return_mode="median")
            except Exception as e:  # a variant that does not compile on this GPU: say so, go on
                print(f"{family} {density} {name}: FAILED {type(e).__name__}: {str(e)[:200]}",
                      flush=True)
                rows.append({"mask": family, "density": density, "impl": name,
                             "error": str(e)[:300]})
                continue
            tf = flops / ms / 1e9
            print(f"{family:9s} {density:4.2f} (kept {kept:.3f}) {name:22s} {ms:8.3f} ms "
                  f"{tf:6.0f} TFLOP/s  rel-L2 vs ours {err:.1e}  NaNs {nans}", flush=True)
            rows.append({"mask": family, "density": density, "kept": kept, "impl": name,
                         "ms": ms, "tflops_active": tf, "rel_l2_vs_ours": err,
                         "nan_elements": nans})
    record = {"benchmark": "hopper_overlap",
              "env": _common.environment(torch.cuda.get_device_name()),
              "shape": {"B": B, "H": H, "S": S, "D": D, "grid": grid}, "rows": rows,
              "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
