"""Where a mixed-adapter decode step spends its time: GPU and host, per step, base against PEFT single and ours.

A Llama-3-8B-wide model (``--layers`` decoder layers, 4 by default: the per-layer cost shows in well under a minute)
with 8 rank-16 adapters on all 7 projections, batch 32, round-robin assignment. For each row and mode:

- ``step_ms``: wall time of one decode step, ``(t(N+1 new) − t(1 new)) / N``, medians of interleaved repeats; this is
  what ``generate`` pays (it syncs every step, so a step costs host + GPU where they do not overlap);
- ``gpu_ms``: summed GPU kernel time per decode step from ``torch.profiler`` (the decode generate minus the
  one-token generate), and ``lora_gpu_ms``, the part spent in our shrink/expand kernels;
- ``launches``: kernel launches per decode step; ``dynamo_lookup_ms``: TorchDynamo's cache lookup (guard
  evaluation) per step in compiled mode;
- with ``--memory``: the peak memory above the static weights of one prefill forward (``--prefill`` rows × tokens,
  ``use_cache=False``, ``logits_to_keep=1``).

    python benchmarks/profile_decode.py --out profile.json [--adapter-dtype fp32] [--modes eager compiled]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from bench_generate import build_model, mode_kwargs
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from peft_fastlora import patch_model, unpatch_model

LORA_KERNELS = ("shrink_kernel", "expand_kernel")


def _generate(model, batch, new_tokens, rows_kwargs, extra):
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(
        **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        **rows_kwargs, **extra,
    )  # fmt: skip
    torch.cuda.synchronize()
    return time.perf_counter() - started


def _profile(model, batch, new_tokens, rows_kwargs, extra, table: str | None = None) -> dict:
    """GPU kernel time, LoRA kernel time, kernel launches and dynamo lookup time of one generate; with ``table``, the
    profiler's per-op table (sorted by self CPU time) is written there."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _generate(model, batch, new_tokens, rows_kwargs, extra)
    if table:
        with open(table, "w") as handle:
            handle.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    gpu = lora = lookup = 0.0
    launches = 0
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            gpu += event.self_device_time_total
            launches += 1
            if any(name in event.name for name in LORA_KERNELS):
                lora += event.self_device_time_total
        elif "Cache Lookup" in event.name:
            lookup += event.cpu_time_total
    return {"gpu_us": gpu, "lora_gpu_us": lora, "launches": launches, "lookup_us": lookup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapter-dtype", choices=["model", "fp32"], default="model")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--memory", action="store_true", help="also measure one prefill's peak memory")
    parser.add_argument("--prefill", type=int, nargs=2, default=[8, 2048], metavar=("ROWS", "TOKENS"))
    parser.add_argument("--tables", default=None, help="folder for the profiler's per-op tables of each row")
    parser.add_argument("--out", default="profile.json")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    model = build_model(False, args.adapters, "cuda", adapter_dtype=args.adapter_dtype, layers=args.layers)
    names = [f"a{row % args.adapters}" for row in range(args.batch)]
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, 128256, (args.batch, args.prompt), generator=generator).cuda()}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])

    # Patched once, as a user does: without adapter_names the patched model runs PEFT's own path (base with
    # disable_adapter, PEFT single with set_adapter), so no row unpatches (a new patch state would re-trace
    # compiled graphs); PEFT's mixed batch (memory only) unpatches last.
    patch_model(model, backend="triton")

    def base():
        return model.disable_adapter(), {}

    def peft_single():
        model.set_adapter("a0")
        return None, {}

    def ours():
        return None, {"adapter_names": names}

    rows = {"base": base, "peft_single": peft_single, "ours_triton": ours}
    results = []
    print(f"{torch.cuda.get_device_name()}; {args.layers} layers, batch {args.batch}, {args.adapters} adapters "
          f"({args.adapter_dtype} dtype), prompt {args.prompt}, {args.new_tokens} new tokens", flush=True)  # fmt: skip
    print(f"{'mode':>8} {'row':>12} {'step ms':>8} {'GPU ms':>7} {'LoRA GPU':>8} {'launches':>8} {'lookup ms':>9}")
    for mode in args.modes:
        extra = mode_kwargs(mode, "cuda")
        torch._dynamo.reset()
        timings = {name: {"short": [], "long": []} for name in rows}
        with torch.no_grad():
            for setup in rows.values():  # warm-up and compilation
                context, kwargs = setup()
                with context or contextlib.nullcontext():
                    _generate(model, batch, args.new_tokens + 1, kwargs, extra)
                    _generate(model, batch, 1, kwargs, extra)
            for _ in range(args.repeats):
                for name, setup in rows.items():
                    context, kwargs = setup()
                    with context or contextlib.nullcontext():
                        timings[name]["short"].append(_generate(model, batch, 1, kwargs, extra))
                        timings[name]["long"].append(_generate(model, batch, args.new_tokens + 1, kwargs, extra))
            for name, setup in rows.items():
                context, kwargs = setup()
                with context or contextlib.nullcontext():
                    table = f"{args.tables}/{mode}_{name}.txt" if args.tables else None
                    long = _profile(model, batch, args.new_tokens + 1, kwargs, extra, table)
                    short = _profile(model, batch, 1, kwargs, extra)
                steps = args.new_tokens
                step_s = (statistics.median(timings[name]["long"]) - statistics.median(timings[name]["short"])) / steps
                per_step = {
                    key.replace("_us", "_ms"): (long[key] - short[key]) / steps / (1e3 if key.endswith("_us") else 1)
                    for key in long
                }
                result = {
                    "mode": mode, "row": name, "layers": args.layers, "batch": args.batch,
                    "adapter_dtype": args.adapter_dtype, "step_ms": step_s * 1e3, **per_step,
                }  # fmt: skip
                results.append(result)
                print(
                    f"{mode:>8} {name:>12} {result['step_ms']:>8.2f} {result['gpu_ms']:>7.2f} "
                    f"{result['lora_gpu_ms']:>8.3f} {result['launches']:>8.0f} {result['lookup_ms']:>9.2f}",
                    flush=True,
                )
    if args.memory:
        rows_, tokens = args.prefill
        ids = torch.randint(3, 128256, (rows_, tokens), generator=generator).cuda()
        mixed = [f"a{row % args.adapters}" for row in range(rows_)]
        for name, setup in {**rows, "peft_mixed": peft_single}.items():
            if name == "peft_mixed":
                unpatch_model(model)
            context, kwargs = setup()
            if name == "ours_triton":
                kwargs = {"adapter_names": mixed}
            if name == "peft_mixed":
                kwargs = {"adapter_names": mixed}
            with context or contextlib.nullcontext(), torch.no_grad():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                static = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                model(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs)
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - static) / 2**30
            results.append({"mode": "prefill_memory", "row": name, "prefill": [rows_, tokens], "peak_gib": peak})
            print(f"prefill {rows_}x{tokens} {name:>12}: peak above static {peak:.2f} GiB", flush=True)
    unpatch_model(model)
    with open(args.out, "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
