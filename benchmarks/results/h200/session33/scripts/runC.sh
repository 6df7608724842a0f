#!/usr/bin/env bash
# Device run C (session 33, final code): the 32-layer compiled decode profile with PDL on (run B's was cut by its
# limit during PEFT's one-adapter row, now skipped), then the whole GPU suite in 3 processes.
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=.:benchmarks
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runC.txt
PEFT_FASTLORA_PDL=1 timeout 170 python benchmarks/profile_decode.py --layers 32 --prompt 128 --new-tokens 33 \
    --repeats 5 --modes compiled --rows base,ours --out $OUT/profC_pdl1.json > $OUT/profC_pdl1.log 2>&1
echo "=== PDL=1 rc=$? at $((SECONDS-START)) s" >> $OUT/runC.txt
grep -E "^ *compiled|^per decode|mode dtype" $OUT/profC_pdl1.log >> $OUT/runC.txt
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs -o faulthandler_timeout=280"
( timeout 280 $PT tests/test_pool.py -s > $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt;
  FUZZ_NO_SHRINK=1 timeout 150 $PT -s tests/test_fuzz.py >> $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt ) &
( timeout 290 $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_storage.py \
    tests/test_bad_input.py tests/test_kernels.py tests/test_siblings.py tests/test_per_call_check.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout 290 $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py tests/test_calls.py \
    tests/test_concurrency.py tests/test_multi_device.py > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt ) &
wait
echo "=== suite done at $((SECONDS-START)) s" >> $OUT/runC.txt
for f in p a b; do echo "--- $f" >> $OUT/runC.txt; grep -E "passed|failed|error|^FAILED|^ERROR|rc=|vs fp32|examples" $OUT/gpu_$f.txt 2>/dev/null | tail -n 14 >> $OUT/runC.txt; done
cat $OUT/runC.txt
