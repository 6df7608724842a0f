#!/usr/bin/env bash
# Device run B (session 27): run A's failing bf16 fuzz example on this session's code and on session 26's final code
# (0efb1e7, carried in .stage/old27), then compiled and eager decode 32x8 (bf16 adapters) with profiles.
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runB.txt
S=benchmarks/results/h200/session27/scripts
timeout 90 python $S/fuzz_example.py > $OUT/fuzz_new.txt 2>&1; echo "rc=$?" >> $OUT/fuzz_new.txt
PYTHONPATH=.stage/old27:benchmarks timeout 60 python $S/fuzz_example.py > $OUT/fuzz_old.txt 2>&1; echo "rc=$?" >> $OUT/fuzz_old.txt
for f in new old; do echo "--- fuzz example, $f code" >> $OUT/runB.txt; grep -E "package|seed|passed|rc=|Error" $OUT/fuzz_$f.txt >> $OUT/runB.txt; done
echo "=== fuzz done at $((SECONDS-START)) s" >> $OUT/runB.txt
for row in base ours; do
  CUDA_VISIBLE_DEVICES= timeout 60 python $S/guard_dump.py $row > /dev/null 2>&1
  echo "--- $row guards: $(grep -cE '\+- [A-Z_]+:' $OUT/guards_$row.txt) leaf, $(grep -c LAMBDA_GUARD $OUT/guards_$row.txt) lambda; $(grep -o 'Guard eval latency = .*' $OUT/guards_$row.txt)" >> $OUT/runB.txt
  CUDA_VISIBLE_DEVICES= timeout 60 python $S/compile_profile.py $row > $OUT/compile_profile_$row.txt 2>&1
  grep -A14 "ncalls" $OUT/compile_profile_$row.txt | cut -c1-150 >> $OUT/runB.txt
done
echo "=== host harnesses done at $((SECONDS-START)) s" >> $OUT/runB.txt
timeout 300 python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
    --configs 32x8 --adapter-dtype model --modes compiled --backends triton \
    --profile base,ours --out $OUT/genB_compiled.json > $OUT/genB_compiled.log 2>&1
echo "=== compiled rc=$? at $((SECONDS-START)) s" >> $OUT/runB.txt
grep -E "^ *(eager|compiled) |^per decode step|gate|ratio" $OUT/genB_compiled.log | tail -n 30 >> $OUT/runB.txt
LEFT=$((570 - (SECONDS-START)))
timeout $LEFT python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
    --peft-mixed-warmup 0 --peft-mixed-repeats 1 --configs 32x8 --adapter-dtype model --modes eager \
    --backends triton --profile base,ours --out $OUT/genB_eager.json > $OUT/genB_eager.log 2>&1
echo "=== eager rc=$? at $((SECONDS-START)) s" >> $OUT/runB.txt
grep -E "^ *(eager|compiled) |^per decode step|gate|ratio" $OUT/genB_eager.log | tail -n 30 >> $OUT/runB.txt
cat $OUT/runB.txt
