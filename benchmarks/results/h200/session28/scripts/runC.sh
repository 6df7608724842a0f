#!/usr/bin/env bash
# Device run C (session 28): the pool benchmark (1000 rank-16 adapters, K = 64, Zipf 1.0, batch 32, prompt 128,
# 32 new tokens), eager then compiled, one process each.
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runC.txt
timeout 230 python benchmarks/bench_pool.py --adapters 1000 --capacity 64 --mode eager --repeats 5 --warm 12 \
    --backend triton --out $OUT/poolC_eager.json > $OUT/poolC_eager.log 2>&1
echo "=== pool eager rc=$? at $((SECONDS-START)) s" >> $OUT/runC.txt
grep -v Warn $OUT/poolC_eager.log | tail -n 24 >> $OUT/runC.txt
LEFT=$((575 - (SECONDS-START)))
timeout $LEFT python benchmarks/bench_pool.py --adapters 1000 --capacity 64 --mode compiled --repeats 4 --warm 8 \
    --backend triton --out $OUT/poolC_compiled.json > $OUT/poolC_compiled.log 2>&1
echo "=== pool compiled rc=$? at $((SECONDS-START)) s" >> $OUT/runC.txt
grep -v Warn $OUT/poolC_compiled.log | tail -n 24 >> $OUT/runC.txt
free -g | head -2 >> $OUT/runC.txt
cat $OUT/runC.txt
