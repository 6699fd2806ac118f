# Sourced by the GPU scripts (gpu_quality.sh, gpu_timing_diag.sh): $OUT, the carried wheels
# (.whl: diffusers and its two small dependencies, which the device image lacks) installed into
# /tmp/site and put on PYTHONPATH, unbuffered Python, GIT_SHA (the device's copy has no .git),
# and SLUG: the GPU's name as a file-name part (nvidia-h200).
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
export PYTHONUNBUFFERED=1 GIT_SHA=${GIT_SHA:-unknown}
SLUG=$(python3 -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
