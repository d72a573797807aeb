#!/usr/bin/env bash
# The GPU check, for a fresh machine with a CUDA device and no network (torch, nvcc, ninja and pytest
# preinstalled; pytest-xdist used when present): build the extension with its CUDA kernels for this card, run the
# CUDA tests, benchmark the kernels at the paper's step sizes and a paper-size adaptation step (ResNet-101, one
# 1280x720 source + one 1024x512 target image, full and diagonal covariances).
#
#   bash scripts/device_check.sh          # reports land in $OUT (default /tmp/sdca-device-check)
#
# Every stage has its own time limit and together they stay within 7 minutes (about 4 on an H200).
# report.txt and report.json summarise; the exit status is 0 only when every test passed and every benchmark
# target was met (1: a build or test failure, 3: a missed target).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sdca-device-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
build_status=0 test_status=0 kernels_status=0 step_status=0
stage() { echo "== $1 ($(date +%T))"; }

stage device
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader \
  | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee -a "$OUT/device.txt"

stage "build (CUDA kernels for this card only; limit 100 s)"
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
start=$(date +%s)
if TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout 100 \
     $PY -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "built for sm_${arch/./} in $(( $(date +%s) - start )) s" | tee -a "$OUT/device.txt"
  $PY -m sdca doctor | tee "$OUT/doctor.txt"
  # The extension must use the process's shared C++ runtime, not carry a copy of it (see setup.py).
  so=$(ls sdca/_C*.so | head -1)
  if nm -D --defined-only "$so" 2>/dev/null | grep -q "_ZNSo9_M_insert\|codecvt"; then
    echo "the extension defines libstdc++ symbols itself (a static copy was linked):"
    grep -- "-shared" "$OUT/build.log" | tail -1; ls -l "$(g++ -print-file-name=libstdc++.so)"
    build_status=1
  fi
else
  tail -40 "$OUT/build.log"; echo "build failed or timed out after $(( $(date +%s) - start )) s"
  build_status=1
fi

if [ $build_status -eq 0 ]; then
  stage "operator tests, CPU and CUDA (limit 70 s)"
  # Worker processes when pytest-xdist is there: a crashing test is then reported as a failure and the rest
  # still run, instead of the whole session dying with it.
  parallel=()
  $PY -c "import xdist" 2>/dev/null && parallel=(-n 8)
  OMP_NUM_THREADS=2 SDCA_REQUIRE_EXTENSION=1 timeout 70 $PY -m pytest -q -p no:cacheprovider "${parallel[@]}" tests/ops \
    --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || test_status=1

  stage "kernel benchmark at the paper's step sizes (limit 110 s)"
  timeout 110 $PY bench/bench_kernels.py --device cuda --repeat 10 --fail-on-miss --json "$OUT/bench_kernels.json" 2>&1 \
    | tee "$OUT/bench_kernels.txt"
  kernels_status=${PIPESTATUS[0]}

  for cov in full diag; do
    stage "paper-size adaptation step, $cov covariance (limit 55 s)"
    timeout 55 $PY bench/bench_step.py --device cuda --covariance $cov --repeat 4 --fail-on-miss \
      --json "$OUT/bench_step_$cov.json" 2>&1 | tee "$OUT/bench_step_$cov.txt"
    s=${PIPESTATUS[0]}
    [ "$s" -eq 0 ] || step_status=$s
  done
fi

stage summary
$PY scripts/device_report.py "$OUT" $build_status $test_status $kernels_status $step_status | tee "$OUT/report.txt"
if [ $build_status -ne 0 ] || [ $test_status -ne 0 ]; then exit 1; fi
# 3: a missed target; any other failure of a benchmark (a crash, the time limit) is a failure.
for s in $kernels_status $step_status; do
  [ "$s" -eq 0 ] || [ "$s" -eq 3 ] || exit 1
done
if [ $kernels_status -ne 0 ] || [ $step_status -ne 0 ]; then exit 3; fi
exit 0
