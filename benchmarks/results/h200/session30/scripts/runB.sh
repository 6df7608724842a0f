#!/usr/bin/env bash
# Device run B (session 30): the compiled pool benchmark alone (1000 adapters, K = 64; rows base, resident8, pool;
# 9 interleaved repeats: the repeats are cheap, the compiles are not), recompile reasons logged.
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runB.txt
TORCH_LOGS=recompiles timeout 570 python benchmarks/bench_pool.py --adapters 1000 --capacity 64 --mode compiled \
    --repeats 9 --warm 4 --no-zipf-row --backend triton --out $OUT/poolB_compiled.json > $OUT/poolB_compiled.log 2>&1
echo "=== pool compiled rc=$? at $((SECONDS-START)) s" >> $OUT/runB.txt
grep -v Warn $OUT/poolB_compiled.log | grep -v "^  warnings" | tail -n 40 >> $OUT/runB.txt
cat $OUT/runB.txt
