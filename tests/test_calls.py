"""Calls a patched model must serve as PEFT does: copies and pickles of it, calls inside calls and from other
threads, gradients through a mixed batch, the argument types PEFT accepts, and no memory kept per call."""

from __future__ import annotations

import copy
import gc
import io
import os
import pickle
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close_relative, interpreted, load, run_at_once
from transformers import LogitsProcessor, LogitsProcessorList

import peft_fastlora
from peft_fastlora import patch_model, tiny

NAMES = ["a", "b", "__base__", "c"]
GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}


@torch.no_grad()
def mixed_logits(model, batch, names=NAMES) -> torch.Tensor:
    return model(**batch, adapter_names=names).logits


def fast_layers(model) -> list[torch.nn.Module]:
    return [module for module in model.modules() if peft_fastlora.layers.is_fast_layer(module)]


def native_model(adapter_dirs):
    """A transformers model with adapters a/b/c loaded by transformers' own ``load_adapter``."""
    model = tiny.build_base_model("llama")
    for name in ("a", "b", "c"):
        model.load_adapter(str(adapter_dirs["llama"][name]), adapter_name=name)
    return model.eval()


def state_of(model):
    return model.__dict__.get("_fastlora_state") or model.base_model.__dict__["_fastlora_state"]


# ---------------------------------------------------------------------------------------------------------------
# Copies (issue 17, item 4)


def twin_of(model, how: str):
    if how == "deepcopy":
        return copy.deepcopy(model)
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("native", [False, True], ids=["PeftModel", "transformers"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copy_serves_mixed_batches_on_its_own(how, native, adapter_dirs):
    """A deep copy or an unpickled copy of a patched model (one that has already served a call) serves mixed
    batches correctly with its own lock, plan and bank: changing the copy's adapters changes the copy only."""
    oracle = load("llama", adapter_dirs)
    model = patch_model(native_model(adapter_dirs) if native else load("llama", adapter_dirs), backend="torch")
    batch = tiny.random_prompts(len(NAMES), 6, seed=3)
    expected = mixed_logits(oracle, batch)
    assert_close_relative(mixed_logits(model, batch), expected)
    twin = twin_of(model, how)
    # The copy holds plain PEFT parameters in plain dicts (the bank's watched classes are the patch's own state).
    assert all(type(parameter) is torch.nn.Parameter for parameter in twin.parameters())
    assert all(type(module._parameters) is dict for module in twin.modules())
    assert_close_relative(mixed_logits(twin, batch), expected)
    with torch.no_grad():
        assert torch.equal(
            twin.generate(**batch, adapter_names=NAMES, **GREEDY),
            oracle.generate(**batch, adapter_names=NAMES, **GREEDY),
        )
    original_state, twin_state = state_of(model), state_of(twin)
    assert twin_state is not original_state
    assert twin_state.lock is not original_state.lock
    assert twin_state.plan_buffers is not original_state.plan_buffers
    assert twin_state.bank is not original_state.bank
    assert len(fast_layers(twin)) == len(fast_layers(model))
    assert all(layer._fastlora_state is twin_state for layer in fast_layers(twin))
    twin_layer = next(layer for layer in fast_layers(twin) if "a" in layer.lora_B)
    with torch.no_grad():
        twin_layer.lora_B["a"].weight.mul_(3)
    assert (mixed_logits(twin, batch) - expected).abs().max() > 1e-3, "the copy did not serve its own weights"
    assert_close_relative(mixed_logits(model, batch), expected)


def test_unpickle_in_a_fresh_process(adapter_dirs, tmp_path):
    """``torch.save(model)`` loads in a process that has not imported peft_fastlora, and serves mixed batches."""
    oracle = load("llama", adapter_dirs)
    model = patch_model(load("llama", adapter_dirs), backend="torch")
    batch = tiny.random_prompts(len(NAMES), 6, seed=4)
    mixed_logits(model, batch)
    path = tmp_path / "model.pt"
    torch.save({"model": model, "batch": batch, "expected": mixed_logits(oracle, batch), "names": NAMES}, path)
    script = (
        "import sys, torch\n"
        "assert 'peft_fastlora' not in sys.modules\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "with torch.no_grad():\n"
        "    logits = saved['model'](**saved['batch'], adapter_names=saved['names']).logits\n"
        "error = ((logits - saved['expected']).abs().max() / saved['expected'].abs().max()).item()\n"
        "assert error < 1e-5, error\n"
        "from peft_fastlora.layers import is_fast_layer\n"
        "print(sum(is_fast_layer(module) for module in saved['model'].modules()))\n"
    )
    package_root = str(Path(peft_fastlora.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) == len(fast_layers(model))


# ---------------------------------------------------------------------------------------------------------------
# Calls inside calls, and calls from other threads (issue 17, item 6)


class NestedCall(LogitsProcessor):
    """Calls the model itself at every decoding step (as a reranking or contrastive-decoding processor does) and
    records what it saw; the scores pass through unchanged."""

    def __init__(self, model, names):
        self.model, self.names = model, names
        self.inputs, self.logits = [], []

    def __call__(self, input_ids, scores):
        kwargs = {} if self.names is None else {"adapter_names": self.names(len(input_ids))}
        self.inputs.append(input_ids.clone())
        self.logits.append(self.model(input_ids=input_ids, **kwargs).logits)
        return scores


def generate_nested(model, batch, inner) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A mixed greedy ``generate`` with a ``NestedCall(model, inner)`` processor: its tokens and the inner logits."""
    processor = NestedCall(model, inner)
    tokens = model.generate(**batch, adapter_names=NAMES, logits_processor=LogitsProcessorList([processor]), **GREEDY)
    return tokens, processor.logits


def all_base(rows: int) -> list[str]:
    return ["__base__"] * rows


def reversed_names(rows: int) -> list[str]:
    return (NAMES * rows)[:rows][::-1]


@pytest.mark.parametrize("inner", [all_base, reversed_names], ids=["all_base", "reversed"])
@torch.no_grad()
def test_call_inside_generate_leaves_the_outer_call_alone(inner, adapter_dirs):
    """A logits processor that calls the model with its own ``adapter_names`` inside a mixed ``generate``: the
    outer tokens and the inner logits are PEFT's."""
    oracle = load("llama", adapter_dirs)
    model = patch_model(load("llama", adapter_dirs), backend="torch")
    batch = tiny.random_prompts(len(NAMES), 5, seed=5)
    (expected_tokens, expected_logits), (tokens, logits) = [
        generate_nested(each, batch, inner) for each in (oracle, model)
    ]
    assert torch.equal(tokens, expected_tokens)
    assert len(logits) == len(expected_logits) == GREEDY["max_new_tokens"]
    for actual, expected in zip(logits, expected_logits, strict=True):
        assert_close_relative(actual, expected)


@pytest.mark.parametrize("native", [False, True], ids=["PeftModel", "transformers"])
@torch.no_grad()
def test_call_without_names_inside_generate_is_peft_behaviour(native, adapter_dirs):
    """A nested call without ``adapter_names`` inside a mixed ``generate`` serves the outer call's rows, as in PEFT
    (whose hooks stay on every LoRA layer for the outer call's length); a call on its own uses the active adapter."""
    oracle = load("llama", adapter_dirs)
    model = patch_model(native_model(adapter_dirs) if native else load("llama", adapter_dirs), backend="torch")
    for each in (oracle, model):
        each.set_adapter("b")
    batch = tiny.random_prompts(len(NAMES), 5, seed=6)
    (expected_tokens, expected_logits), (tokens, logits) = [
        generate_nested(each, batch, None) for each in (oracle, model)
    ]
    assert torch.equal(tokens, expected_tokens)
    for actual, expected in zip(logits, expected_logits, strict=True):
        assert_close_relative(actual, expected)
    assert_close_relative(model(**batch).logits, oracle(**batch).logits)


class WaitsOnWorker(LogitsProcessor):
    """Hands a model call to a worker thread and waits for it, once (a server that batches requests does this)."""

    def __init__(self, model, batch, names):
        self.model, self.batch, self.names = model, batch, names
        self.result, self.hung, self.errors = None, None, []

    def work(self):
        try:
            with torch.no_grad():
                self.result = self.model(**self.batch, adapter_names=self.names).logits
        except BaseException as error:  # reported by the test
            self.errors.append(error)

    def __call__(self, input_ids, scores):
        if self.hung is None:
            worker = threading.Thread(target=self.work, daemon=True)
            worker.start()
            worker.join(timeout=30)
            self.hung = worker.is_alive()
        return scores


@torch.no_grad()
def test_logits_processor_waiting_on_a_worker_thread_does_not_hang(adapter_dirs):
    oracle = load("llama", adapter_dirs)
    model = patch_model(load("llama", adapter_dirs), backend="torch")
    batch = tiny.random_prompts(len(NAMES), 5, seed=7)
    other_batch, other_names = tiny.random_prompts(3, 4, seed=8), ["c", "__base__", "b"]
    processor = WaitsOnWorker(model, other_batch, other_names)
    tokens = model.generate(**batch, adapter_names=NAMES, logits_processor=LogitsProcessorList([processor]), **GREEDY)
    assert processor.hung is False, "the worker's model call waited for the outer generate"
    assert not processor.errors, processor.errors
    assert torch.equal(tokens, oracle.generate(**batch, adapter_names=NAMES, **GREEDY))
    assert_close_relative(processor.result, mixed_logits(oracle, other_batch, other_names))


@torch.no_grad()
def test_concurrent_calls_with_peft_path_modules(tmp_path):
    """Threads calling at once on a model whose lm_head is a ``modules_to_save`` wrapper (served by PEFT's hooks):
    each call's hooks apply to that call only."""
    base = tiny.build_base_model("llama")
    tiny.save_adapter(base, tmp_path / "x", seed=5, r=4, modules_to_save=["lm_head"])
    tiny.save_adapter(base, tmp_path / "y", seed=6, r=8, modules_to_save=["lm_head"])
    dirs = {"x": tmp_path / "x", "y": tmp_path / "y"}
    oracle = tiny.load_peft_model(tiny.build_base_model("llama"), dirs)
    model = patch_model(tiny.load_peft_model(tiny.build_base_model("llama"), dirs), backend="torch")
    assignments = [["y", "x", "__base__", "y"], ["x", "x", "y", "__base__"], ["__base__", "y", "x", "x"]]
    batches = [tiny.random_prompts(4, 5, seed=seed) for seed in range(len(assignments))]
    expected = [mixed_logits(oracle, batch, names) for batch, names in zip(batches, assignments, strict=True)]
    results = run_at_once(lambda index: mixed_logits(model, batches[index], assignments[index]), len(assignments), 8)
    for index, outputs in results.items():
        for output in outputs:
            assert_close_relative(output, expected[index])


# ---------------------------------------------------------------------------------------------------------------
# Gradients (issue 17, item 7)


def gradients(model, batch, weights, wrt: str):
    """Gradients of a weighted sum of the mixed batch's logits: ``(input gradient or None, {lora param: grad})``."""
    model.zero_grad(set_to_none=True)
    if wrt == "inputs":
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        inputs = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}
    else:
        embeds, inputs = None, batch
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
    logits = model(**inputs, adapter_names=NAMES).logits
    (logits * weights).sum().backward()
    lora = {name: parameter.grad for name, parameter in model.named_parameters() if "lora_" in name}
    return (None if embeds is None else embeds.grad), lora


@pytest.mark.parametrize("wrt", ["inputs", "weights"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreted)])
def test_gradients_match_peft(backend, wrt, adapter_dirs):
    """In eval mode PEFT's mixed batch is differentiable: the same gradients for the LoRA weights (a loss over the
    mixed batch, for per-adapter attribution) and for ``inputs_embeds``."""
    oracle = load("llama", adapter_dirs).eval()
    model = patch_model(load("llama", adapter_dirs).eval(), backend=backend)
    batch = tiny.random_prompts(len(NAMES), 5, seed=9)
    weights = torch.randn(len(NAMES), 5, tiny.VOCAB_SIZE)
    expected_input, expected_lora = gradients(oracle, batch, weights, wrt)
    actual_input, actual_lora = gradients(model, batch, weights, wrt)
    if wrt == "inputs":
        assert_close_relative(actual_input, expected_input)
    assert expected_lora.keys() == actual_lora.keys()
    for name, expected in expected_lora.items():
        if expected is None:
            assert actual_lora[name] is None, name
        else:
            assert actual_lora[name] is not None, name
            assert_close_relative(actual_lora[name], expected)
    assert any(grad is not None for grad in expected_lora.values()) == (wrt == "weights")
    # The fast path still serves the same model under no_grad.
    assert_close_relative(mixed_logits(model, batch), mixed_logits(oracle, batch))


# ---------------------------------------------------------------------------------------------------------------
# Inputs PEFT accepts (issue 17, item 8)


@pytest.mark.parametrize("convert", [tuple, np.array], ids=["tuple", "numpy"])
@torch.no_grad()
def test_adapter_names_as_tuple_or_numpy_array(convert, adapter_dirs):
    oracle = load("llama", adapter_dirs)
    model = patch_model(load("llama", adapter_dirs), backend="torch")
    batch = tiny.random_prompts(len(NAMES), 5, seed=10)
    assert_close_relative(mixed_logits(model, batch, convert(NAMES)), mixed_logits(oracle, batch, convert(NAMES)))
    assert torch.equal(
        model.generate(**batch, adapter_names=convert(NAMES), **GREEDY),
        oracle.generate(**batch, adapter_names=convert(NAMES), **GREEDY),
    )


def raised(call) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


@pytest.mark.parametrize(
    "names,kwargs",
    [
        (["a", None, "c"], {}),
        ([None, None, None], {}),
        (["a", 3, "c"], {}),
        (("a", "b", b"c"), {}),
        (np.array(["a", "b", "c"]), {"num_beams": 2}),
    ],
    ids=["None", "all_None", "int", "bytes", "numpy_beams"],
)
@torch.no_grad()
def test_bad_entries_give_peft_error(names, kwargs, adapter_dirs):
    """Where PEFT fails on ``adapter_names``, the patched model fails with the same exception, word for word."""
    oracle = load("llama", adapter_dirs)
    model = patch_model(load("llama", adapter_dirs), backend="torch")
    batch = tiny.random_prompts(3, 5, seed=11)

    def call(each):
        if kwargs:
            return lambda: each.generate(**batch, adapter_names=names, max_new_tokens=2, pad_token_id=0, **kwargs)
        return lambda: each(**batch, adapter_names=names)

    expected, actual = raised(call(oracle)), raised(call(model))
    assert (type(actual), str(actual)) == (type(expected), str(expected))
    assert state_of(model).plan is None
    assert not any(module._forward_pre_hooks for module in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# Memory per call (issue 17, item 9)


@torch.no_grad()
def test_no_memory_kept_per_call(adapter_dirs):
    """Python memory allocated under peft_fastlora's frames and still alive after many mixed calls stays flat.
    torch's ``config.patch`` objects, one per call, used to pile up (~290 bytes a call; plain PEFT keeps none), and
    ``torch.tensor`` of the plan's host lists left a slower residue."""
    model = patch_model(load("llama", adapter_dirs, names=("a", "b")), backend="torch")
    batch, names = tiny.random_prompts(2, 3, seed=12), ["b", "a"]
    calls = 150

    def run(count):
        for _ in range(count):
            model(**batch, adapter_names=names)

    ours = [tracemalloc.Filter(True, "*peft_fastlora*", all_frames=True)]
    tracemalloc.start(6)
    try:
        run(20)  # caches that fill once (plan views, packing) are full before the first snapshot
        # One more window before the measured one: torch fills some internal caches lazily (seen after a gradient
        # test: ~9 kB once, under the package's frames); a leak keeps growing in the second window too.
        run(calls)
        gc.collect()
        before = tracemalloc.take_snapshot().filter_traces(ours)
        run(calls)
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces(ours)
    finally:
        tracemalloc.stop()
    stats = after.compare_to(before, "traceback")
    growth = sum(stat.size_diff for stat in stats)
    worst = "\n".join(stats[0].traceback.format()) if stats else ""
    assert growth < 4096, f"{growth} bytes kept over {calls} calls; most from:\n{worst}"


@torch.no_grad()
def test_patch_after_a_failed_plain_peft_call(adapter_dirs):
    """Plain PEFT leaves its adapter_names hooks on the model when a mixed call raises (here its length error for
    num_return_sequences with sampling); patching such a model removes them, so mixed calls work."""
    model = load("llama", adapter_dirs)
    names = ["a", "b", "__base__", "c"]
    batch = tiny.random_prompts(len(names), 4, seed=21)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model.generate(**batch, adapter_names=names, do_sample=True, num_return_sequences=2, max_new_tokens=2)
    oracle = load("llama", adapter_dirs)
    patch_model(model, backend="torch")
    assert_close_relative(model(**batch, adapter_names=names).logits, oracle(**batch, adapter_names=names).logits)


def test_patch_info_of_a_fresh_copy(adapter_dirs):
    """patch_info on a copy that has not been called yet reports the copy's own patch."""
    from peft_fastlora import patch_info

    model = patch_model(load("llama", adapter_dirs), backend="torch")
    copied = copy.deepcopy(model)
    info = patch_info(copied)
    assert info.patched and info.backend == "torch" and info.adapters == ("a", "b", "c")
    assert copied.base_model._fastlora_state is not model.base_model._fastlora_state
