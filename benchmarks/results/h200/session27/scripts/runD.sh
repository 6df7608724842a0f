#!/usr/bin/env bash
# Device run D (session 27): the bf16 GPU fuzz test with its per-example bar as changed after run A (and an exact
# fp32 check of every example), then eager decode 32x8 (bf16 adapters), this session's code and session 26's final
# code (.stage/old27) in one run.
set -u
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runD.txt
PYTHONPATH=.:benchmarks FUZZ_NO_SHRINK=1 timeout 180 python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs -s \
    tests/test_fuzz.py > $OUT/gpu_fuzz.txt 2>&1; echo "rc=$?" >> $OUT/gpu_fuzz.txt
grep -E "examples|passed|failed|^FAILED|rc=" $OUT/gpu_fuzz.txt >> $OUT/runD.txt
echo "=== fuzz done at $((SECONDS-START)) s" >> $OUT/runD.txt
for code in new old; do
  P=.:benchmarks; [ $code = old ] && P=.stage/old27:benchmarks
  PYTHONPATH=$P python -c "import peft_fastlora; print('package', peft_fastlora.__file__)" >> $OUT/runD.txt 2>&1
  PYTHONPATH=$P timeout 110 python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
      --peft-mixed-warmup 0 --peft-mixed-repeats 1 --configs 32x8 --adapter-dtype model --modes eager \
      --backends triton --profile base,ours --out $OUT/genD_eager_$code.json > $OUT/genD_eager_$code.log 2>&1
  echo "=== eager ($code code) rc=$? at $((SECONDS-START)) s" >> $OUT/runD.txt
  grep -E "^ *(eager|compiled) |^per decode step" $OUT/genD_eager_$code.log | tail -n 10 >> $OUT/runD.txt
done
cat $OUT/runD.txt
