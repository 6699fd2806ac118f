#!/bin/bash
# Train small-wan on one GPU (7 minutes of training + < 1 min of card), resuming from the shipped
# weights in scaling_attn_compile/assets/small-wan/ when there are any. Run from the repository
# root on the GPU machine; diffusers must import (carry .whl, see benchmarks/device_session.sh):
#
#   bash benchmarks/gpu_train_small_wan.sh             # -> $OUT/small-wan/ (7 files, <= 15 MB each)
#   MINUTES=2 bash benchmarks/gpu_train_small_wan.sh   # a shorter run
#   FRESH=1 bash benchmarks/gpu_train_small_wan.sh     # ignore the shipped weights, start from scratch
#
# Then copy $OUT/small-wan/* into scaling_attn_compile/assets/small-wan/ and commit: the next call
# continues from there (steps and the loss history add up; the card lists every run).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
export PYTHONUNBUFFERED=1
ASSETS=scaling_attn_compile/assets/small-wan
RESUME=()
if [ -z "${FRESH:-}" ] && [ -f "$ASSETS/diffusion_pytorch_model.safetensors" ]; then
  RESUME=(--resume "$ASSETS")
fi
# 9-minute wall clock: --minutes counts from the start (compile included), the card < 1 min.
timeout --signal=INT --kill-after=15 540 python3 -m scaling_attn_compile.tiny.train_small_wan \
  --out "$OUT/small-wan" --device cuda --minutes "${MINUTES:-7}" "${RESUME[@]}" "$@" 2>&1 | tail -n 400
echo "rc ${PIPESTATUS[0]}"
ls -la "$OUT/small-wan"
