#!/bin/bash
# Why the small-wan quality study's ms/step does not follow density (issue 13 Pareto bar), in
# one device call of < 9 min. Run from the repository root on the GPU machine, carrying .whl
# (the diffusers wheels: tools/device-wheels.sh puts them there):
#   GIT_SHA=<sha> bash benchmarks/gpu_timing_diag.sh
#
# What the H200 showed (commit c6c3987, CUDA events around the plain compiled call): WEST+FAST
# 5.83 / 5.04 / 4.17 / 4.35 ms at density 0.5 / 0.35 / 0.25 / 0.15 (a floor near 4.0 ms), STA
# 8.0 ms at 0.15 but 4.36 at 0.25, dense through our kernel 7.60. This run times west_fast,
# west_uniform, sta, radial, svg_split, west_fast_weighted at 0.35 / 0.25 / 0.15 and records,
# per (method, density), in results[*].timing:
#   ms_per_step        one captured CUDA graph of the step, replayed per step (checked against
#                      the plain call first); ms_per_step_wall: the old clock. If the gap between
#                      them is most of the step, the old floor was the host (hypothesis a).
#   profile            one profiled step: our kernels' CUDA ms vs all kernels', launches, GPU
#                      idle ms inside the step (a again).
#   work               blocks the tables make the kernel visit at the timed timesteps (c), and
#                      mean / max key blocks per query row (d: the longest row sets the tail).
#   autotune           the template's autotune timings where this compile lowered it (none: an
#                      FX graph cache hit reused the first method's code and choice).
#   config_sweep       every kernel config on this method's tables, eager launcher, summed over
#                      the 8 layers, vs on all-blocks masks (what the autotune benchmarks): if
#                      the best differs and wins by much, the one shared choice is the cause (b).
#   timing_retuned     sta and radial at 0.25 / 0.15 (RETUNE=, empty: none) once more in a fresh Inductor cache (own
#                      autotune, ~30 s of compile each).
# Expected time on the H200 (from the c6c3987 records): ~2 min setup (load, calibration 8 s,
# response fit 22-40 s, 3 dense references 45-55 s), ~10 s per (method, density) (4 s compile,
# 2 x 3 x 50 timed steps, profile, ~2 s sweep; the sweep's first call compiles the 6 configs),
# ~35 s per retuned item (a cold compile): ~7 min. SIGINT at 8 min (LIMIT_S=480) keeps every
# finished row (the JSON is rewritten after each item; densities run 0.25, 0.35, 0.15, so a cut
# drops the 0.15 items first). Writes into $OUT: timing-diag-<gpu>-small-wan.json, its .png,
# log.txt (with the table of quality.timing_diag.diag_table at the end).
set -u
source "$(dirname "$0")/_device_env.sh"  # OUT, wheels, PYTHONPATH, GIT_SHA, SLUG
JSON=$OUT/timing-diag-$SLUG-small-wan.json
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/log.txt"
timeout --signal=INT --kill-after=20 "${LIMIT_S:-480}" \
  python3 benchmarks/bench_quality.py --model small-wan --timing-only --prompts 2 --seeds 1 \
    --steps 50 --densities "${DENSITIES:-0.35,0.25,0.15}" \
    --methods "${METHODS:-west_fast,west_uniform,sta,radial,svg_split,west_fast_weighted}" \
    --retune-also "${RETUNE-sta@0.25,sta@0.15,radial@0.25,radial@0.15}" --sweep-configs \
    --skip-claims --out-quality "$JSON" ${EXTRA:-} 2>&1 | tee -a "$OUT/log.txt"
echo "=== rc ${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"
python3 -c "
import json, sys
from scaling_attn_compile.quality.timing_diag import diag_table
print(diag_table(json.load(open(sys.argv[1]))))" "$JSON" 2>&1 | tee -a "$OUT/log.txt"
ls -la "$OUT"
