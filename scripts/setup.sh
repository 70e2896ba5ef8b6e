#!/usr/bin/env bash
# Installs what is missing into the current Python (activate a virtualenv first if you want one).
# torch is pinned first to 2.13.0, which on a CPU machine comes from the machine's local CPU wheel, so the
# project's torch range is already satisfied and pip never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# Offscreen rendering for `scripts/evaluate.py --video` (issue 7): MuJoCo needs EGL or OSMesa. Installed only when
# neither library is found, and only as root on Debian/Ubuntu; without them everything else still works.
if ! $PY -c "import ctypes.util as u, sys; sys.exit(0 if u.find_library('EGL') or u.find_library('OSMesa') else 1)" 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q libosmesa6 >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libosmesa6 >/dev/null 2>&1; } \
      || echo "setup.sh: could not install libosmesa6; evaluate.py --video will be unavailable" >&2
  else
    echo "setup.sh: no EGL/OSMesa library; evaluate.py --video needs libegl1 or libosmesa6 (apt-get install libosmesa6)" >&2
  fi
fi
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
