#!/usr/bin/env bash
# Every GPU check in one short run, on a machine with a CUDA device (torch is all it needs):
#   bash tools/gpu_check.sh [--out DIR] [--steps N] [--no-pytest] [--no-throughput]
# A thin wrapper over tools/gpu_check.py (see its header for the checks and for carrying pytest as wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" PYTHONUNBUFFERED=1
nvidia-smi || echo "nvidia-smi not found or failed"
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
