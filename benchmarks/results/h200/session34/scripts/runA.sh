#!/usr/bin/env bash
# Device run A (session 34): the side-stream shrinks (PEFT_FASTLORA_OVERLAP=1) against the default in the 32-layer
# compiled decode profile (base and ours; one process per setting), then the whole GPU suite (3 processes; the
# compiled tests include the side-stream variants, the pool tests the per-adapter copies) on session 33's final code.
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=.:benchmarks
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runA.txt
for overlap in 1 0; do
  PEFT_FASTLORA_OVERLAP=$overlap timeout 160 python benchmarks/profile_decode.py --layers 32 --prompt 128 \
      --new-tokens 33 --repeats 5 --modes compiled --rows base,ours --out $OUT/prof_overlap$overlap.json \
      > $OUT/prof_overlap$overlap.log 2>&1
  echo "=== OVERLAP=$overlap rc=$? at $((SECONDS-START)) s" >> $OUT/runA.txt
  grep -E "^ *compiled|^per decode|mode dtype|Error|error" $OUT/prof_overlap$overlap.log | tail -n 8 >> $OUT/runA.txt
done
LEFT=$((585 - (SECONDS-START)))
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs"
( timeout $((LEFT/2)) $PT tests/test_pool.py -s > $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt;
  FUZZ_NO_SHRINK=1 timeout $((LEFT - LEFT/2 - 5)) $PT -s tests/test_fuzz.py >> $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt ) &
( timeout $LEFT $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_storage.py \
    tests/test_bad_input.py tests/test_kernels.py tests/test_siblings.py tests/test_per_call_check.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout $LEFT $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py tests/test_calls.py \
    tests/test_concurrency.py tests/test_multi_device.py > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt ) &
wait
echo "=== suite done at $((SECONDS-START)) s" >> $OUT/runA.txt
for f in p a b; do echo "--- $f" >> $OUT/runA.txt; grep -E "passed|failed|error|^FAILED|^ERROR|rc=|vs fp32|examples" $OUT/gpu_$f.txt 2>/dev/null | tail -n 14 >> $OUT/runA.txt; done
cat $OUT/runA.txt
