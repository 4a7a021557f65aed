#!/usr/bin/env bash
# Installs if needed, then runs the main job: FedAvg on real Fashion-MNIST (offline).
# Extra arguments are passed to experiments/run.py and override the flagfile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python experiments/run.py --flagfile=experiments/flags/quickstart.flags "$@"
