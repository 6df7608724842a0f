#!/usr/bin/env bash
# For the next session's first device calls (written in session 33, not run): the side-stream shrinks
# (PEFT_FASTLORA_OVERLAP=1) against the default, in the 32-layer compiled decode step (profile_decode.py: base and
# ours, step, GPU and host per step), each setting in its own process, then the compiled GPU tests of both settings.
# Run runC.sh (the GPU suite) in a call of its own: this one takes ~300 s of profiles plus the tests.
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=.:benchmarks
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/overlap.txt
for overlap in 1 0; do
  PEFT_FASTLORA_OVERLAP=$overlap timeout 170 python benchmarks/profile_decode.py --layers 32 --prompt 128 \
      --new-tokens 33 --repeats 5 --modes compiled --rows base,ours --out $OUT/prof_overlap$overlap.json \
      > $OUT/prof_overlap$overlap.log 2>&1
  echo "=== OVERLAP=$overlap rc=$? at $((SECONDS-START)) s" >> $OUT/overlap.txt
  grep -E "^ *compiled|^per decode|mode dtype|Error|error" $OUT/prof_overlap$overlap.log | tail -n 8 >> $OUT/overlap.txt
done
timeout $((590 - (SECONDS-START))) python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs \
    tests/test_compile.py tests/test_direct_launch.py > $OUT/gpu_overlap.txt 2>&1
echo "=== tests rc=$? at $((SECONDS-START)) s" >> $OUT/overlap.txt
grep -E "passed|failed|^FAILED|^ERROR|vs fp32" $OUT/gpu_overlap.txt | tail -n 12 >> $OUT/overlap.txt
cat $OUT/overlap.txt
