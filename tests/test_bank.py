"""The adapter bank: ragged packing, and repacking after PEFT adds, deletes or overwrites adapters."""

from __future__ import annotations

import torch
from helpers import assert_close_relative, load
from peft import LoraConfig

from peft_fastlora import patch_model, tiny
from peft_fastlora.layers import is_fast_layer


def unpatched_logits(adapter_dirs, batch, names, edit):
    """The oracle: a fresh unpatched model, given the same edit, run on the same mixed batch."""
    model = load("llama", adapter_dirs)
    edit(model)
    with torch.no_grad():
        return model(**batch, adapter_names=names).logits


def test_packing_has_no_padding(adapter_dirs):
    model = patch_model(load("llama", adapter_dirs))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    packed = q_proj._fastlora_packed
    ranks = {name: q_proj.r[name] for name in q_proj.lora_A}
    assert packed.a.shape == (sum(ranks.values()), 64)
    assert packed.b_t.shape == (sum(ranks.values()), 64)
    slots = model.base_model._fastlora_state.bank.slots
    for name, rank in ranks.items():
        a, b_t = packed.adapter(slots[name])
        assert a.shape[0] == rank
        assert torch.equal(a, q_proj.lora_A[name].weight)
        assert torch.allclose(b_t, q_proj.lora_B[name].weight.t() * q_proj.scaling[name])
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj  # adapter b targets every other module
    assert k_proj._fastlora_packed.ranks[slots["b"]] == 0


def run_after_edit(adapter_dirs, edit, names):
    """Patch first, then edit, then run: the patched result must equal the unpatched oracle given the same edit."""
    model = patch_model(load("llama", adapter_dirs))
    batch = tiny.random_prompts(len(names), 6, seed=int(torch.randint(0, 1000, ())))
    with torch.no_grad():
        model(**batch, adapter_names=["a"] * len(names))  # pack before the edit
    edit(model)
    with torch.no_grad():
        actual = model(**batch, adapter_names=names).logits
    assert_close_relative(actual, unpatched_logits(adapter_dirs, batch, names, edit))
    return model


def test_load_adapter_after_patch(adapter_dirs):
    def edit(model):
        model.load_adapter(adapter_dirs["llama"]["b"], adapter_name="late")

    model = run_after_edit(adapter_dirs, edit, ["late", "a", "__base__", "late"])
    assert all(is_fast_layer(m) for m in model.modules() if hasattr(m, "lora_A") and "late" in m.lora_A)


def test_add_adapter_with_new_target_modules_after_patch(adapter_dirs):
    def edit(model):
        torch.manual_seed(42)
        config = LoraConfig(r=6, lora_alpha=3, target_modules=["o_proj", "down_proj"], init_lora_weights=False)
        model.add_adapter("fresh", config)
        model.eval()

    run_after_edit(adapter_dirs, edit, ["fresh", "c", "fresh", "__base__"])


def test_delete_adapter_after_patch(adapter_dirs):
    def edit(model):
        model.delete_adapter("b")

    model = run_after_edit(adapter_dirs, edit, ["a", "c", "__base__"])
    assert "b" not in model.base_model._fastlora_state.bank.slots


def test_overwrite_weights_in_place_after_patch(adapter_dirs):
    def edit(model):
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "lora_B") and "a" in module.lora_B:
                    weight = module.lora_B["a"].weight
                    weight.copy_(torch.randn(weight.shape, generator=generator))

    run_after_edit(adapter_dirs, edit, ["a", "b", "a"])


def test_swap_parameter_data_after_patch(adapter_dirs):
    def edit(model):
        generator = torch.Generator().manual_seed(4)
        for module in model.modules():
            if hasattr(module, "lora_A") and "c" in module.lora_A:
                weight = module.lora_A["c"].weight
                weight.data = torch.randn(weight.shape, generator=generator)

    run_after_edit(adapter_dirs, edit, ["c", "__base__", "c"])


def test_changed_scaling_after_patch(adapter_dirs):
    def edit(model):
        for module in model.modules():
            if isinstance(getattr(module, "scaling", None), dict) and "b" in module.scaling:
                module.scaling["b"] *= 3.0

    run_after_edit(adapter_dirs, edit, ["b", "a", "b"])
