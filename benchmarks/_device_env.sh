# Sourced by the GPU scripts (gpu_quality.sh, gpu_timing_diag.sh, device_session.sh,
# gpu_hardening.sh): $OUT, the carried wheels (.whl: diffusers and its two small dependencies,
# which the device image lacks) installed into /tmp/site, PYTHONPATH (the repository and
# /tmp/site), unbuffered Python, GIT_SHA (the device's copy has no .git), SLUG: the GPU's name
# as a file-name part (nvidia-h200), LOG ($OUT/log.txt), and two functions: `step` (one
# command with a time limit, logged) and `log_device` (GPU, driver, torch, Triton, commit).
# Sourced by hand, export the commit first: `export GIT_SHA=<sha>; source benchmarks/_device_env.sh`.
# A prefix (`GIT_SHA=<sha> source ...`) lasts only while the file runs, so the steps after it saw
# none and the records took whatever `git rev-parse` found (2026-12-06: a stale commit).
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site
export PYTHONUNBUFFERED=1 GIT_SHA=${GIT_SHA:-unknown}
SLUG=$(python3 -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
LOG=$OUT/log.txt

step() {  # step SECONDS COMMAND...: run with a limit, log it, never stop the session
  local limit=$1; shift
  echo "=== [$(date +%T)] $* (limit ${limit}s)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== rc ${PIPESTATUS[0]}" | tee -a "$LOG"
}

log_device() {  # what a run's log opens with
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$LOG"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"
  echo "commit $GIT_SHA" | tee -a "$LOG"
}
