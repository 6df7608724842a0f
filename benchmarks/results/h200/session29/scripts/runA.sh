#!/usr/bin/env bash
# Device run A (session 29): the pool's copies, zero-copy against a DMA per piece (bench_pool_copy.py), then the GPU
# suite (4 processes) beside the eager pool benchmark (1000 adapters, K = 64), then FlashInfer's GPU tests when
# .stage/wheels was carried (FlashInfer JIT-compiles its modules here: no prebuilt ones this time).
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runA.txt
if ls .stage/wheels/apache_tvm_ffi-*.whl > /dev/null 2>&1; then
  ( python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .stage/wheels/apache_tvm_ffi-*.whl \
    && tar -xJf .stage/wheels/flashinfer_trimmed.tar.xz -C /tmp/site ) > $OUT/fi_install.log 2>&1 &
fi
timeout 60 python benchmarks/bench_pool_copy.py --adapters 16 --repeats 7 --out $OUT/pool_copy.json > $OUT/pool_copy.log 2>&1
echo "=== copy bench rc=$? at $((SECONDS-START)) s" >> $OUT/runA.txt
cat $OUT/pool_copy.log >> $OUT/runA.txt
( timeout 330 python benchmarks/bench_pool.py --adapters 1000 --capacity 64 --mode eager --repeats 7 --warm 12 \
    --backend triton --out $OUT/poolA_eager.json > $OUT/poolA_eager.log 2>&1;
  echo "=== pool eager rc=$? at $((SECONDS-START)) s" >> $OUT/poolA_eager.log ) &
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs --durations=5 -o faulthandler_timeout=280"
( timeout 300 $PT tests/test_pool.py -s > $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt ) &
( timeout 300 $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_storage.py \
    tests/test_bad_input.py tests/test_kernels.py tests/test_siblings.py tests/test_per_call_check.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout 300 $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py tests/test_calls.py \
    tests/test_concurrency.py > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt;
  FUZZ_NO_SHRINK=1 timeout 100 $PT tests/test_fuzz.py > $OUT/gpu_f.txt 2>&1; echo "rc=$?" >> $OUT/gpu_f.txt ) &
wait
echo "=== suite and eager bench done at $((SECONDS-START)) s" >> $OUT/runA.txt
if [ -d /tmp/site/flashinfer ]; then
  LEFT=$((560 - (SECONDS-START)))
  PYTHONPATH=/tmp/site:.:benchmarks timeout $LEFT $PT tests/test_flashinfer.py > $OUT/gpu_c.txt 2>&1; echo "rc=$?" >> $OUT/gpu_c.txt
fi
echo "=== all done at $((SECONDS-START)) s" >> $OUT/runA.txt
for f in p a b f c; do echo "--- $f" >> $OUT/runA.txt; grep -E "passed|failed|error|^FAILED|^ERROR|^SKIPPED|rc=|vs fp32|adapters .* bytes" $OUT/gpu_$f.txt 2>/dev/null | tail -n 14 >> $OUT/runA.txt; done
grep -v Warn $OUT/poolA_eager.log | grep -v "^  warnings" | tail -n 30 >> $OUT/runA.txt
cat $OUT/runA.txt
