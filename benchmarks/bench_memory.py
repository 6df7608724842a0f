"""Peak GPU memory of a patched model against base, PEFT single and PEFT mixed: one configuration per process.

A Llama-3-8B-shaped bf16 model (random weights, built on the GPU) with 8 rank-16 adapters on all 7 projections.
For each row the script measures ``torch.cuda.max_memory_allocated()`` during one call minus the memory allocated
before it (``peak_above_static_gib``), and the memory allocated before it (``static_gib``: the weights, and for
rows of ours the bank too). Configurations:

- ``prefill ROWSxTOKENS``: one forward under ``torch.no_grad()``, ``use_cache=False``, ``logits_to_keep=1``;
- ``decode BATCH``: ``generate`` of 16 new tokens after a 128-token prompt with the static cache, not compiled.

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
from bench_generate import build_model

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
        with context():
            call(**kwargs)()  # warm-up: kernels compiled, bank packed, outside the measurement
            peak, static = measure(call(**kwargs))
        results.append(
            {"config": args.config, "row": row, "peak_above_static_gib": peak, "static_gib": static,
             "layers": args.layers}
        )  # fmt: skip
        print(f"{args.config:>16} {row:>14}: peak above static {peak:6.2f} GiB, static {static:6.2f} GiB", flush=True)
    unpatch_model(model)
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
