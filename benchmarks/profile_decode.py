"""Where a mixed-adapter decode step spends its time: GPU and host, per step, per kernel, prefill apart; base
against PEFT single and ours.

The rows, models and timing are ``bench_generate.py``'s (this script runs it with ``--profile`` and the defaults
below; ``bench_generate.py --profile base,ours`` does the same inside a timing run, at no extra compilation). A
Llama-3-8B-wide model (``--layers`` decoder layers, 4 by default: the per-layer cost shows in well under a minute;
32 for the result), 8 rank-16 adapters on all 7 projections, batch 32, round-robin assignment. For each mode, row
and adapter dtype:

- ``step_ms``: wall time of one decode step, ``(t(N new) − t(1 new)) / (N − 1)``, medians of interleaved repeats
  of unprofiled generates; this is what ``generate`` pays per token (it syncs every step, so a step costs host +
  GPU where they do not overlap). The one-token generate (``prefill_ms``) is the prefill, reported apart;
- ``gpu_ms``: summed GPU time of every kernel (and copy) per decode step, from ``torch.profiler`` over a generate of
  ``--profile-tokens`` new tokens minus the one-token generate, divided by the decode steps; ``lora_gpu_ms``: the
  part in kernels whose name matches ``--lora-kernels`` (our shrink/expand; not PEFT's GEMMs, which are cuBLAS:
  compare ``gpu_ms`` with base's for those). ``prefill_gpu_ms`` / ``prefill_lora_gpu_ms``: the same in the prefill;
- ``host_ms = step_ms − gpu_ms``: the part of a step the GPU is not busy, which is host time (Python, launches,
  dynamo's guards, the stopping check) since every step syncs;
- ``launches``: GPU operations per decode step; ``lookup_ms``: TorchDynamo's cache lookup (guard evaluation) per
  step, compiled mode;
- ``context_enter_ms``: the per-call context entry, once per ``generate``/``forward`` call (PEFT's
  ``_enable_peft_forward_hooks``, which the patch replaces with validation, bank sync and plan fill), wall-clock
  timed around it in every timed call (the profiler also shows it as ``peft_fastlora::call_context_enter``);
- per kernel (``kernels_decode`` / ``kernels_prefill`` in the JSON; ``--tables DIR`` writes text tables with each
  row's kernels against base's);
- with ``--memory``: the peak memory above the static weights of one prefill forward (``--prefill`` rows × tokens,
  ``use_cache=False``, ``logits_to_keep=1``) per row.

    python benchmarks/profile_decode.py --out profile.json [--adapter-dtype both] [--modes eager] [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

LORA_KERNELS = r"shrink|expand|lora|sgmv|bgmv|segment_gemm"
"""Kernel names counted as LoRA work (inductor's own kernels, ``triton_*``, never are)."""

TOP_KERNELS = 40


def is_lora_kernel(name: str, pattern: str) -> bool:
    return not name.startswith("triton_") and re.search(pattern, name) is not None


def capture(fn: Callable[[], object]) -> dict:
    """GPU time and calls per kernel name, dynamo cache lookup and context-entry CPU time, of one call of ``fn``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    kernels: dict[str, list] = {}
    lookup = context = 0.0
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            entry = kernels.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.self_device_time_total
        elif "Cache Lookup" in event.name:
            lookup += event.cpu_time_total
        elif event.name == "peft_fastlora::call_context_enter":
            context += event.cpu_time_total
    return {"kernels": kernels, "lookup_us": lookup, "context_enter_us": context}


def _kernel_list(kernels: dict[str, tuple[float, float]], pattern: str, per: str) -> list[dict]:
    """The ``TOP_KERNELS`` largest kernels (and every LoRA kernel), then the rest summed as ``(other)``."""
    ranked = sorted(kernels.items(), key=lambda item: -item[1][1])
    kept = [item for index, item in enumerate(ranked) if index < TOP_KERNELS or is_lora_kernel(item[0], pattern)]
    rest = [item for item in ranked if item not in kept]
    listed = [
        {"name": name, f"calls_{per}": calls, f"us_{per}": us, "lora": is_lora_kernel(name, pattern)}
        for name, (calls, us) in kept
    ]
    if rest:
        listed.append({"name": "(other)", f"calls_{per}": sum(c for _, (c, _) in rest),
                       f"us_{per}": sum(u for _, (_, u) in rest), "lora": False})  # fmt: skip
    return listed


def profile_row(run: Callable[[int], object], tokens: int, pattern: str = LORA_KERNELS, timer=None) -> dict:
    """Profile one row: a generate of ``tokens`` new tokens and a one-token generate (the prefill); the decode
    steps are their difference over ``tokens − 1`` steps. ``run(new_tokens)`` runs the row's generate."""
    long = capture(lambda: run(tokens))
    short = capture(lambda: run(1))
    if timer is not None:
        timer.take()  # the profiled calls' context times are not the timed ones
    steps = max(1, tokens - 1)
    decode = {}
    for name in set(long["kernels"]) | set(short["kernels"]):
        calls_long, us_long = long["kernels"].get(name, (0, 0.0))
        calls_short, us_short = short["kernels"].get(name, (0, 0.0))
        decode[name] = ((calls_long - calls_short) / steps, (us_long - us_short) / steps)
    prefill = {name: (calls, us) for name, (calls, us) in short["kernels"].items()}

    def total(kernels, lora_only=False, index=1):
        return sum(v[index] for name, v in kernels.items() if not lora_only or is_lora_kernel(name, pattern))

    return {
        "profile_tokens": tokens,
        "gpu_ms": total(decode) / 1e3,
        "lora_gpu_ms": total(decode, lora_only=True) / 1e3,
        "launches": total(decode, index=0),
        "lora_launches": total(decode, lora_only=True, index=0),
        "lookup_ms": (long["lookup_us"] - short["lookup_us"]) / steps / 1e3,
        "prefill_gpu_ms": total(prefill) / 1e3,
        "prefill_lora_gpu_ms": total(prefill, lora_only=True) / 1e3,
        "prefill_launches": total(prefill, index=0),
        "profiled_context_enter_ms": short["context_enter_us"] / 1e3,
        "kernels_decode": _kernel_list(decode, pattern, "per_step"),
        "kernels_prefill": _kernel_list(prefill, pattern, "prefill"),
    }


def step_times(long_s: float, short_s: float, new_tokens: int, profiled: dict) -> dict:
    """Wall times from unprofiled medians: a decode step, its host part (what the GPU did not cover), the prefill."""
    step_ms = (long_s - short_s) / max(1, new_tokens - 1) * 1e3
    return {
        "step_ms": step_ms,
        "host_ms": step_ms - profiled["gpu_ms"],
        "prefill_ms": short_s * 1e3,
        "prefill_host_ms": short_s * 1e3 - profiled["prefill_gpu_ms"],
        "generate_ms": long_s * 1e3,
    }


COLUMNS = [
    ("step_ms", "step ms", ".2f"), ("gpu_ms", "GPU ms", ".2f"), ("host_ms", "host ms", ".2f"),
    ("lora_gpu_ms", "LoRA GPU", ".3f"), ("launches", "launches", ".0f"), ("lora_launches", "LoRA ln", ".0f"),
    ("lookup_ms", "lookup", ".2f"), ("context_enter_ms", "ctx in ms", ".2f"), ("prefill_ms", "prefill", ".1f"),
    ("prefill_gpu_ms", "pf GPU", ".1f"), ("prefill_lora_gpu_ms", "pf LoRA", ".2f"),
]  # fmt: skip


def print_profiles(profiles: list[dict]) -> None:
    """One line per profiled row: per decode step, then the prefill (the one-token generate)."""
    if not profiles:
        return
    print("per decode step (ms) and prefill (ms); host = step − GPU; ctx in = per-call context entry")
    titles = " ".join(f"{title:>9}" for _, title, _ in COLUMNS)
    print(f"{'mode':>8} {'dtype':>5} {'adapters':>8} {'row':>18} {titles}")
    for result in profiles:
        cells = [
            "" if result.get(key) is None else format(result[key], spec) for key, _, spec in COLUMNS
        ]  # fmt: skip
        print(
            f"{result['mode']:>8} {result['adapter_dtype']:>5} {result['distinct_adapters']:>8} {result['row']:>18} "
            + " ".join(f"{cell:>9}" for cell in cells),
            flush=True,
        )


def kernel_tables(profiles: list[dict]) -> str:
    """Text tables: per profiled row, its decode kernels (µs per step, calls per step) against base's, largest
    difference first; then its prefill kernels."""
    lines = []
    base = next((p for p in profiles if p["row"] == "base"), None)
    base_kernels = {k["name"]: k for k in base["kernels_decode"]} if base else {}
    for result in profiles:
        title = f"{result['mode']} {result['row']} ({result['adapter_dtype']} adapters), {result['layers']} layers"
        lines += [f"== decode, per step: {title}", f"{'row µs':>9} {'base µs':>9} {'Δ µs':>9} {'calls':>7}  kernel"]
        mine = {k["name"]: k for k in result["kernels_decode"]}
        names = sorted(set(mine) | set(base_kernels), key=lambda name: -(
            mine.get(name, {}).get("us_per_step", 0) - base_kernels.get(name, {}).get("us_per_step", 0)))  # fmt: skip
        for name in names:
            us = mine.get(name, {}).get("us_per_step", 0.0)
            base_us = base_kernels.get(name, {}).get("us_per_step", 0.0)
            calls = mine.get(name, {}).get("calls_per_step", 0.0)
            if abs(us) < 0.05 and abs(base_us) < 0.05:
                continue
            flag = " [LoRA]" if mine.get(name, {}).get("lora") else ""
            lines.append(f"{us:9.1f} {base_us:9.1f} {us - base_us:9.1f} {calls:7.1f}  {name[:110]}{flag}")
        lines += [f"== prefill (one-token generate): {title}", f"{'µs':>9} {'calls':>7}  kernel"]
        for kernel in result["kernels_prefill"]:
            lines.append(f"{kernel['us_prefill']:9.1f} {kernel['calls_prefill']:7.0f}  {kernel['name'][:110]}")
        lines.append("")
    return "\n".join(lines)


def prefill_memory(bench, rows: int, tokens: int) -> list[dict]:
    """Peak memory above the static weights of one prefill forward, per row of ``bench``'s models."""
    models = bench.models
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, models.plain.config.vocab_size, (rows, tokens), generator=generator).to(bench.device)
    mixed = [f"a{row % max(bench.args.adapters)}" for row in range(rows)]
    cases = [("base", None, models.plain, {})]
    for dtype, peft in models.peft.items():
        cases += [("peft_single", dtype, peft, {}), ("peft_mixed", dtype, peft, {"adapter_names": mixed})]
        cases += [(f"ours_{backend}", dtype, model, {"adapter_names": mixed})
                  for backend, model in models.ours[dtype].items() if not isinstance(model, str)]  # fmt: skip
    results = []
    for name, dtype, model, kwargs in cases:
        if name == "peft_single":
            model.set_adapter("a0")
        with torch.no_grad():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            static = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            model(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - static) / 2**30
        results.append({"mode": "prefill_memory", "row": name, "adapter_dtype": dtype, "prefill": [rows, tokens],
                        "peak_gib": peak})  # fmt: skip
        print(f"prefill {rows}x{tokens} {name:>14} ({dtype} adapters): peak above static {peak:.2f} GiB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU, for a smoke run")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=33, help="new tokens of a timed generate (N − 1 steps)")
    parser.add_argument("--profile-tokens", type=int, default=9, help="new tokens of the profiled generate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapter-dtype", choices=["model", "fp32", "both"], default="model")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--backends", default="triton", help="comma list")
    parser.add_argument("--rows", default="base,peft_single,ours", help="rows to profile (comma list)")
    parser.add_argument("--gate", action="store_true", help="also run bench_generate's fp32-oracle gate")
    parser.add_argument("--lora-kernels", default=LORA_KERNELS, help="regex of LoRA kernel names")
    parser.add_argument("--memory", action="store_true", help="also measure one prefill's peak memory")
    parser.add_argument("--prefill", type=int, nargs=2, default=[8, 2048], metavar=("ROWS", "TOKENS"))
    parser.add_argument("--tables", default=None, help="folder for the per-kernel text tables")
    parser.add_argument("--out", default="profile.json")
    args = parser.parse_args()
    import bench_generate  # here, not at the top: bench_generate imports this module

    rows = set(args.rows.split(","))
    argv = [
        "--layers", str(args.layers), "--batches", str(args.batch), "--adapters", str(args.adapters),
        "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
        "--adapter-dtype", args.adapter_dtype, "--modes", *args.modes, "--backends", args.backends,
        "--profile", args.rows, "--profile-adapters", str(args.adapters), "--profile-tokens", str(args.profile_tokens),
        "--lora-kernels", args.lora_kernels, "--out", args.out, "--no-peft-mixed",
    ]  # fmt: skip
    argv += [] if args.gate else ["--no-gate"]
    argv += [] if "peft_disabled" in rows else ["--no-peft-disabled"]
    argv += [] if "peft_single" in rows else ["--no-peft-single"]
    argv += ["--profile-dir", args.tables] if args.tables else []
    if args.small:
        argv += ["--small", "--model-dtype", "bf16"]
    bench = bench_generate.main(argv)
    if args.memory and torch.cuda.is_available():
        memory = prefill_memory(bench, *args.prefill)
        with open(args.out) as handle:
            data = json.load(handle)
        data["memory"] = memory
        with open(args.out, "w") as handle:
            json.dump(data, handle, indent=1)


if __name__ == "__main__":
    main()
