"""Property-based fuzzing against unpatched PEFT: random adapters, batches and row assignments; mismatches: 0.

Each example builds a tiny Llama with 1-4 random adapters (ranks, alphas, rsLoRA, target modules including the
embedding and lm_head), a batch (size, length, left or right padding) and a row → adapter assignment that may
repeat names and use ``__base__``. PEFT's own mixed batch on the same model is the oracle: logits at the dtype's
tolerance and greedy tokens of a short generate equal.

``FUZZ_EXAMPLES`` scales the example counts (CI runs the defaults; the device runs the bf16 variant with more).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close_relative
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

from peft_fastlora import patch_model, tiny, unpatch_model

TARGETS = [*tiny.TARGET_MODULES["llama"], "embed_tokens", "lm_head"]
SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))


def fuzz_settings(examples: int):
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        database=None,  # no .hypothesis folder in the checkout; failures print their example
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@st.composite
def scenarios(draw, max_batch: int = 6, max_length: int = 9):
    adapters = [
        {
            "r": draw(st.sampled_from([1, 2, 4, 8, 16])),
            "lora_alpha": draw(st.sampled_from([1, 8, 16, 32])),
            "use_rslora": draw(st.booleans()),
            "target_modules": draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=len(TARGETS), unique=True)),
        }
        for _ in range(draw(st.integers(1, 4)))
    ]
    batch_size = draw(st.integers(1, max_batch))
    choices = [f"x{index}" for index in range(len(adapters))] + ["__base__"]
    names = draw(st.lists(st.sampled_from(choices), min_size=batch_size, max_size=batch_size))
    return {
        "adapters": adapters,
        "names": names,
        "length": draw(st.integers(1, max_length)),
        "left_padding": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(scenario: dict, dtype: torch.dtype, device: str):
    torch.manual_seed(scenario["seed"])
    model = None
    for index, spec in enumerate(scenario["adapters"]):
        config = LoraConfig(init_lora_weights=False, **spec)
        if model is None:
            base = tiny.build_base_model("llama", seed=scenario["seed"], dtype=dtype)
            model = get_peft_model(base, config, adapter_name=f"x{index}", autocast_adapter_dtype=False)
        else:
            model.add_adapter(f"x{index}", config)
    batch = tiny.random_prompts(
        len(scenario["names"]), scenario["length"], seed=scenario["seed"], left_padding=scenario["left_padding"]
    )
    return model.to(device).eval(), {key: value.to(device) for key, value in batch.items()}


def check(scenario: dict, backend: str, dtype=torch.float32, device="cpu", rtol=1e-5) -> None:
    model, batch = build(scenario, dtype, device)
    names = scenario["names"]
    generate = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = model(**batch, adapter_names=names).logits
        expected_tokens = (
            model.generate(**batch, adapter_names=names, **generate) if scenario["left_padding"] else None
        )
        patch_model(model, backend=backend)
        assert_close_relative(model(**batch, adapter_names=names).logits, expected, rtol=rtol)
        if expected_tokens is not None and dtype == torch.float32:
            assert torch.equal(model.generate(**batch, adapter_names=names, **generate), expected_tokens)
        unpatch_model(model)


@fuzz_settings(40)
@given(scenario=scenarios())
def test_fuzz_torch_backend(scenario):
    check(scenario, "torch")


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="needs Triton (GPU or interp.)"
)
@fuzz_settings(6)
@given(scenario=scenarios(max_batch=4, max_length=4))
def test_fuzz_triton_backend(scenario):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check(scenario, "triton", device=device)


@pytest.mark.gpu
@fuzz_settings(60)
@given(scenario=scenarios(max_batch=8, max_length=16))
def test_fuzz_bf16_on_gpu(scenario):
    """bf16: logits within bf16 tolerance of PEFT's (greedy tokens are compared in fp32 only: near-ties)."""
    check(scenario, "triton", dtype=torch.bfloat16, device="cuda", rtol=3e-2)
