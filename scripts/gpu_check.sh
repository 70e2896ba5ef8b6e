#!/usr/bin/env bash
# One prepared check for a GPU machine (issue 11), under 8 minutes: the CUDA tests, then the learner benchmark on
# CUDA. Prints everything; the README's GPU figures are copied from its last table.
#   bash scripts/gpu_check.sh            (from the repository root, after bash scripts/setup.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
PY=${PYTHON:-python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
status=0
timeout 300 $PY -m pytest -q -m gpu tests/test_gpu.py -x -p no:cacheprovider || status=$?
timeout 240 $PY scripts/bench_learner.py --device cuda --threads 4 --repeats 3 --seconds 0.5 \
  --widths 8,400 --methods mtsac,pcgrad --compile reduce-overhead || status=$?
exit $status
