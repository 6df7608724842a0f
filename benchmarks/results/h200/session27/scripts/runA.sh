#!/usr/bin/env bash
# Device run A (session 27): the GPU suite on the watched-parameter check (issue 13) and the compile-guard cuts
# (issue 12), in three processes (FlashInfer's with /tmp/site); then host-side harnesses: the per-call context at
# 32 layers (host_overhead.py), the guard cost per decoder layer on this host's CPU (compile_overhead.py), and the
# static memory the patch adds (bench_memory.py static).
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runA.txt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> $OUT/runA.txt
( python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .stage/wheels/apache_tvm_ffi-*.whl \
  && tar -xJf .stage/wheels/flashinfer_trimmed.tar.xz -C /tmp/site ) > $OUT/fi_install.log 2>&1
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs --durations=5 -o faulthandler_timeout=200"
( PYTHONPATH=/tmp/site:.:benchmarks timeout 250 $PT tests/test_flashinfer.py > $OUT/gpu_c.txt 2>&1; echo "rc=$?" >> $OUT/gpu_c.txt ) &
( timeout 250 $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_storage.py \
    tests/test_bad_input.py tests/test_kernels.py tests/test_siblings.py tests/test_per_call_check.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout 250 $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py tests/test_calls.py \
    tests/test_concurrency.py > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt;
  FUZZ_NO_SHRINK=1 timeout 60 $PT tests/test_fuzz.py >> $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt ) &
wait
echo "=== tests done at $((SECONDS-START)) s" >> $OUT/runA.txt
for f in a b c; do grep -E "passed|failed|error|^FAILED|^ERROR|^SKIPPED|rc=" $OUT/gpu_$f.txt | tail -n 12 >> $OUT/runA.txt; done
timeout 120 python benchmarks/host_overhead.py --layers 32 --calls 600 --out $OUT/host_overhead_32.json > $OUT/host_overhead_32.txt 2>&1
echo "=== host_overhead rc=$? at $((SECONDS-START)) s" >> $OUT/runA.txt
grep -v Warn $OUT/host_overhead_32.txt | tail -n 16 >> $OUT/runA.txt
CUDA_VISIBLE_DEVICES= timeout 120 python benchmarks/compile_overhead.py --rows base,ours > $OUT/compile_overhead.txt 2>&1
echo "=== compile_overhead rc=$? at $((SECONDS-START)) s" >> $OUT/runA.txt
grep -E "per layer" $OUT/compile_overhead.txt >> $OUT/runA.txt
timeout 150 python benchmarks/bench_memory.py --config static --out $OUT/memory_static.json > $OUT/memory_static.txt 2>&1
echo "=== memory rc=$? at $((SECONDS-START)) s" >> $OUT/runA.txt
grep -v Warn $OUT/memory_static.txt | tail -n 12 >> $OUT/runA.txt
cat $OUT/runA.txt
