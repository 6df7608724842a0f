"""Mixed-adapter ``generate`` end to end: base model, PEFT single adapter, PEFT mixed batch, and peft_fastlora.

On the GPU (default) the model is Llama-3-8B-shaped with random bf16 weights, built on the device (no download),
with N rank-16 LoRA adapters on all 7 projections. Each configuration (batch size × distinct adapters) runs every
row of the table in turn, repeats interleaved, greedy with a fixed number of new tokens; the table reports the
median tok/s and the ratio to the base model in the same mode.

Correctness gate: a speed number from a wrong output is void. Two bf16 computations of the same thing differ from
each other more than either differs from the truth, so the gate is teacher-forced against an fp32 oracle (an fp32
copy of the same model and adapters, unpatched PEFT): over the base model's generated sequences, ours must be no
worse than PEFT's own bf16 mixed batch, relative logit error ≤ 1.1× PEFT's and argmax agreement ≥ PEFT's − 1
point. Both are printed and stored.

Adapter dtype: ``--adapter-dtype model`` keeps the adapters in the model's dtype (``autocast_adapter_dtype=False``);
``fp32`` is PEFT's default (adapters upcast to fp32). Every row of a run uses the same adapters; each JSON row
carries ``adapter_dtype``.

Modes: ``eager`` (the dynamic cache, no compilation) and ``compiled`` (``cache_implementation="static"``, which
makes transformers compile the decode step with its default CompileConfig: inductor with CUDA graphs). In compiled
mode each ``ours`` row also reports how many dynamo compilations a *new* assignment of adapters to the same rows
caused after timing (it must be 0), and PEFT's mixed batch is not timed (it recompiles per assignment and its
compilation did not finish in 5 minutes): base and PEFT single are the compiled anchors.

    python benchmarks/bench_generate.py --out generate.json            # GPU, the whole grid
    python benchmarks/bench_generate.py --small                        # CPU smoke run, tiny model, < 1 minute
    python benchmarks/report_generate.py generate.json                 # markdown table and PNG plot
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, CompileConfig, LlamaConfig

from peft_fastlora import patch_model, tiny, unpatch_model
from peft_fastlora.backends import get_backend

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(
    small: bool, num_adapters: int, device: str, dora: bool = False, adapter_dtype: str = "model", layers: int = 32
):
    """The base model with ``num_adapters`` random rank-16 adapters named a0, a1, ... (PeftModel, eval), and with
    ``dora`` as many rank-16 DoRA adapters d0, d1, ... (magnitudes perturbed, so that DoRA's rescale matters).
    ``adapter_dtype`` "model" keeps the adapters in the model's dtype, "fp32" is PEFT's default upcast."""
    torch.manual_seed(0)
    if small:
        config, dtype = tiny.tiny_config("llama"), torch.float32
    else:
        config = LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
        )  # fmt: skip
        dtype = torch.bfloat16
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    # Every adapter in one dtype, for PEFT and peft_fastlora alike.
    autocast = adapter_dtype == "fp32"
    model = get_peft_model(base, lora, adapter_name="a0", autocast_adapter_dtype=autocast)
    for index in range(1, num_adapters):
        model.add_adapter(f"a{index}", lora, autocast_adapter_dtype=autocast)
    if dora:
        dora_lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False, use_dora=True)
        for index in range(num_adapters):
            model.add_adapter(f"d{index}", dora_lora, autocast_adapter_dtype=autocast)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    parameter.mul_(1 + 0.3 * torch.rand_like(parameter))
    model.generation_config.eos_token_id = None  # fixed lengths
    return model.eval()


def mode_kwargs(mode: str, device: str) -> dict:
    """generate() kwargs of a mode: nothing for eager; the static cache (and so transformers' automatic decode
    compilation) for compiled. On the CPU (smoke runs) compilation must be allowed explicitly, and aot_eager stands
    in for inductor to keep the run short."""
    if mode == "eager":
        return {}
    kwargs = {"cache_implementation": "static"}
    if device == "cpu":
        config = CompileConfig(backend="aot_eager", mode=None)
        config._compile_all_devices = True
        kwargs["compile_config"] = config
    return kwargs


def timed_generate(model, batch, new_tokens: int, **kwargs) -> tuple[float, torch.Tensor]:
    """Seconds for one greedy generate of exactly ``new_tokens`` tokens, and the output ids."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    output = model.generate(
        **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, output


def agreement(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """Relative logit error ‖actual − expected‖ / ‖expected‖ and the argmax agreement rate."""
    actual, expected = actual.float(), expected.float()
    return {
        "rel_logit_error": ((actual - expected).norm() / expected.norm()).item(),
        "argmax_agreement": (actual.argmax(-1) == expected.argmax(-1)).float().mean().item(),
    }


def patched_agreement(model, sequences: torch.Tensor, names: list[str], backend: str, expected: torch.Tensor) -> dict:
    """The patched mixed-batch logits over ``sequences`` against ``expected``."""
    with torch.no_grad():
        patch_model(model, backend=backend)
        return agreement(model(input_ids=sequences, adapter_names=names).logits, expected)


def oracle_check(model, sequences: torch.Tensor, names: list[str], backends: list[str]) -> dict:
    """Teacher-forced logits over ``sequences`` against an fp32 copy of the model and adapters (unpatched PEFT):
    PEFT's own mixed batch in the model's dtype, and each backend of ours. Returns ``{row: agreement}``; a row of
    ours passes when its error is ≤ 1.1× PEFT's (or 1e-5) and its argmax agreement ≥ PEFT's − 0.01."""
    with torch.no_grad():
        unpatch_model(model)
        oracle = copy.deepcopy(model).float()
        expected = oracle(input_ids=sequences, adapter_names=names).logits.float()
        del oracle
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        checks = {"peft_mixed": agreement(model(input_ids=sequences, adapter_names=names).logits, expected)}
        for backend in backends:
            checks[f"ours_{backend}"] = patched_agreement(model, sequences, names, backend, expected)
            unpatch_model(model)
    peft = checks["peft_mixed"]
    for check in checks.values():
        check["pass"] = (
            # The floor: an fp32 model's oracle is PEFT's own computation (error 0); ours then differs by rounding.
            check["rel_logit_error"] <= max(1.1 * peft["rel_logit_error"], 1e-5)
            and check["argmax_agreement"] >= peft["argmax_agreement"] - 0.01
        )
    return checks


def per_adapter_check(model, sequences: torch.Tensor, names: list[str], backend: str) -> dict:
    """The gate for rows PEFT's mixed batch refuses (DoRA): patched mixed logits over ``sequences`` against PEFT's
    single-adapter forward (``set_adapter``) of each adapter's rows."""
    with torch.no_grad():
        unpatch_model(model)
        expected = torch.empty(*sequences.shape, model.config.vocab_size, device=sequences.device)
        for name in set(names):
            rows = [row for row, row_name in enumerate(names) if row_name == name]
            model.set_adapter(name)
            expected[rows] = model(input_ids=sequences[rows]).logits.float()
    return patched_agreement(model, sequences, names, backend, expected)


def new_assignment_compilations(model, batch, names, backend, new_tokens, extra) -> int:
    """Dynamo compilations caused by one generate with the rows' adapters rotated by one (same batch size)."""
    patch_model(model, backend=backend)
    before = counters["stats"]["unique_graphs"]
    timed_generate(model, batch, new_tokens, adapter_names=names[1:] + names[:1], **extra)
    return counters["stats"]["unique_graphs"] - before


def run_config(model, mode, batch_size, distinct, backends, args, device) -> list[dict]:
    names = [f"a{row % distinct}" for row in range(batch_size)]
    extra = mode_kwargs(mode, device)
    # Each configuration compiles its own graphs; a fresh dynamo cache keeps every row under the recompile limit.
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(batch_size * 100 + distinct)
    vocab = model.config.vocab_size
    batch = {"input_ids": torch.randint(3, vocab, (batch_size, args.prompt), generator=generator).to(device)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])

    # The model is patched once, as a user does. Without adapter_names a patched model runs PEFT's own path (base
    # with disable_adapter, PEFT single with set_adapter), so those rows need no unpatch; only PEFT's mixed row
    # (eager only) unpatches. Unpatching before every row made compiled rows of ours re-trace and re-record their
    # CUDA graphs at every repeat (a new patch state each time), which a user who patches once never pays.
    patch_model(model, backend=backends[0])

    def base_row():
        with model.disable_adapter():
            return timed_generate(model, batch, args.new_tokens, **extra)

    def peft_single_row():
        model.set_adapter("a0")
        return timed_generate(model, batch, args.new_tokens, **extra)

    def peft_mixed_row():
        unpatch_model(model)
        return timed_generate(model, batch, args.new_tokens, adapter_names=names, **extra)

    def ours_row(backend):
        def run():
            patch_model(model, backend=backend)
            return timed_generate(model, batch, args.new_tokens, adapter_names=names, **extra)

        return run

    def ours_dora_row(backend):
        def run():
            patch_model(model, backend=backend)
            return timed_generate(model, batch, args.new_tokens, adapter_names=dora_names, **extra)

        return run

    dora_names = [name.replace("a", "d") for name in names]
    rows = {"base": base_row, "peft_single": peft_single_row}
    if mode == "eager":
        rows["peft_mixed"] = peft_mixed_row
    rows.update({f"ours_{backend}": ours_row(backend) for backend in backends})
    if args.dora:
        rows.update({f"ours_{backend}_dora": ours_dora_row(backend) for backend in backends})
    seconds = {name: [] for name in rows}
    outputs = {}
    with torch.no_grad():
        for name, run in rows.items():  # warm-up (and compilation), outside the timings
            started = time.perf_counter()
            outputs[name] = run()[1]
            print(
                f"  warm-up {mode} b{batch_size} n{distinct} {name}: {time.perf_counter() - started:.1f} s", flush=True
            )
        for repeat in range(args.repeats):  # interleaved repeats
            for name, run in rows.items():
                if name != "peft_mixed" or repeat < args.peft_mixed_repeats:
                    seconds[name].append(run()[0])
    results = []
    base_tok_s = batch_size * args.new_tokens / statistics.median(seconds["base"])
    # The gate runs over the base model's sequences (any text serves a teacher-forced check) on up to 8 rows.
    gate_rows = min(batch_size, 8)
    oracle = oracle_check(model, outputs["base"][:gate_rows], names[:gate_rows], backends)
    for name, values in seconds.items():
        tok_s = batch_size * args.new_tokens / statistics.median(values)
        result = {
            "mode": mode, "batch": batch_size, "distinct_adapters": distinct, "row": name, "tok_s": tok_s,
            "ratio_to_base": tok_s / base_tok_s, "seconds": values, "adapter_dtype": args.adapter_dtype,
            "layers": model.config.num_hidden_layers,
        }  # fmt: skip
        if name.endswith("_dora"):
            # PEFT has no mixed DoRA batch to compare with; the gate is PEFT's single-adapter forward, same dtype.
            backend = name.removeprefix("ours_").removesuffix("_dora")
            result.update(per_adapter_check(model, outputs[name], dora_names, backend))
        elif name in oracle:
            checks = (
                oracle[name] if name.startswith("ours_") else {k: v for k, v in oracle[name].items() if k != "pass"}
            )
            result.update({f"oracle_{key}": value for key, value in checks.items()})
        if name.startswith("ours_") and not name.endswith("_dora"):
            backend = name.removeprefix("ours_")
            if mode == "compiled":
                result["compilations_on_new_assignment"] = new_assignment_compilations(
                    model, batch, names, backend, args.new_tokens, extra
                )
        results.append(result)
    unpatch_model(model)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU, for a smoke run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend that runs here")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--peft-mixed-repeats",
        type=int,
        default=1,
        help="timed repeats of the (slow) PEFT mixed row, at most --repeats",
    )
    parser.add_argument("--dora", action="store_true", help="also time DoRA adapters in the same mixed batches")
    parser.add_argument("--adapter-dtype", choices=["model", "fp32"], default="model")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the GPU model")
    parser.add_argument("--out", default="generate.json")
    args = parser.parse_args()
    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    if args.small:
        args.batches, args.adapters, args.prompt, args.new_tokens, args.repeats = [4], [2], 8, 4, 1
        args.dora = True
    # Every row of every configuration is its own graph; the default limit (8) would silently fall back to eager.
    torch._dynamo.config.recompile_limit = 64
    backends = args.backends or [
        name
        for name in ("triton", "torch")
        if _runs(name, torch.device(device)) and (name == "torch" or device != "cpu")
    ]
    started = time.perf_counter()
    model = build_model(args.small, max(args.adapters), device, args.dora, args.adapter_dtype, args.layers)
    print(f"model and {max(args.adapters)} adapters built in {time.perf_counter() - started:.1f} s", flush=True)
    header = (
        f"{'mode':>8} {'batch':>5} {'adapters':>8} {'row':>17} {'tok/s':>9} {'× base':>7} {'rel err':>8} "
        f"{'argmax':>7} {'gate':>5}"
    )
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")  # fmt: skip
    print(header)
    results = []
    configs = [
        (mode, batch_size, distinct)
        for mode in args.modes
        for batch_size in args.batches
        for distinct in args.adapters
        if distinct <= batch_size
    ]
    for mode, batch_size, distinct in configs:
        for result in run_config(model, mode, batch_size, distinct, backends, args, device):
            results.append(result)
            error = result.get("oracle_rel_logit_error", result.get("rel_logit_error"))
            forced = result.get("oracle_argmax_agreement", result.get("argmax_agreement"))
            gate = result.get("oracle_pass")  # rows of ours only
            print(
                f"{result['mode']:>8} {batch_size:>5} {distinct:>8} {result['row']:>17} {result['tok_s']:>9.1f} "
                f"{result['ratio_to_base']:>7.3f} {'' if error is None else f'{error:.4f}':>8} "
                f"{'' if forced is None else f'{forced:.3f}':>7} {'' if gate is None else str(gate):>5}",
                flush=True,
            )
        # Written after every configuration, so a run cut short by a time limit keeps what it measured.
        _write(args.out, device, args, results)


def _write(path: str, device: str, args, results: list[dict]) -> None:
    import peft
    import transformers

    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
    }  # fmt: skip
    with open(path, "w") as handle:
        json.dump({"meta": meta, "args": vars(args), "results": results}, handle, indent=1)


def _runs(backend: str, device: torch.device) -> bool:
    try:
        get_backend(backend, device)
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    main()
