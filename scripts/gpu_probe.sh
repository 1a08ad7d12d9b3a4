#!/usr/bin/env bash
# The memory and micro-batch probe that followed the GPU check (docs/BENCHMARKS.md section 8): the
# trainer's bench on preset:deepseek-1.3b, seq 2048, bf16, ZeRO-2, one GPU, at micro batches 2, 4, 8
# and 16 without accumulation, and 8 with gradient checkpointing: peak memory per micro batch (what
# api/estimate.py is checked against in tests/api/test_estimate.py) and MFU against micro batch.
# About 4 minutes on an H200, wheels included. On the GPU machine, carrying .whl (scripts/gpu_wheels.sh):
#   run(command="scripts/gpu_probe.sh 2>&1 | tee $OUT/probe.log", carry=[".whl"], timeout_s=420)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-probe-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
b() { name=$1; shift; t0=$SECONDS
  timeout -k 5 75 python3 -m trainer bench --model preset:deepseek-1.3b --gpus 1 --seq-len 2048 --precision bf16 --zero 2 \
    --json "$OUT/$name.json" "$@" > /tmp/$name.log 2>&1
  echo "== $name ($*): exit $? in $((SECONDS - t0))s"; tail -2 /tmp/$name.log; }
b m2 --batch-sizes 2 --max-micro 8 --steps 3 --warmup 2
b m4 --batch-sizes 4 --max-micro 8 --steps 3 --warmup 2
b m8 --batch-sizes 8 --max-micro 8 --steps 3 --warmup 2
b m16 --batch-sizes 16 --max-micro 16 --steps 5 --warmup 2
b gc8 --batch-sizes 8 --max-micro 8 --steps 3 --warmup 2 --gradient-checkpointing
