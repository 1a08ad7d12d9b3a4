#!/usr/bin/env bash
# Set up (idempotent), check the services and the browser the dashboard tests drive, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
bash scripts/browser.sh
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider "$@"
