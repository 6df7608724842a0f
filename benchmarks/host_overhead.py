"""Host time in eager mode: what Python and the launches cost per LoRA layer call, and per model call.

A Llama-3-8B-wide model of ``--layers`` decoder layers (8 rank-16 adapters on all 7 projections, bf16), batch 32,
one token per row (a decode step's shapes). Every number is the wall time per call of a loop with no sync inside
(the GPU work of a call, a few µs, hides behind the host), so it is the host's cost:

- one layer: the base ``nn.Linear`` (``F.linear``), PEFT's LoRA layer with one adapter active and with a mixed
  batch (``adapter_names``), and ours inside a mixed call (o_proj alone; q/k/v together, as siblings share work);
- the per-call context: entering and leaving ``_enable_peft_forward_hooks`` (PEFT's hook registration; ours:
  validation, bank sync, plan fill), which runs once per ``generate``/``forward`` call and scales with the number
  of LoRA layers (``--layers 32`` for the real model);
- one model forward of one token per row: base, PEFT single, ours (mixed batch, context included);
- the bare launches of the kernels, where the package's internal launch API is the one this script knows (it is
  being reworked; the line says "skipped" otherwise).

    python benchmarks/host_overhead.py [--layers 32] [--backend triton] [--out host.json]
    python benchmarks/host_overhead.py --small      # CPU smoke run, tiny model, torch backend
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_generate import TARGETS, shared_copy
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_fastlora import patch_model, tiny


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_call_us(fn, calls: int) -> float:
    for _ in range(min(50, calls)):
        fn()
    synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def build(args, device: str):
    """The plain model, an unpatched PeftModel and a patched copy, sharing the base weights."""
    torch.manual_seed(0)
    if args.small:
        config, dtype = tiny.tiny_config("llama"), torch.float32
    else:
        config = LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=1024, max_position_embeddings=4096,
        )  # fmt: skip
        dtype = torch.bfloat16
    with torch.device(device):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    shared = [*plain.parameters(), *plain.buffers()]
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    peft = get_peft_model(shared_copy(plain, shared), lora, adapter_name="a0", autocast_adapter_dtype=False)
    for index in range(1, args.adapters):
        peft.add_adapter(f"a{index}", lora, autocast_adapter_dtype=False)
    peft.set_adapter("a0")
    peft.eval()
    ours = patch_model(shared_copy(peft, shared), backend=args.backend)
    return plain, peft, ours


def low_level(args, x: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Bare launches through the package's launch API (skipped, with the reason, where it fails)."""
    try:
        from peft_fastlora.backends.triton import TritonBackend
        from peft_fastlora.bank import pack
        from peft_fastlora.kernels import launch
        from peft_fastlora.plan import BatchPlan

        rows, k = x.shape[0], x.shape[-1]
        adapters = {slot: (torch.randn(16, k), torch.randn(k, 16), 2.0) for slot in range(args.adapters)}
        packed = pack([adapters], args.adapters, k, [k], x.dtype, x.device)[0]
        a = packed.a
        plan = BatchPlan(x.device)
        plan.fill([int(name[1:]) for name in names])
        view = plan.view(rows, flattened=False)
        y = torch.randn_like(x)
        plan_args = (*view.segments, 1)
        h = launch.launch_shrink(x.view(rows, k), a, packed.a_offsets_dev, packed.ranks_dev, *plan_args, 16)
        backend = TritonBackend()
        return {
            "add_lora (shrink + expand, with Python), backend alone": per_call_us(
                lambda: backend.add_lora(y, x, packed, view), args.calls
            ),
            "launch_shrink": per_call_us(
                lambda: launch.launch_shrink(
                    x.view(rows, k), a, packed.a_offsets_dev, packed.ranks_dev, *plan_args, 16
                ),
                args.calls,
            ),
            "launch_expand": per_call_us(
                lambda: launch.launch_expand(
                    y.view(rows, k),
                    h,
                    None,
                    packed.b,
                    packed.scales,
                    packed.b_offsets_dev,
                    packed.ranks_dev,
                    *plan_args,
                    16,
                ),
                args.calls,
            ),
        }
    except Exception as error:  # noqa: BLE001 (the internal API is being reworked)
        return {f"bare launches: skipped ({type(error).__name__}: {str(error)[:80]})": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU, torch backend")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backend", default=None, help="default: triton on CUDA, torch on the CPU")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    args.backend = args.backend or ("triton" if device == "cuda" else "torch")
    if args.small:
        args.calls = min(args.calls, 200)
    plain, peft, ours = build(args, device)
    names = [f"a{row % args.adapters}" for row in range(args.batch)]
    hidden = plain.config.hidden_size
    x = torch.randn(args.batch, 1, hidden, device=device, dtype=plain.dtype)
    ids = torch.randint(3, plain.config.vocab_size, (args.batch, 1), device=device)

    def layer(model, name: str):
        return model.base_model.model.model.layers[0].self_attn.get_submodule(name)

    peft_o, ours_o = layer(peft, "o_proj"), layer(ours, "o_proj")
    ours_qkv = [layer(ours, name) for name in ("q_proj", "k_proj", "v_proj")]
    results: dict[str, float] = {}
    with torch.no_grad():
        results["F.linear: the base layer (o_proj)"] = per_call_us(lambda: peft_o.base_layer(x), args.calls)
        results["PEFT o_proj, one adapter active"] = per_call_us(lambda: peft_o(x), args.calls)
        results["PEFT o_proj, mixed batch"] = per_call_us(lambda: peft_o(x, adapter_names=names), args.calls // 4)
        with ours.base_model._enable_peft_forward_hooks(adapter_names=names):
            results["ours o_proj, inside a mixed call"] = per_call_us(lambda: ours_o(x), args.calls)
            results["ours q, k, v (3 layers, siblings), inside a mixed call"] = per_call_us(
                lambda: [module(x) for module in ours_qkv], args.calls
            )

        def context(model):
            def run():
                with model.base_model._enable_peft_forward_hooks(adapter_names=names):
                    pass

            return run

        layers = plain.config.num_hidden_layers
        results[f"context enter+exit, PEFT ({layers} layers)"] = per_call_us(context(peft), args.calls // 9)
        results[f"context enter+exit, ours ({layers} layers)"] = per_call_us(context(ours), args.calls // 9)
        calls = max(10, args.calls // 20)
        results[f"model forward, 1 token per row: base ({layers} layers)"] = per_call_us(
            lambda: plain(input_ids=ids, use_cache=False), calls
        )
        results["  PEFT, one adapter active"] = per_call_us(lambda: peft(input_ids=ids, use_cache=False), calls)
        results["  ours, mixed batch (context included)"] = per_call_us(
            lambda: ours(input_ids=ids, use_cache=False, adapter_names=names), calls
        )
        if device == "cuda" and args.backend == "triton":
            results.update(low_level(args, x.view(args.batch, hidden), names))
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{where}; batch {args.batch}, 1 token per row, {args.adapters} adapters, backend {args.backend}")
    for name, value in results.items():
        print(f"{name:>62}: {value:8.1f} µs per call")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": where, "args": vars(args), "us_per_call": results}, handle, indent=1)


if __name__ == "__main__":
    main()
