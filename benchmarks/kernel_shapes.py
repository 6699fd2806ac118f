"""Question: why does the kernel reach cuDNN's dense throughput at the 14B shape (H=40,
S=75,600) but only ~89% of it at the 1.3B shape (H=12, S=32,760)? Three parts, each a suspect:

- shapes: dense, each Wan sequence length with the other's head count, S a multiple of 128, the
  diffusers layout and a contiguous one, against cuDNN SDPA on the same tensors;
- patterns (``--patterns-only``): the same loop length (256 blocks per row) at the long sequence,
  and the short sequence with one K/V shared by every head (the L2 working set);
- words (``--words-only``): the mask row's word vector padded to 8 .. 64 words at S=32,760.

Our TMA config and the default non-TMA config, pinned (no autotuning); median of ``do_bench``
with enough repetitions for the long shapes.

    python benchmarks/kernel_shapes.py [--patterns-only | --words-only] [--out FILE]
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from scaling_attn_compile.contract.masks import add_diagonal, num_blocks, pack_blocks, unpack_blocks
from scaling_attn_compile.contract.tables import uniform_tables
from scaling_attn_compile.kernels.launch import KernelConfig, block_sparse_attention_forward

# (H, S): the two Wan shapes, each with the other's head count, and S a multiple of 128.
CASES = [(12, 32760), (40, 32760), (12, 75600), (40, 75600), (12, 32768), (24, 32760)]
CONFIGS = {"tma": KernelConfig(128, 8, 3, use_tma=True), "plain": KernelConfig(128, 8, 3)}


def gpu_qkv(H: int, S: int, D: int):
    """q, k, v as diffusers passes them, ``(B, H, S, D)`` views of ``(B, S, H, D)`` memory, B=1;
    drawn on the GPU (make_qkv's CPU generator takes seconds at these sizes)."""
    return tuple(torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16).permute(0, 2, 1, 3)
                 for _ in range(3))


def time_configs(row: dict, q, k, v, masks, lt, bb, flops: int, rep: int) -> dict:
    """Add ``<config>_ms`` and ``<config>_tflops`` for each of CONFIGS to ``row``."""
    ts = torch.tensor([500.0], device="cuda")
    out = torch.empty_like(q)
    for name, cfg in CONFIGS.items():
        ms = do_bench(lambda c=cfg: block_sparse_attention_forward(
            q, k, v, masks, lt, bb, ts, out, q.shape[-1] ** -0.5, c), rep=rep,
            return_mode="median")
        row[f"{name}_ms"], row[f"{name}_tflops"] = ms, flops / ms / 1e9
    return row


def print_row(row: dict) -> None:
    print(" ".join(f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}"
                   for key, val in row.items()), flush=True)


def time_case(H: int, S: int, layout: str, D: int = 128) -> dict:
    """cuDNN and our two configs, dense, on one (H, S, layout)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = gpu_qkv(H, S, D)
    if layout == "bhsd":
        q, k, v = (t.contiguous() for t in (q, k, v))
    flops = 4 * H * S * S * D
    rep = max(200, int(6e-12 * flops))  # ms: a few repetitions of the longest shape
    masks, lt, bb = uniform_tables(1, H, (1, 1, S), 1.0).to("cuda").layer(0)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), rep=rep,
                      return_mode="median")
    row = {"H": H, "S": S, "layout": layout, "cudnn_ms": ms, "cudnn_tflops": flops / ms / 1e9}
    return time_configs(row, q, k, v, masks, lt, bb, flops, rep)


# (H, S, kept blocks per row, K/V shared by all heads): the same loop length (256 blocks) at the
# long sequence, in a band around the diagonal or the first 256 blocks (every program of a head
# reads the same 16.8 MB, as at S=32,760), and the short sequence with one K/V for all heads.
PATTERNS = [(12, 32760, "dense", False), (12, 32760, "dense", True),
            (12, 75600, "first256", False), (12, 75600, "band256", False),
            (12, 75600, "dense", False)]


def pattern_masks(H: int, S: int, pattern: str) -> torch.Tensor:
    nb = num_blocks(S)
    u = torch.arange(nb)[:, None]
    j = torch.arange(nb)[None, :]
    if pattern == "dense":
        block = torch.ones(nb, nb, dtype=torch.bool)
    elif pattern == "first256":
        block = (j < 256).expand(nb, nb)
    elif pattern == "band256":
        lo = (u - 128).clamp(0, nb - 256)
        block = (j >= lo) & (j < lo + 256)
    else:
        raise ValueError(pattern)
    return pack_blocks(add_diagonal(block))[None, None].expand(H, 1, -1, -1).contiguous()


def time_pattern(H: int, S: int, pattern: str, shared_kv: bool, D: int = 128) -> dict:
    """Our two configs on one mask pattern; throughput counted on the kept blocks (each as a
    full 128 x 128 block)."""
    q, k, v = gpu_qkv(H, S, D)
    if shared_kv:  # stride 0 over heads: all heads read head 0's K and V
        k, v = k[:, :1].expand_as(k), v[:, :1].expand_as(v)
    masks = pattern_masks(H, S, pattern).to("cuda")
    kept = int(unpack_blocks(masks[:, 0], num_blocks(S)).sum())
    lt = torch.zeros(1, H, dtype=torch.int32, device="cuda")
    bb = torch.zeros(0, dtype=torch.float32, device="cuda")
    flops = 4 * kept * 128 * 128 * D
    row = {"H": H, "S": S, "pattern": pattern, "shared_kv": shared_kv,
           "blocks_per_row": kept / H / num_blocks(S)}
    return time_configs(row, q, k, v, masks, lt, bb, flops, max(200, int(6e-12 * flops)))


def words_sweep(H: int = 12, S: int = 32760, D: int = 128) -> list[dict]:
    """Dense, both configs, with the mask row's word vector padded to at least 1 (none: 8 words
    at S=32,760), 16, 32 or 64 words; each output checked against the unpadded plain config."""
    from scaling_attn_compile.kernels import launch as K

    q, k, v = gpu_qkv(H, S, D)
    ts = torch.tensor([500.0], device="cuda")
    masks, lt, bb = uniform_tables(1, H, (1, 1, S), 1.0).to("cuda").layer(0)
    flops = 4 * H * S * S * D
    rows, default = [], K.MIN_WORDS_P2
    out, ref = torch.empty_like(q), torch.empty_like(q)
    K.MIN_WORDS_P2 = 1
    block_sparse_attention_forward(q, k, v, masks, lt, bb, ts, ref, D**-0.5, CONFIGS["plain"])
    try:
        for p2 in (1, 16, 32, 64):
            K.MIN_WORDS_P2 = p2
            row = {"H": H, "S": S, "min_words_p2": p2}
            for name, cfg in CONFIGS.items():
                run = lambda c=cfg: block_sparse_attention_forward(  # noqa: E731
                    q, k, v, masks, lt, bb, ts, out, D**-0.5, c)
                run()
                row[f"{name}_max_diff"] = (out.float() - ref.float()).abs().max().item()
                ms = do_bench(run, rep=300, return_mode="median")
                row[f"{name}_ms"], row[f"{name}_tflops"] = ms, flops / ms / 1e9
            rows.append(row)
            print_row(row)
    finally:
        K.MIN_WORDS_P2 = default
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--patterns-only", action="store_true")
    ap.add_argument("--words-only", action="store_true")
    args = ap.parse_args(argv)
    every = not (args.patterns_only or args.words_only)
    # Each row is printed as it is measured: a run cut short by its time limit keeps its log.
    words_rows = words_sweep() if every or args.words_only else []
    pattern_rows, rows = [], []
    for case in PATTERNS if every or args.patterns_only else []:
        pattern_rows.append(time_pattern(*case))
        print_row(pattern_rows[-1])
    for H, S in CASES if every else []:
        for layout in ("bshd", "bhsd"):
            rows.append(time_case(H, S, layout))
            print_row(rows[-1])
    print("\n| H | S | layout | cuDNN TFLOP/s | ours TMA | ours plain | TMA / cuDNN |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['H']} | {r['S']} | {r['layout']} | {r['cudnn_tflops']:.0f} | "
              f"{r['tma_tflops']:.0f} | {r['plain_tflops']:.0f} | "
              f"{r['tma_tflops'] / r['cudnn_tflops']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows, "patterns": pattern_rows,
                       "words_sweep": words_rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
