"""Mixed-adapter ``generate`` end to end: base model, PEFT single adapter, PEFT mixed batch, and peft_fastlora.

On the GPU (default) the model is Llama-3-8B-shaped with random bf16 weights, built on the device (no download),
with rank-16 LoRA adapters a0, a1, ... on all 7 projections. For each mode and batch size, every row below is
timed in one loop of interleaved repeats (greedy, a fixed number of new tokens; median tok/s, ratio to base):

- ``base``: the plain transformers model, no PEFT wrapper at all (it shares its weights with every other row);
- ``peft_disabled`` (eager only): the PeftModel under ``disable_adapter()``, the anchor of earlier runs;
- ``peft_single``: PEFT, one adapter (a0) active, no ``adapter_names``;
- ``peft_mixed`` (eager only): PEFT's own mixed batch, ``adapter_names`` (compiled: "not compiled", it recompiles
  for every assignment and did not finish compiling in 5 minutes);
- ``ours_<backend>``: peft_fastlora with each backend of ``--backends`` (a comma list; a backend that fails to
  load or to run becomes a row carrying its ``error``, not a crash).

Rows that serve mixed batches run once per number of distinct adapters (``--adapters 1 8 32``: rows get a0..a{n-1}
round-robin); base and PEFT single do not depend on it, so they are timed once per (mode, batch) and reported
beside every adapter count. Each model is its own object sharing the base weights (``shared_copy``), so no row
patches or unpatches another: ours is patched once, as a user does, and PEFT's rows run plain, unpatched PEFT.

Adapter dtype (``--adapter-dtype model|fp32|both``): ``model`` keeps the adapters in the model's dtype
(``autocast_adapter_dtype=False``); ``fp32`` is PEFT's default (its own ``_cast_adapter_dtype`` upcasts them);
``both`` times the two in the same process and the same interleaved loop, with the same adapter values (the fp32
adapters are the bf16 ones upcast). PEFT single, PEFT mixed and ours of one ``adapter_dtype`` use the same adapters
in the same dtype; every JSON row carries ``adapter_dtype`` (base rows are repeated in each dtype's group).

Correctness gate: a speed number from a wrong output is void. Two bf16 computations of the same thing differ from
each other more than either differs from the truth, so the gate is teacher-forced against an fp32 oracle (an fp32
copy of the same model and adapters, unpatched PEFT; one oracle serves both adapter dtypes, whose values are the
same): over the base model's generated sequences, ours must be no worse than PEFT's own mixed batch in the same
adapter dtype, relative logit error ≤ 1.1× PEFT's and argmax agreement ≥ PEFT's − 1 point. Both are stored. The
gate runs before any timing, so a process cut short by a time limit keeps it.

Modes: ``eager`` (the dynamic cache, no compilation) and ``compiled`` (``cache_implementation="static"``, which
makes transformers compile the decode step with its default CompileConfig: inductor with CUDA graphs). In compiled
mode the rows are warmed up (compiled) and timed in two phases, base and ours first, then PEFT's rows, and the JSON
is written after each, so that a time limit hit while PEFT compiles keeps the headline. Each ``ours`` row reports
how many dynamo compilations a *new* assignment of adapters caused after timing (it must be 0), and every row of a
group how many happened during its timed repeats.

Noise: each row also records its ratio to base within every interleaved repeat (``ratio_to_base_per_repeat``,
printed as its range) and, for rows timed in both compiled phases, the ratio of medians over both phases' repeats
(``ratio_to_base_pooled``). A difference between two rows smaller than that spread is not a measurement.

``--profile base,peft_single,ours`` profiles those rows after timing (``profile_decode.py`` explains the numbers):
per decode step GPU time, host time, LoRA kernel time, launches and per kernel, the prefill apart, and the time of
the per-call context (``context_enter_ms``: the patched ``_enable_peft_forward_hooks``, i.e. validation, bank
sync, plan fill, before the forward starts), measured with a wall-clock timer in every timed call.

    python benchmarks/bench_generate.py --batches 32 --adapters 8 --adapter-dtype both --out gen.json
    python benchmarks/bench_generate.py --batches 32 --adapters 1 8 32 --modes eager --backends triton,flashinfer
    python benchmarks/bench_generate.py --small                        # CPU smoke run, tiny model, < 1 minute
    python benchmarks/report_generate.py gen.json                      # markdown tables and PNG plot
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import profile_decode
import torch
from peft import LoraConfig, get_peft_model
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, CompileConfig, LlamaConfig

from peft_fastlora import patch_model, tiny
from peft_fastlora.backends import get_backend

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GATE_ROWS = 32  # rows of the teacher-forced correctness gate: 32 × 160 tokens, so that one point of agreement is
# above its sampling noise (with 8 rows, 1,280 tokens, two equally accurate bf16 paths differed by up to 1.2 points)
GATE_CHUNK = 8  # rows per teacher-forced forward: the fp32 logits of 32 rows would hold 2.6 GB each
STARTED = time.perf_counter()


def log(message: str) -> None:
    """A progress line with the seconds since the process started (device calls are budgeted in seconds)."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


def shared_copy(module: torch.nn.Module, shared: list[torch.Tensor]) -> torch.nn.Module:
    """A deep copy of ``module`` in which the tensors of ``shared`` (the base model's weights) are the very same
    objects: a second PeftModel over the same base costs only its adapters' memory."""
    return copy.deepcopy(module, {id(tensor): tensor for tensor in shared})


@dataclass
class Models:
    """The models of one benchmark process, all sharing the base weights.

    ``plain`` is the base model never wrapped by PEFT; ``peft[dtype]`` an unpatched PeftModel with the adapters in
    that adapter dtype; ``ours[dtype][backend]`` a patched copy of it, or the error (a str) that stopped it."""

    plain: torch.nn.Module
    peft: dict[str, torch.nn.Module]
    ours: dict[str, dict[str, torch.nn.Module | str]]
    loaded: int


def build_models(args, device: str, adapter_dtypes: list[str], backends: list[str]) -> Models:
    """The plain base model and, per adapter dtype, PEFT's model and ours per backend, with ``args.loaded_adapters``
    random rank-16 adapters a0, a1, ... (and with ``args.dora`` as many DoRA adapters d0, d1, ..., magnitudes
    perturbed so that DoRA's rescale matters). The adapters of every dtype hold the same values."""
    torch.manual_seed(0)
    if args.small:
        config = tiny.tiny_config("llama")
    else:
        config = LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
        )  # fmt: skip
    with torch.device(device):
        plain = AutoModelForCausalLM.from_config(config, dtype=MODEL_DTYPES[args.model_dtype])
    plain.generation_config.eos_token_id = None  # fixed lengths
    plain.eval()
    shared = [*plain.parameters(), *plain.buffers()]
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    master = get_peft_model(shared_copy(plain, shared), lora, adapter_name="a0", autocast_adapter_dtype=False)
    for index in range(1, args.loaded_adapters):
        master.add_adapter(f"a{index}", lora, autocast_adapter_dtype=False)
    if args.dora:
        dora_lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False, use_dora=True)
        for index in range(args.loaded_adapters):
            master.add_adapter(f"d{index}", dora_lora, autocast_adapter_dtype=False)
        with torch.no_grad():
            for name, parameter in master.named_parameters():
                if "lora_magnitude_vector" in name:
                    parameter.mul_(1 + 0.3 * torch.rand_like(parameter))
    master.set_adapter("a0")
    master.eval()
    peft = {}
    for adapter_dtype in adapter_dtypes:
        model = master if adapter_dtype == "model" or "model" not in adapter_dtypes else shared_copy(master, shared)
        if adapter_dtype == "fp32":
            for name in list(model.peft_config):
                model.base_model._cast_adapter_dtype(name, autocast_adapter_dtype=True)  # PEFT's own upcast
        peft[adapter_dtype] = model
    ours: dict[str, dict] = {}
    for adapter_dtype in adapter_dtypes:
        ours[adapter_dtype] = {}
        for backend in backends:
            try:
                get_backend(backend, torch.device(device))
                model = shared_copy(peft[adapter_dtype], shared)
                ours[adapter_dtype][backend] = patch_model(model, backend=backend)
            except Exception as error:  # noqa: BLE001 (a backend that cannot load is a row, not a crash)
                ours[adapter_dtype][backend] = f"{type(error).__name__}: {error}"
    return Models(plain, peft, ours, args.loaded_adapters)


def build_model(
    small: bool, num_adapters: int, device: str, dora: bool = False, adapter_dtype: str = "model", layers: int = 32
):
    """One unpatched PeftModel with ``num_adapters`` adapters a0, a1, ... (and as many DoRA ones d0, ... with
    ``dora``), in the model's dtype or fp32 (PEFT's default upcast): the single model other scripts
    (``bench_memory.py``) build."""
    args = argparse.Namespace(small=small, layers=layers, model_dtype="fp32" if small else "bf16",
                              loaded_adapters=num_adapters, dora=dora)  # fmt: skip
    return build_models(args, device, [adapter_dtype], []).peft[adapter_dtype]


def adapter_torch_dtype(model: torch.nn.Module) -> str:
    """The dtype of the model's lora_A weights (what "model" or "fp32" became)."""
    for name, parameter in model.named_parameters():
        if "lora_A" in name:
            return str(parameter.dtype).removeprefix("torch.")
    return "none"


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


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_generate(model, batch, new_tokens: int, **kwargs) -> tuple[float, torch.Tensor]:
    """Seconds for one greedy generate of exactly ``new_tokens`` tokens, and the output ids."""
    synchronize()
    started = time.perf_counter()
    output = model.generate(
        **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs
    )
    synchronize()
    return time.perf_counter() - started, output


def agreement(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """Relative logit error ‖actual − expected‖ / ‖expected‖ and the argmax agreement rate."""
    return AgreementSums().add(actual, expected).result()


class AgreementSums:
    """`agreement` accumulated over chunks of rows: the same two figures as over the whole batch at once."""

    def __init__(self) -> None:
        self.error_sq = self.reference_sq = 0.0
        self.matches = self.tokens = 0

    def add(self, actual: torch.Tensor, expected: torch.Tensor) -> AgreementSums:
        actual, expected = actual.float(), expected.float()
        self.error_sq += (actual - expected).square().sum().item()
        self.reference_sq += expected.square().sum().item()
        self.matches += (actual.argmax(-1) == expected.argmax(-1)).sum().item()
        self.tokens += expected[..., 0].numel()
        return self

    def result(self) -> dict:
        return {
            "rel_logit_error": (self.error_sq / self.reference_sq) ** 0.5,
            "argmax_agreement": self.matches / self.tokens,
            "gate_tokens": self.tokens,
        }


def chunked_agreement(model, sequences: torch.Tensor, names: list[str], expected: list[torch.Tensor]) -> dict:
    """`agreement` of ``model``'s teacher-forced logits over ``sequences`` against ``expected``, the oracle's logits
    of consecutive chunks of rows, one forward per chunk."""
    sums, start = AgreementSums(), 0
    for reference in expected:
        rows = slice(start, start + reference.shape[0])
        sums.add(model(input_ids=sequences[rows], adapter_names=names[rows]).logits, reference)
        start = rows.stop
    return sums.result()


def passes(ours: dict, peft: dict) -> bool:
    """The gate: error ≤ 1.1× PEFT's (the floor 1e-5: in an fp32 model the oracle is PEFT's own computation, error
    0, and ours differs by rounding) and argmax agreement ≥ PEFT's − 0.01."""
    return (
        ours["rel_logit_error"] <= max(1.1 * peft["rel_logit_error"], 1e-5)
        and ours["argmax_agreement"] >= peft["argmax_agreement"] - 0.01
    )


def per_adapter_check(peft_model, ours_model, sequences: torch.Tensor, names: list[str]) -> dict:
    """The gate for rows PEFT's mixed batch refuses (DoRA): ours' mixed logits over ``sequences`` against PEFT's
    single-adapter forward (``set_adapter``) of each adapter's rows, in the same adapter dtype."""
    expected = torch.empty(*sequences.shape, peft_model.config.vocab_size, device=sequences.device)
    for name in set(names):
        rows = [row for row, row_name in enumerate(names) if row_name == name]
        peft_model.set_adapter(name)
        expected[rows] = peft_model(input_ids=sequences[rows]).logits.float()
    peft_model.set_adapter("a0")
    return agreement(ours_model(input_ids=sequences, adapter_names=names).logits, expected)


class ContextTimer:
    """Times the per-call context of a PeftModel: ``LoraModel._enable_peft_forward_hooks``, which ``PeftModel``
    enters once per ``generate``/``forward`` before the model runs (PEFT's own hook registration when unpatched;
    the patch's validation, bank sync and plan fill when patched). Installed on the instance, around whatever is
    there, so it follows the patch wherever it puts that work. Only calls with ``adapter_names`` are recorded; the
    profiler sees them as ``peft_fastlora::call_context_enter`` / ``_exit``."""

    def __init__(self, peft_model: torch.nn.Module):
        self.lora_model = peft_model.base_model
        self.inner = self.lora_model._enable_peft_forward_hooks
        self.enter_s: list[float] = []
        self.exit_s: list[float] = []
        self.lora_model._enable_peft_forward_hooks = self

    def __call__(self, *args, **kwargs):
        context = self.inner(*args, **kwargs)
        return self._timed(context) if kwargs.get("adapter_names") is not None else context

    @contextlib.contextmanager
    def _timed(self, context):
        started = time.perf_counter()
        with torch.profiler.record_function("peft_fastlora::call_context_enter"):
            context.__enter__()
        self.enter_s.append(time.perf_counter() - started)
        try:
            yield
        except BaseException as error:
            if not context.__exit__(type(error), error, error.__traceback__):
                raise
        else:
            started = time.perf_counter()
            with torch.profiler.record_function("peft_fastlora::call_context_exit"):
                context.__exit__(None, None, None)
            self.exit_s.append(time.perf_counter() - started)

    def take(self) -> tuple[list[float], list[float]]:
        taken = self.enter_s, self.exit_s
        self.enter_s, self.exit_s = [], []
        return taken


@dataclass
class Row:
    """One timed row of a (mode, batch) group."""

    name: str  # the JSON row: base, peft_disabled, peft_single, peft_mixed, ours_<backend>, ours_<backend>_dora
    adapter_dtype: str | None  # None: no adapters (base rows), reported in every dtype's group
    distinct: int | None  # None: independent of the adapter count, reported beside every count
    run: Callable[[int], tuple[float, torch.Tensor]] | None  # new tokens -> (seconds, output ids)
    model: torch.nn.Module | None = None
    phase: int = 1
    warm_up: bool = True
    repeats: int | None = None  # at most this many timed repeats (None: all)
    error: str | None = None
    seconds: list[float] = field(default_factory=list)
    seconds_phase1: list[float] = field(default_factory=list)
    warmup_s: float | None = None
    context_enter_s: list[float] = field(default_factory=list)
    context_exit_s: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.name, self.adapter_dtype, self.distinct)


class Bench:
    """Builds the models once, runs the correctness gate, then times (mode, batch) groups."""

    def __init__(self, args, device: str):
        self.args, self.device = args, device
        self.adapter_dtypes = ["model", "fp32"] if args.adapter_dtype == "both" else [args.adapter_dtype]
        self.backends = args.backends
        started = time.perf_counter()
        self.models = build_models(args, device, self.adapter_dtypes, self.backends)
        self.timeline = {"build_s": time.perf_counter() - started}
        log(f"model ({args.layers if not args.small else 2} layers) and {args.loaded_adapters} adapters × "
            f"{len(self.adapter_dtypes)} dtypes built")  # fmt: skip
        self.torch_dtypes = {dtype: adapter_torch_dtype(model) for dtype, model in self.models.peft.items()}
        self.gate: dict[tuple, dict] = {}
        self.timers: dict[int, ContextTimer] = {}

    # Inputs ----------------------------------------------------------------------------------------------------
    def prompts(self, batch_size: int) -> dict:
        generator = torch.Generator().manual_seed(batch_size)
        vocab = self.models.plain.config.vocab_size
        ids = torch.randint(3, vocab, (batch_size, self.args.prompt), generator=generator).to(self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @staticmethod
    def names(batch_size: int, distinct: int, prefix: str = "a") -> list[str]:
        return [f"{prefix}{row % distinct}" for row in range(batch_size)]

    # The correctness gate --------------------------------------------------------------------------------------
    def run_gate(self, configs: list[tuple[int, int]]) -> None:
        """Teacher-forced logits of PEFT's mixed batch and of ours, per adapter dtype, against one fp32 oracle, for
        every (batch, distinct adapters) of the run, before any timing. Ours rows that fail to run become errors."""
        if not self.args.gate:
            return
        started = time.perf_counter()
        models = self.models
        with torch.no_grad():
            oracle = copy.deepcopy(models.peft[self.adapter_dtypes[0]]).float()  # a full copy, base weights too
            for batch_size, distinct in configs:
                rows = min(batch_size, GATE_ROWS)
                prompts = {key: value[:rows] for key, value in self.prompts(batch_size).items()}
                sequences = timed_generate(models.plain, prompts, self.args.new_tokens)[1]
                names = self.names(batch_size, distinct)[:rows]
                chunks = [slice(start, start + GATE_CHUNK) for start in range(0, rows, GATE_CHUNK)]
                expected = [oracle(input_ids=sequences[c], adapter_names=names[c]).logits.float() for c in chunks]
                check = functools.partial(chunked_agreement, sequences=sequences, names=names, expected=expected)
                for dtype in self.adapter_dtypes:
                    peft = check(models.peft[dtype])
                    self.gate[(batch_size, distinct, dtype, "peft_mixed")] = peft
                    for backend, model in models.ours[dtype].items():
                        if isinstance(model, str):
                            continue
                        try:
                            ours = check(model)
                            ours["pass"] = passes(ours, peft)
                            ours["peft_rel_logit_error"] = peft["rel_logit_error"]
                            ours["peft_argmax_agreement"] = peft["argmax_agreement"]
                            self.gate[(batch_size, distinct, dtype, f"ours_{backend}")] = ours
                            if self.args.dora:
                                dora_names = self.names(batch_size, distinct, "d")[: min(rows, GATE_CHUNK)]
                                self.gate[(batch_size, distinct, dtype, f"ours_{backend}_dora")] = per_adapter_check(
                                    models.peft[dtype], model, sequences[: len(dora_names)], dora_names
                                )
                        except Exception as error:  # noqa: BLE001
                            models.ours[dtype][backend] = f"{type(error).__name__} in the gate's forward: {error}"
                del expected
            del oracle
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.timeline["gate_s"] = time.perf_counter() - started
        log("correctness gate done")

    # Timing ----------------------------------------------------------------------------------------------------
    def timer(self, model) -> ContextTimer:
        if id(model) not in self.timers:
            self.timers[id(model)] = ContextTimer(model)
        return self.timers[id(model)]

    def rows(self, mode: str, batch_size: int, distincts: list[int]) -> list[Row]:
        args, models = self.args, self.models
        batch, extra = self.prompts(batch_size), mode_kwargs(mode, self.device)
        compiled = mode == "compiled"

        def generate(model, context=None, **kwargs):
            def run(new_tokens: int):
                with context() if context else contextlib.nullcontext():
                    return timed_generate(model, batch, new_tokens, **kwargs, **extra)

            return run

        def single(model):
            def run(new_tokens: int):
                model.set_adapter("a0")
                return timed_generate(model, batch, new_tokens, **extra)

            return run

        rows = [Row("base", None, None, generate(models.plain))]
        first = models.peft[self.adapter_dtypes[0]]
        if not compiled and args.peft_disabled:
            rows.append(Row("peft_disabled", None, None, generate(first, first.disable_adapter)))
        for dtype in self.adapter_dtypes:
            peft = models.peft[dtype]
            if args.peft_single:
                rows.append(Row("peft_single", dtype, None, single(peft), model=peft, phase=2))
            if not compiled and args.peft_mixed:
                for distinct in distincts:
                    run = generate(peft, adapter_names=self.names(batch_size, distinct))
                    rows.append(Row("peft_mixed", dtype, distinct, run, peft, 2, bool(args.peft_mixed_warmup),
                                    args.peft_mixed_repeats))  # fmt: skip
            for backend, model in models.ours[dtype].items():
                for distinct in distincts:
                    if isinstance(model, str):
                        rows.append(Row(f"ours_{backend}", dtype, distinct, None, error=model))
                        continue
                    names = self.names(batch_size, distinct)
                    rows.append(Row(f"ours_{backend}", dtype, distinct, generate(model, adapter_names=names), model))
                    if args.dora:
                        names = self.names(batch_size, distinct, "d")
                        run = generate(model, adapter_names=names)
                        rows.append(Row(f"ours_{backend}_dora", dtype, distinct, run, model))
        if not compiled:
            for row in rows:
                row.phase = 1  # nothing compiles in eager mode: one phase, every row interleaved with every other
        return rows

    def _run_once(self, row: Row, new_tokens: int) -> tuple[float, torch.Tensor] | None:
        timer = self.timer(row.model) if row.model is not None else None
        try:
            result = row.run(new_tokens)
        except Exception as error:  # noqa: BLE001 (a failing backend is reported, the others go on)
            row.error = f"{type(error).__name__}: {error}"
            log(f"  {row.name} ({row.adapter_dtype}, {row.distinct} adapters) failed: {row.error}")
            return None
        finally:
            if timer is not None:
                enter, exit_ = timer.take()
        if timer is not None:
            row.context_enter_s += enter
            row.context_exit_s += exit_
        return result

    def _warm_up(self, rows: list[Row], label: str) -> None:
        for row in rows:
            if row.error or not row.warm_up:
                continue
            started = time.perf_counter()
            self._run_once(row, self.args.new_tokens)
            row.warmup_s = time.perf_counter() - started
            row.context_enter_s, row.context_exit_s = [], []
            log(f"  warm-up {label} {row.name} ({row.adapter_dtype}, {row.distinct} adapters): {row.warmup_s:.1f} s")

    def _time(self, rows: list[Row]) -> int:
        """Interleaved timed repeats; returns the dynamo compilations that happened meanwhile (should be 0)."""
        before = counters["stats"]["unique_graphs"]
        for repeat in range(self.args.repeats):
            for row in rows:
                if not row.error and (row.repeats is None or repeat < row.repeats):
                    result = self._run_once(row, self.args.new_tokens)
                    if result is not None:
                        row.seconds.append(result[0])
        return counters["stats"]["unique_graphs"] - before

    def run_group(self, mode: str, batch_size: int, distincts: list[int], write: Callable) -> None:
        """Time every row of one (mode, batch) group; ``write(results, profiles)`` is called after each phase."""
        torch._dynamo.reset()  # each group compiles its own graphs, under the recompile limit
        rows = self.rows(mode, batch_size, distincts)
        label = f"{mode} b{batch_size}"
        started = time.perf_counter()
        compilations = 0
        with torch.no_grad():
            for phase in sorted({row.phase for row in rows}):
                self._warm_up([row for row in rows if row.phase == phase], label)
                live = [row for row in rows if row.phase <= phase]
                for row in live:
                    if row.phase < phase:
                        row.seconds_phase1, row.seconds = row.seconds, []
                compilations = self._time(live)
                if phase == 1 and len({row.phase for row in rows}) > 1:
                    log(f"  {label}: phase 1 (base and ours) timed; JSON written")
                    write(self.results(mode, batch_size, distincts, live, compilations, final=False), [])
            if mode == "compiled":
                self._new_assignment_check(rows, batch_size, distincts)
        results = self.results(mode, batch_size, distincts, rows, compilations, final=True)
        self.timeline[f"{label}_s"] = time.perf_counter() - started
        write(results, [])
        self.print_results(results)
        if self.args.profile:
            profiles = self.profile_group(mode, batch_size, distincts, rows)
            write(results, profiles)

    def _new_assignment_check(self, rows: list[Row], batch_size: int, distincts: list[int]) -> None:
        """Dynamo compilations caused by one generate of each patched model with the rows' adapters rotated."""
        extra = mode_kwargs("compiled", self.device)
        batch = self.prompts(batch_size)
        names = self.names(batch_size, max(distincts))
        for model in {id(row.model): row.model for row in rows if row.name.startswith("ours_") and not row.error
                      and row.run is not None}.values():  # fmt: skip
            before = counters["stats"]["unique_graphs"]
            try:
                timed_generate(model, batch, self.args.new_tokens, adapter_names=names[1:] + names[:1], **extra)
            except Exception as error:  # noqa: BLE001
                log(f"  new-assignment check failed: {error}")
                continue
            self.timer(model).take()
            for row in rows:
                if row.model is model and row.name.startswith("ours_"):
                    row.extra["compilations_on_new_assignment"] = counters["stats"]["unique_graphs"] - before

    # Results ---------------------------------------------------------------------------------------------------
    def results(self, mode, batch_size, distincts, rows: list[Row], compilations: int, final: bool) -> list[dict]:
        """One JSON row per (row, adapter dtype, distinct adapters); rows timed once per group are repeated in each
        dtype's group and beside each adapter count."""
        by_key = {row.key: row for row in rows}
        results = []
        for dtype in self.adapter_dtypes:
            for distinct in distincts:
                base = by_key[("base", None, None)]
                single = by_key.get(("peft_single", dtype, None))
                disabled = by_key.get(("peft_disabled", None, None))
                for row in rows:
                    if row.adapter_dtype not in (None, dtype) or row.distinct not in (None, distinct):
                        continue
                    results.append(self._result(row, mode, batch_size, distinct, dtype, base, single, disabled))
                    results[-1]["compilations_during_timing"] = compilations
                    if not final:
                        results[-1]["phase"] = 1
        return results

    def _result(self, row: Row, mode, batch_size, distinct, dtype, base, single, disabled) -> dict:
        args = self.args
        result = {
            "mode": mode, "batch": batch_size, "distinct_adapters": distinct, "loaded_adapters": self.models.loaded,
            "row": row.name, "adapter_dtype": dtype, "adapter_torch_dtype": self.torch_dtypes[dtype],
            "model_dtype": args.model_dtype, "layers": self.models.plain.config.num_hidden_layers,
            "prompt": args.prompt, "new_tokens": args.new_tokens, "tok_s": None, "ratio_to_base": None,
        }  # fmt: skip
        if row.adapter_dtype is None:
            result["timed_once_for"] = "every adapter dtype and adapter count of this (mode, batch)"
        elif row.distinct is None:
            result["timed_once_for"] = "every adapter count of this (mode, batch, adapter dtype)"
        if row.error and not row.seconds:
            result["error"] = row.error
            return result
        tok_s = _tok_s(row, batch_size, args.new_tokens)
        result.update({"tok_s": tok_s, "seconds": row.seconds, "warmup_s": row.warmup_s})
        if row.seconds_phase1:
            result["seconds_phase1"] = row.seconds_phase1
        for anchor, reference in (("base", base), ("peft_single", single), ("peft_disabled", disabled)):
            reference_tok_s = None if reference is None else _tok_s(reference, batch_size, args.new_tokens)
            if reference_tok_s:
                result[f"ratio_to_{anchor}"] = tok_s / reference_tok_s
        if base is not None and base is not row and base.seconds:
            result.update(_ratio_spread(row, base))
        if row.context_enter_s:
            result["context_enter_ms"] = statistics.median(row.context_enter_s) * 1e3
            result["context_exit_ms"] = statistics.median(row.context_exit_s) * 1e3 if row.context_exit_s else None
        if row.error:
            result["error"] = row.error
        gate = self.gate.get((batch_size, distinct, dtype, row.name))
        if gate is not None:
            prefix = "" if row.name.endswith("_dora") else "oracle_"  # DoRA: PEFT's single-adapter forward
            result.update({f"{prefix}{key}": value for key, value in gate.items()})
        result.update(row.extra)
        return result

    def print_results(self, results: list[dict]) -> None:
        for result in results:
            error = result.get("oracle_rel_logit_error", result.get("rel_logit_error"))
            forced = result.get("oracle_argmax_agreement", result.get("argmax_agreement"))
            gate = result.get("oracle_pass")
            print(
                f"{result['mode']:>8} {result['adapter_dtype']:>5} {result['batch']:>5} "
                f"{result['distinct_adapters']:>8} {result['row']:>18} {_fmt(result['tok_s'], '.1f'):>9} "
                f"{_fmt(result['ratio_to_base'], '.3f'):>7} {_fmt(result.get('ratio_to_peft_single'), '.3f'):>7} "
                f"{_fmt(error, '.4f'):>8} {_fmt(forced, '.3f'):>7} {_fmt(gate, ''):>5} {result.get('error', '')}"
                + _spread(result)
                + _compilations(result),
                flush=True,
            )

    # Profiles --------------------------------------------------------------------------------------------------
    def profile_group(self, mode: str, batch_size: int, distincts: list[int], rows: list[Row]) -> list[dict]:
        """Per decode step and prefill apart: see ``profile_decode.profile_row``."""
        args = self.args
        wanted = set(args.profile)
        distinct = args.profile_adapters if args.profile_adapters in distincts else max(distincts)
        chosen = [
            row
            for row in rows
            if not row.error
            and row.seconds
            and row.distinct in (None, distinct)
            and (row.name in wanted or (row.name.startswith("ours_") and "ours" in wanted))
        ]
        with torch.no_grad():
            # Short (prefill-only) generates, timed like the long ones: step = (t(new) − t(1)) / (new − 1).
            short = {id(row): [] for row in chosen}
            for _ in range(args.repeats):
                for row in chosen:
                    result = self._run_once(row, 1)
                    if result is not None:
                        short[id(row)].append(result[0])
            profiles = []
            for row in chosen:
                if not short[id(row)]:
                    continue
                timer = self.timer(row.model) if row.model is not None else None
                profiled = profile_decode.profile_row(
                    row.run, args.profile_tokens, args.lora_kernels, timer,
                )  # fmt: skip
                profiled.update(profile_decode.step_times(
                    statistics.median(row.seconds), statistics.median(short[id(row)]), args.new_tokens, profiled,
                ))  # fmt: skip
                profiled.update({
                    "mode": mode, "batch": batch_size, "distinct_adapters": row.distinct or distinct,
                    "loaded_adapters": self.models.loaded, "row": row.name,
                    "adapter_dtype": row.adapter_dtype or "none", "layers": self.models.plain.config.num_hidden_layers,
                    "prompt": args.prompt, "new_tokens": args.new_tokens,
                })  # fmt: skip
                if row.context_enter_s:
                    profiled["context_enter_ms"] = statistics.median(row.context_enter_s) * 1e3
                profiles.append(profiled)
        profile_decode.print_profiles(profiles)
        if args.profile_dir:
            Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
            path = Path(args.profile_dir) / f"kernels_{mode}_b{batch_size}_n{distinct}.txt"
            path.write_text(profile_decode.kernel_tables(profiles))
        return profiles


def _compilations(result: dict) -> str:
    notes = []
    if result.get("compilations_on_new_assignment") is not None:
        notes.append(f"compilations for a new assignment: {result['compilations_on_new_assignment']}")
    if result.get("compilations_during_timing"):
        notes.append(f"COMPILED DURING TIMING: {result['compilations_during_timing']}")
    return ("  " + "; ".join(notes)) if notes else ""


def _spread(result: dict) -> str:
    """`` per repeat 0.71–0.80`` (and `` pooled 0.75``): the ratio's spread, for the printed table."""
    per_repeat = result.get("ratio_to_base_per_repeat")
    if not per_repeat or result["row"] == "base":
        return ""
    text = f"  per repeat {min(per_repeat):.3f}–{max(per_repeat):.3f}"
    pooled = result.get("ratio_to_base_pooled")
    return text + (f", pooled {pooled:.3f}" if pooled is not None else "")


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ratio_spread(row: Row, base: Row) -> dict:
    """How far one row's ratio to base moves from repeat to repeat: the ratio within each interleaved repeat (the
    row's i-th time against base's i-th, timed moments apart), and, where both were also timed in a first phase
    (compiled mode), the ratio of the medians over both phases' repeats. Repeats of one row varied by up to 15% in
    one run on the H200, and one row's two phases by 0.06 in ratio: a difference smaller than this spread is noise."""
    spread = {"ratio_to_base_per_repeat": [b / r for b, r in zip(base.seconds, row.seconds, strict=False)]}
    if row.seconds_phase1 and base.seconds_phase1:
        pooled_row, pooled_base = row.seconds_phase1 + row.seconds, base.seconds_phase1 + base.seconds
        spread["ratio_to_base_pooled"] = statistics.median(pooled_base) / statistics.median(pooled_row)
    return spread


def _tok_s(row: Row, batch_size: int, new_tokens: int) -> float | None:
    return batch_size * new_tokens / statistics.median(row.seconds) if row.seconds else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU, for a smoke run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32], help="distinct adapters per batch")
    parser.add_argument(
        "--configs", nargs="+", default=None, metavar="BxN",
        help="batch x distinct adapters pairs, e.g. 32x1 32x8 64x32 (instead of the --batches × --adapters grid)",
    )  # fmt: skip
    parser.add_argument("--loaded-adapters", type=int, default=None, help="adapters in the model (default: the most)")
    parser.add_argument(
        "--backends", nargs="+", default=None, help="comma list: triton,torch,flashinfer (default: those that run)"
    )
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peft-mixed-repeats", type=int, default=1, help="timed repeats of PEFT's (slow) mixed row")
    parser.add_argument(
        "--peft-mixed-warmup", type=int, choices=[0, 1], default=1,
        help="0: no warm-up run for PEFT's mixed row (eager: nothing to compile; the base row warmed the GPU up)",
    )  # fmt: skip
    parser.add_argument("--no-peft-mixed", dest="peft_mixed", action="store_false", help="skip PEFT's mixed row")
    parser.add_argument(
        "--no-peft-single",
        dest="peft_single",
        action="store_false",
        help="skip PEFT's one-adapter row (an A/B of our own code: its compile is the longest)",
    )
    parser.add_argument("--no-peft-disabled", dest="peft_disabled", action="store_false",
                        help="skip the eager row of the PeftModel under disable_adapter()")  # fmt: skip
    parser.add_argument("--no-gate", dest="gate", action="store_false", help="skip the fp32-oracle correctness gate")
    parser.add_argument("--dora", action="store_true", help="also time DoRA adapters in the same mixed batches")
    parser.add_argument("--adapter-dtype", choices=["model", "fp32", "both"], default="model")
    parser.add_argument("--model-dtype", choices=list(MODEL_DTYPES), default=None, help="default: bf16 (GPU), fp32")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the GPU model")
    parser.add_argument("--profile", default="", help="rows to profile after timing: comma list of base,"
                        "peft_disabled,peft_single,peft_mixed,ours")  # fmt: skip
    parser.add_argument("--profile-adapters", type=int, default=8, help="the adapter count profiled (else the most)")
    parser.add_argument("--profile-tokens", type=int, default=9, help="new tokens of a profiled generate")
    parser.add_argument("--profile-dir", default=None, help="folder for per-kernel text tables")
    parser.add_argument("--lora-kernels", default=profile_decode.LORA_KERNELS, help="regex of LoRA kernel names")
    parser.add_argument("--out", default="generate.json")
    return parser


def prepare(args, device: str) -> None:
    """Defaults that depend on the device and the other options, filled in place."""
    if args.small:  # tiny defaults, where the command line left the GPU defaults
        defaults = build_parser().parse_args([])
        small = {"batches": [4], "adapters": [2], "prompt": 8, "new_tokens": 4, "repeats": 1, "dora": True}
        for name, value in small.items():
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
    args.model_dtype = args.model_dtype or ("fp32" if args.small else "bf16")
    if args.configs:
        pairs = [tuple(int(part) for part in config.lower().split("x")) for config in args.configs]
    else:
        pairs = [(batch_size, count) for batch_size in args.batches for count in args.adapters]
    args.loaded_adapters = args.loaded_adapters or max(count for _, count in pairs)
    args.configs = [f"{b}x{n}" for b, n in pairs if n <= b and n <= args.loaded_adapters]
    args.batches = sorted({int(config.split("x")[0]) for config in args.configs})
    args.adapters = sorted({int(config.split("x")[1]) for config in args.configs})
    if isinstance(args.profile, str):
        args.profile = [name for name in args.profile.split(",") if name]
    if args.backends:
        args.backends = [name for value in args.backends for name in value.split(",") if name]
    else:
        args.backends = [
            name
            for name in ("triton", "torch")
            if _runs(name, torch.device(device)) and (name == "torch" or device != "cpu")
        ]


def run(args) -> Bench:
    """The whole benchmark of ``args``; the JSON is rewritten after every phase of every (mode, batch) group."""
    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    prepare(args, device)
    # Every model of every group is its own graph; the default limit (8) would silently fall back to eager.
    torch._dynamo.config.recompile_limit = 64
    bench = Bench(args, device)
    pairs = [tuple(int(part) for part in config.split("x")) for config in args.configs]
    groups = [
        (mode, batch_size, sorted(count for b, count in pairs if b == batch_size))
        for mode in args.modes
        for batch_size in args.batches
    ]
    try:
        bench.run_gate(pairs)
    except Exception as error:  # noqa: BLE001 (the speed numbers are still worth having; the JSON says why no gate)
        bench.timeline["gate_error"] = f"{type(error).__name__}: {error}"
        log(f"correctness gate failed: {bench.timeline['gate_error']}")
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}; backends {', '.join(args.backends)}")  # fmt: skip
    print(f"{'mode':>8} {'dtype':>5} {'batch':>5} {'adapters':>8} {'row':>18} {'tok/s':>9} {'× base':>7} "
          f"{'× PEFT1':>7} {'rel err':>8} {'argmax':>7} {'gate':>5}")  # fmt: skip
    writer = Writer(args.out, device, args, bench.timeline)
    for mode, batch_size, distincts in groups:
        bench.run_group(mode, batch_size, distincts, writer.write)
        writer.close_group()
    log("done")
    return bench


def main(argv: list[str] | None = None) -> Bench:
    return run(build_parser().parse_args(argv))


def _git_commit() -> str | None:
    """The checkout's commit, or ``$FASTLORA_COMMIT`` where set: a device machine's copy of the working tree may
    carry a stale ``.git`` (every JSON of one session recorded the session's first commit)."""
    if os.environ.get("FASTLORA_COMMIT"):
        return os.environ["FASTLORA_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if commit.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class Writer:
    """Rewrites the JSON with every finished group and the running group's latest results."""

    def __init__(self, path: str, device: str, args, timeline: dict):
        self.path, self.device, self.args, self.timeline = path, device, args, timeline
        self.done: list[dict] = []
        self.done_profiles: list[dict] = []
        self.latest: tuple[list[dict], list[dict]] = ([], [])

    def write(self, results: list[dict], profiles: list[dict]) -> None:
        self.latest = (results, profiles)
        _write(self.path, self.device, self.args, self.done + results, self.done_profiles + profiles, self.timeline)

    def close_group(self) -> None:
        self.done += self.latest[0]
        self.done_profiles += self.latest[1]
        self.latest = ([], [])


def _write(path: str, device: str, args, results: list[dict], profiles: list[dict], timeline: dict) -> None:
    import peft
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "triton": triton_version, "transformers": transformers.__version__, "peft": peft.__version__,
        "commit": _git_commit(), "command": " ".join(sys.argv), "timeline_s": timeline,
        "base_row": "the plain transformers model (no PEFT wrapper), sharing the weights of every other row",
    }  # fmt: skip
    # Written aside and renamed: a process killed by a time limit mid-write leaves the previous file whole.
    partial = Path(f"{path}.partial")
    data = {"meta": meta, "args": vars(args), "results": results, "profiles": profiles}
    partial.write_text(json.dumps(data, indent=1))
    partial.replace(path)


def _runs(backend: str, device: torch.device) -> bool:
    try:
        get_backend(backend, device)
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    main()
