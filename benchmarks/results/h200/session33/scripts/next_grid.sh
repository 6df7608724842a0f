#!/usr/bin/env bash
# For a next session (written in session 33, not run): issue 12's grid on today's code, the README's eager table and
# plot (session 25's) and the compiled 32x32 row (session 26's) anew. Eager sweep (~250 s, as session 25's run 4),
# then compiled 32x32 (~200 s), then the table and the tok/s-against-distinct-adapters plot.
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/grid.txt
COMMON=(--layers 32 --prompt 128 --new-tokens 32 --repeats 3 --peft-mixed-warmup 0 --peft-mixed-repeats 1)
timeout 280 python benchmarks/bench_generate.py "${COMMON[@]}" --configs 32x1 32x8 32x32 64x32 --modes eager \
    --backends triton --out $OUT/grid_eager.json > $OUT/grid_eager.log 2>&1
echo "=== eager sweep rc=$? at $((SECONDS-START)) s" >> $OUT/grid.txt
grep -E "^ *(eager|compiled) " $OUT/grid_eager.log >> $OUT/grid.txt
timeout $((560 - (SECONDS-START))) python benchmarks/bench_generate.py "${COMMON[@]}" --configs 32x32 --modes compiled \
    --backends triton --out $OUT/grid_compiled_32x32.json > $OUT/grid_compiled_32x32.log 2>&1
echo "=== compiled 32x32 rc=$? at $((SECONDS-START)) s" >> $OUT/grid.txt
grep -E "^ *(eager|compiled) " $OUT/grid_compiled_32x32.log >> $OUT/grid.txt
python benchmarks/report_generate.py $OUT/grid_eager.json --table $OUT/grid_eager.md --plot $OUT/grid_eager.png \
    > $OUT/report.log 2>&1 || tail -n 5 $OUT/report.log >> $OUT/grid.txt
cat $OUT/grid.txt
