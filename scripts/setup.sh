#!/usr/bin/env bash
# Creates .venv in the repository and installs sparsefl_jax with its test extra, pinned by
# constraints.txt. Also installs Debian's dataset-fashion-mnist (the embedded default dataset)
# when it is missing and apt-get can be used. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.sparsefl_installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing sparsefl_jax and its dependencies into .venv (about a minute)" >&2
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]' > .venv/pip-install.log 2>&1 \
    || { tail -20 .venv/pip-install.log >&2; echo "setup: pip install failed (log: .venv/pip-install.log)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && [ -z "${SPARSEFL_FMNIST_DIR:-}" ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
    ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "setup: could not apt-get install dataset-fashion-mnist; install it (apt-get install dataset-fashion-mnist) or set SPARSEFL_FMNIST_DIR" >&2
  else
    echo "setup: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist' or set SPARSEFL_FMNIST_DIR" >&2
  fi
fi
