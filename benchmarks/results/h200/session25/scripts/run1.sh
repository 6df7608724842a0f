#!/usr/bin/env bash
# Device run 1 (session 25): GPU tests (two processes), host overhead, eager 32-layer decode with profiles.
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
git log --oneline -1 > $OUT/run1.txt 2>/dev/null || echo "no git" > $OUT/run1.txt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> $OUT/run1.txt
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rf --durations=8"
( timeout 260 $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_fuzz.py \
    tests/test_storage.py tests/test_bad_input.py tests/test_kernels.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout 260 $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py \
    > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt ) &
wait
echo "=== tests done at $((SECONDS-START)) s" >> $OUT/run1.txt
tail -n 14 $OUT/gpu_a.txt $OUT/gpu_b.txt >> $OUT/run1.txt
timeout 60 python benchmarks/host_overhead.py --layers 4 --calls 1000 --out $OUT/host_overhead.json > $OUT/host.txt 2>&1
tail -n 14 $OUT/host.txt >> $OUT/run1.txt
echo "=== host done at $((SECONDS-START)) s" >> $OUT/run1.txt
LEFT=$((560 - (SECONDS-START)))
timeout $LEFT python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
    --peft-mixed-warmup 0 --peft-mixed-repeats 1 --configs 32x8 --adapter-dtype both --modes eager --backends triton \
    --profile base,ours --out $OUT/gen_a_eager.json > $OUT/gen_a_eager.log 2>&1
echo "=== bench rc=$? at $((SECONDS-START)) s" >> $OUT/run1.txt
grep -E "^ *(eager|compiled) |^per decode step|gate|context" $OUT/gen_a_eager.log | tail -n 40 >> $OUT/run1.txt
cat $OUT/run1.txt
