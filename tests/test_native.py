"""Transformers models whose adapters were loaded by transformers itself (``model.load_adapter``, no PeftModel):
after ``patch_model``, ``forward`` and ``generate`` take ``adapter_names`` with PEFT's semantics and errors."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_relative, interpreted, load

from peft_fastlora import patch_model, tiny, unpatch_model

NAMES = ["a", "b", "__base__", "c", "a", "b"]


def native_model(architecture: str, adapter_dirs):
    """A plain transformers model with adapters a/b/c loaded from disk by transformers' ``load_adapter``."""
    model = tiny.build_base_model(architecture)
    for name in ("a", "b", "c"):
        model.load_adapter(str(adapter_dirs[architecture][name]), adapter_name=name)
    return model.eval()


@pytest.mark.parametrize(
    "architecture,backend", [("llama", "torch"), ("gpt2", "torch"), pytest.param("llama", "triton", marks=interpreted)]
)
@torch.no_grad()
def test_native_mixed_batch_matches_peft(architecture, backend, adapter_dirs):
    """The oracle is PEFT's own mixed batch on a PeftModel loaded from the same folders."""
    oracle = load(architecture, adapter_dirs)
    model = patch_model(native_model(architecture, adapter_dirs), backend=backend)
    batch = tiny.random_prompts(len(NAMES), 8, seed=int(torch.randint(0, 1000, ())))
    expected = oracle(**batch, adapter_names=NAMES).logits
    assert_close_relative(model(**batch, adapter_names=NAMES).logits, expected)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(
        model.generate(**batch, adapter_names=NAMES, **kwargs), oracle.generate(**batch, adapter_names=NAMES, **kwargs)
    )


@torch.no_grad()
def test_native_without_names_is_transformers_behaviour(adapter_dirs):
    """Calls without adapter_names use the active adapter, exactly as before the patch; unpatch restores all."""
    model = native_model("llama", adapter_dirs)
    batch = tiny.random_prompts(3, 6, seed=4)
    model.set_adapter("b")
    expected = model(**batch).logits
    patch_model(model)
    assert torch.equal(model(**batch).logits, expected)
    assert "adapter_names" not in str(type(model).forward.__doc__ or "")
    unpatch_model(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    with pytest.raises(ValueError, match="adapter_names"):  # transformers' own error again
        model.generate(**batch, adapter_names=["a", "b", "c"], max_new_tokens=2)


@torch.no_grad()
def test_native_errors_are_the_peft_model_errors(adapter_dirs):
    """The same errors as a patched PeftModel (PEFT's own messages; see test_errors.py), and nothing left behind."""
    peft_model = patch_model(load("llama", adapter_dirs))
    model = patch_model(native_model("llama", adapter_dirs))
    batch = tiny.random_prompts(3, 5, seed=2)
    for names in (["a", "zz", "c"], "a", ["a", "b"], ["a", None, "b"]):
        for method in ("__call__", "generate"):
            extra = {"max_new_tokens": 2} if method == "generate" else {}
            with pytest.raises(Exception) as expected:
                getattr(peft_model, method)(**batch, adapter_names=names, **extra)
            with pytest.raises(type(expected.value)) as ours:
                getattr(model, method)(**batch, adapter_names=names, **extra)
            assert str(ours.value) == str(expected.value)
    assert model._fastlora_state.plan is None
    assert not any(module._forward_pre_hooks for module in model.modules())
    oracle = load("llama", adapter_dirs)
    assert_close_relative(
        model(**batch, adapter_names=["c", "__base__", "a"]).logits,
        oracle(**batch, adapter_names=["c", "__base__", "a"]).logits,
    )


def test_plain_transformers_model_without_adapters_is_refused():
    with pytest.raises(TypeError, match="adapters loaded by model.load_adapter"):
        patch_model(tiny.build_base_model("llama"))
