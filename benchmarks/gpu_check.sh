#!/usr/bin/env bash
# The prepared device check (benchmarks/gpu_check.py says what it runs): one command on a machine
# with a CUDA PyTorch already installed and no network, inside 8 minutes, one summary table.
#
#   here, once:        bash benchmarks/gpu_check_prepare.sh      (the diffusers wheels, the CIFAR-10 JPEGs)
#   on the device:     bash benchmarks/gpu_check.sh              (results in $OUT, else /tmp/gpu-check)
#
# The project runs from src/ on the machine's own torch (nothing is built or installed for it);
# the wheels carried in .whl/ (diffusers and what it needs beyond the machine's packages) are
# unpacked into /tmp/site without touching the machine's torch.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || echo "gpu_check: the wheels in .whl did not install; diffusers' figures will fail" >&2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
exec python3 benchmarks/gpu_check.py --budget-s "${GPU_CHECK_BUDGET_S:-450}" "$@"
