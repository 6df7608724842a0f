#!/usr/bin/env bash
# Device run C (session 26): compiled decode 32x8, both adapter dtypes, on the keyed-storage code, with profiles.
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
timeout 540 python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
    --configs 32x8 --adapter-dtype both --modes compiled --backends triton \
    --profile base,ours --out $OUT/genC_compiled.json > $OUT/genC_compiled.log 2>&1
echo "=== bench rc=$? at $((SECONDS-START)) s"
grep -E "^ *(eager|compiled) |^per decode step|gate|^\[" $OUT/genC_compiled.log | tail -n 40
