"""The compiled path: transformers' static cache with its automatic decode compilation, with ``adapter_names``.

A compiled decode step must serve any assignment of adapters to rows of a batch size it has seen without
recompiling (dynamo) or re-capturing (CUDA graphs): the adapter assignment reaches the graph only as the contents
of the plan's tensors, never as Python values that dynamo would guard on.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_relative, gpu_test_model, interpreted, load
from torch._dynamo.utils import counters
from transformers import CompileConfig

from peft_fastlora import patch_model, tiny

ASSIGNMENTS = [
    ["a", "b", "__base__", "a"],
    ["c", "c", "a", "b"],
    ["__base__"] * 4,
    ["b", "a", "c", "__base__"],
]


def compiled_kwargs(new_tokens: int, **compile_options) -> dict:
    """generate() kwargs for greedy decoding through the static cache and the automatic compilation."""
    config = CompileConfig(**compile_options)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told otherwise
    return {
        "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0,
        "cache_implementation": "static", "compile_config": config,
    }  # fmt: skip


def compilations() -> tuple[int, int]:
    """(graphs dynamo has built, frames it has compiled) so far."""
    return counters["stats"]["unique_graphs"], sum(counters["frames"].values())


# The interpreted Triton run costs seconds per decode step, so it sees two assignments and few tokens.
@pytest.mark.parametrize(
    "backend,assignments,new_tokens",
    [("torch", ASSIGNMENTS, 5), pytest.param("triton", ASSIGNMENTS[:3:2], 3, marks=interpreted)],
)
@torch.no_grad()
def test_compiled_generate_never_recompiles_across_assignments(backend, assignments, new_tokens, adapter_dirs):
    model = load("llama", adapter_dirs)
    batch = tiny.random_prompts(4, 7, seed=int(torch.randint(0, 1000, ())))
    eager = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    expected = [model.generate(**batch, adapter_names=names, **eager) for names in assignments]
    patch_model(model, backend=backend)
    torch._dynamo.reset()
    counters.clear()
    # aot_eager runs dynamo and AOT autograd (so the custom ops' fake implementations) without inductor's C++ build.
    kwargs = compiled_kwargs(new_tokens, backend="aot_eager", mode=None, fullgraph=True)
    first = model.generate(**batch, adapter_names=assignments[0], **kwargs)
    assert torch.equal(first, expected[0])
    after_first = compilations()
    assert after_first[0] >= 1, "the decode step was not compiled"
    for names, tokens in zip(assignments[1:], expected[1:], strict=True):
        assert torch.equal(model.generate(**batch, adapter_names=names, **kwargs), tokens), names
    assert compilations() == after_first, f"recompiled for a new assignment: {dict(counters['frames'])}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_compiled_generate_on_gpu(backend, tmp_path):
    """Inductor with CUDA graphs (transformers' default compile config): greedy tokens equal PEFT's for every
    assignment, one compilation for all of them."""
    model, names, batch = gpu_test_model(torch.bfloat16, tmp_path)
    assignments = [names, names[::-1], ["__base__"] * len(names), ["c"] * len(names)]
    static = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0, "cache_implementation": "static"}
    # The oracle runs the same static cache, uncompiled, so that only the LoRA path and compilation differ.
    expected = [model.generate(**batch, adapter_names=row, disable_compile=True, **static) for row in assignments]
    patch_model(model, backend=backend)
    torch._dynamo.reset()
    counters.clear()
    after_first = None
    for row, tokens in zip(assignments, expected, strict=True):
        actual = model.generate(**batch, adapter_names=row, **static)
        mismatches = (actual != tokens).nonzero().tolist()
        assert not mismatches, f"{row}: first mismatching (row, position): {mismatches[:4]}"
        after_first = after_first or compilations()
    assert after_first[0] >= 1, "the decode step was not compiled"
    assert compilations() == after_first, f"recompiled for a new assignment: {dict(counters['frames'])}"


@torch.no_grad()
def test_compiled_forward_logits_match_peft(adapter_dirs):
    """The compiled torch path (every row against all adapters, masked to its own) at the fp32 tolerance."""
    names = ["a", "b", "__base__", "c", "a", "b"]
    model = load("llama", adapter_dirs)
    batch = tiny.random_prompts(len(names), 9, seed=int(torch.randint(0, 1000, ())))
    expected = model(**batch, adapter_names=names).logits
    patch_model(model, backend="torch")
    inner = model.base_model.model
    inner.forward = torch.compile(inner.forward, backend="aot_eager", fullgraph=True)
    assert_close_relative(model(**batch, adapter_names=names).logits, expected)


@torch.no_grad()
def test_compiled_generate_with_peft_path_adapter(tmp_path):
    """An adapter the packed path leaves to PEFT's hooks (here one with ``lora_bias``) stays correct under
    compilation when a graph was first compiled for calls that did not name it: dynamo by default does not guard on
    hooks, so without the patch's hook guards that graph would be replayed and the adapter silently skipped."""
    base = tiny.build_base_model("llama")
    tiny.save_adapter(base, tmp_path / "x", seed=5, r=4)
    tiny.save_adapter(base, tmp_path / "y", seed=6, r=8, lora_bias=True)
    model = tiny.load_peft_model(tiny.build_base_model("llama"), {"x": tmp_path / "x", "y": tmp_path / "y"})
    batch = tiny.random_prompts(4, 6, seed=int(torch.randint(0, 1000, ())))
    assignments = [["x", "__base__", "x", "x"], ["y", "x", "__base__", "y"]]
    eager = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = [model.generate(**batch, adapter_names=names, **eager) for names in assignments]
    with model.disable_adapter():
        assert not torch.equal(model.generate(**batch, **eager), expected[1]), "adapter y changes nothing"
    patch_model(model, backend="torch")
    torch._dynamo.reset()
    kwargs = compiled_kwargs(4, backend="aot_eager", mode=None)
    for names, tokens in zip(assignments, expected, strict=True):
        assert torch.equal(model.generate(**batch, adapter_names=names, **kwargs), tokens), names
