"""Quantized base layers (bitsandbytes 8-bit and 4-bit, PEFT's ``lora.bnb`` layers): the LoRA delta runs through
our backends, the base stays bitsandbytes' quantized matmul. The oracle is PEFT's own mixed batch on the same
quantized model. bitsandbytes runs these layers on CPU too (≥ 0.45), so they run in CI; the GPU variant runs on
the device."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close_relative

from peft_fastlora import patch_model, tiny
from peft_fastlora.layers import is_fast_layer

bitsandbytes = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

NAMES = ["a", "b", "__base__", "c", "a", "b"]
QUANTIZATIONS = {
    "8bit": lambda dtype: BitsAndBytesConfig(load_in_8bit=True),
    "4bit": lambda dtype: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype),
}


def quantized_model(tmp_path, adapter_dirs, quantization: str, device: str, dtype=torch.float32):
    tiny.save_base_model(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=QUANTIZATIONS[quantization](dtype), device_map=device, dtype=dtype
    )
    return tiny.load_peft_model(base, {name: adapter_dirs["llama"][name] for name in ("a", "b", "c")})


def check(model, device, backend, rtol, generate=True):
    batch = {key: value.to(device) for key, value in tiny.random_prompts(len(NAMES), 7, seed=5).items()}
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = model(**batch, adapter_names=NAMES).logits
        expected_tokens = model.generate(**batch, adapter_names=NAMES, **kwargs) if generate else None
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no layer is left on PEFT's path
            patch_model(model, backend=backend)
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        assert is_fast_layer(q_proj) and "bitsandbytes" in type(q_proj.get_base_layer()).__module__
        assert_close_relative(model(**batch, adapter_names=NAMES).logits, expected, rtol=rtol)
        if generate:
            assert torch.equal(model.generate(**batch, adapter_names=NAMES, **kwargs), expected_tokens)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_mixed_batch_on_cpu(quantization, tmp_path, adapter_dirs):
    check(quantized_model(tmp_path, adapter_dirs, quantization, "cpu"), "cpu", "torch", rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_mixed_batch_on_gpu(quantization, backend, tmp_path, adapter_dirs):
    model = quantized_model(tmp_path, adapter_dirs, quantization, "cuda", dtype=torch.float16)
    check(model, "cuda", backend, rtol=1e-2, generate=False)
