"""The kernels compile for a GPU, checked on any machine: Triton's front end builds their TTIR for an sm_90 target
without a GPU. The interpreter (which runs the CPU tests) executes kernels as Python, so it accepts code the
compiler refuses: a variable of a loop body read after the loop once passed every CPU test and failed to build.
Every kernel builds with and without ``USE_PDL`` (the programmatic dependent launch's wait, which the interpreter
never runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUILD = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton._C.libtriton import ir
from peft_fastlora.kernels.sgmv import expand_group_kernel, expand_kernel, shrink_kernel

target = GPUTarget("cuda", 90, 32)
backend = CUDABackend(target)
options = backend.parse_options({})
SHRINK = ["x_ptr", "a_ptr", "h_ptr", "sorted_rows_ptr", "seg_slots_ptr", "seg_starts_ptr", "seg_lens_ptr",
          "num_segments_ptr", "offsets_ptr", "ranks_ptr", "K", "num_tokens", "tokens_per_row", "stride_x"]
EXPAND = ["h_ptr", "h_cols_ptr", "b_ptr", "scales_ptr", "y_ptr", "sorted_rows_ptr", "seg_slots_ptr",
          "seg_starts_ptr", "seg_lens_ptr", "num_segments_ptr", "offsets_ptr", "ranks_ptr", "N", "num_tokens",
          "tokens_per_row", "stride_y"]

GROUP_EXPAND = ["h_ptr", "sorted_rows_ptr", "seg_slots_ptr", "seg_starts_ptr", "seg_lens_ptr", "num_segments_ptr"]
GROUP_EXPAND += [f"{name}_{m}" for m in range(3) for name in ("h_cols", "b", "scales", "y", "offsets", "ranks", "N")]
GROUP_EXPAND += ["tiles_0", "tiles_01", "num_tokens", "tokens_per_row"]

def build(kernel, names, types, constexprs):
    signature = dict(zip(names, types))
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(list(signature).index(k),): v for k, v in constexprs.items()})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)

built = 0
cases = itertools.product(["bf16", "fp16", "fp32"], ["bf16", "fp32"], ["tf32", "ieee"], [1, 2])
for x, w, precision, r_tiles in cases:
    ints = ["*i32"] * 7 + ["i32"] * 4
    build(shrink_kernel, SHRINK, [f"*{x}", f"*{w}", "*fp32"] + ints,
          dict(BLOCK_M=16, BLOCK_R=16, R_TILES=r_tiles, BLOCK_K=64, K_STEPS=2, PRECISION=precision,
               USE_PDL=r_tiles == 2))
    for shared, splits in itertools.product([False, True], [1, 2]):
        build(expand_kernel, EXPAND, ["*fp32", "*i32", f"*{w}", "*fp32", f"*{x}"] + ["*i32"] * 7 + ["i32"] * 4,
              dict(BLOCK_M=16, BLOCK_R=16, R_TILES=r_tiles, H_STRIDE=16 * r_tiles, BLOCK_N=64, SPLITS=splits,
                   SHARED_H=shared, PRECISION=precision, USE_PDL=splits == 2))
    member = ["*i32", f"*{w}", "*fp32", f"*{x}", "*i32", "*i32", "i32"]
    for members in (2, 3):
        build(expand_group_kernel, GROUP_EXPAND, ["*fp32"] + ["*i32"] * 5 + member * 3 + ["i32"] * 4,
              dict(BLOCK_M=16, BLOCK_R=16, R_TILES=r_tiles, H_STRIDE=48 * r_tiles, BLOCK_N=64, SPLITS=2,
                   MEMBERS=members, PRECISION=precision, USE_PDL=members == 3))
    built += 7
print("built", built)
"""


def test_kernels_build_for_a_gpu_target():
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-c", BUILD], capture_output=True, text=True, timeout=300, env=environment, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "built 168" in completed.stdout, completed.stdout
