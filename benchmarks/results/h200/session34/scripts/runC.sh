#!/usr/bin/env bash
# Device run C (session 34): issue 15's compiled target with the per-adapter copies (session 33, not yet measured),
# and the resident_zipf row (the same Zipf batches, every adapter they name resident, no pool) in the same process,
# so that pool / resident_zipf isolates the pool's own cost from the workload's (21-28 distinct adapters against 8).
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=.:benchmarks
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runC.txt
timeout 588 python benchmarks/bench_pool.py --adapters 1000 --capacity 64 --mode compiled --repeats 7 --warm 3 \
    --backend triton --out $OUT/poolC_compiled.json > $OUT/poolC_compiled.log 2>&1
echo "=== bench_pool compiled rc=$? at $((SECONDS-START)) s" >> $OUT/runC.txt
grep -vE "warn|^ *$" $OUT/poolC_compiled.log | tail -n 32 >> $OUT/runC.txt
cat $OUT/runC.txt
