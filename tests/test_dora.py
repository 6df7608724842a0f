"""DoRA adapters in mixed batches, beside plain LoRA adapters and ``__base__`` rows.

PEFT refuses ``adapter_names`` with DoRA, so the oracle is PEFT's single-adapter DoRA forward (``set_adapter``)
on the same rows, at the fp32 tolerance."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_relative, gpu_test_model, interpreted

from peft_fastlora import patch_model, tiny
from peft_fastlora.peft_messages import dora_enabled

NAMES = ["d", "a", "__base__", "e", "d", "a"]


def dora_model(architecture: str, tmp_path, dtype=torch.float32):
    """Adapters ``a`` (plain LoRA, rank 4), ``d`` (DoRA, rank 8) and ``e`` (DoRA, rank 16, rsLoRA, half the
    targets), loaded from disk onto a fresh base model. DoRA's magnitude is perturbed, so that ``g != 1``
    matters: a freshly initialised DoRA adapter starts with magnitude equal to the norm."""
    base = tiny.build_base_model(architecture, dtype=dtype)
    targets = tiny.TARGET_MODULES[architecture]
    tiny.save_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    tiny.save_adapter(base, tmp_path / "d", seed=2, r=8, lora_alpha=16, use_dora=True)
    tiny.save_adapter(base, tmp_path / "e", seed=3, r=16, use_dora=True, use_rslora=True, target_modules=targets[::2])
    model = tiny.load_peft_model(base, {name: tmp_path / name for name in "ade"})
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.3 * torch.rand_like(parameter))
    return model


def per_adapter_logits(model, batch, names):
    """Each distinct adapter's rows from one single-adapter forward of those rows (PEFT's DoRA forward)."""
    logits = torch.full((len(names), batch["input_ids"].shape[1], model.config.vocab_size), float("nan"))
    for name in set(names):
        rows = [row for row, row_name in enumerate(names) if row_name == name]
        sub = {key: value[rows] for key, value in batch.items()}
        if name == "__base__":
            with model.disable_adapter():
                logits[rows] = model(**sub).logits.float()
        else:
            model.set_adapter(name)
            logits[rows] = model(**sub).logits.float()
    return logits


@pytest.mark.parametrize(
    "architecture,backend",
    [("llama", "torch"), ("gpt2", "torch"), ("opt", "torch"), pytest.param("llama", "triton", marks=interpreted)],
)
@torch.no_grad()
def test_dora_rows_match_single_adapter_forward(architecture, backend, tmp_path):
    model = dora_model(architecture, tmp_path)
    batch = tiny.random_prompts(len(NAMES), 7, seed=int(torch.randint(0, 1000, ())))
    expected = per_adapter_logits(model, batch, NAMES)
    patch_model(model, backend=backend)
    actual = model(**batch, adapter_names=NAMES).logits
    assert_close_relative(actual, expected)
    # The DoRA part must matter: the same adapters as plain LoRA (magnitude ignored) give other logits.
    for layer in model.modules():
        if hasattr(layer, "_fastlora_packed") and layer._fastlora_packed.dora is not None:
            layer._fastlora_packed.dora.is_dora.zero_()
    plain = model(**batch, adapter_names=NAMES).logits
    assert (plain - expected).abs().amax(dim=(1, 2))[[0, 3, 4]].min() > 1e-3


@torch.no_grad()
def test_dora_generate_matches_per_adapter_generate(tmp_path):
    model = dora_model("llama", tmp_path)
    batch = tiny.random_prompts(len(NAMES), 6, seed=int(torch.randint(0, 1000, ())))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = torch.full((len(NAMES), 12), -1)
    for name in set(NAMES):
        rows = [row for row, row_name in enumerate(NAMES) if row_name == name]
        sub = {key: value[rows] for key, value in batch.items()}
        if name == "__base__":
            with model.disable_adapter():
                expected[rows] = model.generate(**sub, **kwargs)
        else:
            model.set_adapter(name)
            expected[rows] = model.generate(**sub, **kwargs)
    patch_model(model)
    assert torch.equal(model.generate(**batch, adapter_names=NAMES, **kwargs), expected)


@torch.no_grad()
def test_dora_norms_follow_changed_weights(tmp_path):
    """The cached norms and magnitudes are refreshed when a DoRA adapter's weights change in place."""
    model = dora_model("llama", tmp_path)
    batch = tiny.random_prompts(len(NAMES), 5, seed=3)
    patch_model(model)
    model(**batch, adapter_names=NAMES)
    for name, parameter in model.named_parameters():
        if name.endswith(("lora_magnitude_vector.d.weight", "lora_A.d.weight")):
            parameter.mul_(1.5)
    expected = per_adapter_logits(model, batch, NAMES)
    assert_close_relative(model(**batch, adapter_names=NAMES).logits, expected)


def test_unpatched_error_is_peft_word_for_word(tmp_path):
    """Unpatched PEFT keeps its own behaviour (and leaks its hooks when it raises, so the model is not reused)."""
    model = dora_model("llama", tmp_path)
    with pytest.raises(ValueError) as error:
        model(**tiny.random_prompts(2, 4, seed=1), adapter_names=["d", "a"])
    assert str(error.value) == str(dora_enabled())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_dora_greedy_tokens_on_gpu(backend, tmp_path):
    """bf16 on the GPU: a DoRA adapter beside plain ones, greedy tokens equal to per-adapter PEFT generate."""
    model, names, batch = gpu_test_model(torch.bfloat16, tmp_path)
    base = model.get_base_model()
    tiny.save_adapter(base, tmp_path / "d", seed=9, r=16, lora_alpha=16, use_dora=True)
    model.load_adapter(tmp_path / "d", adapter_name="d")
    model.eval()
    names = ["d" if name == "c" else name for name in names]
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    expected = torch.full((len(names), batch["input_ids"].shape[1] + 10), -1, device="cuda")
    for name in set(names):
        rows = [row for row, row_name in enumerate(names) if row_name == name]
        sub = {key: value[rows] for key, value in batch.items()}
        if name == "__base__":
            with model.disable_adapter():
                expected[rows] = model.generate(**sub, **kwargs)
        else:
            model.set_adapter(name)
            expected[rows] = model.generate(**sub, **kwargs)
    patch_model(model, backend=backend)
    actual = model.generate(**batch, adapter_names=names, **kwargs)
    mismatches = (actual != expected).nonzero().tolist()
    assert not mismatches, f"first mismatching (row, position): {mismatches[:4]}"
