"""Dynamo's guards of one compiled decode step (2 decoder layers, the compile_overhead harness's model) written to
$OUT/guards_{row}.txt, for counting by type: ``python guard_dump.py base|ours``."""

import io
import logging
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, "benchmarks")

import torch  # noqa: E402
from compile_overhead import compiled_step, mixed_call  # noqa: E402

row = sys.argv[1] if len(sys.argv) > 1 else "ours"
stream = io.StringIO()
torch._logging.set_logs(guards=True)
logging.getLogger("torch._dynamo").addHandler(logging.StreamHandler(stream))
model, forward, step = compiled_step(row, 2)
with torch.no_grad(), mixed_call(row, model):
    forward(**step)
with open(os.environ.get("OUT", "/tmp") + f"/guards_{row}.txt", "w") as file:
    file.write(stream.getvalue())
