#!/usr/bin/env bash
# Device run B (session 31): the bf16 GPU fuzz test again (its fp32 check now consults an fp64 copy where PEFT's own
# fp32 is off), then compiled decode 32x8 (bf16 adapters) with profiles, this code (launch fields read through the
# storage key: ~8 fewer dynamo guards per LoRA layer) then session 30's final code (.stage/old31).
set -u
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runB.txt
PYTHONPATH=.:benchmarks FUZZ_NO_SHRINK=1 timeout 90 python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs -s \
    tests/test_fuzz.py > $OUT/gpu_fuzz.txt 2>&1; echo "rc=$?" >> $OUT/gpu_fuzz.txt
grep -E "examples|passed|failed|^FAILED|rc=" $OUT/gpu_fuzz.txt >> $OUT/runB.txt
echo "=== fuzz done at $((SECONDS-START)) s" >> $OUT/runB.txt
for code in new old; do
  P=.:benchmarks; [ $code = old ] && P=.stage/old31:benchmarks
  PYTHONPATH=$P python -c "import peft_fastlora; print('package', peft_fastlora.__file__)" >> $OUT/runB.txt 2>&1
  LEFT=$((585 - (SECONDS-START))); [ $code = new ] && LEFT=$((LEFT / 2))
  PYTHONPATH=$P timeout $LEFT python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
      --configs 32x8 --adapter-dtype model --modes compiled --backends triton \
      --profile base,ours --out $OUT/genB_compiled_$code.json > $OUT/genB_compiled_$code.log 2>&1
  echo "=== compiled ($code code) rc=$? at $((SECONDS-START)) s" >> $OUT/runB.txt
  grep -E "^ *(eager|compiled) |^per decode step|gate|package" $OUT/genB_compiled_$code.log | tail -n 12 >> $OUT/runB.txt
done
cat $OUT/runB.txt
