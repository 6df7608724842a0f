#!/usr/bin/env bash
# Device run B (session 34): issue 12's grid on today's code. Eager 32x1/32x8/32x32/64x32 in one process with the
# decode-step profile of 32x8 (base and ours), then compiled 32x32 (the README's rows were sessions 25-26's).
# The table and plot are made here afterwards (report_generate.py) from the JSON.
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?} overlap ${PEFT_FASTLORA_OVERLAP:-default}" > $OUT/runB.txt
COMMON=(--layers 32 --prompt 128 --new-tokens 32 --repeats 3 --peft-mixed-warmup 0 --peft-mixed-repeats 1)
timeout 320 python benchmarks/bench_generate.py "${COMMON[@]}" --configs 32x1 32x8 32x32 64x32 --modes eager \
    --backends triton --profile base,ours --profile-adapters 8 --out $OUT/grid_eager.json > $OUT/grid_eager.log 2>&1
echo "=== eager sweep rc=$? at $((SECONDS-START)) s" >> $OUT/runB.txt
grep -E "^ *(eager|compiled) |^per decode|mode dtype" $OUT/grid_eager.log >> $OUT/runB.txt
timeout $((585 - (SECONDS-START))) python benchmarks/bench_generate.py "${COMMON[@]}" --configs 32x32 --modes compiled \
    --backends triton --out $OUT/grid_compiled_32x32.json > $OUT/grid_compiled_32x32.log 2>&1
echo "=== compiled 32x32 rc=$? at $((SECONDS-START)) s" >> $OUT/runB.txt
grep -E "^ *(eager|compiled) |mode dtype" $OUT/grid_compiled_32x32.log >> $OUT/runB.txt
cat $OUT/runB.txt
