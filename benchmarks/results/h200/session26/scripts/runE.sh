#!/usr/bin/env bash
# Device run E (session 26): compiled 32x32 (32 distinct adapters), bf16 adapters; phase 1 (base, ours) kept if
# the time limit stops it while PEFT's row compiles.
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
timeout 225 python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
    --configs 32x32 --modes compiled --backends triton --out $OUT/genE_compiled_32x32.json > $OUT/genE.log 2>&1
echo "=== bench rc=$?"
grep -E "^ *(eager|compiled) |^\[" $OUT/genE.log | tail -n 14
