#!/bin/bash
# One device call for the FlashInfer backend (no internet there): install FlashInfer from what was carried, compile
# its segmented-GEMM modules (timed, cache under /tmp so that nothing outlives the call), run the FlashInfer tests and
# the kernel benchmark (FlashInfer beside Triton and torch). Run from a folder holding peft_fastlora/, tests/,
# benchmarks/, pyproject.toml and wheels/ (apache_tvm_ffi-*.whl and flashinfer_trimmed.tar.xz, see
# benchmarks/results/FLASHINFER.md for how the trimmed copy is made).
#   OUT=/tmp/out bash benchmarks/flashinfer_device.sh [total_s] [bench_s]
# The whole script ends within total_s (default 285); the benchmark gets the last bench_s (default 45).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + ${1:-285}))
BENCH_S=${2:-45}
elapsed() { echo "[$(($(date +%s) - START)) s]"; }
left() { echo $((DEADLINE - $(date +%s) - $1)); }
exec > >(tee "$OUT/run.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site wheels/apache_tvm_ffi-*.whl || exit 1
tar -xJf wheels/flashinfer_trimmed.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHINFER_WORKSPACE_BASE=/tmp/fiws
echo "$(elapsed) installed"
# The toolkit: FlashInfer compiles with the nvcc on PATH and links -lcublas -lcublasLt from its lib64; find the
# headers and unversioned libraries where that toolkit lacks them (pip's nvidia packages).
NVCC=$(command -v nvcc) && CUDA_ROOT=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
echo "nvcc: $NVCC ($(nvcc --version | tail -1)), toolkit $CUDA_ROOT"
SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p /tmp/culink
for header in cublasLt.h curand_kernel.h; do
  if [ ! -e "$CUDA_ROOT/include/$header" ]; then
    found=$(find "$SITE/nvidia" /usr/local/cuda*/ /usr/include -name "$header" 2>/dev/null | head -1)
    echo "$header not in $CUDA_ROOT/include; using ${found:-nothing}"
    [ -n "$found" ] && export CPATH="$(dirname "$found")${CPATH:+:$CPATH}"
  fi
done
for lib in cublas cublasLt; do
  if [ ! -e "$CUDA_ROOT/lib64/lib$lib.so" ]; then
    found=$(find "$SITE/nvidia" /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu -name "lib$lib.so*" 2>/dev/null | sort | head -1)
    echo "lib$lib.so not in $CUDA_ROOT/lib64; linking ${found:-nothing}"
    [ -n "$found" ] && ln -sf "$found" "/tmp/culink/lib$lib.so"
  fi
done
export LIBRARY_PATH=/tmp/culink${LIBRARY_PATH:+:$LIBRARY_PATH}
python3 -c "import torch, triton, transformers, peft, flashinfer; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'flashinfer', flashinfer.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" || exit 1
echo "$(elapsed) probed; compiling FlashInfer's sm90 and sm80 segmented-GEMM modules in parallel"
for path in sm90 sm80; do
  timeout "$(left $((BENCH_S + 40)))" python3 - "$path" > "/tmp/jit_$path.log" 2>&1 <<'EOF' &
import sys, time
t0 = time.perf_counter()
import torch  # noqa: F401
from flashinfer.gemm.gemm_base import get_gemm_module, get_gemm_sm90_module
t1 = time.perf_counter()
(get_gemm_sm90_module if sys.argv[1] == "sm90" else get_gemm_module)()
print(f"JIT {sys.argv[1]}: import {t1 - t0:.1f} s, compile and load {time.perf_counter() - t1:.1f} s")
EOF
done
wait
tail -n 5 /tmp/jit_sm90.log /tmp/jit_sm80.log
echo "$(elapsed) JIT done"
(cd /tmp/fiws && tar -cJf "$OUT/jit_cache.tar.xz" $(find . -name '*.so')) && ls -la "$OUT/jit_cache.tar.xz"
timeout "$(left "$BENCH_S")" python3 -m pytest tests/test_flashinfer.py -q -p no:cacheprovider -o addopts="" -rs \
  --durations=5 -m gpu 2>&1 | tail -n 40
echo "$(elapsed) tests done"
timeout "$(left 3)" python3 benchmarks/bench_kernels.py --tokens 1,32,128,512 --ranks 16,64 --adapters 8 \
  --no-siblings --out "$OUT/kernels_flashinfer_h200.json" 2>&1 | grep -v "^$" | tee "$OUT/kernels_flashinfer_h200.txt"
echo "$(elapsed) bench done"
