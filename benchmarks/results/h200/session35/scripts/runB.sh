#!/usr/bin/env bash
# Device run B (session 35): FlashInfer's GPU tests (tests/test_flashinfer.py -m gpu) and the peak-memory benchmark
# (triton backend; "prefill 8x2048" and "decode 64", one process each), side by side on one H200.
# FlashInfer travels in carry (.stage/wheels, git-ignored): apache_tvm_ffi-0.1.15.post2 (cp312 wheel) and
# flashinfer_jit_trimmed.tar.xz = flashinfer_python-0.7.2.post1 unpacked, all its Python, of flashinfer/data the
# headers (include/, cutlass/, cccl/, spdlog/) and the top-level files of csrc/ (its subfolders dropped: 178 MB
# unpacked, 13.6 MB as tar.xz), no prebuilt modules: FlashInfer JIT-compiles its two segmented-GEMM modules here.
# Every translation unit of both modules was preprocessed against the trimmed copy (nvcc -E) on the dev machine.
#   FASTLORA_COMMIT=<hash> bash benchmarks/results/h200/session35/scripts/runB.sh   (carry: .stage/wheels)
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FLASHINFER_WORKSPACE_BASE=/tmp/fiws
START=$SECONDS
el() { echo "$((SECONDS - START)) s"; }
S=$OUT/summary.txt
echo "commit ${FASTLORA_COMMIT:-?}; $(date -u)" > "$S"

# 1. Peak memory (needs no FlashInfer): own track, started first, configurations one after the other.
(
  export PYTHONPATH=.:benchmarks
  for c in "prefill 8x2048" "decode 64"; do
    tag=${c%% *}
    timeout 190 python3 benchmarks/bench_memory.py --config "$c" --backends triton --out "$OUT/mem.json" \
      > "$OUT/mem_$tag.log" 2>&1
    echo "=== bench_memory '$c' rc=$? at $(el)" >> "$OUT/mem_$tag.log"
  done
) &
MEM=$!

# 2. Install FlashInfer from what was carried.
E=$OUT/env.txt
{
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .stage/wheels/apache_tvm_ffi-*.whl 2>&1 | grep -v "Running pip as"
  tar -xJf .stage/wheels/flashinfer_jit_trimmed.tar.xz -C /tmp/site && echo "unpacked at $(el)"
  echo "nvcc: $(nvcc --version | tail -1); ninja: $(ninja --version 2>&1); $(which nvcc); CUDA_HOME=${CUDA_HOME:-unset}"
  PYTHONPATH=/tmp/site python3 -c "
import torch, triton, transformers, peft, flashinfer, tvm_ffi
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers',
      transformers.__version__, 'peft', peft.__version__, 'flashinfer', flashinfer.__version__, 'tvm_ffi',
      tvm_ffi.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  echo "import check rc=$? at $(el)"
} > "$E" 2>&1
export PYTHONPATH=/tmp/site:.:benchmarks

# 3. JIT-compile both segmented-GEMM modules side by side (sm90: the H200's path; sm80: the tests force it too).
J=$OUT/jit.log
pids=()
for path in sm90 sm80; do
  timeout 180 python3 - "$path" > "/tmp/jit_$path.log" 2>&1 <<'EOF' &
import sys, time
t0 = time.perf_counter()
from flashinfer.gemm.gemm_base import get_gemm_module, get_gemm_sm90_module
t1 = time.perf_counter()
(get_gemm_sm90_module if sys.argv[1] == "sm90" else get_gemm_module)()
print(f"JIT {sys.argv[1]}: import {t1 - t0:.1f} s, build_and_load {time.perf_counter() - t1:.1f} s")
EOF
  pids+=($!)
done
wait "${pids[@]}"
for path in sm90 sm80; do
  echo "== $path"; grep -vE "^\s*$" "/tmp/jit_$path.log" | cut -c1-400 | tail -n 25
done > "$J"
for log in $(find /tmp/fiws -name .ninja_log 2>/dev/null); do
  echo "== $log (start end ms, output)"; grep -v "^#" "$log" | awk '{print $1, $2, $4}'
done >> "$J"
echo "JIT done at $(el)" >> "$J"

# 4. FlashInfer's GPU tests (they load the modules compiled above from /tmp/fiws).
timeout 200 python3 -m pytest -m gpu -o addopts= -q -p no:cacheprovider -rfs --durations=5 tests/test_flashinfer.py \
  > "$OUT/tests.log" 2>&1
echo "=== pytest rc=$? at $(el)" >> "$OUT/tests.log"

wait $MEM
{
  echo "--- env"; cat "$E"
  echo "--- jit"; grep -E "^JIT|rror|JIT done" "$J" | cut -c1-300 | tail -n 8
  echo "--- tests"; grep -E "passed|failed|skipped|error|^FAILED|^ERROR|^SKIPPED|=== pytest" "$OUT/tests.log" | tail -n 15
  echo "--- memory"; grep -hE "peak above static|=== bench_memory|Error|error" "$OUT"/mem_*.log | tail -n 20
  echo "end at $(el)"
} >> "$S"
cat "$S"
