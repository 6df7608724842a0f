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
from test_storage import NAMES, data_mul, edit_every_layer, lora_layers, patched_and_oracle

from peft_fastlora import bank, patch, watched


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
def test_the_per_call_check_reads_no_stored_parameter(monkeypatch):
    """Every stored parameter is a ``BankParameter`` in a ``WatchedParameters`` dict, so the per-call check compares
    two counters and each layer's adapter count and reads no parameter: its cost grows with the layers, not with
    the weights (the issue's bound)."""
    model, oracle, batch = patched_and_oracle("torch")
    state = model.base_model._fastlora_state
    stored = [
        (module, key)
        for layer in state.bank.fast_layers
        for name in bank.adapter_parameters(layer)
        for module, key in bank._owners(layer, name)
    ]
    assert len(stored) > 20
    assert all(watched.is_watched(module._parameters, module._parameters[key]) for module, key in stored)
    snapshot = state.bank._snapshot
    assert snapshot.unwatched.keys == [] and len(snapshot.every.keys) == len(stored)
    read = []
    real_read = bank._Placed.read
    monkeypatch.setattr(bank._Placed, "read", lambda placed: read.extend(real_read(placed)) or real_read(placed))
    for _ in range(2):
        assert_close_relative(model(**batch, adapter_names=NAMES).logits, oracle(**batch, adapter_names=NAMES).logits)
    assert read == [] and state.bank._snapshot is snapshot


@torch.no_grad()
def test_each_uncounted_kind_of_write_is_counted():
    """The writes no registration hook sees are each counted: ``.data =`` on a stored parameter, and every way of
    changing a watched ``_parameters`` dict."""
    model, _, _ = patched_and_oracle("torch")
    layer = next(layer for layer in model.base_model._fastlora_state.bank.fast_layers if "a" in layer.lora_A)
    module = layer.lora_A["a"]
    parameters = module._parameters
    writes = [
        lambda: setattr(module.weight, "data", module.weight.data.clone()),
        lambda: parameters.__setitem__("weight", torch.nn.Parameter(module.weight.data.clone())),
        lambda: parameters.update(weight=torch.nn.Parameter(module.weight.data.clone())),
        lambda: parameters.setdefault("extra", None),
        lambda: parameters.pop("extra"),
        lambda: parameters.__ior__({"extra": None}),
        lambda: parameters.__delitem__("extra"),
        lambda: parameters.__setitem__("extra", None),
        lambda: parameters.popitem(),
    ]
    for write in writes:
        before = watched.writes()
        write()
        assert watched.writes() != before, write
    saved = dict(parameters)
    before = watched.writes()
    parameters.clear()
    assert watched.writes() != before
    parameters.update(saved)


@torch.no_grad()
def test_model_to_under_swap_tensors_conversion_is_seen():
    """Under ``torch.__future__.set_swap_module_params_on_conversion(True)`` ``model.to`` swaps each parameter's
    contents (and class) in place, which neither count sees: the check then reads every parameter."""
    model, oracle, batch = patched_and_oracle("torch")
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for target in (model, oracle):
            target.to(torch.float64)
            # An in-place edit after the swap: stale storage shows even though the conversion kept the values.
            edit_every_layer(data_mul, "b", "B")(target, seed=0)
        actual = model(**batch, adapter_names=NAMES).logits
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert actual.dtype == torch.float64
    assert_close_relative(actual, oracle(**batch, adapter_names=NAMES).logits)


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
