#!/usr/bin/env bash
# Device run 4 (session 25): final numbers. Eager sweep (plot), FlashInfer row, compiled both adapter dtypes.
set -u
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
COMMON=(--layers 32 --prompt 128 --new-tokens 32 --repeats 3 --peft-mixed-warmup 0 --peft-mixed-repeats 1)
timeout 250 python benchmarks/bench_generate.py "${COMMON[@]}" --configs 32x1 32x8 32x32 64x32 --modes eager \
    --backends triton --out $OUT/gen4_eager_sweep.json > $OUT/gen4_eager_sweep.log 2>&1
echo "=== eager sweep rc=$? at $((SECONDS-START)) s"
grep -E "^ *(eager|compiled) " $OUT/gen4_eager_sweep.log
( python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .stage/wheels/apache_tvm_ffi-*.whl \
  && tar -xJf .stage/wheels/flashinfer_trimmed.tar.xz -C /tmp/site ) > $OUT/fi_install.log 2>&1
PYTHONPATH=/tmp/site:.:benchmarks FLASHINFER_WORKSPACE_BASE=/tmp/fiws timeout 120 python benchmarks/bench_generate.py "${COMMON[@]}" \
    --configs 32x8 --modes eager --backends triton,flashinfer --no-peft-mixed --no-peft-disabled \
    --out $OUT/gen4_flashinfer.json > $OUT/gen4_flashinfer.log 2>&1
echo "=== flashinfer rc=$? at $((SECONDS-START)) s"
grep -E "^ *(eager|compiled) " $OUT/gen4_flashinfer.log; tail -n 3 $OUT/gen4_flashinfer.log
LEFT=$((570 - (SECONDS-START)))
timeout $LEFT python benchmarks/bench_generate.py "${COMMON[@]}" --configs 32x8 --adapter-dtype both --modes compiled \
    --backends triton --out $OUT/gen4_compiled.json > $OUT/gen4_compiled.log 2>&1
echo "=== compiled rc=$? at $((SECONDS-START)) s"
grep -E "^ *(eager|compiled) |^\[" $OUT/gen4_compiled.log | tail -n 14
python benchmarks/report_generate.py $OUT/gen4_eager_sweep.json --table $OUT/generate_eager_sweep.md \
    --plot $OUT/generate_eager_sweep.png > $OUT/report.log 2>&1 || tail -n 5 $OUT/report.log
