#!/usr/bin/env bash
# Installs what the tests need (venv, pinned packages, Debian's Fashion-MNIST) and runs them.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k engine` or `-m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
