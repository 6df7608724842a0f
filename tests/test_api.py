"""patch_model / unpatch_model, backend choice, and PEFT behaviour that must not change under the patch."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close_relative, load
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_fastlora
from peft_fastlora import patch_info, patch_model, tiny, unpatch_model
from peft_fastlora.backends import get_backend
from peft_fastlora.layers import is_fast_layer


def fast_layer_count(model):
    return sum(is_fast_layer(module) for module in model.modules())


def test_patch_is_idempotent_and_unpatch_restores(adapter_dirs):
    model = load("llama", adapter_dirs)
    text_before, classes_before = repr(model), [type(m) for m in model.modules()]
    assert patch_model(model) is model
    count = fast_layer_count(model)
    assert count == 2 * 7 + 2  # 7 projections in 2 blocks, plus embed_tokens and lm_head (adapter c)
    patch_model(model)
    assert fast_layer_count(model) == count
    assert repr(model) == text_before
    assert unpatch_model(model) is model
    assert [type(m) for m in model.modules()] == classes_before
    assert "_enable_peft_forward_hooks" not in model.base_model.__dict__
    unpatch_model(model)  # harmless twice


@torch.no_grad()
def test_single_adapter_paths_unchanged(adapter_dirs):
    """Without adapter_names: active adapter, set_adapter, disable_adapter, merge and unmerge act as in PEFT."""
    reference = load("gpt2", adapter_dirs)
    model = patch_model(load("gpt2", adapter_dirs))
    batch = tiny.random_prompts(3, 6, seed=11)
    for peft_model in (reference, model):
        peft_model.set_adapter("b")
    assert_close_relative(model(**batch).logits, reference(**batch).logits)
    with model.disable_adapter(), reference.disable_adapter():
        assert_close_relative(model(**batch).logits, reference(**batch).logits)
    for peft_model in (reference, model):
        peft_model.set_adapter("c")
        peft_model.merge_adapter()
    assert_close_relative(model(**batch).logits, reference(**batch).logits)
    for peft_model in (reference, model):
        peft_model.unmerge_adapter()
    assert_close_relative(model(**batch).logits, reference(**batch).logits)
    names = ["c", "__base__", "a"]
    assert_close_relative(model(**batch, adapter_names=names).logits, reference(**batch, adapter_names=names).logits)


def test_save_pretrained_same_keys_and_values(adapter_dirs, tmp_path):
    model = patch_model(load("phi3", adapter_dirs))
    with torch.no_grad():
        model(**tiny.random_prompts(2, 4, seed=1), adapter_names=["a", "c"])
    assert all(not key.startswith("_fastlora") for key in model.state_dict())
    model.save_pretrained(tmp_path / "saved")
    for name in ("a", "b", "c"):
        folder = tmp_path / "saved" / name  # PEFT saves adapters not named "default" in subfolders
        saved = load_file(folder / "adapter_model.safetensors")
        original = load_file(adapter_dirs["phi3"][name] / "adapter_model.safetensors")
        assert saved.keys() == original.keys()
        for key in saved:
            assert torch.equal(saved[key], original[key])


def test_backend_choice():
    model = get_peft_model(tiny.build_base_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Unknown peft_fastlora backend 'cuda'"):
        patch_model(model, backend="cuda")
    assert fast_layer_count(model) == 0  # a refused patch changes nothing
    with pytest.raises(RuntimeError, match="backend 'flashinfer' is not available"):
        patch_model(model, backend="flashinfer")
    patch_model(model, backend="auto")
    assert type(model.base_model._fastlora_state.backend).__name__ == "TorchBackend"  # CPU: torch
    patch_model(model, backend="torch")
    assert model.base_model._fastlora_state.backend_name == "torch"


def test_patch_info_reports_backend_and_reason(adapter_dirs, caplog):
    model = load("llama", adapter_dirs)
    assert patch_info(model) == peft_fastlora.PatchInfo(patched=False)
    assert str(patch_info(model)) == "not patched by peft_fastlora"
    assert not patch_info("not a model").patched and not patch_info(tiny.build_base_model("llama")).patched
    with caplog.at_level("INFO", logger="peft_fastlora"):
        patch_model(model)
    info = patch_info(model)
    assert info.patched and info.backend == "torch" and info.requested == "auto"
    assert info.reason == "the model is on cpu, not CUDA; Triton kernels need CUDA"
    assert "backend='auto' chose 'torch': the model is on cpu" in caplog.text
    assert info.adapters == ("a", "b", "c") and info.fast_layers == info.lora_layers == fast_layer_count(model)
    assert str(info).startswith("patched by peft_fastlora: backend 'torch' (requested 'auto': the model is on cpu")
    patch_model(model, backend="torch")
    assert patch_info(model).requested == "torch" and patch_info(model).reason == "asked for by name"
    unpatch_model(model)
    assert not patch_info(model).patched


def test_patch_info_on_transformers_model(adapter_dirs):
    model = tiny.build_base_model("llama")
    model.load_adapter(str(adapter_dirs["llama"]["a"]), adapter_name="a")
    assert not patch_info(model).patched
    patch_model(model, backend="torch")
    assert patch_info(model).patched and patch_info(model).adapters == ("a",)


def test_auto_warns_when_cuda_falls_back_to_torch(monkeypatch):
    """On a CUDA model without Triton, ``auto`` serves with torch and says so (a warning, not silence)."""
    monkeypatch.setitem(__import__("sys").modules, "triton", None)  # import triton -> ImportError
    with pytest.warns(UserWarning, match="falls back to the slower torch backend on this CUDA model: triton is not"):
        backend = get_backend("auto", torch.device("cuda"))
    assert backend.name == "torch" and backend.reason.startswith("fallback on CUDA: triton is not installed")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available: triton is not installed"):
        get_backend("triton", torch.device("cuda"))


def test_refuses_non_peft_objects():
    with pytest.raises(TypeError, match="expects a peft.PeftModel"):
        patch_model(tiny.build_base_model("llama"))
    with pytest.raises(TypeError, match="expects a peft.PeftModel"):
        patch_model("not a model")


class ConvAndLinear(torch.nn.Module):
    """A model with one Linear and one Conv2d LoRA target: the Conv2d must stay on PEFT's path."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.proj = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.proj(self.conv(x).mean(dim=(2, 3)))


@torch.no_grad()
def test_other_layer_types_warn_and_stay_on_peft_path(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(ConvAndLinear(), LoraConfig(r=2, target_modules=["conv", "proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=3, target_modules=["conv", "proj"], init_lora_weights=False))
    model.eval()
    x = torch.randn(4, 3, 5, 5)
    names = ["other", "default", "__base__", "other"]
    expected = model(x, adapter_names=names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch_model(model)
    messages = [str(w.message) for w in caught if "peft_fastlora" in str(w.message)]
    assert len(messages) == 1 and "Conv2d" in messages[0]
    assert is_fast_layer(model.base_model.model.proj) and not is_fast_layer(model.base_model.model.conv)
    assert_close_relative(model(x, adapter_names=names), expected)


def test_reload_after_unpatch_is_plain_peft(adapter_dirs, tmp_path):
    model = patch_model(load("llama", adapter_dirs, names=("a",)))
    unpatch_model(model)
    assert isinstance(model, PeftModel) and fast_layer_count(model) == 0


def test_import_does_not_load_bitsandbytes_layers():
    """Importing peft_fastlora does not import PEFT's bitsandbytes LoRA layers (nor the kernels bitsandbytes loads
    with them); they are looked up once PEFT itself has imported them for a quantized model (tests/test_quantized.py).
    """
    import subprocess
    import sys

    code = "import sys, peft_fastlora\nprint('peft.tuners.lora.bnb' in sys.modules)\n"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.stdout.strip() == "False", completed.stderr
