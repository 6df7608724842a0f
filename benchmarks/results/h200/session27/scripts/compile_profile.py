"""cProfile of 200 compiled decode-step calls of the compile_overhead harness's model (10 decoder layers): where the
host time around the graph goes. ``python compile_profile.py base|ours``."""

import cProfile
import os
import pstats
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, "benchmarks")

import torch  # noqa: E402
from compile_overhead import compiled_step, mixed_call  # noqa: E402

row = sys.argv[1]
model, forward, step = compiled_step(row, 10)
with torch.no_grad(), mixed_call(row, model):
    forward(**step)
    forward(**step)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        forward(**step)
    profile.disable()
pstats.Stats(profile).sort_stats("tottime").print_stats(15)
