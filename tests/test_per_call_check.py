"""The per-call check stays off the model's module tree while nothing registers on it.

A call walks the model (to find LoRA layers PEFT added) only after a module of the patched model registered a
submodule or a parameter (``bank.watch_modules``), and rechecks the adapters unit by unit only when an adapter
parameter moved or a layer's adapter count changed (``bank._Snapshot``). transformers registers its decoder layers
into a fresh ``ModuleList`` on every forward; counting that made every call walk and recheck the whole model (15 ms
per call on the H200) and made torch.compile recompile on every call.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from helpers import assert_close_relative
from test_storage import NAMES, lora_layers, patched_and_oracle

from peft_fastlora import bank, patch


def _count_calls(monkeypatch, owner, name: str) -> dict:
    calls = {"count": 0}
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls["count"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@torch.no_grad()
def test_calls_without_changes_neither_walk_nor_recheck(monkeypatch):
    model, oracle, batch = patched_and_oracle("torch")
    model(**batch, adapter_names=NAMES)  # the first call after patching walks once
    walks = _count_calls(monkeypatch, patch, "_sync_layers")
    rechecks = _count_calls(monkeypatch, bank.AdapterBank, "_refresh")
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    for _ in range(3):
        tokens = model.generate(**batch, adapter_names=NAMES, **kwargs)
    assert torch.equal(tokens, oracle.generate(**batch, adapter_names=NAMES, **kwargs))
    assert walks["count"] == 0 and rechecks["count"] == 0, (walks, rechecks)


def test_registrations_outside_the_model_are_not_counted():
    model, _, _ = patched_and_oracle("torch")
    before = bank.registrations()
    torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])  # what a forward's `self.layers[:n]` does
    layers = model.base_model.model.model.layers
    layers[: len(layers)]  # the slice itself: a fresh ModuleList registering the model's own layers
    assert bank.registrations() == before


@torch.no_grad()
def test_a_registration_on_the_model_is_seen_by_the_next_call(monkeypatch):
    """An adapter added after a call: the next call walks, repacks and serves it (PEFT's output)."""
    model, oracle, batch = patched_and_oracle("torch")
    before = bank.registrations()
    from test_storage import _config

    for target in (model, oracle):
        torch.manual_seed(7)  # the same random weights in both
        target.add_adapter("c", _config(2))
    assert bank.registrations() > before
    walks = _count_calls(monkeypatch, patch, "_sync_layers")
    names = ["c", "a", "__base__", "c", "b"]
    expected = oracle(**batch, adapter_names=names).logits
    assert_close_relative(model(**batch, adapter_names=names).logits, expected)
    assert walks["count"] == 1


@torch.no_grad()
def test_a_deleted_adapter_is_seen_without_a_registration():
    """``delete_adapter`` registers nothing; the adapter counts per layer catch it: PEFT's unknown-adapter error."""
    model, oracle, batch = patched_and_oracle("torch")
    for target in (model, oracle):
        target.delete_adapter("b")
    with pytest.raises(ValueError) as ours:
        model(**batch, adapter_names=NAMES)
    with pytest.raises(ValueError) as peft:
        oracle(**batch, adapter_names=NAMES)
    assert str(ours.value) == str(peft.value)
    names = ["a", "__base__", "a", "a", "__base__"]
    assert_close_relative(model(**batch, adapter_names=names).logits, oracle(**batch, adapter_names=names).logits)


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.bfloat16])
@torch.no_grad()
def test_patch_under_another_default_dtype(default_dtype):
    """``torch.set_default_dtype`` (a common trick when loading models) must not change the stored scales: they were
    once built through ``torch.tensor(floats)``, which follows the default dtype, and bit-cast to int32."""
    model, oracle, batch = patched_and_oracle("torch")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        for target in (model, oracle):
            for layer in lora_layers(target):
                if "b" in layer.scaling:
                    layer.set_scale("b", 0.3)
        fresh, fresh_oracle, _ = patched_and_oracle("torch", seed=1)
        actual = model(**batch, adapter_names=NAMES).logits
        fresh_actual = fresh(**batch, adapter_names=NAMES).logits
    finally:
        torch.set_default_dtype(previous)
    assert_close_relative(actual, oracle(**batch, adapter_names=NAMES).logits)
    assert_close_relative(fresh_actual, fresh_oracle(**batch, adapter_names=NAMES).logits)


@torch.no_grad()
def test_a_narrower_parameter_put_straight_into_parameters_repacks():
    """A new Parameter object at a stored address but of another shape, put into ``_parameters`` without a
    registration (as accelerate's ``set_module_tensor_to_device`` writes): the object changed, so the layer
    repacks (PEFT then reads rank 2 of adapter a, and so do the kernels)."""
    model, oracle, batch = patched_and_oracle("torch")
    for target in (model, oracle):
        for layer in lora_layers(target):
            if "a" in layer.lora_A:
                a_module, b_module = layer.lora_A["a"], layer.lora_B["a"]
                a_module._parameters["weight"] = torch.nn.Parameter(a_module.weight.data[:2])
                b_module._parameters["weight"] = torch.nn.Parameter(b_module.weight.data[:, :2])
    assert_close_relative(model(**batch, adapter_names=NAMES).logits, oracle(**batch, adapter_names=NAMES).logits)


def test_a_freed_modules_id_taken_by_another_object_is_not_counted(monkeypatch):
    """The watched modules are known by weak reference, not by id alone: once a watched module is freed, its id is
    soon another object's (a forward's fresh ModuleList), and registrations on that object must not count."""
    freed = torch.nn.ModuleList()
    dead = weakref.ref(freed)
    del freed
    assert dead() is None
    other = torch.nn.ModuleList()
    monkeypatch.setattr(bank, "_WATCHED", {id(other): dead})  # as if `other` had taken the freed module's id
    before = bank.registrations()
    other.append(torch.nn.Linear(2, 2))
    assert bank.registrations() == before


def test_a_dead_watch_entry_does_not_hide_a_live_one():
    """Two patched models: a module freed in one (``delete_adapter`` registers nothing, so its bank keeps the entry)
    whose id a module of the other took must not stop that module's registrations from counting."""

    class Owner:  # what watch_modules keys its entries by (a bank, normally)
        pass

    first, second = Owner(), Owner()
    live = torch.nn.ModuleList()
    bank.watch_modules(first, [live])
    freed = torch.nn.ModuleList()
    bank.watch_modules(second, [freed])  # merged after `first`'s entries
    del freed
    # The stale entry of `second`, moved under `live`'s id (what id reuse does).
    bank._WATCH_SETS[second] = {id(live): next(iter(bank._WATCH_SETS[second].values()))}
    bank.watch_modules(first, [live])  # any walk merges the entries again
    before = bank.registrations()
    live.append(torch.nn.Linear(2, 2))
    assert bank.registrations() == before + 1
    bank.watch_modules(first, [])
    bank.watch_modules(second, [])
