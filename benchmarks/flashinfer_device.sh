#!/bin/bash
# One device call for the FlashInfer backend (no internet there): install FlashInfer from what was carried, run the
# FlashInfer tests and the kernel benchmark (FlashInfer beside Triton and torch), then time FlashInfer's JIT compile
# of its segmented-GEMM modules from scratch with the time left. Run from a folder holding peft_fastlora/, tests/,
# benchmarks/, pyproject.toml and wheels/ (apache_tvm_ffi-*.whl, flashinfer_trimmed.tar.xz; see
# benchmarks/results/FLASHINFER.md for how the trimmed copy, and its prebuilt modules under data/aot, are made).
#   OUT=/tmp/out bash benchmarks/flashinfer_device.sh [total_s] 2>&1 | tee $OUT/run.log
# Everything ends within total_s (default 285). All FlashInfer caches stay under /tmp (nothing outlives the call).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + ${1:-285}))
elapsed() { echo "[$(($(date +%s) - START)) s]"; }
left() { echo $((DEADLINE - $(date +%s) - $1)); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site wheels/apache_tvm_ffi-*.whl || exit 1
tar -xJf wheels/flashinfer_trimmed.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHINFER_WORKSPACE_BASE=/tmp/fiws
echo "$(elapsed) installed; nvcc $(nvcc --version | tail -1)"
ls -la /tmp/site/flashinfer/data/aot/*/ 2>/dev/null
timeout "$(left 200)" python3 - <<'EOF'
import time
t0 = time.perf_counter()
import torch, triton, transformers, peft, flashinfer
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "transformers",
      transformers.__version__, "peft", peft.__version__, "flashinfer", flashinfer.__version__,
      torch.cuda.get_device_name(), torch.cuda.get_device_capability())
t1 = time.perf_counter()
from flashinfer.gemm.gemm_base import get_gemm_module, get_gemm_sm90_module
for get in (get_gemm_sm90_module, get_gemm_module):
    t = time.perf_counter()
    get()
    print(f"{get.__name__}: loaded in {time.perf_counter() - t:.2f} s")
print(f"import {t1 - t0:.1f} s")
EOF
echo "$(elapsed) modules loaded (prebuilt, or JIT where loading failed)"
timeout "$(left 110)" python3 -m pytest tests/test_flashinfer.py -q -p no:cacheprovider -o addopts="" -rs \
  --durations=8 -m gpu > "$OUT/tests.log" 2>&1
echo "pytest exit $?"; tail -n 30 "$OUT/tests.log"
echo "$(elapsed) tests done"
timeout "$(left 60)" python3 benchmarks/bench_kernels.py --tokens 1,32,128,512 --ranks 16,64 --adapters 8 \
  --no-siblings --out "$OUT/kernels_flashinfer_h200.json" > "$OUT/kernels_flashinfer_h200.txt" 2>&1
echo "bench exit $?"; cat "$OUT/kernels_flashinfer_h200.txt"
echo "$(elapsed) bench done; timing a from-scratch JIT compile of both modules (16 cores, in parallel)"
pids=()
for path in sm90 sm80; do
  timeout "$(left 3)" python3 - "$path" > "$OUT/jit_$path.log" 2>&1 <<'EOF' &
import sys, time
from flashinfer.jit.gemm import gen_gemm_module, gen_gemm_sm90_module
spec = gen_gemm_sm90_module() if sys.argv[1] == "sm90" else gen_gemm_module()
start = time.perf_counter()
spec.build(verbose=True)  # ninja from scratch in /tmp/fiws (ignores the prebuilt copy under data/aot)
print(f"JIT {spec.name}: compiled and linked in {time.perf_counter() - start:.1f} s")
EOF
  pids+=($!)
done
wait "${pids[@]}"
for path in sm90 sm80; do echo "== $path"; grep -E "JIT |rror" "$OUT/jit_$path.log" | cut -c1-300 | tail -n 5; done
# ninja's log: start and end (ms from the build's start) of each compile step that finished, also after a timeout
for log in $(find /tmp/fiws -name .ninja_log); do echo "== $log"; grep -v "^#" "$log" | awk '{print $1, $2, $4}'; done
echo "$(elapsed) end"
