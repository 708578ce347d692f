#!/usr/bin/env bash
# Create .venv and install bluesky-deepfocus with the CPU build of PyTorch.
#   scripts/setup.sh          # runtime
#   scripts/setup.sh test     # + test/lint/type-check tools and PostgreSQL (Debian)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
# On this project's machines `torch==2.13.0` is the CPU wheel on local disk; elsewhere set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$VENV/bin/python" -m pip install -q torch --index-url "$TORCH_INDEX_URL"
  else
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  fi
fi
if [ "${1:-}" = "test" ]; then
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  # PostgreSQL for the facility-scale (Tiled server) tests
  if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
      $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
      echo "PostgreSQL is needed for the server tests: install the Debian package 'postgresql'." >&2
      exit 1
    fi
  fi
else
  "$VENV/bin/python" -m pip install -q -e .
fi
