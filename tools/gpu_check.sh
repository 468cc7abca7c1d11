#!/usr/bin/env bash
# Every GPU check in one short run, for a machine with a CUDA device:
#   bash tools/gpu_check.sh [extra pytest args]
# Prints the device and the software stack (torch/CUDA, whether FlashAttention and NVIDIA apex's fused kernels load),
# then runs every test marked `gpu` (any helper's; selected by marker, not by file). Exit status is pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works from a bare checkout too, installed or not
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

echo "== nvidia-smi"
nvidia-smi || echo "nvidia-smi not found or failed"

echo "== torch / CUDA"
"$PY" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  [{i}] {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, bf16: {torch.cuda.is_bf16_supported()}")
PY

echo "== optional fused kernels"
"$PY" - <<'PY'
try:
    import flash_attn
    print(f"flash_attn {flash_attn.__version__}: imports")
except Exception as exc:  # report, do not fail: the tests skip what is absent
    print(f"flash_attn: not available ({type(exc).__name__}: {exc})")
from dmvae_scale.models.attention import flash_available
from dmvae_scale.models.layers import fused_rms_norm_available
print(f"flash_attn usable by dmvae_scale: {flash_available()}")
print(f"apex FusedRMSNorm (with CUDA kernel) usable by dmvae_scale: {fused_rms_norm_available()}")
PY

echo "== pytest -m gpu"
"$PY" -m pytest -m gpu -q -rs -p no:cacheprovider "$@"
rc=$?
echo "gpu_check: pytest -m gpu exited $rc"
exit $rc
