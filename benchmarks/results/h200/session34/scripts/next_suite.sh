#!/usr/bin/env bash
# For the next session's first device call (written in session 34, not run): the whole GPU suite on session 34's
# final code (the side stream's removal and the fuzzing's new fp32 bar and tests have not run on a GPU), 3 processes.
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=.:benchmarks
export TRITON_CACHE_DIR=$PWD/build/bench_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/suite.txt
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs"
( timeout 200 $PT tests/test_pool.py -s > $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt;
  FUZZ_NO_SHRINK=1 timeout 250 $PT -s tests/test_fuzz.py >> $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt ) &
( timeout 480 $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_storage.py \
    tests/test_bad_input.py tests/test_kernels.py tests/test_siblings.py tests/test_per_call_check.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout 480 $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py tests/test_calls.py \
    tests/test_concurrency.py tests/test_multi_device.py > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt ) &
wait
echo "=== suite done at $((SECONDS-START)) s" >> $OUT/suite.txt
for f in p a b; do echo "--- $f" >> $OUT/suite.txt; grep -E "passed|failed|error|^FAILED|^ERROR|rc=|vs fp32|examples" $OUT/gpu_$f.txt 2>/dev/null | tail -n 14 >> $OUT/suite.txt; done
cat $OUT/suite.txt
