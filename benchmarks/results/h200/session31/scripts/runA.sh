#!/usr/bin/env bash
# Device run A (session 31): the GPU suite (3 processes) on the code with the launch fields read through the storage
# key and the fused sibling groups (one expand launch per q/k/v and gate/up in eager calls), then eager decode 32x8
# (bf16 adapters) with profiles, this code and session 30's final code (b17d0f5, carried in .stage/old31).
set -u
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runA.txt
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs --durations=5 -o faulthandler_timeout=280"
export PYTHONPATH=.:benchmarks
( timeout 280 $PT tests/test_pool.py -s > $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt;
  FUZZ_NO_SHRINK=1 timeout 100 $PT tests/test_fuzz.py > $OUT/gpu_f.txt 2>&1; echo "rc=$?" >> $OUT/gpu_f.txt ) &
( timeout 300 $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_storage.py \
    tests/test_bad_input.py tests/test_kernels.py tests/test_siblings.py tests/test_per_call_check.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout 300 $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py tests/test_calls.py \
    tests/test_concurrency.py tests/test_multi_device.py > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt ) &
wait
echo "=== suite done at $((SECONDS-START)) s" >> $OUT/runA.txt
for f in p a b f; do echo "--- $f" >> $OUT/runA.txt; grep -E "passed|failed|error|^FAILED|^ERROR|^SKIPPED|rc=|vs fp32" $OUT/gpu_$f.txt 2>/dev/null | tail -n 14 >> $OUT/runA.txt; done
for code in new old; do
  P=.:benchmarks; [ $code = old ] && P=.stage/old31:benchmarks
  PYTHONPATH=$P python -c "import peft_fastlora; print('package', peft_fastlora.__file__)" >> $OUT/runA.txt 2>&1
  LEFT=$((585 - (SECONDS-START))); [ $code = new ] && LEFT=$((LEFT / 2))
  PYTHONPATH=$P timeout $LEFT python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
      --peft-mixed-warmup 0 --peft-mixed-repeats 1 --configs 32x8 --adapter-dtype model --modes eager \
      --backends triton --profile base,ours --out $OUT/genA_eager_$code.json > $OUT/genA_eager_$code.log 2>&1
  echo "=== eager ($code code) rc=$? at $((SECONDS-START)) s" >> $OUT/runA.txt
  grep -E "^ *(eager|compiled) |^per decode step" $OUT/genA_eager_$code.log | tail -n 10 >> $OUT/runA.txt
done
cat $OUT/runA.txt
