"""Bad input: PEFT's exact error, and the model left as it was."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import assert_close_relative, load

from peft_fastlora import patch_model, tiny


def snapshot(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model, before, batch):
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert model.base_model._fastlora_state.plan is None
    assert not any(module._forward_pre_hooks for module in model.modules())
    names = ["c", "__base__", "a"]
    reference = load("llama", _DIRS)
    with torch.no_grad():
        assert_close_relative(
            model(**batch, adapter_names=names).logits, reference(**batch, adapter_names=names).logits
        )


_DIRS = {}


@pytest.fixture
def pair(adapter_dirs):
    """(unpatched oracle, patched model, batch of 3)."""
    _DIRS.update(adapter_dirs)
    return load("llama", adapter_dirs), patch_model(load("llama", adapter_dirs)), tiny.random_prompts(3, 5, seed=2)


def expect_same_error(oracle, model, call, batch):
    """``call(m)`` must raise the same type and message on the unpatched oracle and the patched model."""
    with pytest.raises(Exception) as peft_error:
        call(oracle)
    before = snapshot(model)
    with pytest.raises(type(peft_error.value)) as our_error:
        call(model)
    assert str(our_error.value) == str(peft_error.value)
    if model.training:
        model.eval()
    assert_unchanged(model, before, batch)
    expect_same_error.notes = getattr(our_error.value, "__notes__", [])
    return str(our_error.value)


@torch.no_grad()
def test_unknown_adapter_name(pair):
    oracle, model, batch = pair
    message = expect_same_error(oracle, model, lambda m: m(**batch, adapter_names=["a", "zz", "yy"]), batch)
    assert message == "Trying to infer with non-existing adapter(s): yy, zz"
    # The hint is a note below PEFT's unchanged text: the loaded adapters and the name for no adapter.
    assert expect_same_error.notes == [
        "peft_fastlora: the loaded adapters are 'a', 'b', 'c'; use '__base__' for a row that gets no adapter."
    ]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tracebacks print exception notes from Python 3.11")
@torch.no_grad()
def test_unknown_adapter_hint_in_traceback(pair):
    """A user who writes "base" for the base model sees PEFT's message, then the hint, in the printed traceback."""
    import traceback

    _, model, batch = pair
    with pytest.raises(ValueError) as error:
        model(**batch, adapter_names=["a", "base", "b"])
    printed = "".join(traceback.format_exception(error.value))
    assert "ValueError: Trying to infer with non-existing adapter(s): base\n" in printed
    assert printed.rstrip().endswith("use '__base__' for a row that gets no adapter.")


@torch.no_grad()
def test_length_mismatch(pair):
    oracle, model, batch = pair
    message = expect_same_error(oracle, model, lambda m: m(**batch, adapter_names=["a", "b"]), batch)
    assert message.startswith("Length of `adapter_names` should be the same as the number of inputs")


@torch.no_grad()
def test_training_mode(pair):
    oracle, model, batch = pair
    oracle.train()
    model.train()
    message = expect_same_error(oracle, model, lambda m: m(**batch, adapter_names=["a", "b", "c"]), batch)
    assert message == "Cannot pass `adapter_names` when the model is in training mode."
    assert expect_same_error.notes == ["peft_fastlora: call model.eval() before a mixed-adapter batch."]


@torch.no_grad()
def test_merged_adapter(pair):
    oracle, model, batch = pair
    for peft_model in (oracle, model):
        peft_model.set_adapter("b")
        peft_model.merge_adapter()
    with pytest.raises(ValueError) as peft_error:
        oracle(**batch, adapter_names=["a", "b", "c"])
    with pytest.raises(ValueError) as our_error:
        model(**batch, adapter_names=["a", "b", "c"])
    assert str(our_error.value) == str(peft_error.value)
    assert "please call `unmerge_adapter` first" in str(our_error.value)
    model.unmerge_adapter()
    model.set_adapter("a")
    assert_unchanged(model, snapshot(model), batch)


@torch.no_grad()
def test_dora_adapter_on_an_embedding(pair, tmp_path):
    """DoRA is served in Linear layers (tests/test_dora.py); DoRA on an embedding keeps PEFT's error."""
    oracle, model, batch = pair
    base = tiny.build_base_model("llama")
    tiny.save_adapter(base, tmp_path / "dora", seed=9, r=4, use_dora=True, target_modules=["embed_tokens", "q_proj"])
    for peft_model in (oracle, model):
        peft_model.load_adapter(tmp_path / "dora", adapter_name="dora")
        peft_model.eval()
    message = expect_same_error(oracle, model, lambda m: m(**batch, adapter_names=["a", "dora", "c"]), batch)
    assert message == "Cannot pass `adapter_names` when DoRA is enabled."


@torch.no_grad()
def test_adapter_names_not_a_list(pair):
    oracle, model, batch = pair
    generate = {"max_new_tokens": 2, "num_beams": 2, "pad_token_id": 0}
    # PEFT checks the type under beam search only; the patched model checks it always, with PEFT's message.
    message = expect_same_error(oracle, model, lambda m: m.generate(**batch, adapter_names="abc", **generate), batch)
    assert message == "Got adapter names of type <class 'str'>, expected a list of str."
    with pytest.raises(TypeError, match="expected a list of str"):
        model(**batch, adapter_names="abc")
