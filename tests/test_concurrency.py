"""Several threads calling ``generate`` on one patched model at once: each gets exactly its own rows' results."""

from __future__ import annotations

import pytest
import torch
from helpers import load, run_at_once

from peft_fastlora import patch_model, tiny

ASSIGNMENTS = [["a", "b", "__base__", "c"], ["c", "c", "a", "a"], ["b", "__base__", "b", "a"], None]
"""Per thread; None is a call without adapter_names (the active adapter), which must not see another call's plan."""


def call(model, batch, names):
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    if names is None:
        return model.generate(**batch, **kwargs)
    return model.generate(**batch, adapter_names=names, **kwargs)


@pytest.mark.parametrize("native", [False, True], ids=["PeftModel", "transformers"])
@torch.no_grad()
def test_concurrent_generate_gets_own_rows(native, adapter_dirs):
    if native:
        model = tiny.build_base_model("llama")
        for name in ("a", "b", "c"):
            model.load_adapter(str(adapter_dirs["llama"][name]), adapter_name=name)
        model.set_adapter("a")
    else:
        model = load("llama", adapter_dirs)
    model = patch_model(model.eval(), backend="torch")
    batches = [tiny.random_prompts(4, 6, seed=seed) for seed in range(len(ASSIGNMENTS))]
    expected = [call(model, batch, names) for batch, names in zip(batches, ASSIGNMENTS, strict=True)]
    rounds = 5
    results = run_at_once(lambda index: call(model, batches[index], ASSIGNMENTS[index]), len(ASSIGNMENTS), rounds)
    for index, outputs in results.items():
        assert len(outputs) == rounds
        for output in outputs:
            assert torch.equal(output, expected[index]), f"thread {index} ({ASSIGNMENTS[index]}) got other rows"
    assert model.base_model._fastlora_state.plan is None if not native else model._fastlora_state.plan is None
