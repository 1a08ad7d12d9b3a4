#!/usr/bin/env bash
# Debian's chromium for the dashboard's browser tests (tests/browser): Playwright drives
# /usr/bin/chromium through executable_path, so no browser is ever downloaded by Playwright.
# Installs it when missing and this runs as root (CI images); the apt output goes to a log and is
# shown only if the install fails. Without root it says how, and exits 0: the suite then skips.
set -euo pipefail
CHROMIUM=${TRAINBOX_CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "browser.sh: $CHROMIUM is missing; as root: apt-get install -y chromium (the browser tests skip without it)" >&2
  exit 0
fi
log=${TMPDIR:-/tmp}/trainbox-chromium-install.log
: > "$log"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core; } >>"$log" 2>&1; then
  echo "browser.sh: installing chromium failed (log: $log)" >&2
  tail -n 30 "$log" >&2
  exit 1
fi
"$CHROMIUM" --version 2>/dev/null || true  # (Debian's wrapper may warn about its memory check on stderr)
