#!/usr/bin/env bash
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
TORCH_LOGS=perf_hints timeout 150 python .stage/diag3.py > $OUT/diag3.txt 2>&1
echo "=== diag rc=$? at $((SECONDS-START)) s" >> $OUT/diag3.txt
grep -v "^\s*$" $OUT/diag3.txt | grep -v Warning | head -70
timeout $((520 - (SECONDS-START))) python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
    --configs 32x8 --adapter-dtype model --modes compiled --backends triton \
    --profile base,ours --out $OUT/gen3_compiled.json > $OUT/gen3_compiled.log 2>&1
echo "=== bench rc=$? at $((SECONDS-START)) s"
grep -E "^ *(eager|compiled) |^per decode step|^\[" $OUT/gen3_compiled.log | tail -n 20
