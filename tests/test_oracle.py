"""Patched mixed batches against the oracle: the same model unpatched (PEFT's own mixed batch), and per-adapter
runs with ``set_adapter``."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_close_relative,
    assert_no_worse_than_peft,
    assert_no_worse_than_peft_logits,
    gpu_test_model,
    interpreted,
    load,
    oracle_batch,
)

from peft_fastlora import patch_model, tiny, unpatch_model

NAMES = ["a", "b", "__base__", "c", "a", "b"]


def per_adapter_logits(model, batch, names):
    """Each row's logits from a single-adapter forward with that row's adapter active: the oracle for mixed batches
    that PEFT's own mixed path cannot run (OPT's flattened fc1/fc2)."""
    rows = []
    for row, name in enumerate(names):
        single = {key: value[row : row + 1] for key, value in batch.items()}
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(**single).logits)
        else:
            model.set_adapter(name)
            rows.append(model(**single).logits)
    return torch.cat(rows)


# Interpreted Triton costs seconds per generate step on a CPU, so its end-to-end runs cover two architectures
# (Llama, and GPT-2 for Conv1D) with short generations; the torch backend covers all of them.
BACKEND_CASES = [
    ("llama", "torch"), ("gpt2", "torch"), ("phi3", "torch"),
    pytest.param("llama", "triton", marks=interpreted), pytest.param("gpt2", "triton", marks=interpreted),
]  # fmt: skip


@pytest.mark.parametrize("architecture,backend", BACKEND_CASES)
@torch.no_grad()
def test_logits_match_peft_mixed_batch(architecture, backend, adapter_dirs):
    model = load(architecture, adapter_dirs)
    batch = tiny.random_prompts(len(NAMES), 9, seed=int(torch.randint(0, 1000, ())))
    expected = model(**batch, adapter_names=NAMES).logits
    patch_model(model, backend=backend)
    actual = model(**batch, adapter_names=NAMES).logits
    assert_close_relative(actual, expected)
    # The adapters must matter, or the comparison above proves nothing.
    with model.disable_adapter():
        base = model(**batch).logits
    assert (expected - base).abs().amax(dim=(1, 2))[[0, 1, 3]].min() > 1e-3


@pytest.mark.parametrize("architecture", tiny.ARCHITECTURES)
@torch.no_grad()
def test_logits_match_per_adapter_runs(architecture, adapter_dirs):
    model = load(architecture, adapter_dirs)
    batch = tiny.random_prompts(len(NAMES), 7, seed=int(torch.randint(0, 1000, ())))
    expected = per_adapter_logits(model, batch, NAMES)
    patch_model(model, backend="torch")
    actual = model(**batch, adapter_names=NAMES).logits
    # Single-row runs see different padding layouts only through the mask, so compare unmasked positions.
    mask = batch["attention_mask"].bool()
    assert_close_relative(actual[mask], expected[mask])


@pytest.mark.parametrize("architecture,backend", BACKEND_CASES)
@torch.no_grad()
def test_greedy_generate_matches_peft(architecture, backend, adapter_dirs):
    model = load(architecture, adapter_dirs)
    batch = tiny.random_prompts(len(NAMES), 6, seed=int(torch.randint(0, 1000, ())))
    kwargs = {"max_new_tokens": 8 if backend == "torch" else 3, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(**batch, adapter_names=NAMES, **kwargs)
    patch_model(model, backend=backend)
    actual = model.generate(**batch, adapter_names=NAMES, **kwargs)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreted)])
@torch.no_grad()
def test_greedy_generate_opt_matches_per_adapter(backend, adapter_dirs):
    """OPT flattens [B, S, H] to [B*S, H] before fc1/fc2, where PEFT's mixed batch raises; the plan serves it per
    token. Each row must equal a batch-of-one run with that row's adapter active."""
    model = load("opt", adapter_dirs)
    names = ["a", "__base__", "b", "c"]
    batch = tiny.random_prompts(len(names), 5, seed=int(torch.randint(0, 1000, ())), left_padding=False)
    batch["attention_mask"][:] = 1
    kwargs = {"max_new_tokens": 6 if backend == "torch" else 3, "do_sample": False, "pad_token_id": 0}
    expected = []
    for row, name in enumerate(names):
        single = {key: value[row : row + 1] for key, value in batch.items()}
        if name == "__base__":
            with model.disable_adapter():
                expected.append(model.generate(**single, **kwargs))
        else:
            model.set_adapter(name)
            expected.append(model.generate(**single, **kwargs))
    patch_model(model, backend=backend)
    actual = model.generate(**batch, adapter_names=names, **kwargs)
    assert torch.equal(actual, torch.cat(expected))


@torch.no_grad()
def test_beam_search_matches_peft(adapter_dirs):
    model = load("llama", adapter_dirs)
    names = ["c", "__base__", "a"]
    batch = tiny.random_prompts(len(names), 5, seed=int(torch.randint(0, 1000, ())))
    kwargs = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(**batch, adapter_names=names, **kwargs)
    patch_model(model)
    actual = model.generate(**batch, adapter_names=names, **kwargs)
    mismatches = (actual != expected).nonzero().tolist()
    assert not mismatches, f"first mismatching (row, position): {mismatches[:4]}"


@torch.no_grad()
def test_num_return_sequences_rows_keep_their_adapter(adapter_dirs):
    """PEFT raises a length error here; patched, each returned sequence uses the adapter of its input row. The
    oracle is PEFT on the inputs and names expanded by hand, sampled with the same seed."""
    model = load("llama", adapter_dirs)
    names = ["b", "__base__", "c"]
    copies = 2
    batch = tiny.random_prompts(len(names), 5, seed=int(torch.randint(0, 1000, ())))
    kwargs = {"max_new_tokens": 6, "do_sample": True, "top_k": 0, "pad_token_id": 0}
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model.generate(**batch, adapter_names=names, num_return_sequences=copies, **kwargs)
    # PEFT leaves its hooks registered after that error, so the oracle needs a fresh model.
    model = load("llama", adapter_dirs)
    expanded = {key: value.repeat_interleave(copies, dim=0) for key, value in batch.items()}
    torch.manual_seed(1234)
    expected = model.generate(**expanded, adapter_names=[n for n in names for _ in range(copies)], **kwargs)
    patch_model(model)
    torch.manual_seed(1234)
    actual = model.generate(**batch, adapter_names=names, num_return_sequences=copies, **kwargs)
    assert torch.equal(actual, expected)


@torch.no_grad()
def test_sampling_with_fixed_seed_matches_peft(adapter_dirs):
    model = load("gpt2", adapter_dirs)
    batch = tiny.random_prompts(len(NAMES), 5, seed=int(torch.randint(0, 1000, ())))
    kwargs = {"max_new_tokens": 6, "do_sample": True, "top_k": 20, "pad_token_id": 0}
    torch.manual_seed(99)
    expected = model.generate(**batch, adapter_names=NAMES, **kwargs)
    patch_model(model)
    torch.manual_seed(99)
    actual = model.generate(**batch, adapter_names=NAMES, **kwargs)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("names", [["__base__"] * 3, ["b"]], ids=["all_base", "batch_of_one"])
@torch.no_grad()
def test_all_base_and_single_row(names, adapter_dirs):
    model = load("phi3", adapter_dirs)
    batch = tiny.random_prompts(len(names), 6, seed=int(torch.randint(0, 1000, ())))
    expected = model(**batch, adapter_names=names).logits
    patch_model(model)
    assert_close_relative(model(**batch, adapter_names=names).logits, expected)


@torch.no_grad()
def test_modules_to_save_in_mixed_batch(tmp_path):
    base = tiny.build_base_model("llama")
    tiny.save_adapter(base, tmp_path / "x", seed=5, r=4, modules_to_save=["lm_head"])
    tiny.save_adapter(base, tmp_path / "y", seed=6, r=8, modules_to_save=["lm_head"])
    model = tiny.load_peft_model(tiny.build_base_model("llama"), {"x": tmp_path / "x", "y": tmp_path / "y"})
    names = ["y", "x", "__base__", "y"]
    batch = tiny.random_prompts(len(names), 6, seed=7)
    expected = model(**batch, adapter_names=names).logits
    patch_model(model)
    assert_close_relative(model(**batch, adapter_names=names).logits, expected)
    unpatch_model(model)
    assert_close_relative(model(**batch, adapter_names=names).logits, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_greedy_tokens_on_gpu(backend, tmp_path):
    """Greedy tokens equal PEFT's on the GPU, fp32 (greedy-token equality is an oracle in fp32 only)."""
    model, names, batch = gpu_test_model(torch.float32, tmp_path)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(**batch, adapter_names=names, **kwargs)
    patch_model(model)
    assert type(model.base_model._fastlora_state.backend).__name__ == "TritonBackend"  # auto picks Triton on CUDA
    patch_model(model, backend=backend)
    actual = model.generate(**batch, adapter_names=names, **kwargs)
    mismatches = (actual != expected).nonzero().tolist()
    assert not mismatches, f"first mismatching (row, position): {mismatches[:4]}"


ADAPTER_DTYPES = pytest.mark.parametrize("autocast_adapter_dtype", [True, False], ids=["fp32_adapters", "model_dtype"])


def check_low_precision(dtype, autocast_adapter_dtype, backend, tmp_path, device, rows, length) -> dict:
    model, names, _ = gpu_test_model(dtype, tmp_path, autocast_adapter_dtype, device=device)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["a"].weight.dtype == (torch.float32 if autocast_adapter_dtype else dtype)
    batch, names = oracle_batch(names, device, rows, length)
    return assert_no_worse_than_peft(model, batch, names, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@ADAPTER_DTYPES
def test_low_precision_no_worse_than_peft_on_gpu(dtype, autocast_adapter_dtype, backend, tmp_path):
    """bf16/fp16 (the wider model of gpu_test_model): against an fp32 copy of the model and adapters, ours' logits
    are no worse than PEFT's own mixed batch (DESIGN §6), over 128 rows x 256 tokens. Greedy tokens of two bf16
    computations are not an oracle: they differ from each other more than either differs from fp32."""
    check_low_precision(dtype, autocast_adapter_dtype, backend, tmp_path, "cuda", 128, 256)


@ADAPTER_DTYPES
@torch.no_grad()
def test_low_precision_bar_on_cpu(autocast_adapter_dtype, tmp_path):
    """The GPU test's comparison on CPU (bf16 matmuls, torch backend, a smaller batch), for its logic."""
    stats = check_low_precision(torch.bfloat16, autocast_adapter_dtype, "torch", tmp_path, "cpu", 8, 16)
    assert 0 < stats["peft"][0] < 0.2, stats  # bf16 really differs from the fp32 oracle, and not wildly


def test_low_precision_bar_catches_a_worse_result():
    """The bar fails logits worse than PEFT's: a dropped LoRA delta, or more noise than PEFT's."""
    oracle = torch.randn(4, 6, 32)
    peft = oracle + 0.01 * torch.randn_like(oracle)
    # Nine tenths of PEFT's own deviation passes, whatever the draw: each logit difference is linear along the way
    # from the oracle to PEFT, so no argmax that PEFT keeps can flip (independent noise flipped a near-tie on CI).
    assert_no_worse_than_peft_logits(oracle + 0.9 * (peft - oracle), peft, oracle)
    with pytest.raises(AssertionError, match="error above"):
        assert_no_worse_than_peft_logits(oracle + 0.02 * torch.randn_like(oracle), peft, oracle)
    swapped = oracle.clone()
    swapped[..., :2] = swapped[..., :2].flip(-1) + 100  # every argmax moves to column 0 or 1 (and the error grows)
    with pytest.raises(AssertionError):
        assert_no_worse_than_peft_logits(swapped, peft, oracle)
    mask = torch.ones(4, 6)
    mask[:, :3] = 0
    stats = assert_no_worse_than_peft_logits(peft, peft, oracle, mask)
    assert stats["ours"] == stats["peft"]
