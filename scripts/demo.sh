#!/usr/bin/env bash
# The README's first command: set up the venv (scripts/setup.sh), then `trainbox demo` starts the
# whole stack on this machine (SQLite, Redis, API, worker), trains a tiny model on 2 GPUs (CPU slots
# without GPUs) with a live progress bar, prints the result and stops everything again.
# Extra arguments go to `trainbox demo` (e.g. --steps 300, --port 8001).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec trainbox demo "$@"
