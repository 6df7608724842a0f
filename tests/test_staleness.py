"""Adapters that change between calls are served with their new weights: a deleted and re-added adapter is never
served stale, even where the allocator hands the new tensors the freed storage."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_relative
from peft import LoraConfig, get_peft_model

from peft_fastlora import patch_model, tiny


def _config(rank: int) -> LoraConfig:
    targets = tiny.TARGET_MODULES["llama"]
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)


@pytest.mark.parametrize("ranks", [(8, 8), (8, 4, 16)], ids=["same_rank", "other_ranks"])
@torch.no_grad()
def test_delete_and_re_add_is_never_stale(ranks):
    torch.manual_seed(0)
    model = get_peft_model(tiny.build_base_model("llama"), _config(4), adapter_name="keep").eval()
    model.add_adapter("churn", _config(ranks[0]))
    oracle = copy.deepcopy(model)
    patch_model(model, backend="torch")
    names = ["churn", "keep", "__base__", "churn"]
    batch = tiny.random_prompts(len(names), 5, seed=2)
    cycles = 100 if len(set(ranks)) == 1 else 24
    for cycle in range(cycles):
        rank = ranks[cycle % len(ranks)]
        for peft_model in (model, oracle):
            peft_model.delete_adapter("churn")
            torch.manual_seed(1000 + cycle)
            peft_model.add_adapter("churn", _config(rank))
            peft_model.eval()
        (
            assert_close_relative(
                model(**batch, adapter_names=names).logits, oracle(**batch, adapter_names=names).logits
            ),
            cycle,
        )
