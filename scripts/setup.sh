#!/usr/bin/env bash
# Create .venv and install trainbox with its pinned dependencies (CPU torch; GPU boxes bring CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first, pinned to the CPU build: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
python -c "import trainer, deepspeed, transformers" 2>/dev/null || { echo "setup failed: imports do not work" >&2; exit 1; }
