#!/bin/bash
# FlashAttention-4 on the GPU machine, whose image lacks it. Its wheels (102 MB, of which
# nvidia-cutlass-dsl-libs-cu13 is 92 MB) exceed what one device call carries (64 MiB, the
# repository's own files included: 32.4 MB now), so they travel as one xz-compressed site folder
# (about 70 MB: xz packs the 237 MB of CuTe DSL libraries into 62 MB where the wheel's zip takes
# 92) cut into parts, one part per call on one warm machine, put together on the last call. The
# machine goes back after 30 s idle: make the calls back to back.
#
# Here, once, from the repository root (about 10 minutes: xz -9 on 2 cores):
#   bash benchmarks/fa4_wheels.sh prepare      # downloads into .fa4w/, packs, splits, prints the calls
# On the device, one call per part, in order (carry [".fa4w/NN"], NN = 01, 02, ...):
#   bash benchmarks/fa4_wheels.sh keep NN      # parks the part in /tmp/fa4parts
# and on the call carrying the last part:
#   bash benchmarks/fa4_wheels.sh keep NN && bash benchmarks/fa4_wheels.sh install && ...
# install checks the sha256 and unpacks the site folder into /tmp/site (the wheels have no .data
# parts, so unpacking is what pip --target does); that call and later ones on the same warm
# machine then use (CuTe DSL's packages sit behind a .pth file, which PYTHONPATH does not read)
#   export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
#   test -d /tmp/site/flash_attn || exit 3   # the machine went back: send the parts again
# diffusers is not in it (test_fa4.py and bench_attention.py do not import it): carry it as
# benchmarks/device_session.sh says for the other GPU tests.
set -euo pipefail
MIB=$((1024 * 1024))
PARTS=${FA4_PARTS:-/tmp/fa4parts}  # where the device keeps the parts between calls
SITE=${FA4_SITE:-/tmp/site}  # where install unpacks (device_session.sh's wheels go there too)
# What FA4 4.0.0b36 needs beyond the image (torch 2.11+cu130, einops, cuda-bindings, protobuf
# are there): its Requires-Dist, with CuTe DSL's CUDA 13 libraries for torch's cu130.
CUTE=4.8.1
WHEELS=("flash-attn-4==4.0.0b36" "nvidia-cutlass-dsl==$CUTE" "nvidia-cutlass-dsl-libs-base==$CUTE"
        "nvidia-cutlass-dsl-libs-core==$CUTE" "nvidia-cutlass-dsl-libs-cu13==$CUTE"
        "apache-tvm-ffi>=0.1.11,<0.2" "torch-c-dlpack-ext" "quack-kernels>=0.5.3")

prepare() {
  rm -rf .fa4w && mkdir -p .fa4w/whl
  git check-ignore -q .fa4w || { echo "fa4_wheels: .fa4w/ must be git-ignored (.gitignore)" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .fa4w/whl "${WHEELS[@]}"
  ls -la .fa4w/whl
  mkdir -p .fa4w/site
  for w in .fa4w/whl/*.whl; do unzip -q -o "$w" -d .fa4w/site; done
  tar cf - -C .fa4w/site . | xz -9 -T2 > .fa4w/fa4.tar.xz
  rm -rf .fa4w/whl .fa4w/site
  # Room per call: 64 MiB less the tree that travels (tracked + untracked-not-ignored files),
  # less 1 MiB for files added before the calls.
  local tree room total parts
  tree=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
  room=$((64 * MIB - tree - MIB))
  total=$(stat -c %s .fa4w/fa4.tar.xz)
  [ "$room" -gt $((4 * MIB)) ] || { echo "fa4_wheels: the tree is ${tree} bytes, leaving no room under 64 MiB per call" >&2; exit 1; }
  parts=$(( (total + room - 1) / room ))
  sha256sum .fa4w/fa4.tar.xz | cut -d' ' -f1 > .fa4w/sha256
  split -n "$parts" -d -a 2 .fa4w/fa4.tar.xz .fa4w/part.
  for f in .fa4w/part.*; do
    n=$(printf %02d $((10#${f##*.} + 1)))
    mkdir -p ".fa4w/$n" && mv "$f" ".fa4w/$n/part.$n" && cp .fa4w/sha256 ".fa4w/$n/"
  done
  rm .fa4w/fa4.tar.xz .fa4w/sha256
  echo "tree ${tree} B, room ${room} B per call, payload ${total} B in ${parts} parts:"
  du -b .fa4w/*/part.* | sed 's/^/  /'
  for f in .fa4w/*/part.*; do
    n=${f##*.}
    if [ "$n" != "$(printf %02d "$parts")" ]; then
      echo "call: carry [\".fa4w/$n\"], command: bash benchmarks/fa4_wheels.sh keep $n"
    else
      echo "last call: carry [\".fa4w/$n\"], command: bash benchmarks/fa4_wheels.sh keep $n && bash benchmarks/fa4_wheels.sh install && export PYTHONPATH=\$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages && ..."
    fi
  done
}

keep() {
  local n=${1:?keep NN}
  mkdir -p "$PARTS"
  cp ".fa4w/$n/part.$n" ".fa4w/$n/sha256" "$PARTS/"
  ls -la "$PARTS"
}

install() {
  cd "$PARTS"
  cat part.* > fa4.tar.xz
  if ! echo "$(cat sha256)  fa4.tar.xz" | sha256sum -c --quiet; then
    echo "fa4_wheels: the parts in $PARTS do not add up ($(ls part.* | tr '\n' ' ')); the machine may have gone back between calls: send every part again, back to back" >&2
    exit 3
  fi
  mkdir -p "$SITE"
  python3 -c "import sys, tarfile; tarfile.open('fa4.tar.xz').extractall(sys.argv[1])" "$SITE"
  rm fa4.tar.xz
  PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages python3 -c \
    "import cutlass, flash_attn.cute; print('flash_attn.cute', flash_attn.cute.__file__)"
}

"${1:?prepare | keep NN | install}" "${@:2}"
