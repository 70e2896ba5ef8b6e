#!/usr/bin/env bash
# Installs what is missing into the current Python (activate a virtualenv first if you want one).
# torch is pinned first to 2.13.0, which on a CPU machine comes from the machine's local CPU wheel, so the
# project's torch range is already satisfied and pip never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
stamp=".install-stamp"
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && \
   $PY -c "import torch, metaworld, dm_control, ray, gymnasium, stable_baselines3, tensorboard, torchjd, pytest, mtrl" 2>/dev/null; then
  exit 0
fi
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install --quiet "torch==2.13.0"
fi
$PY -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
