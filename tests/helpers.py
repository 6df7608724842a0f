"""Test helpers: loading the session's tiny adapters and comparing tensors."""

from __future__ import annotations

import os

import pytest
import torch

from peft_fastlora import tiny

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors runs only through the interpreter"
)
"""For tests that run the Triton backend on CPU tensors: conftest sets the interpreter on machines without a GPU."""


def load(architecture: str, adapter_dirs, names=("a", "b", "c"), dtype=torch.float32):
    """A fresh PeftModel of ``architecture`` with the named adapters loaded from disk."""
    base = tiny.build_base_model(architecture, dtype=dtype)
    return tiny.load_peft_model(base, {name: adapter_dirs[architecture][name] for name in names})


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Max abs difference at most ``rtol`` times the reference's max magnitude, and no NaN anywhere."""
    assert not torch.isnan(actual).any(), "output has NaN"
    scale = expected.abs().max().clamp_min(1e-12)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error <= rtol, f"relative error {error.item():.3g} > {rtol}"


def gpu_test_model(dtype: torch.dtype, tmp_path) -> tuple:
    """A Llama PeftModel on the GPU with adapters a/b/c (ranks 8/16/64) loaded from disk, a mixed assignment of
    8 rows, and a left-padded batch for it: ``(model, names, batch)``.

    fp32 uses the tiny model. bf16 uses a wider one (hidden 1024) initialised with a wider weight spread (0.1, not
    0.02), so that its logits are not a sea of near-ties at bf16 resolution, where any change of summation order
    flips an argmax."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if dtype == torch.float32:
        config = tiny.tiny_config("llama")
    else:
        config = LlamaConfig(
            hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=tiny.VOCAB_SIZE, pad_token_id=0, max_position_embeddings=256,
            initializer_range=0.1,
        )  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    ranks = {"a": 8, "b": 16, "c": 64}
    for seed, (name, rank) in enumerate(ranks.items(), start=1):
        tiny.save_adapter(base, tmp_path / name, seed=seed, r=rank, lora_alpha=rank)
    model = tiny.load_peft_model(base, {name: tmp_path / name for name in ranks}).to("cuda")
    names = ["a", "b", "__base__", "c", "b", "a", "c", "c"]
    batch = {key: value.cuda() for key, value in tiny.random_prompts(len(names), 12, seed=5).items()}
    return model, names, batch
