#!/usr/bin/env bash
# Set up (idempotent), check the services, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider "$@"
