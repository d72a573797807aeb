#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device and no network (torch, nvcc, ninja, pybind11 preinstalled):
# build the extension with its CUDA kernels, run the CUDA tests, run the GPU benchmark.
#
#   bash scripts/device_check.sh            # results also land in $OUT (default /tmp/sdca-device-check)
#
# Sized to finish in about 6 minutes on an H100: the build (~2 min with 16 cores), the CUDA test cases, and the
# benchmark at the paper's step size.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sdca-device-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee -a "$OUT/device.txt"

echo "== build (CUDA kernels for this card only)"
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
start=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
     $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "build failed"; exit 1
fi
echo "built for sm_${arch/./} in $(( $(date +%s) - start )) s"
$PY -m sdca doctor | tee "$OUT/doctor.txt"

echo "== CUDA tests"
SDCA_REQUIRE_EXTENSION=1 timeout 300 $PY -m pytest -q -x tests/ops -k cuda -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark (GPU, paper scale)"
timeout 240 $PY bench/bench_kernels.py --device cuda --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
