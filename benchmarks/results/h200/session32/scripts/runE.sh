#!/usr/bin/env bash
# Device run E (session 32, the budget's last ~6 minutes): the pool's faster host bookkeeping (one slice per source
# piece from one bounds array; scales mirrored per unit in one numpy step). The pool's GPU tests beside
# bench_pool.py eager (1000 adapters, K=64, 3 repeats, 4 warm batches), which reports the host time of each call's
# place() and the copies' GPU time.
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=.:benchmarks
export TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runE.txt
( timeout 140 python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs -s tests/test_pool.py > $OUT/gpu_pool.txt 2>&1; echo "rc=$?" >> $OUT/gpu_pool.txt ) &
timeout 235 python benchmarks/bench_pool.py --adapters 1000 --capacity 64 --mode eager --repeats 3 --warm 4 \
    --no-zipf-row --backend triton --out $OUT/poolE_eager.json > $OUT/poolE_eager.log 2>&1
echo "=== bench_pool eager rc=$? at $((SECONDS-START)) s" >> $OUT/runE.txt
wait
grep -E "passed|failed|^FAILED|rc=|vs fp32" $OUT/gpu_pool.txt >> $OUT/runE.txt
tail -n 25 $OUT/poolE_eager.log >> $OUT/runE.txt
cat $OUT/runE.txt
