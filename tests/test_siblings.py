"""Siblings that read one input (q/k/v, gate/up) share one shrink launch on the Triton backend."""

from __future__ import annotations

import torch
from helpers import assert_close_relative, interpreted, load
from peft import LoraConfig, get_peft_model

from peft_fastlora import patch_model, storage_keys, tiny
from peft_fastlora.backends import triton as triton_backend


def count_shrinks(monkeypatch):
    calls = []
    original = triton_backend.keyed_shrink

    def counting(*args):
        calls.append(storage_keys.lookup(args[7]).a.shape[0])  # rows of the packed A it shrinks against
        return original(*args)

    monkeypatch.setattr(triton_backend, "keyed_shrink", counting)
    return calls


@interpreted
@torch.no_grad()
def test_llama_shares_shrinks_and_matches_peft(adapter_dirs, monkeypatch):
    model = load("llama", adapter_dirs)
    names = ["a", "c", "__base__", "b"]
    batch = tiny.random_prompts(len(names), 5, seed=int(torch.randint(0, 1000, ())))
    expected = model(**batch, adapter_names=names).logits
    patch_model(model, backend="triton")
    groups = model.base_model._fastlora_state.bank.groups
    assert sorted(group.size for group in groups) == [2, 2, 3, 3]  # per block: q/k/v and gate/up
    calls = count_shrinks(monkeypatch)
    actual = model(**batch, adapter_names=names).logits
    assert_close_relative(actual, expected)
    # Per block: one shrink for q/k/v, o_proj, one for gate/up, down_proj; 2 blocks; then lm_head (adapter c).
    assert len(calls) == 2 * 4 + 1


class SameNamesOtherInputs(torch.nn.Module):
    """q_proj and k_proj under one parent, but k_proj reads a different tensor: the sibling hint must not apply."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(24, 16)
        self.k_proj = torch.nn.Linear(24, 8)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x * 2.0)], dim=-1)


@interpreted
@torch.no_grad()
def test_sibling_with_another_input_computes_its_own_shrink(monkeypatch):
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    model = get_peft_model(SameNamesOtherInputs(), config)
    model.add_adapter("other", LoraConfig(r=8, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    model.eval()
    x = torch.randn(5, 3, 24)
    names = ["other", "default", "__base__", "other", "default"]
    expected = model(x, adapter_names=names)
    patch_model(model, backend="triton")
    assert len(model.base_model._fastlora_state.bank.groups) == 1
    calls = count_shrinks(monkeypatch)
    assert_close_relative(model(x, adapter_names=names), expected)
    assert len(calls) == 2  # the leader's group shrink, then k_proj's own
