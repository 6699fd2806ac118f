"""Why is the 8-bit kernel slower than the bf16 one? Their sm_90 machine code, side by side,
on any machine (Triton's compiler, ptxas and nvdisasm need no GPU).

Issue 15 measured (H100, 2026-12-05, ``results/attention-q8-nvidia-h100-80gb-hbm3.json``) the
8-bit kernel at 0.65-0.69x the bf16 one (dense 1.3B: FP8 17.6 ms, INT8 18.3, bf16 12.0 with TMA
and 13.7 without). This compiles both kernels as a launch at the Wan 1.3B shape specialises them
(``testing.compile_for_sm90``), disassembles the cubin and counts, per kernel: instructions by
opcode (tensor-core ``HGMMA`` / ``QGMMA`` / ``IGMMA``, byte permutes ``PRMT`` and shuffles
``SHFL``, which move P from the accumulator layout into the 8-bit operand layout, float
multiplies and adds), shared memory, and the async-copy wait at the top of the KV loop
(``DEPBAR.LE SB0, N``: how many copy groups may still be in flight when a block's math starts;
0 means the next block's K/V load does not overlap this block's math).

    python benchmarks/kernel_sass.py [--out benchmarks/results/kernel-sass-sm90.json]

The committed record was compiled with the GPU image's Triton (3.6.0) rather than this machine's:
``pip install --no-deps --target /tmp/t36 triton==3.6.0`` then ``PYTHONPATH=/tmp/t36``.
Counts are of the whole kernel: the masked byte loads of the partial last block (no TMA) account
for most of the 8-bit rows' LDG and PRMT (with TMA, 26 LDG and 32 PRMT are left).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import triton  # noqa: E402

from scaling_attn_compile.kernels import block_sparse_attention as KB  # noqa: E402
from scaling_attn_compile.kernels import block_sparse_attention_q8 as KQ  # noqa: E402
from scaling_attn_compile.kernels import launch as L  # noqa: E402
from scaling_attn_compile.kernels.launch_q8 import PV_MODES  # noqa: E402
from scaling_attn_compile.testing import compile_for_sm90, sm90_launch_hints  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
S = 32760  # Wan 1.3B/480p
KEYS = ("HGMMA", "QGMMA", "IGMMA", "PRMT", "SHFL", "I2FP", "F2FP", "FMUL", "FFMA", "FADD",
        "MUFU", "LDGSTS", "LDG", "LDS", "STS", "BAR", "LDL", "STL")  # LDL/STL: register spills


def bf16_kernel(stages: int, tma: bool = False, energy: int = 0):
    pointers, floats, div16, unit = sm90_launch_hints("bf16")
    const = dict(L.launch_meta(S, 8, 2, 128), BLOCK_M=128, USE_TMA=tma, WARP_SPECIALIZE=False,
                 ENERGY_RULE=energy, WRITE_SKIPPED=False, HAS_KV_LENS=False,
                 HAS_LAUNCH_ORDER=False, **unit)
    return compile_for_sm90(KB._bsa_forward_kernel, pointers, floats, div16, const, num_warps=8,
                            num_stages=stages)


def q8_kernel(precision: str, stages: int, tma: bool = False, pv: str = "two-level",
              energy: int = 0):
    pointers, floats, div16, unit = sm90_launch_hints(precision)
    const = dict(L.launch_meta(S, 8, 2, 128), BLOCK_M=128, QK_INT8=precision == "int8",
                 USE_TMA=tma, PV_MODE=PV_MODES[pv], ENERGY_RULE=energy, **unit)
    return compile_for_sm90(KQ._bsa_q8_forward_kernel, pointers, floats, div16, const,
                            num_warps=8, num_stages=stages)


MMA = ("HGMMA", "QGMMA", "IGMMA")
OPCODE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
# Hopper, per SM and clock: 4 warp schedulers issue one warp instruction each; the MUFU unit
# (EX2) returns 16 results, so one warp instruction of it holds it 2 clocks.
ISSUE_PER_CLK, MUFU_LANES_PER_CLK = 4, 16


def kv_loop_budget(sass: str, warps: int = 8) -> dict:
    """The KV loop's body (the shortest backward branch whose range holds tensor-core ops: one
    block's Q.K^T, softmax and P.V) and what it costs one SM per block, where one CTA of
    ``warps`` warps is resident: issue clocks (``warps`` x instructions / 4 schedulers) and MUFU
    clocks (``warps`` x MUFU x 32 lanes / 16). The larger of the two bounds the softmax phase
    where nothing overlaps it with the MMA (the bf16 MMA of one block: about 1,970 clocks)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"(\.L_x_\d+):", line.strip()))}
    best = None
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i:
            body = lines[labels[m.group(1)]:i + 1]
            if any(op in b for b in body for op in MMA) and (best is None or len(body) < len(best)):
                best = body
    if best is None:
        return {}
    ops = collections.Counter(m.group(1).split(".")[0] for b in best if (m := OPCODE.match(b)))
    n = sum(ops.values())
    return {"loop_instructions": n, "loop_MUFU": ops.get("MUFU", 0),
            "loop_mma": sum(ops.get(op, 0) for op in MMA),
            "loop_issue_clocks_per_sm": warps * n // ISSUE_PER_CLK,
            "loop_mufu_clocks_per_sm": warps * ops.get("MUFU", 0) * 32 // MUFU_LANES_PER_CLK,
            "loop_top": dict(ops.most_common(8))}


def sass_facts(kernel) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(BIN / "nvdisasm"), "-c", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        if m := OPCODE.match(line):
            ops[m.group(1).split(".")[0]] += 1
    # The KV loop's first wait: the first DEPBAR after the first loop label.
    loop = sass[sass.index(".L_x_1:"):] if ".L_x_1:" in sass else sass
    wait = re.search(r"DEPBAR\.LE SB0, (0x[0-9a-f]+)", loop)
    return {"shared_bytes": kernel.metadata.shared, "instructions": sum(ops.values()),
            "kv_loop_copy_groups_in_flight": int(wait.group(1), 16) if wait else None,
            **{k: ops.get(k, 0) for k in KEYS}, **kv_loop_budget(sass)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows = {}
    for name, build in (("bf16 (no TMA), 3 stages", lambda: bf16_kernel(3)),
                        ("bf16, TMA, 3 stages", lambda: bf16_kernel(3, True)),
                        ("fp8, 2 stages", lambda: q8_kernel("fp8", 2)),
                        ("fp8, 3 stages", lambda: q8_kernel("fp8", 3)),
                        ("int8, 3 stages", lambda: q8_kernel("int8", 3)),
                        ("fp8, TMA, 3 stages", lambda: q8_kernel("fp8", 3, True)),
                        ("int8, TMA, 3 stages", lambda: q8_kernel("int8", 3, True)),
                        ("int8, TMA, 4 stages", lambda: q8_kernel("int8", 4, True)),
                        # the rows above: two-level P.V (the default); the opt-in forms
                        # (issue 15): the running accumulator, and deferred two-level
                        ("int8, 3 stages, running P.V", lambda: q8_kernel("int8", 3, pv="running")),
                        ("fp8, 2 stages, running P.V", lambda: q8_kernel("fp8", 2, pv="running")),
                        ("int8, 3 stages, deferred P.V",
                         lambda: q8_kernel("int8", 3, pv="deferred")),
                        ("fp8, 2 stages, deferred P.V", lambda: q8_kernel("fp8", 2, pv="deferred")),
                        ("fp8, 3 stages, deferred P.V",
                         lambda: q8_kernel("fp8", 3, pv="deferred")),
                        # the energy filter (BLASST; the loop's extra compare and branch); with
                        # it the 8-bit autotuner races two-level only: deferred spills
                        ("bf16, TMA, 3 stages, BLASST", lambda: bf16_kernel(3, True, 2)),
                        ("int8, 3 stages, BLASST", lambda: q8_kernel("int8", 3, energy=2)),
                        ("int8, 3 stages, deferred P.V, BLASST",
                         lambda: q8_kernel("int8", 3, pv="deferred", energy=2))):
        rows[name] = sass_facts(build())
        print(f"{name:26s} " + " ".join(f"{k}={v}" for k, v in rows[name].items()), flush=True)
    record = {"benchmark": "kernel_sass", "shape": "Wan 1.3B/480p, S=32760, D=128, 8 warps, "
              "BLOCK_M=128", "triton": triton.__version__, "rows": rows,
              "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
