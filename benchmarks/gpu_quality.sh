#!/bin/bash
# The quality study on one GPU (issue 13 item 3): every method at equal computed density and at
# equal measured time per step, on held-out prompts, against the model's own dense videos.
# Run from the repository root on the GPU machine, carrying .whl (the device image has no
# diffusers; put the wheels there with: python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata zipp).
#
# One call does it all within BUDGET_MINUTES (default 7.5), cutting what does not fit:
#   GIT_SHA=<sha> bash benchmarks/gpu_quality.sh small-wan
# The whole matrix for small-wan does not fit one 10-minute call, so split it (PART=quality:
# videos, no compile, ~5 s per (method, density) on the H200; PART=timing: compiles and times, no
# videos) and join the JSONs of one token order with
#   python benchmarks/bench_quality.py --merge A B C ... --out-quality OUT.
# The token order is bench_quality's --token-order, default auto (tile on small-wan, as
# `scaling-attn west`); the raster record (quality-<gpu>-small-wan.json) was made when raster
# was the default: these calls reproduce it with R="--token-order raster" (EXTRA="$R"), the
# -tile record's call says tile:
#   GIT_SHA=<sha> PART=quality TAG=-q BUDGET_MINUTES=8.3 EXTRA="$R" \
#       METHODS=west_fast,west_fast_curve,west_fast_fidelity,west_uniform,dense_warmup,radial,sta,svg_split \
#       bash benchmarks/gpu_quality.sh small-wan                                          # ~4 min
#   GIT_SHA=<sha> PART=quality TAG=-q2 BUDGET_MINUTES=4.3 EXTRA="$R" \
#       METHODS=west_fast_weighted,west_fast_weighted_half,west_fast_warmup,energy_cumulative,energy_blasst,west_fast_energy \
#       bash benchmarks/gpu_quality.sh small-wan                                          # ~4 min
#   GIT_SHA=<sha> PART=quality TAG=-tile BUDGET_MINUTES=4.3 EXTRA="--token-order tile" \
#       METHODS=west_fast,west_uniform,dense_warmup,radial,sta,svg_split,west_fast_weighted,west_fast_warmup \
#       bash benchmarks/gpu_quality.sh small-wan                                          # ~4 min
#   GIT_SHA=<sha> PART=timing TAG=-tm EXTRA="$R" \
#       METHODS=west_fast,west_uniform,dense_warmup,radial,sta,svg_split \
#       bash benchmarks/gpu_quality.sh small-wan                                          # ~4 min
#   GIT_SHA=<sha> PART=timing TAG=-te1 EXTRA="$R" METHODS=energy_cumulative,energy_blasst,west_fast_energy \
#       DENSITIES=0.35,0.25 bash benchmarks/gpu_quality.sh small-wan                      # ~5 min
#   GIT_SHA=<sha> PART=timing TAG=-te2 EXTRA="$R" METHODS=energy_cumulative,energy_blasst,west_fast_energy \
#       DENSITIES=0.5,0.15 bash benchmarks/gpu_quality.sh small-wan                       # ~5 min
# Timing (quality/timing.py): ms_per_step is one captured CUDA graph of the step replayed per step
# (checked against the plain compiled call first; where capture fails, the plain call's clock and
# the reason); results[*].timing also has ms_per_step_wall (the clock before), one profiled step
# (attention vs all kernel ms, launches, GPU idle) and the blocks the tables visit. EXTRA passes
# the diagnostics' flags: --no-graphs, --no-profile, --retune-per-method, --retune-also
# sta@0.15,..., --sweep-configs; benchmarks/gpu_timing_diag.sh runs them in one call.
# Two runs in one call need their own OUT folders (each writes log.txt).
#   GIT_SHA=<sha> bash benchmarks/gpu_quality.sh tiny-wan                   # smoke run, ~4 min
#
# Writes into $OUT: quality-<gpu>-<model><TAG>.json (rewritten after every method and density, so
# a run cut short keeps what it finished), its .png, and log.txt: 3 files (the device returns 8).
#
# Cost at small-wan's native grid (16x32x32 = 16,384 tokens, 8 layers x 4 heads x 64), measured
# on the H200 (commit 9ac337f): one generation of 8 prompts x 2 seeds x 50 steps 7.8 s, a
# (method, density) with its metrics 10-20 s; a dense step 7.6 ms through our kernel, 8.4 ms
# through Inductor's SDPA. Compiles dominate: the first of the model 32 s; a method whose tables
# had another shape than the last compile's 24-32 s, one with the same shape 4 s (so every
# method's tables are now padded to one shape; not yet measured on the GPU); an energy-filter
# method 40 s (its rule and threshold are template constants: one new kernel per threshold). 9 methods x 4 densities is ~36 x 10 s of videos plus
# 24 x ~6 s + 12 x ~40 s of compiles: ~17 min, hence the split. In one call the budget plan
# keeps densities 0.25 and 0.35 (the bars') first, then cuts prompts and seeds only where that
# makes it fit; a (method, density) whose expected time would overrun is skipped and says so.
set -u
MODEL=${1:?model: tiny-wan | small-wan}
source "$(dirname "$0")/_device_env.sh"  # OUT, wheels, PYTHONPATH, GIT_SHA, SLUG
BUDGET=${BUDGET_MINUTES:-7.5}
JSON=$OUT/quality-$SLUG-$MODEL${TAG:-}.json
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/log.txt"
case "${PART:-all}" in
  all) MODE="" ;;
  quality) MODE="--no-time" ;;
  timing) MODE="--timing-only" ;;
  *) echo "PART: expected all, quality or timing, got ${PART}"; exit 2 ;;
esac
METHODS_ARG=()
[ -n "${METHODS:-}" ] && METHODS_ARG=(--methods "$METHODS")
# SIGINT at the budget + 60 s: Python stops where it is, the JSON holds every finished row.
timeout --signal=INT --kill-after=20 "$(python3 -c "print(int(60 * $BUDGET + 60))")" \
  python3 benchmarks/bench_quality.py --model "$MODEL" --prompts "${PROMPTS:-8}" \
    --seeds "${SEEDS:-2}" --steps "${STEPS:-50}" --densities "${DENSITIES:-0.5,0.35,0.25,0.15}" \
    "${METHODS_ARG[@]}" $MODE --budget-minutes "$BUDGET" --skip-claims --out-quality "$JSON" \
    ${EXTRA:-} 2>&1 | tee -a "$OUT/log.txt"
echo "=== rc ${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"
ls -la "$OUT"
