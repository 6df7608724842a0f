"""Dynamo's guards of one compiled decode step (2 decoder layers, the compile_overhead harness's model) written to
$OUT/guards_{row}.txt, for counting by type: ``python guard_dump.py base|ours``."""

import contextlib
import io
import logging
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, "benchmarks")

import torch  # noqa: E402
from compile_overhead import ASSIGNMENT, build, replaying_backend  # noqa: E402
from transformers import StaticCache  # noqa: E402

from peft_fastlora import tiny  # noqa: E402

row = sys.argv[1] if len(sys.argv) > 1 else "ours"
stream = io.StringIO()
torch._logging.set_logs(guards=True)
logging.getLogger("torch._dynamo").addHandler(logging.StreamHandler(stream))
model = build(row, 2)
inner = model if row == "base" else model.get_base_model()
step = {
    "input_ids": tiny.random_prompts(4, 5, seed=1)["input_ids"][:, :1],
    "past_key_values": StaticCache(config=inner.config, max_cache_len=64),
    "use_cache": True,
    "position_ids": torch.full((4, 1), 5),
    "cache_position": torch.tensor([5]),
}
forward = torch.compile(inner.forward, backend=replaying_backend, dynamic=False)
context = model._enable_peft_forward_hooks(adapter_names=ASSIGNMENT) if row == "ours" else contextlib.nullcontext()
with torch.no_grad(), context:
    forward(**step)
with open(os.environ.get("OUT", "/tmp") + f"/guards_{row}.txt", "w") as file:
    file.write(stream.getvalue())
