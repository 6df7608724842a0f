import os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, "benchmarks")
import cProfile, pstats, torch, time, contextlib
from compile_overhead import build, replaying_backend, ASSIGNMENT
from transformers import StaticCache
from peft_fastlora import tiny
row = sys.argv[1]
model = build(row, 10)
inner = model if row == "base" else model.get_base_model()
step = {"input_ids": tiny.random_prompts(4, 5, seed=1)["input_ids"][:, :1],
    "past_key_values": StaticCache(config=inner.config, max_cache_len=64), "use_cache": True,
    "position_ids": torch.full((4, 1), 5), "cache_position": torch.tensor([5])}
forward = torch.compile(inner.forward, backend=replaying_backend, dynamic=False)
ctx = model._enable_peft_forward_hooks(adapter_names=ASSIGNMENT) if row == "ours" else contextlib.nullcontext()
with torch.no_grad(), ctx:
    forward(**step); forward(**step)
    pr = cProfile.Profile(); pr.enable()
    for _ in range(200): forward(**step)
    pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(15)
