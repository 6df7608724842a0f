#!/usr/bin/env bash
# Device run B (session 33): programmatic dependent launches (PDL) for the LoRA kernels, A/B in the 32-layer
# compiled decode step (profile_decode.py: base and ours, step time, GPU and host per step), PDL on then off then on,
# each its own process; then the GPU tests of the launch path and kernels.
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=.:benchmarks
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runB.txt
for pdl in 1 0; do
  PEFT_FASTLORA_PDL=$pdl timeout 190 python benchmarks/profile_decode.py --layers 32 --prompt 128 --new-tokens 33 \
      --repeats 5 --modes compiled --rows base,ours --out $OUT/profB_pdl$pdl.json > $OUT/profB_pdl$pdl.log 2>&1
  echo "=== PDL=$pdl rc=$? at $((SECONDS-START)) s" >> $OUT/runB.txt
  grep -E "^ *compiled|^per decode|mode dtype" $OUT/profB_pdl$pdl.log >> $OUT/runB.txt
done
timeout $((590 - (SECONDS-START))) python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs \
    tests/test_direct_launch.py tests/test_kernels.py tests/test_compile.py > $OUT/gpuB.txt 2>&1
echo "=== tests rc=$? at $((SECONDS-START)) s" >> $OUT/runB.txt
grep -E "passed|failed|^FAILED|^ERROR" $OUT/gpuB.txt | tail -n 12 >> $OUT/runB.txt
cat $OUT/runB.txt
