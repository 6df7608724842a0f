#!/usr/bin/env bash
# Device run A (session 33): issue 15's compiled target on session 32's final code (18461c0 + notes): the pool with
# its faster place() bookkeeping, compiled, 1000 adapters, K=64, 9 interleaved repeats.
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=.:benchmarks
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runA.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv >> $OUT/runA.txt
timeout 585 python benchmarks/bench_pool.py --adapters 1000 --capacity 64 --mode compiled --repeats 9 --warm 4 \
    --no-zipf-row --backend triton --out $OUT/poolA_compiled.json > $OUT/poolA_compiled.log 2>&1
echo "=== bench_pool compiled rc=$? at $((SECONDS-START)) s" >> $OUT/runA.txt
tail -n 30 $OUT/poolA_compiled.log >> $OUT/runA.txt
cat $OUT/runA.txt
