#!/usr/bin/env bash
# Device run C (session 31): the bf16 GPU fuzz with a longer limit (run B's 90 s ran out on a cold Triton cache), then
# compiled decode 32x8 of this code alone with its profile (run B's was cut by its limit after the timed rows).
set -u
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runC.txt
PYTHONPATH=.:benchmarks FUZZ_NO_SHRINK=1 timeout 150 python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs -s \
    tests/test_fuzz.py > $OUT/gpu_fuzz.txt 2>&1; echo "rc=$?" >> $OUT/gpu_fuzz.txt
grep -E "examples|passed|failed|^FAILED|rc=" $OUT/gpu_fuzz.txt >> $OUT/runC.txt
echo "=== fuzz done at $((SECONDS-START)) s" >> $OUT/runC.txt
LEFT=$((530 - (SECONDS-START)))
PYTHONPATH=.:benchmarks timeout $LEFT python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
    --configs 32x8 --adapter-dtype model --modes compiled --backends triton \
    --profile base,ours --out $OUT/genC_compiled_new.json > $OUT/genC_compiled_new.log 2>&1
echo "=== compiled (new code) rc=$? at $((SECONDS-START)) s" >> $OUT/runC.txt
grep -E "^ *(eager|compiled) |^per decode step|gate" $OUT/genC_compiled_new.log | tail -n 12 >> $OUT/runC.txt
cat $OUT/runC.txt
