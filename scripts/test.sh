#!/usr/bin/env bash
# Installs what is missing, then runs the default (fast) test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}  # local test clusters only; no token banner
exec ${PYTHON:-python} -m pytest -q "$@"
