#!/usr/bin/env bash
# Create .venv and install trainbox with its pinned dependencies (CPU torch; GPU boxes bring CUDA torch).
# pip's output goes to .venv/setup.log and is shown only if something fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
log=.venv/setup.log
: > "$log"
run() { "$@" >>"$log" 2>&1 || { echo "setup failed: $*" >&2; tail -n 40 "$log" >&2; exit 1; }; }
run python -m pip install -q --upgrade pip
# torch first, pinned to the CPU build: an unpinned torch would pull a multi-GB CUDA build.
run python -m pip install -q "torch==2.13.0"
run python -m pip install -q -e ".[dev]"
python -c "import trainer, deepspeed, transformers" >/dev/null 2>&1 || { echo "setup failed: imports do not work" >&2; exit 1; }
# The DeepSpeed ops ranks JIT-compile, built now into the default data dir's cache (the worker checks
# it again at start, and the tests share it): about a minute the first time, seconds after.
python -m worker.ops >>"$log" 2>&1 || { echo "setup failed: building the DeepSpeed ops" >&2; tail -n 40 "$log" >&2; exit 1; }
