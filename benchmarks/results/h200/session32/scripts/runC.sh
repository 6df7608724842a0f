#!/usr/bin/env bash
# Device run C (session 32): diagC.py (guards, bytecode and a cProfile of the compiled call on CUDA, 10 tiny layers)
# and diagD.py (the real-width compiled step of 8 layers: base, ours, ours with no-op LoRA ops).
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=.:benchmarks
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runC.txt
TORCH_LOGS=guards,bytecode timeout 120 python benchmarks/results/h200/session32/scripts/diagC.py cuda > $OUT/diagC.log 2>&1
echo "=== diagC rc=$? at $((SECONDS-START)) s" >> $OUT/runC.txt
gzip -9 $OUT/diagC.log
timeout $((570 - (SECONDS-START))) python benchmarks/results/h200/session32/scripts/diagD.py 8 >> $OUT/runC.txt 2> $OUT/diagD.err
echo "=== diagD rc=$? at $((SECONDS-START)) s" >> $OUT/runC.txt
tail -n 5 $OUT/diagD.err >> $OUT/runC.txt
cat $OUT/runC.txt
