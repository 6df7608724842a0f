#!/usr/bin/env bash
# Device run 2 (session 25): the GPU tests run 1 lost (fuzz first, no shrinking, stack dump if slow), then compiled decode.
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rf --durations=5 -o faulthandler_timeout=50"
( FUZZ_NO_SHRINK=1 timeout 110 $PT -s tests/test_fuzz.py > $OUT/gpu_fuzz.txt 2>&1; echo "rc=$?" >> $OUT/gpu_fuzz.txt ) &
( timeout 110 $PT tests/test_storage.py tests/test_bad_input.py tests/test_kernels.py > $OUT/gpu_c.txt 2>&1; echo "rc=$?" >> $OUT/gpu_c.txt ) &
wait
echo "=== tests done at $((SECONDS-START)) s" > $OUT/run2.txt
tail -n 12 $OUT/gpu_c.txt >> $OUT/run2.txt
grep -v "^$" $OUT/gpu_fuzz.txt | tail -n 60 >> $OUT/run2.txt
LEFT=$((555 - (SECONDS-START)))
timeout $LEFT python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
    --configs 32x8 --adapter-dtype both --modes compiled --backends triton \
    --profile base,ours --out $OUT/gen_a_compiled.json > $OUT/gen_a_compiled.log 2>&1
echo "=== bench rc=$? at $((SECONDS-START)) s" >> $OUT/run2.txt
grep -E "^ *(eager|compiled) |^per decode step|gate|compil|^\[" $OUT/gen_a_compiled.log | tail -n 40 >> $OUT/run2.txt
cat $OUT/run2.txt
