#!/usr/bin/env bash
# Device run B (session 26): the GPU suite on the keyed-storage change (three processes; FlashInfer's with room to
# finish), then eager decode 32x8, both adapter dtypes, Triton and FlashInfer, 32-row gate, with profiles.
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws
START=$SECONDS
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/runB.txt
( python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .stage/wheels/apache_tvm_ffi-*.whl \
  && tar -xJf .stage/wheels/flashinfer_trimmed.tar.xz -C /tmp/site ) > $OUT/fi_install.log 2>&1
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs --durations=5 -o faulthandler_timeout=200"
( PYTHONPATH=/tmp/site:.:benchmarks timeout 250 $PT tests/test_flashinfer.py > $OUT/gpu_c.txt 2>&1; echo "rc=$?" >> $OUT/gpu_c.txt ) &
( timeout 250 $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_storage.py \
    tests/test_bad_input.py tests/test_kernels.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout 250 $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py \
    > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt;
  FUZZ_NO_SHRINK=1 timeout 60 $PT tests/test_fuzz.py >> $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt ) &
wait
echo "=== tests done at $((SECONDS-START)) s" >> $OUT/runB.txt
for f in a b c; do grep -E "passed|failed|error|^FAILED|^ERROR|^SKIPPED|rc=" $OUT/gpu_$f.txt | tail -n 12 >> $OUT/runB.txt; done
LEFT=$((560 - (SECONDS-START)))
PYTHONPATH=/tmp/site:.:benchmarks timeout $LEFT python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 \
    --repeats 3 --peft-mixed-warmup 0 --peft-mixed-repeats 1 --configs 32x8 --adapter-dtype both --modes eager \
    --backends triton,flashinfer --profile base,ours --out $OUT/genB_eager.json > $OUT/genB_eager.log 2>&1
echo "=== bench rc=$? at $((SECONDS-START)) s" >> $OUT/runB.txt
grep -E "^ *(eager|compiled) |^per decode step|gate|^\[" $OUT/genB_eager.log | tail -n 40 >> $OUT/runB.txt
cat $OUT/runB.txt
