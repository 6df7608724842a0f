#!/usr/bin/env bash
# Device run C (session 34): issue 15's compiled target with the per-adapter copies (session 33, not yet measured),
# and the resident_zipf row (the same Zipf batches, every adapter they name resident, no pool) in the same process,
# so that pool / resident_zipf isolates the pool's own cost from the workload's (21-28 distinct adapters against 8).
# Beside the bench's build and compile (~400 s before its timed repeats): the GPU fuzzing with the fp32 check's new
# fp64 bar and the seed-239 regression test (run A's failure), ~100 s.
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=.:benchmarks
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runC.txt
( FUZZ_NO_SHRINK=1 timeout 200 python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs -s tests/test_fuzz.py \
    > $OUT/gpu_fuzz.txt 2>&1; echo "rc=$? at $((SECONDS-START)) s" >> $OUT/gpu_fuzz.txt ) &
timeout 588 python benchmarks/bench_pool.py --adapters 1000 --capacity 64 --mode compiled --repeats 7 --warm 3 \
    --backend triton --out $OUT/poolC_compiled.json > $OUT/poolC_compiled.log 2>&1
echo "=== bench_pool compiled rc=$? at $((SECONDS-START)) s" >> $OUT/runC.txt
wait
grep -vE "warn|^ *$" $OUT/poolC_compiled.log | tail -n 32 >> $OUT/runC.txt
echo "--- fuzz" >> $OUT/runC.txt
grep -E "passed|failed|^FAILED|^E |rc=|examples" $OUT/gpu_fuzz.txt | tail -n 12 >> $OUT/runC.txt
cat $OUT/runC.txt
