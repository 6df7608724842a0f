"""Models split over devices (accelerate's ``device_map``): every layer reads the plan on its own device."""

from __future__ import annotations

import pytest
import torch
from helpers import load

from peft_fastlora import patch_model, tiny
from peft_fastlora.plan import BatchPlan


def test_plan_views_live_on_the_asking_device():
    """The meta device stands in for a second device on a CPU-only machine."""
    plan = BatchPlan("cpu")
    plan.fill([1, -1, 0, 1], expand=1)
    here = plan.view(4, flattened=False, tokens_per_row=3)  # a [4, 3, H] input: S = 3 (see BatchPlan.view)
    there = plan.view(4, flattened=False, device=torch.device("meta"))
    assert here.row_slots.device.type == "cpu" and there.row_slots.device.type == "meta"
    assert all(tensor.device.type == "meta" for tensor in there.segments)
    assert there.groups == here.groups and there.sorted_rows.shape == here.sorted_rows.shape
    tokens = plan.view(12, flattened=True, device=torch.device("meta"))
    assert tokens.row_slots.device.type == "meta" and tokens.row_slots.shape == (12,)
    assert plan.view(4, flattened=False, device=torch.device("meta")) is there  # one copy per call and device


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_split_over_two_gpus_matches_peft(backend, adapter_dirs):
    """Embeddings and layer 0 on cuda:0, layer 1, the norm and lm_head on cuda:1 (a device_map as accelerate
    writes it); greedy tokens equal PEFT's own mixed batch on the same split model."""
    from accelerate import dispatch_model

    model = load("llama", adapter_dirs)
    device_map = {
        "base_model.model.model.embed_tokens": 0, "base_model.model.model.layers.0": 0,
        "base_model.model.model.layers.1": 1, "base_model.model.model.norm": 1,
        "base_model.model.model.rotary_emb": 1, "base_model.model.lm_head": 1,
    }  # fmt: skip
    model = dispatch_model(model, device_map=device_map)
    names = ["a", "b", "__base__", "c", "a", "b"]
    batch = {key: value.to("cuda:0") for key, value in tiny.random_prompts(len(names), 7, seed=3).items()}
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(**batch, adapter_names=names, **kwargs)
    patch_model(model, backend=backend)
    layer1 = model.base_model.model.model.layers[1].self_attn.q_proj
    assert layer1._fastlora_packed.a.device == torch.device("cuda:1")
    assert torch.equal(model.generate(**batch, adapter_names=names, **kwargs), expected)
