"""Mixed-adapter ``generate`` on a model split over two GPUs with accelerate: tok/s of the base model, PEFT's own
mixed batch and peft_fastlora, on the same split.

The model is ``bench_generate``'s Llama-3-8B-shaped one (random bf16 weights built on the first device, no
download) with N rank-16 adapters on all 7 projections, in a user's order: the base is split first, the way
``from_pretrained(device_map=...)`` splits a model too large for one GPU (accelerate's ``dispatch_model``: the
embedding and the first half of the decoder layers on the first device; the rest, the final norm and lm_head on the
second; ``split_device_map``), then PEFT adds the adapters on each layer's device. Layers run on their own device
and accelerate's hooks move the hidden state across.

Rows (one batch size, one adapter count): ``base`` (adapters disabled), ``peft_mixed`` (PEFT's own mixed batch,
eager only: it recompiles per assignment) and ``ours_<backend>`` (patched once). Repeats are interleaved, the
median is reported, and ours must pass ``bench_generate``'s gate: teacher-forced logits over the base model's
sequences against an fp32 copy of the split model and adapters, error ≤ 1.1× PEFT's own mixed batch and argmax
agreement ≥ PEFT's − 1 point. Compiled mode (``cache_implementation="static"``, transformers' automatic decode
compilation) also counts the compilations a new assignment of adapters to the same rows causes (must be 0). The
JSON has ``bench_generate``'s row format (``report_generate.py`` reads it) plus per-device memory in ``meta``.

    python benchmarks/bench_multi_gpu.py --out multi_gpu.json                      # 2 GPUs, 32 layers, both modes
    python benchmarks/bench_multi_gpu.py --devices cuda:0 cuda:0 --modes eager     # the same, one GPU (with hooks)
    python benchmarks/bench_multi_gpu.py --tiny --out /tmp/multi_gpu.json          # CPU smoke run, tiny model
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import statistics
import sys
import time
from collections import Counter

import torch
from accelerate import dispatch_model
from bench_generate import agreement, build_model, mode_kwargs, passes, timed_generate
from peft import get_peft_model
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from peft_fastlora import patch_model, unpatch_model


def split_device_map(num_layers: int, devices: tuple[str, str]) -> dict[str, str]:
    """A device_map of a transformers Llama (module name → device) as accelerate writes one for a model that fits
    neither device alone: the embedding and the first half of the decoder layers on ``devices[0]``; the second
    half, the final norm, the rotary embedding and lm_head on ``devices[1]``."""
    first, second = devices
    layers = {f"model.layers.{index}": first if index < num_layers // 2 else second for index in range(num_layers)}
    tail = dict.fromkeys(["model.norm", "model.rotary_emb", "lm_head"], second)
    return {"model.embed_tokens": first, **layers, **tail}


def build_split_model(args):
    """``bench_generate``'s model and adapters, in a user's order: the base split over ``args.devices`` first (as
    ``from_pretrained(device_map=...)`` leaves it: accelerate's ``dispatch_model``), then the adapters added by PEFT,
    which creates each layer's LoRA weights on that layer's device. A PeftModel, eval. The hooks are forced where
    both devices are one (a one-device reference, or the CPU smoke run)."""
    # bench_generate's model on the meta device costs nothing and gives its config and LoraConfig.
    template = build_model(args.tiny, 1, "meta", adapter_dtype=args.adapter_dtype, layers=args.layers)
    lora, dtype = template.peft_config["a0"], template.get_base_model().dtype
    torch.manual_seed(0)
    with torch.device(args.devices[0]):
        base = AutoModelForCausalLM.from_config(template.config, dtype=dtype)
    device_map = split_device_map(base.config.num_hidden_layers, tuple(args.devices))
    dispatch_model(base, device_map=device_map, force_hooks=True, skip_keys=base._skip_keys_device_placement)
    upcast = args.adapter_dtype == "fp32"
    model = get_peft_model(base, lora, adapter_name="a0", autocast_adapter_dtype=upcast)
    for name in (f"a{index}" for index in range(1, args.adapters)):
        model.add_adapter(name, lora, autocast_adapter_dtype=upcast)
    model.generation_config.eos_token_id = None  # fixed lengths
    return model.eval()


def oracle_check(model, sequences: torch.Tensor, names: list[str], backends: list[str]) -> dict:
    """Teacher-forced logits over ``sequences`` against an fp32 copy of the split model and adapters (unpatched
    PEFT): PEFT's own mixed batch and each backend of ours, ``{row: agreement + "pass"}`` (``passes``). Leaves the
    model unpatched."""
    with torch.no_grad():
        unpatch_model(model)
        oracle = copy.deepcopy(model).float()
        expected = oracle(input_ids=sequences, adapter_names=names).logits.float()
        del oracle
        checks = {"peft_mixed": agreement(model(input_ids=sequences, adapter_names=names).logits, expected)}
        for backend in backends:
            patch_model(model, backend=backend)
            checks[f"ours_{backend}"] = agreement(model(input_ids=sequences, adapter_names=names).logits, expected)
            unpatch_model(model)
    for check in checks.values():
        check["pass"] = passes(check, checks["peft_mixed"])
    return checks


def new_assignment_compilations(model, batch, names, backend, new_tokens, extra) -> int:
    """Dynamo compilations caused by one generate with the rows' adapters rotated by one (same batch size)."""
    patch_model(model, backend=backend)
    before = counters["stats"]["unique_graphs"]
    timed_generate(model, batch, new_tokens, adapter_names=names[1:] + names[:1], **extra)
    return counters["stats"]["unique_graphs"] - before


def markdown_table(results: list[dict]) -> str:
    """One line per (mode, row): tok/s and the ratio to base."""
    lines = ["| mode | row | tok/s | / base |", "|---|---|---|---|"]
    for result in results:
        lines.append(f"| {result['mode']} | {result['row']} | {result['tok_s']:.1f} | {result['ratio_to_base']:.3f} |")
    return "\n".join(lines)


def measure(model, mode: str, batch: dict, names: list[str], backends: list[str], args) -> list[dict]:
    """One mode's rows on the split ``model`` (a PeftModel, unpatched on entry and on return)."""
    extra = mode_kwargs(mode, str(batch["input_ids"].device))
    torch._dynamo.reset()

    def generate(**kwargs):
        return timed_generate(model, batch, args.new_tokens, **extra, **kwargs)

    def base():
        with model.disable_adapter():
            return generate()

    def peft_mixed():
        unpatch_model(model)
        return generate(adapter_names=names)

    def ours(backend):
        def run():
            patch_model(model, backend=backend)  # outside the timing; a no-op when patched with this backend
            return generate(adapter_names=names)

        return run

    rows = {"base": base, **({"peft_mixed": peft_mixed} if mode == "eager" else {})}
    rows.update({f"ours_{backend}": ours(backend) for backend in backends})
    patch_model(model, backend=backends[0])  # patched once, as a user does; base runs PEFT's own path of it
    seconds: dict[str, list[float]] = {row: [] for row in rows}
    outputs = {}
    with torch.no_grad():
        for row, run in rows.items():
            started = time.perf_counter()
            outputs[row] = run()[1]
            print(f"  warm-up {mode} {row}: {time.perf_counter() - started:.1f} s", flush=True)
        for repeat in range(args.repeats):
            for row, run in rows.items():
                if row != "peft_mixed" or repeat < args.peft_mixed_repeats:
                    seconds[row].append(run()[0])
        recompiles = {
            backend: new_assignment_compilations(model, batch, names, backend, args.new_tokens, extra)
            for backend in (backends if mode == "compiled" else [])
        }
    gate_rows = min(len(names), 8)
    gate = oracle_check(model, outputs["base"][:gate_rows], names[:gate_rows], backends)  # leaves it unpatched
    tokens = len(names) * args.new_tokens
    base_tok_s = tokens / statistics.median(seconds["base"])
    results = []
    for row, values in seconds.items():
        tok_s = tokens / statistics.median(values)
        result = {
            "mode": mode, "batch": len(names), "distinct_adapters": len(set(names)), "row": row, "tok_s": tok_s,
            "ratio_to_base": tok_s / base_tok_s, "seconds": values, "adapter_dtype": args.adapter_dtype,
            "layers": model.config.num_hidden_layers, "devices": list(args.devices),
        }  # fmt: skip
        result.update({f"oracle_{key}": value for key, value in gate.get(row, {}).items()})
        if row.startswith("ours_") and mode == "compiled":
            result["compilations_on_new_assignment"] = recompiles[row.removeprefix("ours_")]
        results.append(result)
    return results


def meta(args, model, weights_gib: dict) -> dict:
    """What ran where: the devices, the versions, the command, the split, and per device the memory the model and
    adapters took (``weights_gib``) and the peak (the whole model is built on the first device before the split,
    and the gate makes an fp32 copy)."""
    import accelerate
    import peft
    import transformers

    cuda = [torch.device(device) for device in dict.fromkeys(args.devices) if torch.device(device).type == "cuda"]
    names = [torch.cuda.get_device_name(device) for device in cuda] or [platform.processor() or "cpu"]
    split = Counter(str(device) for device in model.get_base_model().hf_device_map.values())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": " + ".join(f"{name} ({device})" for name, device in zip(names, cuda or ["cpu"], strict=True)),
        "devices": names, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
        "command": shlex.join(["python", *sys.argv]), "modules_per_device": dict(split), "weights_gib": weights_gib,
        "max_memory_allocated_gib": {
            str(device): torch.cuda.max_memory_allocated(device) / 2**30 for device in cuda
        },
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny fp32 model, both halves on the CPU (smoke run)")
    parser.add_argument("--devices", nargs=2, default=["cuda:0", "cuda:1"], help="the two halves' devices")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (hidden 4096, Llama-3-8B shape)")
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters, round-robin over the rows")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peft-mixed-repeats", type=int, default=1, help="timed repeats of PEFT's (slow) mixed row")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--backends", nargs="+", default=None, help="default: triton on CUDA, torch on the CPU")
    parser.add_argument("--adapter-dtype", choices=["model", "fp32"], default="model")
    parser.add_argument("--out", default="multi_gpu.json")
    args = parser.parse_args()
    if args.tiny:
        args.devices, args.batch, args.adapters, args.prompt, args.new_tokens = ["cpu", "cpu"], 4, 2, 8, 4
        args.repeats, args.layers = 1, 2
    cuda = torch.device(args.devices[0]).type == "cuda"
    backends = args.backends or (["triton"] if cuda else ["torch"])
    torch._dynamo.config.recompile_limit = 64  # base and ours are separate graphs of one model
    started = time.perf_counter()
    model = build_split_model(args)
    weights_gib = {device: torch.cuda.memory_allocated(device) / 2**30 for device in args.devices if "cuda" in device}
    print(f"model and {args.adapters} adapters built and split in {time.perf_counter() - started:.1f} s", flush=True)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), generator=generator)
    input_ids = input_ids.to(args.devices[0])  # where the embedding is
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    names = [f"a{row % args.adapters}" for row in range(args.batch)]
    results: list[dict] = []
    errors: dict[str, str] = {}
    for mode in args.modes:
        try:
            results += measure(model, mode, batch, names, backends, args)
        except Exception as error:  # a mode that fails is reported, and the other modes still run
            errors[mode] = f"{type(error).__name__}: {error}"[:2000]
            print(f"{mode} failed: {errors[mode]}", flush=True)
            unpatch_model(model)
        info = meta(args, model, weights_gib)
        with open(args.out, "w") as handle:  # after every mode: a run cut short keeps what it measured
            json.dump({"meta": info, "args": vars(args), "results": results, "errors": errors}, handle, indent=1)
    print(markdown_table(results))
    for result in results:
        if "oracle_pass" in result:
            print(
                f"{result['mode']} {result['row']}: gate {'passed' if result['oracle_pass'] else 'FAILED'}, error "
                f"{result['oracle_rel_logit_error']:.4f}, argmax agreement {result['oracle_argmax_agreement']:.4f}; "
                f"new-assignment compilations {result.get('compilations_on_new_assignment', '-')}"
            )
    for peft in (result for result in results if result["row"] == "peft_mixed"):
        error, agreement = peft["oracle_rel_logit_error"], peft["oracle_argmax_agreement"]
        print(f"{peft['mode']} peft_mixed (the bar): error {error:.4f}, argmax agreement {agreement:.4f}")
    print(f"modules per device: {info['modules_per_device']}; model and adapters GiB: {weights_gib}; peak GiB: "
          f"{info['max_memory_allocated_gib']}")  # fmt: skip


if __name__ == "__main__":
    main()
