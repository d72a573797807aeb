#!/usr/bin/env bash
# The Lite0 experiment's key rows on a GPU (scripts/experiment_gpu.py): source-only, oracle, AdaBN, SDCA adapt,
# SDCA + self-training, mean teacher, mean teacher + SDCA, one seed, 512x256, ten times the CPU plan's steps.
#
#   bash scripts/experiment_gpu.sh          # the table lands in $OUT/experiment-gpu/table.md
#
# Meant to fit 8 minutes on an H100/H200 (build 100 s, the rows the rest; not yet measured on one). The
# SynthDrive frames are generated on the machine's CPUs first. Rerunning resumes finished rows.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sdca-experiment-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if ! TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout 100 \
     $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; echo "build failed"; exit 1
fi
OUT="$OUT" timeout ${LIMIT_S:-380} $PY scripts/experiment_gpu.py --out "$OUT/experiment-gpu" "$@"
