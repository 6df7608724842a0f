#!/usr/bin/env bash
# Device run A (session 30): the whole GPU suite on the code with the copies' fast path (source views kept per
# adapter) and the watched scaling dicts, in 3 processes, then FlashInfer's GPU tests (.stage carried).
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runA.txt
( python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .stage/wheels/apache_tvm_ffi-*.whl \
  && tar -xJf .stage/wheels/flashinfer_trimmed.tar.xz -C /tmp/site ) > $OUT/fi_install.log 2>&1 &
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs --durations=5 -o faulthandler_timeout=280"
( timeout 300 $PT tests/test_pool.py -s > $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt;
  FUZZ_NO_SHRINK=1 timeout 120 $PT tests/test_fuzz.py > $OUT/gpu_f.txt 2>&1; echo "rc=$?" >> $OUT/gpu_f.txt ) &
( timeout 300 $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_storage.py \
    tests/test_bad_input.py tests/test_kernels.py tests/test_siblings.py tests/test_per_call_check.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout 300 $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py tests/test_calls.py \
    tests/test_concurrency.py > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt ) &
wait
echo "=== suite done at $((SECONDS-START)) s" >> $OUT/runA.txt
if [ -d /tmp/site/flashinfer ]; then
  LEFT=$((570 - (SECONDS-START)))
  PYTHONPATH=/tmp/site:.:benchmarks timeout $LEFT $PT tests/test_flashinfer.py -x > $OUT/gpu_c.txt 2>&1; echo "rc=$?" >> $OUT/gpu_c.txt
else
  echo "no flashinfer" >> $OUT/runA.txt; tail -5 $OUT/fi_install.log >> $OUT/runA.txt
fi
echo "=== all done at $((SECONDS-START)) s" >> $OUT/runA.txt
for f in p a b f c; do echo "--- $f" >> $OUT/runA.txt; grep -E "passed|failed|error|^FAILED|^ERROR|^SKIPPED|rc=|vs fp32|adapters .* bytes" $OUT/gpu_$f.txt 2>/dev/null | tail -n 14 >> $OUT/runA.txt; done
cat $OUT/runA.txt
