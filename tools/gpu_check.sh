#!/usr/bin/env bash
# On a machine with a CUDA GPU (the lent H100/H200, or yours): build masknorm
# with its CUDA kernels, then run what is asked, writing logs under $OUT
# (default ./gpu_results):
#   tools/gpu_check.sh cuda-tests   tests/test_cuda.py (fails if the CUDA kernels were not built)
#   tools/gpu_check.sh suite        the whole test suite (CUDA-parametrized tests run on the GPU)
#   tools/gpu_check.sh cuda-suite   only the suite's CUDA-parametrized tests (-k cuda)
#   tools/gpu_check.sh tune         tools/cuda_tune.py (launch shapes, per-kernel times)
#   tools/gpu_check.sh bench [args] python -m benchmarks --device cuda [args]
# Several stages run in order: tools/gpu_check.sh cuda-tests suite bench --no-compile
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MASKNORM_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
start=$(date +%s)
$PY -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
(cd /tmp && $PY -c "import masknorm, torch; print(masknorm.build_info(), torch.__version__, masknorm._C._kernels_for('cuda'))")
status=0
while [ $# -gt 0 ]; do
  stage=$1; shift
  case $stage in
    cuda-tests)
      MASKNORM_EXPECT_CUDA=1 $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
      status=$(( status | ${PIPESTATUS[0]} )) ;;
    cuda-suite)
      MASKNORM_EXPECT_CUDA=1 timeout ${SUITE_TIMEOUT:-400} $PY -m pytest tests -k cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_suite.log" | tail -25
      status=$(( status | ${PIPESTATUS[0]} )) ;;
    suite)
      MASKNORM_EXPECT_CUDA=1 $PY -m pytest tests -q -p no:cacheprovider -x 2>&1 | tee "$OUT/suite.log" | tail -25
      status=$(( status | ${PIPESTATUS[0]} )) ;;
    tune)
      $PY tools/cuda_tune.py 2>&1 | tee "$OUT/tune.log"
      status=$(( status | ${PIPESTATUS[0]} )) ;;
    bench)
      $PY -m benchmarks --device cuda --out "$OUT/bench" "$@" > "$OUT/bench.log" 2>&1
      status=$(( status | $? ))
      sed -n '/^## Summary/,/^## N/p' "$OUT/bench/results.md" | head -40
      sed -n '/^## Bars/,$p' "$OUT/bench/results.md"
      break ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
exit $status
