#!/usr/bin/env bash
# The training engine on a GPU (issue: training at paper scale), for a fresh machine with a CUDA device and no
# network: build the extension for this card, then scripts/train_check.py: every stage of gta5_cityscapes_r101
# on fabricated paper-size data (fp32), adapt in bf16 and fp16, SIGTERM and resume, two ranks on the one GPU
# (gloo on CUDA tensors) and a world of one under NCCL, forced syncs per step, and the loader's images/s.
#
#   bash scripts/train_check.sh            # reports land in $OUT (default /tmp/sdca-train-check)
#
# Bounded to about 8 minutes on an H100/H200: build 100 s, the checks 300 s, the loader benchmark 60 s.
# Exit 0 when every check passed, 1 otherwise; report.txt and report.json say which.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sdca-train-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

echo "== device ($(date +%T))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
nproc | sed 's/^/cpus /' | tee -a "$OUT/device.txt"

echo "== build (CUDA kernels for this card only; limit 100 s)"
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if ! TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout 100 \
     $PY -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; echo "build failed"; exit 1
fi

echo "== checks (limit 300 s)"
timeout 300 $PY scripts/train_check.py --out "$OUT" --iters "${ITERS:-24}" 2>&1 | tee "$OUT/train_check.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== loader images/s per worker (limit 60 s)"
timeout 60 $PY bench/bench_loader.py --frames 4 --repeats 2 2>&1 | tee "$OUT/bench_loader.txt"

exit $status
