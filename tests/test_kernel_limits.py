"""Limits the kernels must not have: any rank PEFT accepts (sibling stacks too), any token count that fits in
memory, and no activation kept alive past its layer."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import assert_close_relative, interpreted
from peft import LoraConfig, get_peft_model
from test_kernels import adapters_of, check, random_packed

from peft_fastlora import patch_model, tiny
from peft_fastlora.backends.triton import TritonBackend
from peft_fastlora.kernels.reference import lora_delta_reference
from peft_fastlora.plan import BatchPlan


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ranks_up_to_256_interpreted(dtype):
    check(5, 1, "distinct", dtype, "cpu", k=40, n=24, ranks=[256, 4, 130, 65])
    check(2, 3, "uniform", dtype, "cpu", k=40, n=24, ranks=[200, 1])


def _llama_with_large_ranks() -> torch.nn.Module:
    """A tiny Llama with q/k/v adapters of ranks 128 and 256 (stacked: 384 and 768 rows per slot) beside rank 4."""
    base = tiny.build_base_model("llama")
    model = get_peft_model(
        base, LoraConfig(r=256, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    )
    qkv = ["q_proj", "k_proj", "v_proj"]
    model.add_adapter("r128", LoraConfig(r=128, target_modules=qkv, init_lora_weights=False))
    model.add_adapter("r4", LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model.eval()


@interpreted
@torch.no_grad()
def test_sibling_stack_of_rank_256_matches_peft_interpreted():
    model = _llama_with_large_ranks()
    names = ["default", "r128", "__base__", "r4", "default"]
    batch = tiny.random_prompts(len(names), 4, seed=int(torch.randint(0, 1000, ())))
    expected = model(**batch, adapter_names=names).logits
    patch_model(model, backend="triton")
    assert any(group.max_rank == 768 for group in model.base_model._fastlora_state.bank.groups)
    assert_close_relative(model(**batch, adapter_names=names).logits, expected)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreted)])
@torch.no_grad()
def test_no_activation_outlives_its_layer(backend):
    """A decoder layer's normed inputs (what q/k/v and gate/up read) are free by the time the next layer starts,
    as in PEFT: nothing of the patch keeps them alive until the call ends."""
    model = _llama_with_large_ranks()
    patch_model(model, backend=backend)
    layers = model.base_model.model.model.layers
    normed: list[weakref.ref] = []
    alive_at_next_layer: list[int] = []

    def keep_weak(module, args, output):
        normed.append(weakref.ref(output))

    def count_alive(module, args):
        gc.collect()
        alive_at_next_layer.append(sum(ref() is not None for ref in normed))

    for norm in (layers[0].input_layernorm, layers[0].post_attention_layernorm):
        norm.register_forward_hook(keep_weak)
    layers[1].register_forward_pre_hook(count_alive)
    batch = tiny.random_prompts(3, 6, seed=1)
    model(**batch, adapter_names=["default", "r128", "r4"])
    assert len(normed) == 2
    assert alive_at_next_layer == [0]


@pytest.mark.gpu
@torch.no_grad()
def test_more_than_2_to_the_31_elements_gpu():
    """One layer-sized LoRA (4096 → 14336) over 163,840 tokens in one call (tokens × out passes 2³¹), and an
    lm_head-sized one (4096 → 128256) over 20,480 tokens, against the fp32 reference on sampled tokens."""
    for rows, tokens_per_row, n in ((40, 4096, 14336), (5, 4096, 128256)):
        k, dtype, ranks = 4096, torch.bfloat16, [16, 8, 64, 16]
        packed = random_packed(ranks, k, n, dtype, "cuda")
        slots = [row % (len(ranks) + 1) - 1 for row in range(rows)]  # every adapter and __base__ rows
        plan = BatchPlan("cuda")
        plan.fill(slots)
        x = torch.randn(rows, tokens_per_row, k, device="cuda", dtype=dtype)
        y = torch.randn(rows, tokens_per_row, n, device="cuda", dtype=dtype)
        sample = torch.randint(0, rows * tokens_per_row, (256,), device="cuda")
        sample[-1] = rows * tokens_per_row - 1  # the last token: the one whose offsets are largest
        y_before = y.view(-1, n)[sample].clone()
        TritonBackend().add_lora(y, x, packed, plan.view(rows, flattened=False))
        token_slots = [slots[int(token) // tokens_per_row] for token in sample]
        expected = lora_delta_reference(
            y_before.float(), x.view(-1, k)[sample].float(), adapters_of(packed), token_slots,
        )  # fmt: skip
        error = (y.view(-1, n)[sample].float() - expected).abs().max() / expected.abs().max()
        assert error <= 2e-2, (n, error.item())
        del x, y
        torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_large_ranks_at_real_sizes_gpu(dtype):
    """Ranks up to 256 alone and stacked as q/k/v siblings are (384, 768 rows per slot): a 512-wide rank tile once
    asked for more shared memory than the GPU has. fp32 adapters too (PEFT's default dtype)."""
    ranks = [8, 16, 256, 768, 384, 4, 128, 1]
    check(32, 1, "distinct", dtype, "cuda", k=4096, n=4096, ranks=ranks)
    check(4, 64, "uniform", dtype, "cuda", k=4096, n=14336, ranks=ranks)


@pytest.mark.gpu
@torch.no_grad()
def test_direct_launches_follow_triton_specialisation_gpu():
    """Launches after the first skip Triton's argument binding and reuse the compiled kernel: only for arguments
    Triton compiles alike. Inputs that alternate between aligned and misaligned pointers and strides divisible by 16
    or not must each give the right answer (a kernel compiled for aligned loads would read the wrong bytes)."""
    rows, k, n, dtype, ranks = 16, 4096, 1024, torch.bfloat16, [16, 8, 32]
    packed = random_packed(ranks, k, n, dtype, "cuda")
    slots = [row % (len(ranks) + 1) - 1 for row in range(rows)]
    plan = BatchPlan("cuda")
    plan.fill(slots)
    view = plan.view(rows, flattened=False)
    for offset, pad in ((0, 0), (1, 0), (0, 3), (0, 0), (5, 8), (1, 0)):
        storage = torch.randn(offset + rows * (k + pad), device="cuda").to(dtype)
        x = storage[offset:].as_strided((rows, 1, k), (k + pad, k + pad, 1))
        y = torch.randn(rows, 1, n, device="cuda", dtype=dtype)
        expected = lora_delta_reference(
            y.view(rows, n).float(), x.reshape(rows, k).float(), adapters_of(packed), slots,
        )  # fmt: skip
        TritonBackend().add_lora(y, x, packed, view)
        error = (y.view(rows, n).float() - expected).abs().max() / expected.abs().max()
        assert error <= 2e-2, (offset, pad, error.item())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreted)])
@torch.no_grad()
def test_out_of_memory_mid_call_leaves_the_model_working(backend, monkeypatch):
    """An allocation that fails halfway through a mixed call raises torch's OutOfMemoryError unchanged, and the
    next call gives the right answer: plan, bank, sibling groups and the lock are not left half-written."""
    from peft_fastlora.kernels import launch

    model = _llama_with_large_ranks()
    names = ["r4", "default", "__base__", "r128"]
    batch = tiny.random_prompts(len(names), 5, seed=3)
    expected = model(**batch, adapter_names=names).logits
    patch_model(model, backend=backend)
    model(**batch, adapter_names=names)  # warm: packed, planned
    calls = {"count": 0}
    real_empty, real_matmul = launch.scratch_empty, torch.Tensor.__matmul__

    def failing(real):
        def allocate(*args, **kwargs):
            calls["count"] += 1
            if calls["count"] == 5:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return real(*args, **kwargs)

        return allocate

    if backend == "triton":
        monkeypatch.setattr(launch, "scratch_empty", failing(real_empty))
    else:
        monkeypatch.setattr(torch.Tensor, "__matmul__", failing(real_matmul))
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        model(**batch, adapter_names=names)
    monkeypatch.undo()
    state = model.base_model._fastlora_state
    assert state.plan is None and not state.plan_buffers.shrinks
    assert state.lock.acquire(blocking=False)
    state.lock.release()
    assert_close_relative(model(**batch, adapter_names=names).logits, expected)
    smaller = {key: value[:2] for key, value in batch.items()}
    assert_close_relative(model(**smaller, adapter_names=names[:2]).logits, expected[:2])


def test_specialisation_key_separates_what_triton_compiles_apart():
    """The direct launch path reuses a compiled kernel only under an equal key: ints that are 1, divisible by 16
    or past 32 bits, tensors of another dtype or alignment, each key apart; other argument types are refused."""
    from peft_fastlora.kernels.launch import _specialization

    assert _specialization(1) != _specialization(2) != _specialization(16)
    assert _specialization(32) == _specialization(16) and _specialization(3) == _specialization(5)
    assert _specialization(2**31) != _specialization(2**31 - 16)
    storage = torch.zeros(64, dtype=torch.float16)
    assert _specialization(storage) != _specialization(storage[1:]) != _specialization(storage.float())
    for value in (True, 1.0, None):
        with pytest.raises(TypeError):
            _specialization(value)
