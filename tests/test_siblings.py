"""Siblings that read one input (q/k/v, gate/up) share one shrink launch on the Triton backend, and in eager calls
of up to ``layers.FUSE_MAX_TOKENS`` tokens one expand launch too (the leader computes every member's output)."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from helpers import assert_close_relative, interpreted, load
from peft import LoraConfig, get_peft_model

from peft_fastlora import layers, patch_model, storage_keys, tiny
from peft_fastlora.backends import triton as triton_backend
from peft_fastlora.kernels import launch


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


class _Counting:
    """A ``CompiledLauncher`` that counts its launches (the interpreter launches every one through ``__call__``)."""

    def __init__(self, launcher, counts: collections.Counter, name: str):
        self.launcher, self.counts, self.name = launcher, counts, name

    def __call__(self, *args, **kwargs):
        self.counts[self.name] += 1
        return self.launcher(*args, **kwargs)

    def __getattr__(self, attribute):
        return getattr(self.launcher, attribute)


def count_launches(monkeypatch) -> collections.Counter:
    counts = collections.Counter()
    for name in ("_shrink", "_expand", "_expand_group"):
        monkeypatch.setattr(launch, name, _Counting(getattr(launch, name), counts, name))
    return counts


@interpreted
@torch.no_grad()
def test_fused_groups_launch_one_expand_each_and_match_peft(adapter_dirs, monkeypatch):
    """Per Llama block 4 shrinks and 4 expands (q/k/v and gate/up one each), not 4 and 7; the same logits and
    greedy tokens as PEFT. Adapter b is on every other projection only: some members of a group hold it, some not."""
    model = load("llama", adapter_dirs)
    peft = copy.deepcopy(model)
    names = ["a", "c", "__base__", "b"]
    batch = tiny.random_prompts(len(names), 5, seed=int(torch.randint(0, 1000, ())))
    patch_model(model, backend="triton")
    counts = count_launches(monkeypatch)
    assert_close_relative(model(**batch, adapter_names=names).logits, peft(**batch, adapter_names=names).logits)
    # 2 blocks of (q/k/v, o, gate/up, down), then lm_head (adapter c); the embedding takes the torch path.
    assert counts == {"_shrink": 2 * 4 + 1, "_expand_group": 2 * 2, "_expand": 2 * 2 + 1}
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = peft.generate(**batch, adapter_names=names, **kwargs)
    assert torch.equal(model.generate(**batch, adapter_names=names, **kwargs), expected)


@interpreted
@torch.no_grad()
def test_inputs_past_the_fusing_limit_launch_per_member(adapter_dirs, monkeypatch):
    model = load("llama", adapter_dirs)
    names = ["a", "c", "__base__", "b"]
    batch = tiny.random_prompts(len(names), 5, seed=int(torch.randint(0, 1000, ())))
    expected = model(**batch, adapter_names=names).logits
    patch_model(model, backend="triton")
    monkeypatch.setattr(layers, "FUSE_MAX_TOKENS", 4 * 5 - 1)
    counts = count_launches(monkeypatch)
    assert_close_relative(model(**batch, adapter_names=names).logits, expected)
    assert counts == {"_shrink": 2 * 4 + 1, "_expand": 2 * 7 + 1}
    # A long input (a prefill) launches per member without turning the groups' fusing off for short ones (decode).
    counts.clear()
    short = tiny.random_prompts(len(names), 4, seed=1)
    model(**short, adapter_names=names)
    assert counts["_expand_group"] == 2 * 2


@interpreted
@torch.no_grad()
def test_fused_members_keep_their_hooks(adapter_dirs):
    """A member whose pre-hook changes its input computes its own output (the leader's was for another input); a
    member's forward hook sees the output it returns. Both as in PEFT."""
    model = load("llama", adapter_dirs)
    peft = copy.deepcopy(model)
    seen = {"ours": [], "peft": []}
    for key, twin in (("ours", model), ("peft", peft)):
        attention = twin.base_model.model.model.layers[0].self_attn
        attention.k_proj.register_forward_pre_hook(lambda module, args: (args[0] * 1.5,))
        attention.v_proj.register_forward_hook(lambda module, args, output, key=key: seen[key].append(output))
    names = ["b", "a", "c", "a"]
    batch = tiny.random_prompts(len(names), 6, seed=int(torch.randint(0, 1000, ())))
    expected = peft(**batch, adapter_names=names).logits
    patch_model(model, backend="triton")
    assert_close_relative(model(**batch, adapter_names=names).logits, expected)
    assert_close_relative(seen["ours"][-1], seen["peft"][-1])


def scale_input_in_place(module, args, *output) -> None:
    args[0].mul_(1.5)


IN_PLACE_HOOKS = {
    # A member's pre-hook, the leader's forward hook: they run between the leader's call and the members' reads of
    # what it shared; a member's base layer's pre-hook runs inside the fused leader's call, before the group's shrink.
    "k_pre": lambda attention: attention.k_proj.register_forward_pre_hook(scale_input_in_place),
    "q_post": lambda attention: attention.q_proj.register_forward_hook(scale_input_in_place),
    "k_base_pre": lambda attention: attention.k_proj.base_layer.register_forward_pre_hook(scale_input_in_place),
}


@interpreted
@pytest.mark.parametrize(
    "mode, hook",
    [
        ("eager", "k_pre"), ("eager", "k_base_pre"), ("compiled", "k_pre"), ("compiled", "q_post"),
        ("inference", "k_pre"),
    ],
)  # fmt: skip
def test_a_hook_that_changes_the_shared_input_in_place(adapter_dirs, mode, hook):
    """A hook that scales the group's shared input in place after the leader computed its members' outputs or the
    group's shrink (or, on a member's base layer, inside the fused leader's call): every layer gets what PEFT
    computes. Eager calls see the change in the input's version counter; compiled graphs and inference tensors keep
    none, so there a leader with hooks around its members shares nothing with them (the other groups still fuse)."""
    model = load("llama", adapter_dirs)
    peft = copy.deepcopy(model)
    for twin in (model, peft):
        IN_PLACE_HOOKS[hook](twin.base_model.model.model.layers[0].self_attn)
    names = ["a", "b", "__base__", "c"]
    batch = tiny.random_prompts(len(names), 4, seed=int(torch.randint(0, 1000, ())))
    context = torch.inference_mode if mode == "inference" else torch.no_grad
    with context():
        expected = peft(**batch, adapter_names=names).logits
    patch_model(model, backend="triton")
    inner = model.get_base_model()
    if mode == "compiled":
        torch._dynamo.reset()
        inner.forward = torch.compile(inner.forward, backend="aot_eager", fullgraph=True)
    fused = []
    original = layers._group_forward
    with pytest.MonkeyPatch.context() as patcher, context():
        patcher.setattr(
            layers, "_group_forward", lambda leader, *args: fused.append(leader) or original(leader, *args)
        )
        assert_close_relative(model(**batch, adapter_names=names).logits, expected)
    if mode != "eager" or hook == "k_base_pre":
        assert inner.model.layers[0].self_attn.q_proj not in fused
    assert inner.model.layers[1].self_attn.q_proj in fused


@interpreted
@torch.no_grad()
def test_a_group_whose_leader_is_not_called_first_stops_fusing(adapter_dirs, monkeypatch):
    """OPT registers k_proj before q_proj (k leads the group) but calls q_proj first: q finds nothing of its leader's,
    computes its own, and the group stops fusing before its leader runs, which would otherwise run q's base layer a
    second time for nothing.
    (The reference is the torch backend, which never fuses: PEFT's own mixed batch refuses OPT's flattened rows.)"""
    model = load("opt", adapter_dirs)
    reference = copy.deepcopy(model)
    names = ["a", "c", "__base__", "b"]
    batch = tiny.random_prompts(len(names), 5, seed=int(torch.randint(0, 1000, ())))
    patch_model(reference, backend="torch")
    expected = reference(**batch, adapter_names=names).logits
    patch_model(model, backend="triton")
    attention = model.base_model.model.model.decoder.layers[0].self_attn
    calls = collections.Counter()
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attention, name).base_layer.register_forward_hook(lambda *args, name=name: calls.update([name]))
    for _ in range(2):
        calls.clear()
        assert_close_relative(model(**batch, adapter_names=names).logits, expected)
        assert calls == {"q_proj": 1, "k_proj": 1, "v_proj": 1}
    assert attention.k_proj._fastlora_packed.fused and attention.k_proj._fastlora_packed.fusing_missed
