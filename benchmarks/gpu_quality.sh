#!/bin/bash
# The quality study on one GPU (issue 13 item 3): every method at equal computed density and at
# equal measured time per step, on held-out prompts, against the model's own dense videos.
# Run from the repository root on the GPU machine, carrying .whl (the device image has no
# diffusers: bash ../shared/tools/device-wheels.sh puts the wheels there):
#
#   GIT_SHA=<sha> bash benchmarks/gpu_quality.sh small-wan                 # ~8 min on an H200
#   GIT_SHA=<sha> DENSITIES=0.5,0.15 TAG=-b bash benchmarks/gpu_quality.sh small-wan   # 2nd call
#   GIT_SHA=<sha> bash benchmarks/gpu_quality.sh tiny-wan                  # smoke run, ~3 min
#
# then, here: python benchmarks/bench_quality.py --merge A.json B.json --out-quality OUT.json
#
# Writes into $OUT: quality-<gpu>-<model><TAG>.json (rewritten after every method and density, so
# a run cut short keeps what it finished), its .png, and log.txt: 3 files (the device returns 8).
#
# Cost at small-wan's native grid (16x32x32 = 16,384 tokens, 8 layers x 4 heads x 64): dense
# attention is 4 S^2 D H = 0.27 TFLOP per layer and video, 2.2 TFLOP per step; 8 prompts x 2
# seeds x 50 steps = 1,760 TFLOP per batch, ~6 s at ~300 TFLOP/s (head_dim 64). 1 dense + 9
# methods x 4 densities: ~3 min of generation (the energy-only methods visit every block, the
# others ~0.15-0.5 of them). Timing compiles each (method, density) anew: ~36 compiles of ~5-15 s
# (Dynamo + Inductor; the Triton and FX caches are warm after the first) plus 4 x 50 timed steps.
# That is more than 8 minutes, so --budget-minutes (BUDGET_MINUTES, default 7.5) keeps densities
# 0.25 and 0.35 (the bars') first, cuts the others, then prompts, then seeds, as its estimate
# needs, and says so in the record ("budget"); DENSITIES=0.5,0.15 in a second call adds the rest.
set -u
MODEL=${1:?model: tiny-wan | small-wan}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
export PYTHONUNBUFFERED=1 GIT_SHA=${GIT_SHA:-unknown}
BUDGET=${BUDGET_MINUTES:-7.5}
SLUG=$(python3 -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
JSON=$OUT/quality-$SLUG-$MODEL${TAG:-}.json
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/log.txt"
# SIGINT at the budget + 60 s: Python stops where it is, the JSON holds every finished row.
timeout --signal=INT --kill-after=20 "$(python3 -c "print(int(60 * $BUDGET + 60))")" \
  python3 benchmarks/bench_quality.py --model "$MODEL" --prompts "${PROMPTS:-8}" \
    --seeds "${SEEDS:-2}" --steps "${STEPS:-50}" --densities "${DENSITIES:-0.5,0.35,0.25,0.15}" \
    --budget-minutes "$BUDGET" --skip-claims --out-quality "$JSON" ${EXTRA:-} 2>&1 \
  | tee -a "$OUT/log.txt"
echo "=== rc ${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"
ls -la "$OUT"
