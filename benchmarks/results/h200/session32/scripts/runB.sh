#!/usr/bin/env bash
# Device run B (session 32): where the compiled decode step's extra host time comes from. compile_overhead.py
# --generate times the compiled call inside generate (width 64, so GPU time is negligible) at 2 and 10 decoder
# layers, base / PEFT one adapter / ours: first with a replaying backend (guards and input gathering only), then with
# transformers' default CompileConfig (inductor, CUDA graphs).
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=.:benchmarks
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS
echo "commit ${FASTLORA_COMMIT:-?}" > $OUT/runB.txt
timeout 150 python benchmarks/compile_overhead.py --generate --device cuda --backend replay --rows base,peft,ours \
    >> $OUT/runB.txt 2> $OUT/replay.err
echo "=== replay rc=$? at $((SECONDS-START)) s" >> $OUT/runB.txt
TORCH_LOGS=perf_hints,recompiles timeout $((560 - (SECONDS-START))) python benchmarks/compile_overhead.py --generate \
    --device cuda --backend inductor --rows base,ours,peft >> $OUT/runB.txt 2> $OUT/inductor.err
echo "=== inductor rc=$? at $((SECONDS-START)) s" >> $OUT/runB.txt
grep -v "^$" $OUT/inductor.err | cut -c1-300 | sort | uniq -c | sort -rn | head -20 >> $OUT/runB.txt
cat $OUT/runB.txt
