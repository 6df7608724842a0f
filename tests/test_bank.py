"""The adapter bank: ragged packing, and repacking after PEFT adds, deletes or overwrites adapters."""

from __future__ import annotations

import pytest
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


def test_parameters_are_views_of_one_unpadded_storage(adapter_dirs):
    """PEFT's lora_A/lora_B parameters are views into the packed storage (q/k/v share one lora_A storage), hold
    PEFT's values unscaled and contiguous, and nothing is padded or stored twice."""
    model = load("llama", adapter_dirs)
    attention = model.base_model.model.model.layers[0].self_attn
    members = [attention.q_proj, attention.k_proj, attention.v_proj]
    before = {
        (id(layer), name): (layer.lora_A[name].weight, layer.lora_A[name].weight.detach().clone(),
                            layer.lora_B[name].weight.detach().clone())
        for layer in members for name in layer.lora_A
    }  # fmt: skip
    patch_model(model)
    slots = model.base_model._fastlora_state.bank.slots
    storage = members[0]._fastlora_packed.a
    assert storage.shape == (sum(layer.r[name] for layer in members for name in layer.lora_A), 64)
    for layer in members:
        packed = layer._fastlora_packed
        assert packed.a is storage and packed.group is not None
        assert packed.b.numel() == sum(layer.r[name] for name in layer.lora_A) * layer.out_features
        for name in layer.lora_A:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            parameter, a_before, b_before = before[(id(layer), name)]
            assert a is parameter  # the same Parameter object, its data re-pointed
            assert torch.equal(a, a_before) and torch.equal(b, b_before) and a.is_contiguous() and b.is_contiguous()
            view_a, view_b, scale = packed.adapter(slots[name])
            assert a.data_ptr() == view_a.data_ptr() and b.data_ptr() == view_b.data_ptr()
            assert a.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
            assert scale.item() == pytest.approx(layer.scaling[name])
    assert attention.k_proj._fastlora_packed.ranks[slots["b"]] == 0  # adapter b targets every other module


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
