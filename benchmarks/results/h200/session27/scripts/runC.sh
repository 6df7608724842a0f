#!/usr/bin/env bash
# Device run C (session 27): A/B of this session's compile-guard cuts against session 26's final code (0efb1e7,
# carried in .stage/old27) in one run: the compile-guard harness on this host's CPU (interleaved old/new), then
# compiled decode 32x8 (bf16 adapters) with profiles, new code then old code.
set -u
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runC.txt
for round in 1 2; do
  for code in new old; do
    P=.:benchmarks; [ $code = old ] && P=.stage/old27:benchmarks
    echo "--- harness round $round, $code code" >> $OUT/runC.txt
    CUDA_VISIBLE_DEVICES= PYTHONPATH=$P timeout 90 python benchmarks/compile_overhead.py --rows ours > $OUT/harness_${code}_$round.txt 2>&1
    grep "per layer" $OUT/harness_${code}_$round.txt >> $OUT/runC.txt
  done
done
CUDA_VISIBLE_DEVICES= PYTHONPATH=.:benchmarks timeout 60 python benchmarks/compile_overhead.py --rows base > $OUT/harness_base.txt 2>&1
grep "per layer" $OUT/harness_base.txt >> $OUT/runC.txt
echo "=== harness done at $((SECONDS-START)) s" >> $OUT/runC.txt
for code in new old; do
  P=.:benchmarks; [ $code = old ] && P=.stage/old27:benchmarks
  PYTHONPATH=$P python -c "import peft_fastlora; print('package', peft_fastlora.__file__)" >> $OUT/runC.txt 2>&1
  PYTHONPATH=$P timeout 230 python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
      --configs 32x8 --adapter-dtype model --modes compiled --backends triton \
      --profile base,ours --out $OUT/genC_compiled_$code.json > $OUT/genC_compiled_$code.log 2>&1
  echo "=== compiled ($code code) rc=$? at $((SECONDS-START)) s" >> $OUT/runC.txt
  grep -E "^ *(eager|compiled) |^per decode step|gate|ratio|package" $OUT/genC_compiled_$code.log | tail -n 12 >> $OUT/runC.txt
done
cat $OUT/runC.txt
