#!/usr/bin/env bash
# Installs what the tests need (venv, pinned packages, Debian's Fashion-MNIST) and runs them,
# then the end-to-end fault drills (scripts/faults.sh). Extra arguments go to pytest and skip
# the drills, e.g. `bash scripts/test.sh -k engine` or `-m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
if [[ $# -eq 0 ]]; then
  bash scripts/faults.sh
fi
