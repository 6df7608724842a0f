"""cProfile of 200 compiled decode-step calls of the compile_overhead harness's model (10 decoder layers): where the
host time around the graph goes. ``python compile_profile.py base|ours``."""

import contextlib
import cProfile
import os
import pstats
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, "benchmarks")

import torch  # noqa: E402
from compile_overhead import ASSIGNMENT, build, replaying_backend  # noqa: E402
from transformers import StaticCache  # noqa: E402

from peft_fastlora import tiny  # noqa: E402

row = sys.argv[1]
model = build(row, 10)
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
    forward(**step)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        forward(**step)
    profile.disable()
pstats.Stats(profile).sort_stats("tottime").print_stats(15)
