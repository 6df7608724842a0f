"""Device run C (session 32), part 2: the compiled decode step of the real width (Llama-3-8B shape, 8 layers, batch 32,
8 bf16 rank-16 adapters, prompt 128) for base, ours, and ours with the LoRA custom ops replaced by no-ops (same
graph and guards, no LoRA kernels in the CUDA graph): ours − no-op = what the LoRA kernels cost the step (kernel
time and the gaps between graph nodes); no-op − base = host and graph overhead. Step = (generate of 33 new tokens −
generate of 1) / 32, median of 5 interleaved repeats."""

import argparse
import statistics
import sys
import time

sys.path.insert(0, "benchmarks")
import bench_generate as bg  # noqa: E402
import torch  # noqa: E402

from peft_fastlora import patch_model  # noqa: E402
from peft_fastlora.kernels import launch  # noqa: E402

LAYERS = int(sys.argv[1]) if len(sys.argv) > 1 else 8
torch._dynamo.config.recompile_limit = 64
args = argparse.Namespace(small=False, layers=LAYERS, model_dtype="bf16", loaded_adapters=8, dora=False)
models = bg.build_models(args, "cuda", ["model"], [])
ours = models.peft["model"]
patch_model(ours, backend="triton")
torch.manual_seed(1)
batch = {
    "input_ids": torch.randint(0, 128256, (32, 128), device="cuda"),
    "attention_mask": torch.ones(32, 128, dtype=torch.long, device="cuda"),
}
names = [f"a{i % 8}" for i in range(32)]
extra = bg.mode_kwargs("compiled", "cuda")


def gen(row, tokens):
    model, kwargs = (models.plain, {}) if row == "base" else (ours, {"adapter_names": names})
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs, **extra)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def phase(label, rows):
    for row in rows:
        gen(row, 33), gen(row, 1), gen(row, 33)
    steps = {row: [] for row in rows}
    for _ in range(5):
        for row in rows:
            steps[row].append((gen(row, 33) - gen(row, 1)) / 32 * 1e3)
    for row in rows:
        print(
            f"{label:>6} {row:>5}: step {statistics.median(steps[row]):.3f} ms "
            f"(repeats {', '.join(f'{s:.2f}' for s in steps[row])})",
            flush=True,
        )


phase("normal", ["base", "ours"])
torch._dynamo.reset()


def noop_shrink(
    x, sorted_rows, seg_slots, seg_starts, seg_lens, num_segments, tokens_per_row, key, num_slots, max_rank
):
    return launch._keyed_shrink_fake(
        x, sorted_rows, seg_slots, seg_starts, seg_lens, num_segments, tokens_per_row, key, num_slots, max_rank
    )


launch.keyed_shrink_op.register_kernel("cuda")(noop_shrink)
launch.keyed_expand_op.register_kernel("cuda")(lambda *a: None)
launch.keyed_group_expand_op.register_kernel("cuda")(lambda *a: None)
phase("no-op", ["base", "ours"])
