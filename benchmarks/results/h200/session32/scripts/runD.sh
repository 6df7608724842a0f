#!/usr/bin/env bash
# Device run D (session 32): the compiled-mode changes (PEFT's _disable_adapters read from the instance; fused sibling
# groups under torch.compile; the shared shrink's version check): the compiled call per decoder layer (replay, tiny
# width), the GPU suite (3 processes), then compiled decode 32x8 bf16 with profiles.
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=.:benchmarks
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runD.txt
timeout 100 python benchmarks/compile_overhead.py --generate --device cuda --backend replay --rows base,ours \
    >> $OUT/runD.txt 2> $OUT/replay.err
echo "=== replay rc=$? at $((SECONDS-START)) s" >> $OUT/runD.txt
PT="python -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs -o faulthandler_timeout=280"
( timeout 280 $PT tests/test_pool.py -s > $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt;
  FUZZ_NO_SHRINK=1 timeout 150 $PT -s tests/test_fuzz.py >> $OUT/gpu_p.txt 2>&1; echo "rc=$?" >> $OUT/gpu_p.txt ) &
( timeout 300 $PT tests/test_direct_launch.py tests/test_kernel_limits.py tests/test_compile.py tests/test_storage.py \
    tests/test_bad_input.py tests/test_kernels.py tests/test_siblings.py tests/test_per_call_check.py > $OUT/gpu_a.txt 2>&1; echo "rc=$?" >> $OUT/gpu_a.txt ) &
( timeout 300 $PT tests/test_oracle.py tests/test_dora.py tests/test_variants.py tests/test_quantized.py tests/test_calls.py \
    tests/test_concurrency.py tests/test_multi_device.py > $OUT/gpu_b.txt 2>&1; echo "rc=$?" >> $OUT/gpu_b.txt ) &
wait
echo "=== suite done at $((SECONDS-START)) s" >> $OUT/runD.txt
for f in p a b; do echo "--- $f" >> $OUT/runD.txt; grep -E "passed|failed|error|^FAILED|^ERROR|rc=|vs fp32|examples" $OUT/gpu_$f.txt 2>/dev/null | tail -n 14 >> $OUT/runD.txt; done
timeout $((575 - (SECONDS-START))) python benchmarks/bench_generate.py --layers 32 --prompt 128 --new-tokens 32 --repeats 3 \
    --configs 32x8 --adapter-dtype model --modes compiled --backends triton \
    --profile base,ours --out $OUT/genD_compiled.json > $OUT/genD_compiled.log 2>&1
echo "=== compiled rc=$? at $((SECONDS-START)) s" >> $OUT/runD.txt
grep -E "^ *(eager|compiled) |^per decode step|gate" $OUT/genD_compiled.log | tail -n 12 >> $OUT/runD.txt
cat $OUT/runD.txt
