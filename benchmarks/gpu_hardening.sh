#!/bin/bash
# Issue 16 (hardening), the kernel / op / demo parts, on one GPU. Run from the repository root on
# the GPU machine, carrying .whl (the diffusers, importlib_metadata and zipp wheels the GPU image
# lacks). The device's copy has no .git: pass the commit as GIT_SHA. For the clamp-cost timing,
# put the kernel file from before the hardening next to the wheels first (here, not there):
#
#   git show 0500abc:scaling_attn_compile/kernels/block_sparse_attention.py > .whl/before_block_sparse_attention.py
#   GIT_SHA=<sha> bash benchmarks/gpu_hardening.sh                   # all four stages, ~8 min
#   GIT_SHA=<sha> bash benchmarks/gpu_hardening.sh tests demo        # or some of them
#
# Stages (each step has its own time limit; everything lands in $OUT, 6 files):
#   tests     GPU tests of the files this work touched (bad tables, kernel, demo)
#   demo      scaling-attn demo --device cuda at the default grid (12x64x64) and at 16x64x64,
#             shortened (8 steps, 2 prompts): $OUT/demo-<grid>/results.{json,md}
#   sanitize  compute-sanitizer memcheck and racecheck over benchmarks/sanitize_bad_tables.py (the
#             kernel once per config on bad tables); prints what the tool says, or that it refused
#             the device (it does on gVisor machines: "Device not supported")
#   clamp     benchmarks/bench_clamp.py: the kernel before vs after at the 1.3B shape -> $OUT/clamp.json
set -u
: "${GIT_SHA:?pass GIT_SHA=<commit>}"
source "$(dirname "$0")/_device_env.sh"  # OUT, wheels, PYTHONPATH, GIT_SHA, LOG, step, log_device
BEFORE=${BEFORE:-.whl/before_block_sparse_attention.py}
log_device

for stage in "${@:-tests demo sanitize clamp}"; do for s in $stage; do
case "$s" in
tests)
  step 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_bad_tables.py \
    tests/test_kernel.py tests/test_demo.py
  ;;
demo)
  for grid in default 16,64,64; do
    dir="$OUT/demo-${grid//,/x}"
    step 120 python3 -m scaling_attn_compile.cli demo --device cuda --out "$dir" --steps 8 \
      --fast-capture-steps 8 --num-prompts 2 --quiet $([ "$grid" = default ] || echo --grid "$grid")
    find "$dir" -type f ! -name 'results.*' -delete 2>/dev/null  # the device returns 8 files
  done
  ;;
sanitize)
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  if [ -z "$CS" ]; then
    echo "compute-sanitizer: not found on this machine" | tee -a "$LOG"
  else
    first=$(($(wc -l < "$LOG") + 1))
    for tool in memcheck racecheck; do
      step 150 "$CS" --tool "$tool" --error-exitcode 1 python3 benchmarks/sanitize_bad_tables.py
    done
    echo "--- sanitizer summary: what each tool found, or why it refused the device" | tee -a "$LOG"
    tail -n +"$first" "$LOG" | grep -E "^=== |SUMMARY|not supported|[Ee]rror 999|Invalid|Hazard|FAIL|outputs" \
      | tee "$OUT/sanitizer-summary.txt"
  fi
  ;;
clamp)
  if [ -f "$BEFORE" ]; then
    step 200 python3 benchmarks/bench_clamp.py --before "$BEFORE" --out "$OUT/clamp.json"
  else
    echo "clamp: no $BEFORE (see the header); timing the current kernel only" | tee -a "$LOG"
    step 120 python3 benchmarks/bench_clamp.py --out "$OUT/clamp.json"
  fi
  ;;
*)
  echo "unknown stage $s: tests | demo | sanitize | clamp" | tee -a "$LOG"
  ;;
esac
done; done
