#!/usr/bin/env bash
# Device run A (session 32): the final code of session 31 (18b41b1 + notes), never run whole on a GPU: the GPU suite
# (3 processes), eager decode 32x8 bf16 with profiles (the fused groups after a 128-token prefill: 256 LoRA launches
# per step expected), then peak memory of a prefill 8x2048 and decode 64 (Triton only; fused groups hold no more
# than PEFT).
set -u
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runA.txt
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs --durations=5 -o faulthandler_timeout=280"
export PYTHONPATH=.:benchmarks
( timeout 280 $PT tests/test_pool.py -s > $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt;
  FUZZ_NO_SHRINK=1 timeout 150 $PT -s tests/test_fuzz.py > $OUT/gpu_f.txt 2>&1; echo "rc=$?" >> $OUT/gpu_f.txt ) &
( timeout 300 $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_storage.py \
    tests/test_bad_input.py tests/test_kernels.py tests/test_siblings.py tests/test_per_call_check.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout 300 $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py tests/test_calls.py \
    tests/test_concurrency.py tests/test_multi_device.py > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt ) &
wait
echo "=== suite done at $((SECONDS-START)) s" >> $OUT/runA.txt
for f in p a b f; do echo "--- $f" >> $OUT/runA.txt; grep -E "passed|failed|error|^FAILED|^ERROR|^SKIPPED|rc=|vs fp32|examples" $OUT/gpu_$f.txt 2>/dev/null | tail -n 14 >> $OUT/runA.txt; done
LEFT=$((470 - (SECONDS-START)))
timeout $LEFT python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
    --peft-mixed-warmup 0 --peft-mixed-repeats 1 --configs 32x8 --adapter-dtype model --modes eager \
    --backends triton --profile base,ours --out $OUT/genA_eager.json > $OUT/genA_eager.log 2>&1
echo "=== eager rc=$? at $((SECONDS-START)) s" >> $OUT/runA.txt
grep -E "^ *(eager|compiled) |^per decode step" $OUT/genA_eager.log | tail -n 10 >> $OUT/runA.txt
for c in "prefill 8x2048" "decode 64"; do
  LEFT=$((575 - (SECONDS-START))); [ $LEFT -lt 20 ] && break
  timeout $LEFT python benchmarks/bench_memory.py --config "$c" --backends triton --out $OUT/memA.json > $OUT/memA_${c// /_}.log 2>&1
  echo "=== memory $c rc=$? at $((SECONDS-START)) s" >> $OUT/runA.txt
  tail -n 8 $OUT/memA_${c// /_}.log >> $OUT/runA.txt
done
cat $OUT/runA.txt
