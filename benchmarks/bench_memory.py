"""Peak GPU memory of a patched model against base, PEFT single and PEFT mixed: one configuration per process.

A Llama-3-8B-shaped bf16 model (random weights, built on the GPU) with 8 rank-16 adapters on all 7 projections.
For each row the script measures ``torch.cuda.max_memory_allocated()`` during one call minus the memory allocated
before it (``peak_above_static_gib``), and the memory allocated before it (``static_gib``: the weights, and for
rows of ours the bank too). Configurations:

- ``prefill ROWSxTOKENS``: one forward under ``torch.no_grad()``, ``use_cache=False``, ``logits_to_keep=1``;
- ``decode BATCH``: ``generate`` of 16 new tokens after a 128-token prompt with the static cache, not compiled;
- ``static``: what ``patch_model`` adds to the memory held between calls (``torch.cuda.memory_allocated`` after a
  first mixed call, against PEFT alone), with 8 adapters of mixed ranks {8, 16, 32, 64} on all 7 projections in
  PEFT's default dtype (fp32 adapters on the bf16 model); ``added_fraction`` is that over the adapters' own bytes.

Results are merged into the JSON file given by ``--out`` (``{"meta": ..., "results": [...]}``), replacing the rows
of the same configuration, so a loop over configurations in separate processes builds one file::

    for c in "prefill 8x2048" "prefill 4x8192" "decode 64"; do
        python benchmarks/bench_memory.py --config "$c" --out benchmarks/results/memory.json
    done
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import peft
import torch
import transformers
from bench_generate import TARGETS, build_model
from peft import LoraConfig

from peft_fastlora import patch_model, unpatch_model

GIB = 2**30


def measure(call) -> tuple[float, float]:
    """``(peak above static, static)`` in GiB for one call."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - static) / GIB, static / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help='"prefill ROWSxTOKENS" or "decode BATCH"')
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--backends", nargs="+", default=["triton", "torch"])
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    if args.config == "static":
        results = static_rows(args)
        write(args, results)
        return
    kind, size = args.config.split()
    model = build_model(False, args.adapters, "cuda", layers=args.layers)
    generator = torch.Generator().manual_seed(0)
    if kind == "prefill":
        rows, tokens = (int(value) for value in size.split("x"))
    else:
        rows, tokens = int(size), 128
    ids = torch.randint(3, model.config.vocab_size, (rows, tokens), generator=generator).cuda()
    names = [f"a{row % args.adapters}" for row in range(rows)]

    def call(**kwargs):
        if kind == "prefill":
            return lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs)
        return lambda: model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
            do_sample=False, pad_token_id=0, cache_implementation="static", disable_compile=True, **kwargs,
        )  # fmt: skip

    rows_to_run = {
        "base": (model.disable_adapter, {}, None),
        "peft_single": (contextlib.nullcontext, {}, None),
        "peft_mixed": (contextlib.nullcontext, {"adapter_names": names}, None),
        **{f"ours_{name}": (contextlib.nullcontext, {"adapter_names": names}, name) for name in args.backends},
    }
    results = []
    for row, (context, kwargs, backend) in rows_to_run.items():
        unpatch_model(model)
        model.set_adapter("a0")
        if backend is not None:
            patch_model(model, backend=backend)
        with context(), torch.no_grad():  # (the warm-up with grad on kept 120 GiB of activations for backward)
            call(**kwargs)()  # warm-up: kernels compiled, bank packed, outside the measurement
            peak, static = measure(call(**kwargs))
        results.append(
            {"config": args.config, "row": row, "peak_above_static_gib": peak, "static_gib": static,
             "layers": args.layers}
        )  # fmt: skip
        print(f"{args.config:>16} {row:>14}: peak above static {peak:6.2f} GiB, static {static:6.2f} GiB", flush=True)
    unpatch_model(model)
    write(args, results)


STATIC_RANKS = (16, 8, 32, 64, 8, 16, 32, 64)


def static_rows(args) -> list[dict]:
    """PEFT alone, then PEFT + patch (each backend, after one mixed call): memory held between calls."""
    model = build_model(False, 1, "cuda", layers=args.layers, adapter_dtype="fp32")  # a0: rank 16
    for index, rank in enumerate(STATIC_RANKS[1:], start=1):
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        model.add_adapter(f"a{index}", lora)  # PEFT's default: fp32 adapters
    model.eval()
    adapter_bytes = sum(parameter.nbytes for name, parameter in model.named_parameters() if "lora_" in name)
    ids = torch.randint(3, 1000, (len(STATIC_RANKS), 8), device="cuda")
    names = [f"a{index}" for index in range(len(STATIC_RANKS))]

    def held() -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated()

    peft_alone = held()
    rows = [{"config": "static", "row": "peft", "static_gib": peft_alone / GIB, "added_gib": 0.0}]
    for backend in args.backends:
        patch_model(model, backend=backend)
        with torch.no_grad():
            model(input_ids=ids, adapter_names=names, use_cache=False, logits_to_keep=1)
        added = held() - peft_alone
        rows.append({"config": "static", "row": f"ours_{backend}", "static_gib": (peft_alone + added) / GIB,
                     "added_gib": added / GIB})  # fmt: skip
        unpatch_model(model)
    for row in rows:
        row.update(adapter_gib=adapter_bytes / GIB, added_fraction=row["added_gib"] * GIB / adapter_bytes,
                   layers=args.layers, ranks=list(STATIC_RANKS), adapter_dtype="float32")  # fmt: skip
        share = f"{100 * row['added_fraction']:.2f}% of the adapters' {row['adapter_gib']:.3f} GiB"
        held_gib, added_gib = row["static_gib"], row["added_gib"]
        print(f"  static {row['row']:>14}: held {held_gib:7.3f} GiB, added {added_gib:.4f} GiB = {share}", flush=True)
    return rows


def write(args, results: list[dict]) -> None:
    """Merge ``results`` into ``args.out``, replacing earlier rows of the same configuration."""
    previous = []
    if os.path.exists(args.out):
        with open(args.out) as handle:
            previous = [result for result in json.load(handle)["results"] if result["config"] != args.config]
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "adapters": args.adapters, "rank": 16,
    }  # fmt: skip
    with open(args.out, "w") as handle:
        json.dump({"meta": meta, "results": previous + results}, handle, indent=1)


if __name__ == "__main__":
    main()
