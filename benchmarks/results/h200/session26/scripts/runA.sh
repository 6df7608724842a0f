#!/usr/bin/env bash
# Device run A (session 26): the GPU suite on session 25's final code (three processes, FlashInfer's in the third),
# then compiled decode 32x8 with both adapter dtypes and the 32-row gate, with profiles.
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/runA.txt
( python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .stage/wheels/apache_tvm_ffi-*.whl \
  && tar -xJf .stage/wheels/flashinfer_trimmed.tar.xz -C /tmp/site ) > $OUT/fi_install.log 2>&1
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rf --durations=5 -o faulthandler_timeout=100"
( timeout 250 $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_storage.py \
    tests/test_bad_input.py tests/test_kernels.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout 250 $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py \
    > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt ) &
( FUZZ_NO_SHRINK=1 timeout 120 $PT tests/test_fuzz.py > $OUT/gpu_c.txt 2>&1; echo "rc=$?" >> $OUT/gpu_c.txt;
  PYTHONPATH=/tmp/site:.:benchmarks FLASHINFER_WORKSPACE_BASE=/tmp/fiws timeout 120 $PT tests/test_flashinfer.py \
    >> $OUT/gpu_c.txt 2>&1; echo "rc=$?" >> $OUT/gpu_c.txt ) &
wait
echo "=== tests done at $((SECONDS-START)) s" >> $OUT/runA.txt
for f in a b c; do grep -E "passed|failed|error|^FAILED|^ERROR|rc=" $OUT/gpu_$f.txt | tail -n 12 >> $OUT/runA.txt; done
LEFT=$((545 - (SECONDS-START)))
timeout $LEFT python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
    --configs 32x8 --adapter-dtype both --modes compiled --backends triton \
    --profile base,ours --out $OUT/genA_compiled.json > $OUT/genA_compiled.log 2>&1
echo "=== bench rc=$? at $((SECONDS-START)) s" >> $OUT/runA.txt
grep -E "^ *(eager|compiled) |^per decode step|gate|^\[" $OUT/genA_compiled.log | tail -n 40 >> $OUT/runA.txt
cat $OUT/runA.txt
