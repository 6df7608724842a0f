"""Bad input beyond PEFT's own checks (those are in test_errors.py): each gets a clear error that names the
problem, and the model stays usable afterwards."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import assert_close_relative, assert_no_worse_than_peft, load, oracle_batch

from peft_fastlora import patch_model, tiny, unpatch_model

GOOD = ["c", "__base__", "a"]


def assert_usable(model, oracle_dirs):
    """After a refused call: no plan, no hooks left, and a good mixed call matches PEFT."""
    root = model.base_model
    assert root._fastlora_state.plan is None
    assert not any(module._forward_pre_hooks for module in model.modules())
    batch = tiny.random_prompts(3, 5, seed=11)
    oracle = load("llama", oracle_dirs)
    with torch.no_grad():
        assert_close_relative(model(**batch, adapter_names=GOOD).logits, oracle(**batch, adapter_names=GOOD).logits)


@pytest.fixture
def model(adapter_dirs):
    return patch_model(load("llama", adapter_dirs), backend="torch")


# Entries of the wrong type in a list, tuple or array get PEFT's own error: tests/test_calls.py.
@pytest.mark.parametrize(
    "names", ["abc", b"abc", {"a": 1}, {"a", "b", "c"}, np.array([["a"], ["b"], ["c"]])], ids=repr
)
@torch.no_grad()
def test_wrong_types(model, adapter_dirs, names):
    batch = tiny.random_prompts(3, 5, seed=1)
    for call in (model, lambda **kw: model.generate(**kw, max_new_tokens=2, pad_token_id=0)):
        with pytest.raises(TypeError, match="expected a list of str"):
            call(**batch, adapter_names=names)
    assert_usable(model, adapter_dirs)


@torch.no_grad()
def test_empty_batch(model, adapter_dirs):
    empty = {"input_ids": torch.zeros(0, 5, dtype=torch.long), "attention_mask": torch.zeros(0, 5, dtype=torch.long)}
    for call in (model, lambda **kw: model.generate(**kw, max_new_tokens=2, pad_token_id=0)):
        with pytest.raises(ValueError, match="the batch is empty"):
            call(**empty, adapter_names=[])
    # An empty name list for a batch that has rows is PEFT's length error.
    with pytest.raises(ValueError, match="should be the same as the number of inputs, but got 0 and 3"):
        model(**tiny.random_prompts(3, 5, seed=1), adapter_names=[])
    assert_usable(model, adapter_dirs)


@torch.no_grad()
def test_adapter_with_incompatible_shape(model, adapter_dirs):
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    good = layer.lora_A["a"].weight.data
    layer.lora_A["a"].weight.data = torch.randn(good.shape[0], good.shape[1] + 3)
    with pytest.raises(ValueError, match=r"adapter 'a' of layer model\.model\.layers\.0\.self_attn\.q_proj"):
        model(**tiny.random_prompts(3, 5, seed=1), adapter_names=GOOD)
    layer.lora_A["a"].weight.data = good
    assert_usable(model, adapter_dirs)


@torch.no_grad()
def test_adapter_on_another_device(model, adapter_dirs):
    """On a CPU-only machine the meta device stands in for a second device (test_gpu covers CPU vs CUDA)."""
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    good = layer.lora_B["c"].weight
    layer.lora_B["c"].weight = torch.nn.Parameter(torch.empty_like(good, device="meta"))
    with pytest.raises(ValueError, match=r"adapter 'c' of layer .*layers\.1\.mlp\.down_proj is on meta"):
        model(**tiny.random_prompts(3, 5, seed=1), adapter_names=GOOD)
    layer.lora_B["c"].weight = good
    assert_usable(model, adapter_dirs)


@torch.no_grad()
def test_bf16_model_with_fp32_adapters(adapter_dirs):
    """PEFT's default loads adapters in fp32 onto a bf16 base (autocast_adapter_dtype); also one adapter cast to
    bf16 beside fp32 ones. Both are judged against an fp32 copy: no worse than PEFT's own mixed batch (PEFT's mixed
    batch rounds an fp32 delta to bf16 before adding it, ours adds it in fp32 as PEFT's single-adapter forward
    does, so a bf16-vs-bf16 comparison with PEFT is no oracle here)."""
    base = tiny.build_base_model("llama", dtype=torch.bfloat16)
    model = tiny.load_peft_model(base, {name: adapter_dirs["llama"][name] for name in "abc"})
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["a"].weight.dtype == torch.float32
    model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["b"].to(torch.bfloat16)
    model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["b"].to(torch.bfloat16)
    batch, names = oracle_batch(["a", "b", "__base__", "c", "a", "b"], "cpu", rows=48, length=64)
    assert_no_worse_than_peft(model, batch, names, "torch")


@torch.no_grad()
def test_fp32_adapters_on_a_bf16_model_add_as_peft_adds_one_adapter(adapter_dirs):
    """With fp32 adapters (PEFT's default) on a bf16 model, each row equals PEFT's single-adapter forward of its
    adapter bit for bit (torch backend): the delta is added in fp32 and the sum rounded to bf16 once. (PEFT's own
    mixed batch rounds the delta to bf16 first, which the packed path once copied.)"""
    base = tiny.build_base_model("llama", dtype=torch.bfloat16)
    model = tiny.load_peft_model(base, {name: adapter_dirs["llama"][name] for name in "abc"})
    peft = copy.deepcopy(model)
    batch = tiny.random_prompts(6, 7, seed=5)
    names = ["a", "b", "c", "c", "b", "a"]
    patch_model(model, backend="torch")
    ours = model(**batch, adapter_names=names).logits
    for name in "abc":
        peft.set_adapter(name)
        rows = [row for row, row_name in enumerate(names) if row_name == name]
        assert torch.equal(ours[rows], peft(**batch).logits[rows]), name


@torch.no_grad()
def test_generate_after_unpatch_is_plain_peft(adapter_dirs):
    oracle = load("llama", adapter_dirs)
    model = patch_model(load("llama", adapter_dirs))
    batch = tiny.random_prompts(3, 5, seed=1)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    model.generate(**batch, adapter_names=GOOD, **kwargs)
    unpatch_model(model)
    assert "_fastlora_state" not in model.base_model.__dict__
    assert torch.equal(
        model.generate(**batch, adapter_names=GOOD, **kwargs), oracle.generate(**batch, adapter_names=GOOD, **kwargs)
    )
    unpatch_model(model)  # twice is harmless


def test_patching_a_model_without_lora_layers():
    from peft import PeftModel, PromptTuningConfig, get_peft_model

    prompt_tuned = get_peft_model(
        tiny.build_base_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    with pytest.raises(TypeError, match="supports LoRA adapters only"):
        patch_model(prompt_tuned)
    assert isinstance(prompt_tuned, PeftModel)
    with pytest.raises(TypeError, match="adapters loaded by model.load_adapter"):
        patch_model(tiny.build_base_model("llama"))


@pytest.mark.parametrize("thing", ["not a model", None, 3, torch.nn.Linear(2, 2)], ids=repr)
def test_patching_a_non_peft_object(thing):
    with pytest.raises(TypeError, match="patch_model expects a peft.PeftModel"):
        patch_model(thing)


def test_package_allocations_start_poisoned():
    """The conftest fixture is in force: the package's torch.empty and kernel scratch come back poisoned."""
    from conftest import POISON_INT

    from peft_fastlora.kernels import launch
    from peft_fastlora.plan import BatchPlan

    plan = BatchPlan("cpu")
    plan.fill([0, -1, 1])
    stale = plan._buffer[plan.capacity + 2 : 2 * plan.capacity]  # sorted_rows past the two live rows
    assert (stale == POISON_INT).all()
    assert torch.isnan(launch.scratch_empty(2, 3, dtype=torch.float32)).all()


@pytest.mark.gpu
@torch.no_grad()
def test_adapter_on_cpu_beside_a_cuda_model(adapter_dirs):
    model = patch_model(load("llama", adapter_dirs).to("cuda"))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    good = layer.lora_A["a"].weight
    layer.lora_A["a"].weight = torch.nn.Parameter(good.detach().cpu())
    batch = {key: value.cuda() for key, value in tiny.random_prompts(3, 5, seed=1).items()}
    with pytest.raises(ValueError, match=r"adapter 'a' of layer .*layers\.0\.mlp\.up_proj is on cpu"):
        model(**batch, adapter_names=GOOD)
    layer.lora_A["a"].weight = good
    assert model.base_model._fastlora_state.plan is None
    model(**batch, adapter_names=GOOD)
