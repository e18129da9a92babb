#!/usr/bin/env bash
# Compile-checks masknorm's CUDA build on a machine without a GPU (CI):
# a separate venv with torch's CUDA 13.0 build (torch 2.14.1), nvcc 13.0, and
# the CUDA library headers that torch's wheel ships (nvidia/cu13/include, which
# the local toolkit lacks). Builds the extension with its CUDA kernels for one
# architecture (sm_90, to keep it to a few minutes) and checks that the CUDA
# kernels are in the library. Nothing is run: there is no GPU.
#   tools/cuda_compile_check.sh [venv folder (default /tmp/masknorm-cuda-venv)]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/masknorm-cuda-venv}
CUDA=${CUDA_HOME:-/usr/local/cuda-13.0}
if [ ! -x "$CUDA/bin/nvcc" ]; then
  echo "cuda_compile_check: no nvcc at $CUDA/bin/nvcc" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || python -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.14.1 ninja setuptools wheel
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
BUILD=$(mktemp -d)
start=$(date +%s)
CUDA_HOME=$CUDA PATH=$CUDA/bin:$PATH CPATH=$SITE/nvidia/cu13/include \
  TORCH_CUDA_ARCH_LIST=9.0 MASKNORM_CUDA=1 MASKNORM_CPU_ISAS= MAX_JOBS=${MAX_JOBS:-2} \
  "$VENV/bin/python" setup.py -q build_ext -b "$BUILD/lib" -t "$BUILD/tmp" > "$BUILD/log" 2>&1 \
  || { tail -60 "$BUILD/log"; exit 1; }
LIB=$(ls "$BUILD"/lib/masknorm/_C.*.so)
# The CUDA kernels and their registration must be in the library.
nm -C "$LIB" > "$BUILD/symbols"
for kernel in row_norm_forward_kernel row_norm_backward_kernel reduce_channels_last_kernel elemt_channels_first_kernel merge_stats_kernel; do
  grep -q "masknorm::cuda::.*$kernel" "$BUILD/symbols" || { echo "cuda_compile_check: $kernel missing from $LIB" >&2; exit 1; }
done
readelf -S "$LIB" > "$BUILD/sections"
grep -q nv_fatbin "$BUILD/sections" || { echo "cuda_compile_check: no GPU code (.nv_fatbin) in $LIB" >&2; exit 1; }
echo "cuda_compile_check: CUDA build of masknorm compiled and linked in $(( $(date +%s) - start )) s ($LIB)"
rm -rf "$BUILD"
