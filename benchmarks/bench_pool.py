"""A thousand adapters through a bounded GPU pool (``patch_model(..., max_gpu_adapters=K)``): mixed ``generate`` of
batches drawn from a Zipf popularity, against the same batches served with every adapter resident.

The model is Llama-3-8B-shaped with random bf16 weights, built on the device, with ``--adapters`` rank-16 LoRA
adapters a0, a1, ... on all 7 projections. How the adapters are made: PEFT makes a0 (``get_peft_model``); the
others are registered the way PEFT's ``update_layer`` registers one (``r``, ``lora_alpha``, ``scaling``, dropout,
``lora_A``/``lora_B`` modules, ``peft_config``), each with fresh random weights drawn on the GPU from its own seed,
so that any model holding adapter ``i`` holds the same values (PEFT's ``add_adapter`` walks and re-injects the
whole model per adapter: minutes for a thousand).

Rows, timed in one loop of interleaved repeats (median tok/s; ratios to base and to ``resident8``):

- ``base``: the plain transformers model;
- ``resident8``: patched, 8 adapters (no pool), each batch's rows mapped onto a0..a7 (``i mod 8``): the issue's
  reference, "the same batches with 8 resident adapters";
- ``resident_zipf``: patched, no pool, holding exactly the adapters the timed Zipf batches name (all resident):
  the same batches as ``pool``, without a pool, so that ``pool / resident_zipf`` is the pool's own cost;
- ``pool``: patched with ``max_gpu_adapters=K`` over all ``--adapters``, the Zipf batches; the pool is warmed with
  ``--warm`` batches first, so the timed ones see its steady state.

Batch ``i`` of a repeat has 32 rows (``--batch``) whose adapters are drawn from Zipf(``--zipf``) over all adapters
(popularity rank = index), the same prompts for every row kind. The pool's copies are reported per timed call:
adapters copied, bytes, host seconds in ``AdapterPool.place`` and GPU seconds of the copies (CUDA events).

Correctness: the pool's logits for a Zipf batch are compared with ``resident_zipf``'s (the same weights through
the same kernels; only the slot numbering differs). The pool against PEFT and an fp32 oracle is
``tests/test_pool.py``'s. Compiled mode also reports the dynamo compilations during the timed repeats (a swap must
cause none).

    python benchmarks/bench_pool.py --adapters 1000 --capacity 64 --mode eager --out pool_eager.json
    python benchmarks/bench_pool.py --small                      # CPU smoke run, tiny model
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_generate import MODEL_DTYPES, TARGETS, _git_commit, mode_kwargs, shared_copy, synchronize
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_fastlora import patch_model, tiny

STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


def base_model(small: bool, layers: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if small:
        config = tiny.tiny_config("llama")
    else:
        config = LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
        )  # fmt: skip
    with torch.device(device):
        plain = AutoModelForCausalLM.from_config(config, dtype=MODEL_DTYPES["fp32" if small else "bf16"])
    plain.generation_config.eos_token_id = None  # fixed lengths
    return plain.eval()


def add_adapters(model, indices, rank: int = 16, alpha: int = 32) -> None:
    """Register adapters ``a{i}`` for ``indices`` on every LoRA layer of ``model`` with the entries PEFT's
    ``update_layer`` makes (``r``, ``lora_alpha``, ``scaling``, ``use_rslora``, ``use_dora``, ``lora_bias``, an
    Identity dropout, ``lora_A``/``lora_B`` Linear modules without bias, a ``peft_config`` entry), written straight
    into the layers' dicts; each adapter's weights are one ``randn`` on the model's device from seed ``i`` (scaled by
    0.02), viewed per layer, so any model holding adapter ``i`` holds the same values."""
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    template = next(iter(model.peft_config.values()))
    weight = layers[0].get_base_layer().weight
    shapes = [((rank, layer.in_features), (layer.out_features, rank)) for layer in layers]
    total = sum(a[0] * a[1] + b[0] * b[1] for a, b in shapes)
    dropout = torch.nn.Identity()
    for index in indices:
        name = f"a{index}"
        generator = torch.Generator(device=weight.device).manual_seed(index)
        values = torch.randn(total, generator=generator, device=weight.device, dtype=weight.dtype).mul_(0.02)
        offset = 0
        for layer, (a_shape, b_shape) in zip(layers, shapes, strict=True):
            layer.r[name], layer.lora_alpha[name], layer.scaling[name] = rank, alpha, alpha / rank
            layer.use_rslora[name], layer.use_dora[name], layer.lora_bias[name] = False, False, False
            layer.lora_dropout._modules[name] = dropout
            for part, shape in (("lora_A", a_shape), ("lora_B", b_shape)):
                size = shape[0] * shape[1]
                getattr(layer, part)._modules[name] = _linear(values[offset : offset + size].view(shape))
                offset += size
        model.peft_config[name] = copy.deepcopy(template)


_TEMPLATE = torch.nn.Linear(1, 1, bias=False, device="meta")


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    """An ``nn.Linear`` without bias holding ``weight`` (``[out, in]``): a template's attributes with fresh dicts
    (its hooks, buffers, children), since ``Module.__init__`` costs ~40 µs and a thousand adapters need ~450,000."""
    module = torch.nn.Linear.__new__(torch.nn.Linear)
    state = {
        key: type(value)() if isinstance(value, (dict, set)) else value for key, value in _TEMPLATE.__dict__.items()
    }
    state["in_features"], state["out_features"] = weight.shape[1], weight.shape[0]
    state["_parameters"] = {"weight": torch.nn.Parameter(weight, requires_grad=False)}
    module.__dict__.update(state)
    return module


def peft_model(plain, shared, indices, rank: int = 16) -> torch.nn.Module:
    """A PeftModel over a copy of ``plain`` sharing its weights, holding adapters ``a{i}`` for ``indices``."""
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    indices = list(indices)
    model = get_peft_model(shared_copy(plain, shared), config, adapter_name="template", autocast_adapter_dtype=False)
    add_adapters(model, indices, rank)
    model.delete_adapter("template")
    model.set_adapter(f"a{indices[0]}")
    return model.eval()


def zipf_names(rng: random.Random, adapters: int, rows: int, exponent: float) -> list[str]:
    weights = [1 / (rank + 1) ** exponent for rank in range(adapters)]
    return [f"a{index}" for index in rng.choices(range(adapters), weights=weights, k=rows)]


def timed(model, batch, names, new_tokens: int, kwargs: dict) -> float:
    synchronize()
    started = time.perf_counter()
    model.generate(**batch, adapter_names=names, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0, **kwargs)  # fmt: skip
    synchronize()
    return time.perf_counter() - started


def run(args) -> dict:
    device = "cpu" if args.small else "cuda"
    kwargs = mode_kwargs(args.mode, device)
    rng = random.Random(args.seed)
    warm = [zipf_names(rng, args.adapters, args.batch, args.zipf) for _ in range(args.warm)]
    timed_batches = [zipf_names(rng, args.adapters, args.batch, args.zipf) for _ in range(args.repeats)]
    used = sorted({int(name[1:]) for names in timed_batches for name in names})
    to8 = [[f"a{int(name[1:]) % 8}" for name in names] for names in timed_batches]
    prompts = {key: value.to(device) for key, value in tiny.random_prompts(args.batch, args.prompt, seed=3).items()}
    if not args.small:  # random prompts over the whole vocabulary of the big model
        prompts["input_ids"] = torch.randint(0, 128256, prompts["input_ids"].shape, device=device)
    result: dict = {"args": vars(args), "meta": _meta(device), "timeline_s": {}}
    log(f"build: {args.adapters} adapters, {len(used)} named by the timed batches")
    plain = base_model(args.small, args.layers, device)
    shared = [*plain.parameters(), *plain.buffers()]
    resident8 = patch_model(peft_model(plain, shared, range(8)), backend=args.backend)
    resident_zipf = patch_model(peft_model(plain, shared, used), backend=args.backend) if args.zipf_row else None
    started = time.perf_counter()
    pooled = peft_model(plain, shared, range(args.adapters))
    result["timeline_s"]["register_s"] = time.perf_counter() - started
    synchronize()
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    started = time.perf_counter()
    patch_model(pooled, backend=args.backend, max_gpu_adapters=args.capacity)
    synchronize()
    result["timeline_s"]["patch_s"] = time.perf_counter() - started
    pool = pooled.base_model._fastlora_state.bank.pool
    pool.timing = True  # CUDA events around each call's copies (copy_gpu_seconds)
    # Whether the copies read the host storage through CUDA views (zero-copy) rather than a DMA per piece.
    result["zero_copy"] = all(source.is_cuda for unit in pool.units for source in (unit.source_a, *unit.source_b))
    if device == "cuda":
        result["gpu_bytes_freed_by_pool_patch"] = before - torch.cuda.memory_allocated()
        result["pool_device_bytes"] = sum(
            unit.device[0].a.numel() * unit.device[0].a.element_size()
            + sum(p.b.numel() * p.b.element_size() for p in unit.device)
            for unit in pool.units
        )
    log(f"patched: {result['timeline_s']}")
    reference, checked = (resident_zipf, timed_batches[0]) if args.zipf_row else (resident8, to8[0])
    result["check"] = _check(pooled, reference, prompts, checked)
    log(f"check: {result['check']}")
    Path(args.out).write_text(json.dumps(result, indent=1))
    rows = {
        "base": (plain, None),
        "resident8": (resident8, to8),
        "resident_zipf": (resident_zipf, timed_batches),
        "pool": (pooled, timed_batches),
    }
    if resident_zipf is None:
        del rows["resident_zipf"]
    started = time.perf_counter()
    for names in warm:  # the pool's steady state; compiles every row's graph (same lengths as timed: static cache)
        took = timed(pooled, prompts, names, args.new_tokens, kwargs)
        log(f"warm pool call: {took:.2f} s, compilations so far {sum(counters['frames'].values())}")
    for label, (model, batches) in rows.items():
        if label != "pool":
            took = timed(model, prompts, None if batches is None else batches[0], args.new_tokens, kwargs)
            log(f"warm {label}: {took:.2f} s, compilations so far {sum(counters['frames'].values())}")
    result["timeline_s"]["warm_s"] = time.perf_counter() - started
    log("warm")
    compiled_before = sum(counters["frames"].values())
    seconds: dict[str, list[float]] = {label: [] for label in rows}
    copies = []
    for repeat in range(args.repeats):
        for label, (model, batches) in rows.items():
            names = None if batches is None else batches[repeat]
            if label == "pool":
                stats = dict(pool.stats)
                pool.copy_gpu_seconds()
            seconds[label].append(timed(model, prompts, names, args.new_tokens, kwargs))
            if label == "pool":
                copies.append({
                    "distinct": len(set(names)), "copied": pool.stats["misses"] - stats["misses"],
                    "bytes": pool.stats["bytes"] - stats["bytes"],
                    "host_s": pool.stats["seconds"] - stats["seconds"], "gpu_copy_s": pool.copy_gpu_seconds(),
                })  # fmt: skip
        log(f"repeat {repeat}: " + ", ".join(f"{label} {values[-1]:.3f} s" for label, values in seconds.items()))
        result["seconds_so_far"], result["pool_copies"] = seconds, copies
        Path(args.out).write_text(json.dumps(result, indent=1))  # (a time limit keeps what was measured)
    tokens = args.batch * args.new_tokens
    table = {}
    for label, values in seconds.items():
        median = statistics.median(values)
        table[label] = {"seconds": values, "median_s": median, "tok_s": tokens / median}
    for row in table.values():
        row["vs_base"] = row["tok_s"] / table["base"]["tok_s"]
        row["vs_resident8"] = row["tok_s"] / table["resident8"]["tok_s"]
        if "resident_zipf" in table:
            row["vs_resident_zipf"] = row["tok_s"] / table["resident_zipf"]["tok_s"]
    result["rows"], result["pool_copies"] = table, copies
    result["compilations_during_timing"] = sum(counters["frames"].values()) - compiled_before
    result["timeline_s"]["timed_s"] = time.perf_counter() - started
    _print(result)
    return result


@torch.no_grad()
def _check(pooled, resident, prompts: dict, names: list[str]) -> dict:
    """Teacher-free logits of one Zipf batch: pool against all-resident (same weights, same kernels)."""
    ours = pooled(**prompts, adapter_names=names).logits.float()
    reference = resident(**prompts, adapter_names=names).logits.float()
    difference = (ours - reference).norm() / reference.norm()
    agree = (ours.argmax(-1) == reference.argmax(-1)).float().mean()
    return {"relative_difference": difference.item(), "argmax_agreement": agree.item(), "equal": torch.equal(ours,
            reference)}  # fmt: skip


def _meta(device: str) -> dict:
    import peft
    import transformers

    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "commit": _git_commit(),
        "command": " ".join(sys.argv),
    }  # fmt: skip


def _print(result: dict) -> None:
    args = result["args"]
    print(f"\n{args['mode']}, batch {args['batch']}, prompt {args['prompt']}, {args['new_tokens']} new tokens, "
          f"{args['adapters']} adapters, max_gpu_adapters={args['capacity']}, Zipf({args['zipf']})")  # fmt: skip
    print("| row | tok/s | vs base | vs resident8 | vs resident_zipf |")
    print("|---|---|---|---|---|")
    for label, row in result["rows"].items():
        print(f"| {label} | {row['tok_s']:.0f} | {row['vs_base']:.3f} | {row['vs_resident8']:.3f} | "
              f"{row.get('vs_resident_zipf', float('nan')):.3f} |")  # fmt: skip
    for copy_stats in result["pool_copies"]:
        print(f"pool call: {copy_stats}")
    print(f"compilations during the timed repeats: {result['compilations_during_timing']}; "
          f"zero-copy reads: {result['zero_copy']}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU, for a smoke run")
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--capacity", type=int, default=64, help="max_gpu_adapters")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warm", type=int, default=12, help="Zipf batches run through the pool before timing")
    parser.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-zipf-row", dest="zipf_row", action="store_false", help="skip resident_zipf")
    parser.add_argument("--out", default="pool.json")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
