#!/usr/bin/env bash
# Device run D (session 28): the whole GPU suite on the final pool code (batched copies), in parallel with the
# compiled pool benchmark (1000 adapters, K = 64; rows base, resident8, pool; recompile reasons logged).
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runD.txt
( python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .stage/wheels/apache_tvm_ffi-*.whl \
  && tar -xJf .stage/wheels/flashinfer_trimmed.tar.xz -C /tmp/site ) > $OUT/fi_install.log 2>&1
( TORCH_LOGS=recompiles timeout 440 python benchmarks/bench_pool.py --adapters 1000 --capacity 64 --mode compiled \
    --repeats 3 --warm 4 --no-zipf-row --backend triton --out $OUT/poolD_compiled.json > $OUT/poolD_compiled.log 2>&1;
  echo "=== pool compiled rc=$? at $((SECONDS-START)) s" >> $OUT/poolD_compiled.log ) &
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs --durations=5 -o faulthandler_timeout=250"
( timeout 280 $PT tests/test_pool.py -s > $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt;
  PYTHONPATH=/tmp/site:.:benchmarks timeout 150 $PT tests/test_flashinfer.py > $OUT/gpu_c.txt 2>&1; echo "rc=$?" >> $OUT/gpu_c.txt ) &
( timeout 300 $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_storage.py \
    tests/test_bad_input.py tests/test_kernels.py tests/test_siblings.py tests/test_per_call_check.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout 300 $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py tests/test_calls.py \
    tests/test_concurrency.py > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt;
  FUZZ_NO_SHRINK=1 timeout 120 $PT tests/test_fuzz.py > $OUT/gpu_f.txt 2>&1; echo "rc=$?" >> $OUT/gpu_f.txt ) &
wait
echo "=== all done at $((SECONDS-START)) s" >> $OUT/runD.txt
for f in p a b c f; do echo "--- $f" >> $OUT/runD.txt; grep -E "passed|failed|error|^FAILED|^ERROR|^SKIPPED|rc=|vs fp32|adapters .* bytes" $OUT/gpu_$f.txt | tail -n 14 >> $OUT/runD.txt; done
grep -v Warn $OUT/poolD_compiled.log | grep -v "^  warnings" | tail -n 30 >> $OUT/runD.txt
cat $OUT/runD.txt
