"""Host time around a compiled decode step's graph, per decoder layer: base model, PEFT one adapter, ours.

A torch.compile'd forward pays, on every call, for what surrounds its graph: dynamo's guard check, gathering every
graph input from its Python source, replaying side effects. This measures exactly that, on the CPU and without a
GPU: the compile backend replays the graph's first output instead of running the graph, so a call costs only what
surrounds it. Each model is a tiny Llama (width 64) at two depths; the difference divided by the extra layers is
the cost per decoder layer (4 rank-4 adapters on all 7 projections; ours with a mixed assignment, Triton under the
interpreter, which never runs here).

What it does not see: the CUDA-graph and AOT wrappers' per-input work on a GPU, which the H200 runs showed to be
larger than the guards (``benchmarks/results/h200/NOTES.md``, session 26). Measured on a 2-core CPU at commit
6a7fde9: base 6.3 µs, PEFT one adapter 29.1 µs, ours 16.0 µs per decoder layer (21.0 before the storage keys).

``--generate`` measures inside ``generate`` instead (static cache, so transformers compiles the decode step): the
median time of one call of the compiled forward, and the median gap between two calls (the loop's own host work),
per decoder layer from the two depths. With ``--device cuda --backend inductor`` the call is the real one
(inductor, CUDA graphs: transformers' default CompileConfig), at width 64, so its GPU time is negligible and
what differs between rows is host time around the graph.

    python benchmarks/compile_overhead.py [--rows base,peft,ours] [--calls 400]
    python benchmarks/compile_overhead.py --generate --device cuda --backend inductor   # on a GPU
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the patch must load on a CPU

import argparse
import contextlib
import statistics
import time

import torch
import torch._dynamo
from bench_generate import TARGETS
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, CompileConfig, StaticCache

from peft_fastlora import patch_model, tiny

ASSIGNMENT = ["a0", "a1", "__base__", "a3"]


def build(row: str, layers: int, device: str = "cpu"):
    """``row``'s model ("base", "peft" or "ours") with ``layers`` decoder layers on ``device``, in eval mode."""
    config = tiny.tiny_config("llama")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(device).eval()
    if row == "base":
        return base
    lora = {"r": 4, "target_modules": TARGETS, "init_lora_weights": False}
    model = get_peft_model(base, LoraConfig(**lora), adapter_name="a0")
    for index in range(1, 4):
        model.add_adapter(f"a{index}", LoraConfig(**lora))
    model.eval()
    if row == "ours":
        patch_model(model, backend="triton")
    return model


def replaying_backend(graph_module, example_inputs):
    """A compile backend whose graph runs once; later calls return that first output."""
    first = []

    def run(*args):
        if not first:
            first.append(graph_module.forward(*args))
        return first[0]

    return run


def compiled_step(row: str, layers: int, backend=replaying_backend):
    """``(model, compiled forward, one decode step's kwargs)`` of ``row`` at ``layers`` (1 token per row, static
    cache); call the forward inside ``mixed_call(row, model)``."""
    model = build(row, layers)
    inner = model if row == "base" else model.get_base_model()
    step = {
        "input_ids": tiny.random_prompts(len(ASSIGNMENT), 5, seed=1)["input_ids"][:, :1],
        "past_key_values": StaticCache(config=inner.config, max_cache_len=64),
        "use_cache": True,
        "position_ids": torch.full((len(ASSIGNMENT), 1), 5),
        "cache_position": torch.tensor([5]),
    }
    return model, torch.compile(inner.forward, backend=backend, dynamic=False), step


def mixed_call(row: str, model):
    """The context a decode step of ``row`` runs in: ours inside a mixed call of ``ASSIGNMENT``."""
    return model._enable_peft_forward_hooks(adapter_names=ASSIGNMENT) if row == "ours" else contextlib.nullcontext()


def median_call_us(row: str, layers: int, calls: int) -> float:
    """Median µs of one compiled decode-step call (1 token per row, static cache) of ``row`` at ``layers``."""
    torch._dynamo.reset()
    model, forward, step = compiled_step(row, layers)
    best = float("inf")
    for _ in range(3):  # the fastest of three medians: the CPU's own noise only ever adds
        with torch.no_grad(), mixed_call(row, model):
            forward(**step)
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                forward(**step)
                times.append(time.perf_counter() - started)
        best = min(best, statistics.median(times) * 1e6)
    return best


def generate_call_us(row: str, layers: int, device: str, backend: str, new_tokens: int = 40) -> tuple[float, float]:
    """``(call, gap)``: median µs of one call of the compiled decode step inside ``generate`` (static cache), and
    the median µs between the end of one call and the start of the next; the fastest of three generates."""
    torch._dynamo.reset()
    model = build(row, layers, device)
    inner = model if row == "base" else model.get_base_model()
    if backend == "replay":
        config = CompileConfig(backend=replaying_backend, mode=None)
    else:
        config = CompileConfig()  # transformers' default: inductor, "reduce-overhead" (CUDA graphs)
    config._compile_all_devices = True  # a CPU run compiles too
    prompts = {key: value.to(device) for key, value in tiny.random_prompts(len(ASSIGNMENT), 5, seed=1).items()}
    kwargs = {
        **prompts, "do_sample": False, "cache_implementation": "static", "compile_config": config,
        "pad_token_id": 0, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
    }  # fmt: skip
    if row == "ours":
        kwargs["adapter_names"] = ASSIGNMENT
    with torch.no_grad():
        model.generate(**kwargs)  # compiles (and captures the CUDA graph)
        model.generate(**kwargs)
    compiled = inner._compiled_call
    spans = []

    def timed(*args, **call_kwargs):
        started = time.perf_counter()
        output = compiled(*args, **call_kwargs)
        spans.append((started, time.perf_counter()))
        return output

    inner._compiled_call = timed  # what generate's get_compiled_call hands the decode loop
    calls, gaps = [], []
    for _ in range(3):
        spans.clear()
        with torch.no_grad():
            model.generate(**kwargs)
        calls.append(statistics.median(end - start for start, end in spans) * 1e6)
        gaps.append(statistics.median(spans[i + 1][0] - spans[i][1] for i in range(len(spans) - 1)) * 1e6)
    return min(calls), min(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="base,peft,ours", help="comma list of base, peft, ours")
    parser.add_argument("--calls", type=int, default=400, help="timed calls per median")
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 10], help="the two depths compared")
    parser.add_argument("--generate", action="store_true", help="time the compiled call inside generate")
    parser.add_argument("--device", default="cpu", help="--generate: the models' device")
    parser.add_argument("--backend", choices=["replay", "inductor"], default="replay", help="--generate's compiler")
    args = parser.parse_args()
    shallow, deep = args.layers
    if args.generate:
        for row in args.rows.split(","):
            (call_low, gap_low), (call_high, gap_high) = (
                generate_call_us(row, layers, args.device, args.backend) for layers in (shallow, deep)
            )
            per_layer = (call_high - call_low) / (deep - shallow)
            print(
                f"{row:>5} ({args.device}, {args.backend}): compiled call {shallow} layers {call_low:.0f} µs,"
                f" {deep} layers {call_high:.0f} µs, per layer {per_layer:.1f} µs;"
                f" gap between calls {gap_low:.0f} / {gap_high:.0f} µs",
                flush=True,
            )
        return
    for row in args.rows.split(","):
        low, high = (median_call_us(row, layers, args.calls) for layers in (shallow, deep))
        per_layer = (high - low) / (deep - shallow)
        print(f"{row:>5}: {shallow} layers {low:.0f} µs, {deep} layers {high:.0f} µs; per layer {per_layer:.1f} µs")


if __name__ == "__main__":
    main()
