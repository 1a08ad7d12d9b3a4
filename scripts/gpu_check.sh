#!/usr/bin/env bash
# The GPU check of issue 11, unattended, in under 8 minutes on one H100/H200 machine that has torch
# and transformers but no DeepSpeed and no registry: installs the carried wheels, then runs
# benchmarks/gpu_check.py (trainer bench on preset:deepseek-1.3b, the article's plain loop, one
# service job on the embedded stack, the goals). What it writes goes under $OUT (the device tool
# brings that folder back); stdout is also kept there as gpu_check.log.
#
#   scripts/gpu_wheels.sh                    # here, once: fills .whl/ (see ../shared/device/README.md)
#   scripts/gpu_check.sh                     # on the GPU machine; the device call carries .whl
#   scripts/gpu_check.sh --cpu               # here: the same stages on CPU, preset:tiny, a few minutes
#
# GPU_CHECK_BUDGET_S (default 465; 600 with --cpu) bounds the whole run, wheels included; each
# stage has its own time box inside it and the report says what was skipped and why. Exit status:
# 0 when no goal and no stage failed, 1 when one did, 2 when the setup failed.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
mode=gpu
for arg in "$@"; do [ "$arg" = --cpu ] && mode=cpu; done
[ "${GPU_CHECK_CPU:-}" = 1 ] && mode=cpu && set -- "$@" --cpu
# 8 minutes on the GPU machine, with room to spare; CPU mode on 2 shared cores is slower per step.
budget=${GPU_CHECK_BUDGET_S:-$([ "$mode" = gpu ] && echo 465 || echo 600)}
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
log=$OUT/gpu_check.log
: > "$log"
say() { echo "$*" | tee -a "$log"; }

if [ "$mode" = gpu ]; then
  py=python3
  if ls .whl/*.whl >/dev/null 2>&1; then
    say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    if ! timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$log" 2>&1; then
      say "FAIL: the carried wheels did not install (the end of $log says why)"; exit 2
    fi
    export PYTHONPATH=$PWD:/tmp/site
    # The embedded stack's Redis travels beside the wheels (scripts/gpu_wheels.sh says why).
    [ -x .whl/bin/redis-server ] && export PATH=$PWD/.whl/bin:$PATH
  elif $py -c 'import deepspeed, fastapi, sqlalchemy, celery' >/dev/null 2>&1; then
    say "no .whl/: this Python already has DeepSpeed and the service's packages; using them"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    say "FAIL: no .whl/ to install and this Python lacks DeepSpeed or the service's packages:"
    say "  run ../shared/device/make-wheels.sh here and carry .whl with the device call"; exit 2
  fi
  # DeepSpeed's JIT builder parses TORCH_CUDA_ARCH_LIST as numbers and fails on Hopper's "9.0a"
  # (the image sets it): build FusedAdam, for the plain loop, for plain 9.0.
  [ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && export TORCH_CUDA_ARCH_LIST=$(echo "$TORCH_CUDA_ARCH_LIST" | sed 's/\([0-9]\)a\b/\1/g')
  say "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} (for DeepSpeed's JIT builds)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version \
    --format=csv,noheader 2>&1 | tee -a "$log"
else
  py=python3
  [ -x .venv/bin/python ] && py=.venv/bin/python
  say "CPU mode: $py, preset:tiny, CPU ranks (no wheels installed)"
fi

left=$((budget - (SECONDS - start) - 15))
say "$((SECONDS - start))s spent on setup; ${left}s for the stages"
# The Python side keeps to its budget; this timeout is the backstop that ends the run regardless.
timeout -k 10 $((left + 10)) "$py" benchmarks/gpu_check.py --out "$OUT" --budget "$left" "$@" 2>&1 | tee -a "$log"
code=${PIPESTATUS[0]}
[ "$code" = 124 ] || [ "$code" = 137 ] && say "FAIL: the run passed its ${budget}s budget and was stopped"
say "done in $((SECONDS - start))s (exit $code); results in $OUT"
exit "$code"
