#!/usr/bin/env bash
# Decode-speed benchmarks for issues 12 and 22 on one GPU (H200), 32-layer Llama-3-8B shape, in one device call each.
#
#   bash benchmarks/device_decode.sh a    # most important: batch 32, 8 adapters, bf16 vs fp32 adapters, eager and
#                                         # compiled, with the decode-step profile (prefill apart) of base and
#                                         # ours; estimated 420-500 s
#   bash benchmarks/device_decode.sh b    # tok/s against distinct adapters: batch 32 with 1, 8, 32 adapters (eager,
#                                         # compiled), eager batch 64 / 32 adapters, the FlashInfer row, host
#                                         # overhead; estimated 400-520 s
#
# One configuration per python process; each writes its JSON after every phase, so a process cut by its time limit
# keeps what it measured. The whole script stops starting work at BUDGET seconds (default 540) minus a reserve for
# the report, and caps each process at what is left. Everything lands in $OUT (the device tool's output folder):
# <step>.json, <step>.log, kernels/ (per-kernel tables of the profiles), generate_<part>.md/.png (merged report).
# Inductor and Triton caches live in build/bench_cache (git-ignored, kept between calls on a warm machine), so part b
# run after part a on the same machine reuses the compiled base and PEFT graphs of batch 32.
set -u
PART=${1:-a}
BUDGET=${BUDGET:-540}
RESERVE=20
OUT=${OUT:-$PWD/decode_out}
mkdir -p "$OUT/kernels"
export PYTHONPATH=.:benchmarks PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/bench_cache/inductor TRITON_CACHE_DIR=$PWD/build/bench_cache/triton
START=$SECONDS

# The settings every run shares: the 32-layer model, prompt 128, 32 new tokens, 3 interleaved repeats, PEFT's mixed
# row timed once without a warm-up run (eager: nothing to compile; 12-50 s a run).
COMMON=(--layers 32 --prompt 128 --new-tokens 32 --repeats 3 --peft-mixed-warmup 0 --peft-mixed-repeats 1)
# A CPU check of this script: BENCH_EXTRA="--small --model-dtype bf16 --prompt 8 --new-tokens 4" HOST_EXTRA=--small
read -r -a BENCH_EXTRA <<< "${BENCH_EXTRA:-}"
read -r -a HOST_EXTRA <<< "${HOST_EXTRA:-}"

step() {  # step NAME CAP_SECONDS SCRIPT ARGS...: run one process with min(CAP, what is left of the budget)
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - RESERVE - (SECONDS - START)))
    if ((left < 45)); then
        echo "=== SKIPPED $name: ${left} s of the budget left"
        return
    fi
    local limit=$((cap < left ? cap : left))
    echo "=== $name: limit ${limit} s, started at $((SECONDS - START)) s"
    local begun=$SECONDS
    timeout -k 10 "$limit" python "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    echo "=== $name: exit ${status}$( ((status == 124 || status == 137)) && echo ' (time limit)') after $((SECONDS - begun)) s"
    # The result lines (the full log, with warm-up and compile times, is in $OUT/$name.log).
    grep -E "^ *(eager|compiled) |^\[.*(done|built)|^per decode step" "$OUT/$name.log" | tail -n 50
    if ((status != 0)); then tail -n 8 "$OUT/$name.log"; fi
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null
    python -c "import sys, torch, triton, transformers, peft; print(sys.version.split()[0], torch.__version__, \
triton.__version__, transformers.__version__, peft.__version__)" 2>&1 | tail -n 1
} | tee "$OUT/environment.txt"

case "$PART" in
a)
    # (a) issues 22 + 12: bf16 vs fp32 adapters at batch 32 / 8 adapters, eager then compiled, one process per mode,
    # with the decode-step profile (prefill apart, per kernel) of base and ours after the timing.
    step gen_a_eager 220 benchmarks/bench_generate.py "${COMMON[@]}" --configs 32x8 --adapter-dtype both \
        --modes eager --backends triton --profile base,ours --profile-dir "$OUT/kernels" \
        --out "$OUT/gen_a_eager.json" "${BENCH_EXTRA[@]}"
    step gen_a_compiled 600 benchmarks/bench_generate.py "${COMMON[@]}" --configs 32x8 --adapter-dtype both \
        --modes compiled --backends triton --profile base,ours --profile-dir "$OUT/kernels" \
        --out "$OUT/gen_a_compiled.json" "${BENCH_EXTRA[@]}"
    ;;
b)
    # (b) issue 12's plot: tok/s against 1, 8, 32 distinct adapters (32 loaded) at batch 32, and eager batch 64 /
    # 32 adapters (same process, its own group, after batch 32); then compiled; then FlashInfer's row (its own
    # process: a backend that faults must not take the sweep with it); then the host overhead per layer.
    step gen_b_eager_sweep 280 benchmarks/bench_generate.py "${COMMON[@]}" --configs 32x1 32x8 32x32 64x32 \
        --modes eager --backends triton --out "$OUT/gen_b_eager_sweep.json" "${BENCH_EXTRA[@]}"
    step gen_b_compiled_sweep 260 benchmarks/bench_generate.py "${COMMON[@]}" --configs 32x1 32x8 32x32 \
        --modes compiled --backends triton --out "$OUT/gen_b_compiled_sweep.json" "${BENCH_EXTRA[@]}"
    step gen_b_flashinfer 90 benchmarks/bench_generate.py "${COMMON[@]}" --configs 32x8 --modes eager \
        --backends triton,flashinfer --no-peft-mixed --no-peft-disabled --out "$OUT/gen_b_flashinfer.json" \
        "${BENCH_EXTRA[@]}"
    step host_overhead 45 benchmarks/host_overhead.py --layers 4 --out "$OUT/host_overhead.json" "${HOST_EXTRA[@]}"
    ;;
*)
    echo "usage: bash benchmarks/device_decode.sh a|b" >&2
    exit 2
    ;;
esac

shopt -s nullglob
jsons=("$OUT"/gen_*.json)
if ((${#jsons[@]})); then
    python benchmarks/report_generate.py "${jsons[@]}" --table "$OUT/generate_$PART.md" --plot "$OUT/generate_$PART.png" \
        > "$OUT/report_$PART.log" 2>&1 || tail -n 5 "$OUT/report_$PART.log"
    cat "$OUT/generate_$PART.md"
fi
[ -f "$OUT/host_overhead.log" ] && grep "µs per call" "$OUT/host_overhead.log"
echo "=== part $PART done in $((SECONDS - START)) s"
