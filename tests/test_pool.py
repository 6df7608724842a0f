"""The GPU adapter pool (``patch_model(..., max_gpu_adapters=K)``): its bookkeeping, and its output against
unpatched PEFT after many swaps, edits, additions and deletions.

On a CPU the "GPU" slots are CPU tensors too, so every copy, eviction and metadata refill runs as it does on a
GPU; only the page-locking and the asynchronous copies are the GPU tests' (``test_pool_on_gpu``).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from helpers import (
    assert_close_relative,
    assert_no_worse_than_peft_logits,
    fp32_oracle,
    gpu_test_model,
    interpreted,
    oracle_batch,
)
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from test_compile import compilations, compiled_kwargs, generated_vs_oracle
from torch._dynamo.utils import counters

from peft_fastlora import patch_model, tiny, unpatch_model
from peft_fastlora.host_memory import device_view, host_empty

BACKENDS = ["torch", pytest.param("triton", marks=interpreted)]
TARGETS = [*tiny.TARGET_MODULES["llama"], "embed_tokens", "lm_head"]


def _config(rank: int, **extra) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False, **extra)


def pooled_and_oracle(backend: str, capacity: int = 3, adapters: int = 6, seed: int = 0, rank: int | None = None):
    """``(patched model with a pool of capacity, unpatched oracle, batch of 4 rows)``; adapters a0.. have ranks
    2, 4, 6, ... (the pool's slots are sized for the largest), or all ``rank``."""
    torch.manual_seed(seed)
    model = get_peft_model(tiny.build_base_model("llama", seed=seed), _config(rank or 2), adapter_name="a0").eval()
    for index in range(1, adapters):
        model.add_adapter(f"a{index}", _config(rank or 2 + 2 * index))
    oracle = copy.deepcopy(model)
    patch_model(model, backend=backend, max_gpu_adapters=capacity)
    return model, oracle, tiny.random_prompts(4, 6, seed=seed + 1)


def pool_of(model):
    return model.base_model._fastlora_state.bank.pool


@torch.no_grad()
def assert_matches(model, oracle, batch, names) -> None:
    assert_close_relative(model(**batch, adapter_names=names).logits, oracle(**batch, adapter_names=names).logits)


@pytest.mark.parametrize("rank", [None, 8], ids=["ranks-2-to-12", "rank-8"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_swaps_match_peft(backend, rank):
    """Batches drawn at random from 6 adapters through 3 GPU slots: every call matches unpatched PEFT. Adapters
    of one rank take the copies' fast path (source views kept per adapter), the others the general one."""
    model, oracle, batch = pooled_and_oracle(backend, rank=rank)
    rng = random.Random(int(torch.randint(0, 1000, ())))
    calls = 12 if backend == "torch" else 4
    for _ in range(calls):
        chosen = rng.sample([f"a{i}" for i in range(6)], 3)
        names = [rng.choice([*chosen, "__base__"]) for _ in range(4)]
        assert_matches(model, oracle, batch, names)
    pool = pool_of(model)
    assert pool.stats["misses"] > 3, "the calls never swapped"
    assert len(pool.resident) <= 3
    fast = [full is not None for full in pool._full_sources.values()]
    assert (fast and all(fast)) if rank else fast.count(True) <= 1  # (a5, rank 12, is the only one at every cap)


def test_greedy_generate_matches_peft():
    model, oracle, batch = pooled_and_oracle("torch")
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        for names in (["a0", "a1", "a2", "__base__"], ["a3", "a4", "a5", "a3"], ["a5", "a0", "a0", "a1"]):
            expected = oracle.generate(**batch, adapter_names=names, **kwargs)
            assert torch.equal(model.generate(**batch, adapter_names=names, **kwargs), expected), names


@torch.no_grad()
def test_least_recently_used_is_evicted():
    model, oracle, batch = pooled_and_oracle("torch")
    pool = pool_of(model)
    assert_matches(model, oracle, batch, ["a0", "a1", "a2", "a0"])
    assert_matches(model, oracle, batch, ["a1", "a1", "__base__", "a1"])  # a1 is now the most recent
    assert list(pool.resident) == ["a0", "a2", "a1"]
    slot_of_a0 = pool.resident["a0"]
    assert_matches(model, oracle, batch, ["a3", "a3", "a3", "a3"])  # evicts a0, the least recent
    assert list(pool.resident) == ["a2", "a1", "a3"]
    assert pool.resident["a3"] == slot_of_a0
    misses = pool.stats["misses"]
    assert_matches(model, oracle, batch, ["a2", "a1", "a3", "__base__"])  # all resident: no copy
    assert pool.stats["misses"] == misses


@torch.no_grad()
def test_too_many_adapters_in_one_batch_raise_and_change_nothing():
    model, oracle, batch = pooled_and_oracle("torch")
    pool = pool_of(model)
    assert_matches(model, oracle, batch, ["a0", "a1", "a2", "a0"])
    resident, stats = dict(pool.resident), dict(pool.stats)
    with pytest.raises(ValueError, match=r"names 4 distinct adapters, more than max_gpu_adapters=3"):
        model(**batch, adapter_names=["a3", "a4", "a5", "a0"])
    assert dict(pool.resident) == resident and pool.stats == stats
    assert_matches(model, oracle, batch, ["a3", "a4", "a5", "__base__"])  # and the model still works


@torch.no_grad()
def test_slots_in_use_by_a_call_in_flight_are_not_evicted():
    """A call holds its GPU slots until it ends (another thread's call must not overwrite them mid-forward)."""
    model, oracle, batch = pooled_and_oracle("torch")
    bank = model.base_model._fastlora_state.bank
    held = bank.slot_ids(["a0", "a1", "a2"])  # as a call in flight on another thread holds them
    with pytest.raises(ValueError, match="the GPU slots are held by calls in flight"):
        model(**batch, adapter_names=["a3", "a3", "a3", "a3"])
    bank.release_slots(held)
    assert_matches(model, oracle, batch, ["a3", "a3", "a3", "a3"])


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_swaps_while_adapters_are_added_and_deleted(backend):
    model, oracle, batch = pooled_and_oracle(backend, adapters=4)
    assert_matches(model, oracle, batch, ["a0", "a1", "a2", "__base__"])
    for twin in (model, oracle):
        torch.manual_seed(11)
        twin.add_adapter("new", _config(12))  # a larger rank than any slot holds so far
        twin.delete_adapter("a1")
    assert_matches(model, oracle, batch, ["new", "a3", "a0", "new"])
    assert_matches(model, oracle, batch, ["a2", "new", "__base__", "a3"])
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(**batch, adapter_names=["a1", "a0", "a0", "a0"])
    assert "a1" not in pool_of(model).resident


@torch.no_grad()
def test_a_new_adapter_in_a_deleted_ones_place_is_copied_anew():
    """Adapters of one rank (the copies' fast path keeps each one's source views): an adapter deleted, then a new one
    of the same rank added, which may take its place in the storage, is served with its own weights."""
    model, oracle, batch = pooled_and_oracle("torch", capacity=2, adapters=3, rank=4)
    assert_matches(model, oracle, batch, ["a0", "a1", "__base__", "a1"])
    assert_matches(model, oracle, batch, ["a2", "a0", "a2", "a0"])
    for twin in (model, oracle):
        twin.delete_adapter("a1")
        torch.manual_seed(12)
        twin.add_adapter("new", _config(4))
    assert_matches(model, oracle, batch, ["new", "a2", "new", "__base__"])
    assert_matches(model, oracle, batch, ["a0", "new", "a0", "a0"])


def _edit_b(models, name: str, edit) -> None:
    """Apply ``edit(weight, fresh)`` to adapter ``name``'s lora_B in every Linear layer of both models alike."""
    pairs = zip(*([m for m in model.modules() if isinstance(m, LoraLayer)] for model in models), strict=True)
    for layers in pairs:
        if name in layers[0].lora_B:
            fresh = torch.randn_like(layers[0].lora_B[name].weight)
            for layer in layers:
                edit(layer.lora_B[name].weight, fresh)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda weight, fresh: weight.copy_(fresh), id="copy_"),
        pytest.param(lambda weight, fresh: weight.data.copy_(fresh), id="data.copy_"),
        pytest.param(lambda weight, fresh: weight.detach().mul_(0).add_(fresh), id="detach().add_"),
    ],
)
@torch.no_grad()
def test_in_place_edits_of_a_resident_adapter_are_seen(edit):
    """The host storage is the truth: an adapter edited in place while resident is copied in again."""
    model, oracle, batch = pooled_and_oracle("torch")
    assert_matches(model, oracle, batch, ["a0", "a1", "a2", "a0"])
    _edit_b([model, oracle], "a1", edit)
    assert_matches(model, oracle, batch, ["a1", "a0", "a1", "__base__"])


@torch.no_grad()
def test_a_bias_given_to_a_resident_adapter_sends_it_to_peft():
    """``lora_B[name].bias = ...`` on a pooled adapter makes it a lora_bias adapter: the next call leaves it to
    PEFT's path, from tensors of its own on the layer's device (PEFT cannot read the host storage)."""
    model, oracle, batch = pooled_and_oracle("torch")
    assert_matches(model, oracle, batch, ["a0", "a1", "a2", "a0"])
    generator = torch.Generator().manual_seed(3)
    pairs = zip(*([m for m in twin.modules() if isinstance(m, LoraLayer)] for twin in (model, oracle)), strict=True)
    for ours, theirs in pairs:
        if "a1" in ours.lora_B:
            bias = torch.randn(ours.out_features, generator=generator)
            ours.lora_B["a1"].bias = torch.nn.Parameter(bias.clone())
            theirs.lora_B["a1"].bias = torch.nn.Parameter(bias.clone())
    with pytest.warns(UserWarning, match="'a1' \\(lora_bias\\)"):
        assert_matches(model, oracle, batch, ["a1", "a0", "a1", "__base__"])
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["a1"].weight
    assert type(weight) is torch.nn.Parameter  # its own tensor again, no longer a view of the host storage
    assert_matches(model, oracle, batch, ["a2", "a1", "a3", "a1"])


@torch.no_grad()
def test_set_scale_of_a_resident_adapter_is_seen():
    model, oracle, batch = pooled_and_oracle("torch")
    assert_matches(model, oracle, batch, ["a0", "a1", "a2", "a0"])
    for twin in (model, oracle):
        for module in twin.modules():
            if isinstance(module, LoraLayer) and "a1" in module.scaling:
                module.set_scale("a1", 0.3)
    assert_matches(model, oracle, batch, ["a1", "a0", "a1", "__base__"])


@torch.no_grad()
def test_weights_live_in_host_storage_and_the_pool_holds_copies():
    model, _, batch = pooled_and_oracle("torch")
    model(**batch, adapter_names=["a0", "a1", "a2", "a0"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    stored = layer.lora_A["a1"].weight
    host = model.base_model._fastlora_state.bank._units
    host_packs = [pack for unit in host.values() for pack in unit.packs if layer in unit.layers]
    host_a = host_packs[0].a
    assert host_a.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()  # a view of the host storage
    pooled = layer._fastlora_packed
    assert pooled.a.untyped_storage().data_ptr() != host_a.untyped_storage().data_ptr()
    assert pooled.num_slots == 3


@torch.no_grad()
def test_plain_call_serves_the_active_adapter():
    """PEFT's own forward cannot read weights kept in host memory: a call without adapter_names is served through
    the pool with the active adapter on every row, as PEFT would serve it."""
    model, oracle, batch = pooled_and_oracle("torch")
    for twin in (model, oracle):
        twin.set_adapter("a4")
    assert_close_relative(model(**batch).logits, oracle(**batch).logits)
    assert "a4" in pool_of(model).resident
    with model.disable_adapter(), oracle.disable_adapter():
        assert_close_relative(model(**batch).logits, oracle(**batch).logits)
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(**batch, **kwargs), oracle.generate(**batch, **kwargs))


@torch.no_grad()
def test_unpatch_and_copies_of_a_pooled_model():
    model, oracle, batch = pooled_and_oracle("torch")
    names = ["a0", "a4", "a2", "__base__"]
    assert_matches(model, oracle, batch, names)
    twin = copy.deepcopy(model)  # re-patches itself, with the pool, on its first call
    assert_matches(twin, oracle, batch, ["a5", "a4", "a3", "a5"])
    assert twin.base_model._fastlora_state.bank.pool.capacity == 3
    unpatch_model(model)
    assert_matches(model, oracle, batch, names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                weight = module.lora_A[name].weight
                assert type(weight) is torch.nn.Parameter and weight.is_contiguous()


@torch.no_grad()
def test_unpatching_an_unused_copy_of_a_pooled_model():
    """A copy made from a pooled model holds its adapters in host memory until its first call re-patches it;
    unpatched before that, its adapters go back to their layers' device, as the original's do."""
    model, oracle, batch = pooled_and_oracle("torch")
    assert_matches(model, oracle, batch, ["a0", "a1", "a2", "a0"])
    twin = unpatch_model(copy.deepcopy(model))
    assert "_fastlora_state" not in twin.base_model.__dict__
    assert_matches(twin, oracle, batch, ["a3", "a4", "a5", "a3"])
    weight = twin.base_model.model.model.layers[0].self_attn.q_proj.lora_A["a3"].weight
    assert type(weight) is torch.nn.Parameter and weight.device == torch.device("cpu")


def test_repatch_with_another_pool_size():
    model, oracle, batch = pooled_and_oracle("torch")
    assert_matches(model, oracle, batch, ["a0", "a1", "a2", "a0"])
    patch_model(model, backend="torch", max_gpu_adapters=5)
    assert_matches(model, oracle, batch, ["a3", "a4", "a5", "a0"])
    assert pool_of(model).capacity == 5
    patch_model(model, backend="torch")  # no pool
    assert pool_of(model) is None
    assert_matches(model, oracle, batch, ["a5", "a4", "a3", "a1"])


@torch.no_grad()
def test_plain_forward_of_a_causal_lm_model():
    """``PeftModelForCausalLM.forward`` keeps ``input_ids`` to itself, so the pool serves its plain call with a plan
    that takes any number of rows (``BatchPlan.fill_uniform``)."""
    torch.manual_seed(0)
    config = _config(2, task_type="CAUSAL_LM")
    model = get_peft_model(tiny.build_base_model("llama"), config, adapter_name="a0").eval()
    model.add_adapter("a1", _config(6, task_type="CAUSAL_LM"))
    oracle = copy.deepcopy(model)
    patch_model(model, backend="torch", max_gpu_adapters=1)
    batch = tiny.random_prompts(3, 5, seed=2)
    for name in ("a1", "a0"):
        for twin in (model, oracle):
            twin.set_adapter(name)
        assert_close_relative(model(**batch).logits, oracle(**batch).logits)
        assert list(pool_of(model).resident) == [name]  # served by the pool, not PEFT's path on host weights
    assert_close_relative(
        model(input_ids=batch["input_ids"][:1]).logits, oracle(input_ids=batch["input_ids"][:1]).logits
    )


def test_training_and_gradients_are_refused_under_a_pool():
    """The adapters' weights are in host memory: what would need PEFT's path with autograd raises a clear error."""
    model, _, batch = pooled_and_oracle("torch")
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # as PeftModel.from_pretrained leaves them (is_trainable=False)
    model(**batch, adapter_names=["a0", "a1", "a1", "__base__"])  # grad mode on, but nothing requires grad: served
    model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["a0"].weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="a forward that records gradients cannot use them"):
        model(**batch, adapter_names=["a0", "a1", "a1", "__base__"])
    model.train()
    with pytest.raises(RuntimeError, match="serves inference only; call model.eval"):
        model(**batch)


@torch.no_grad()
def test_adapters_left_to_peft_beside_pooled_ones():
    """An adapter the packed path cannot serve (a lora_bias) stays on the model's device with PEFT's path; in its
    layers PEFT computes only its rows (pooled rows are "__base__" to PEFT, whose weights it cannot reach)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny.build_base_model("llama"), _config(2), adapter_name="a0").eval()
    model.add_adapter("a1", _config(4))
    biased = _config(4, lora_bias=True)
    biased.target_modules = {*tiny.TARGET_MODULES["llama"], "lm_head"}  # (PEFT has no lora_bias for embeddings)
    model.add_adapter("biased", biased)
    oracle = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="'biased' \\(lora_bias\\)"):
        patch_model(model, backend="torch", max_gpu_adapters=2)
    seen = []
    original = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["a0"].forward

    def spy(x):  # PEFT's path must not read a pooled adapter's (host) weights
        seen.append("a0")
        return original(x)

    model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["a0"].forward = spy
    batch = tiny.random_prompts(4, 6, seed=1)
    for names in (["biased", "a0", "a1", "__base__"], ["a1", "biased", "biased", "a0"]):
        assert_matches(model, oracle, batch, names)
    assert not seen
    for twin in (model, oracle):
        twin.set_adapter("biased")
    assert_close_relative(model(**batch).logits, oracle(**batch).logits)


@pytest.mark.parametrize("architecture", ["opt", "llama"])
@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
@torch.no_grad()
def test_plain_call_with_an_active_adapter_left_to_peft(architecture, task_type):
    """A plain call whose active adapter some layers leave to PEFT (a lora_bias): those layers run PEFT's own plain
    forward, the others the pool; no hook hands names to flattened inputs (OPT's fc1/fc2 see B × S rows)."""
    torch.manual_seed(0)
    targets = tiny.TARGET_MODULES[architecture]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False, task_type=task_type)
    model = get_peft_model(tiny.build_base_model(architecture), config, adapter_name="a0").eval()
    biased = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type=task_type, lora_bias=True
    )
    model.add_adapter("biased", biased)
    oracle = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="lora_bias"):
        patch_model(model, backend="torch", max_gpu_adapters=2)
    batch = tiny.random_prompts(3, 5, seed=2)
    kwargs = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    for name in ("biased", "a0"):
        for twin in (model, oracle):
            twin.set_adapter(name)
        assert_close_relative(model(**batch).logits, oracle(**batch).logits)
        assert torch.equal(model.generate(**batch, **kwargs), oracle.generate(**batch, **kwargs))


@torch.no_grad()
def test_a_call_that_skips_the_peft_model_gets_a_clear_error():
    """``model.base_model(...)`` reaches the layers without the PeftModel's call (and so without the pool): PEFT's own
    forward would read the active adapter's weights in host memory (a device error on a GPU)."""
    model, oracle, batch = pooled_and_oracle("torch")
    for twin in (model, oracle):
        twin.set_adapter("a2")
    for inner in (model.base_model, model.get_base_model()):
        with pytest.raises(RuntimeError, match="adapter 'a2' is in host memory and only a call of the PeftModel"):
            inner(**batch)
    with model.disable_adapter(), oracle.disable_adapter():
        assert_close_relative(model.get_base_model()(**batch).logits, oracle.get_base_model()(**batch).logits)
    assert_close_relative(model(**batch).logits, oracle(**batch).logits)
    unpooled, _, _ = pooled_and_oracle("torch", capacity=3)
    patch_model(unpooled, backend="torch")  # without a pool the same call is PEFT's own, as before
    unpooled.set_adapter("a2")
    assert_close_relative(unpooled.base_model(**batch).logits, oracle.base_model(**batch).logits)


@torch.no_grad()
def test_resize_keeps_the_host_storage():
    model, oracle, batch = pooled_and_oracle("torch")
    assert_matches(model, oracle, batch, ["a0", "a1", "a2", "a0"])
    weight = model.base_model.model.model.layers[1].mlp.down_proj.lora_B["a3"].weight
    address = weight.data_ptr()
    patch_model(model, backend="torch", max_gpu_adapters=4)
    assert_matches(model, oracle, batch, ["a3", "a4", "a5", "a0"])
    assert pool_of(model).capacity == 4 and weight.data_ptr() == address


@torch.no_grad()
def test_a_repack_during_a_call_keeps_its_adapters_in_place():
    """A logits processor that adds an adapter and runs it inside generate repacks the bank: the outer call's
    adapters stay in the GPU slots its plan names (copied anew), so its output is still PEFT's."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, oracle, batch = pooled_and_oracle("torch", capacity=4, adapters=3)

    class SideCall(LogitsProcessor):
        step = 0

        def __call__(self, ids, scores):
            self.step += 1
            if self.step == 2:
                torch.manual_seed(5)
                model.add_adapter("x", _config(4))
                model(input_ids=ids[:1, :3], adapter_names=["x"])
            return scores

    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    names = ["a0", "a1", "a2", "a1"]
    expected = oracle.generate(**batch, adapter_names=names, **kwargs)
    actual = model.generate(**batch, adapter_names=names, logits_processor=LogitsProcessorList([SideCall()]), **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    for ours, theirs in zip(actual.scores, expected.scores, strict=True):
        finite = theirs.isfinite()  # (min_new_tokens sets the end token's score to -inf)
        assert torch.equal(ours.isfinite(), finite)
        assert_close_relative(ours[finite], theirs[finite])
    assert pool_of(model)._in_use == [0] * 4


@torch.no_grad()
def test_delete_an_adapter_of_some_layers_then_rescale():
    torch.manual_seed(0)
    model = get_peft_model(tiny.build_base_model("llama"), _config(2), adapter_name="a0").eval()
    model.add_adapter(
        "a1", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.add_adapter("a2", _config(6))
    oracle = copy.deepcopy(model)
    patch_model(model, backend="torch", max_gpu_adapters=3)
    batch = tiny.random_prompts(4, 6, seed=1)
    assert_matches(model, oracle, batch, ["a0", "a1", "a2", "a0"])
    for twin in (model, oracle):
        twin.delete_adapter("a1")
        for module in twin.modules():
            if isinstance(module, LoraLayer) and "a0" in module.scaling:
                module.set_scale("a0", 0.5)
    assert_matches(model, oracle, batch, ["a0", "a2", "a0", "__base__"])


def test_packing_staged_on_another_device_gives_the_same_storage():
    """``pack(stage_on=...)`` gathers the adapters on one device and moves each storage tensor in one copy (a GPU
    pool's first packing); the storage must equal the direct packing's."""
    from peft_fastlora.bank import pack

    torch.manual_seed(0)
    members = [
        {0: (torch.randn(4, 16), torch.randn(8, 4), 2.0), 2: (torch.randn(2, 16), torch.randn(8, 2), 0.5)},
        {1: (torch.randn(3, 16), torch.randn(5, 3), 1.0), 2: (torch.randn(6, 16), torch.randn(5, 6), 1.5)},
    ]
    direct = pack(members, 3, 16, [8, 5], torch.float32, "cpu")
    staged = pack(members, 3, 16, [8, 5], torch.float32, "cpu", stage_on=torch.device("cpu"))
    assert torch.equal(direct[0].a, staged[0].a) and staged[0].a.data_ptr() == staged[1].a.data_ptr()
    for ours, theirs in zip(staged, direct, strict=True):
        assert torch.equal(ours.b, theirs.b) and torch.equal(ours.meta, theirs.meta)


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "8"])
def test_bad_pool_size_raises_and_changes_nothing(value):
    torch.manual_seed(0)
    model = get_peft_model(tiny.build_base_model("llama"), _config(2), adapter_name="a0").eval()
    with pytest.raises(ValueError, match="max_gpu_adapters must be a positive int or None"):
        patch_model(model, max_gpu_adapters=value)
    assert "_fastlora_state" not in model.base_model.__dict__


def test_progress_bar_while_packing(capsys):
    torch.manual_seed(0)
    model = get_peft_model(tiny.build_base_model("llama"), _config(2), adapter_name="a0").eval()
    patch_model(model, backend="torch", max_gpu_adapters=2, progressbar=True)
    assert "peft_fastlora: packing adapters" in capsys.readouterr().err
    unpatch_model(model)
    patch_model(model, backend="torch", max_gpu_adapters=2)  # off by default, as in PEFT
    assert "packing adapters" not in capsys.readouterr().err


@torch.no_grad()
def test_dora_adapters_stay_with_peft_under_a_pool():
    """DoRA adapters are not pooled: they keep their own tensors on the model's device and PEFT's path, so a mixed
    batch naming one gets PEFT's DoRA error and a plain call with it active is PEFT's own."""
    torch.manual_seed(0)
    model = get_peft_model(tiny.build_base_model("llama"), _config(2), adapter_name="a0").eval()
    model.add_adapter("d", _config(4, use_dora=True))
    oracle = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="DoRA with max_gpu_adapters"):
        patch_model(model, backend="torch", max_gpu_adapters=2)
    batch = tiny.random_prompts(4, 6, seed=1)
    with pytest.raises(ValueError, match="DoRA"):
        model(**batch, adapter_names=["d", "a0", "a0", "a0"])
    for twin in (model, oracle):
        twin.set_adapter("d")
    assert_close_relative(model(**batch).logits, oracle(**batch).logits)
    assert_matches(model, oracle, batch, ["a0", "__base__", "a0", "a0"])


@interpreted
@torch.no_grad()
def test_compiled_generate_does_not_recompile_on_a_swap():
    """The pool's storage and metadata tensors stay put through swaps (only their values change), so a compiled
    decode step serves a new set of resident adapters without recompiling."""
    model, oracle, batch = pooled_and_oracle("triton", capacity=2, adapters=4)
    eager = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    assignments = [["a0", "a1", "a0", "__base__"], ["a2", "a3", "a3", "a2"], ["a1", "a0", "__base__", "a1"]]
    expected = [oracle.generate(**batch, adapter_names=names, **eager) for names in assignments]
    torch._dynamo.reset()
    counters.clear()
    kwargs = compiled_kwargs(3, backend="aot_eager", mode=None, fullgraph=True)
    after_first = None
    for names, tokens in zip(assignments, expected, strict=True):
        assert torch.equal(model.generate(**batch, adapter_names=names, **kwargs), tokens), names
        after_first = after_first or compilations()
    assert pool_of(model).stats["misses"] >= 6, "the calls never swapped"
    assert compilations() == after_first, f"recompiled after a swap: {dict(counters['frames'])}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@torch.no_grad()
def test_pool_on_gpu(backend, tmp_path):
    """On the GPU: host storage page-locked, and pooled bf16 output after swaps no worse than PEFT's against an fp32
    oracle, pooled over three batches that swap; "v" (a lora_bias) stays with PEFT's path on the GPU beside them."""
    extra = {"d": {"r": 4, "lora_alpha": 8}, "v": {"r": 4, "lora_alpha": 8, "lora_bias": True}}
    model, _, _ = gpu_test_model(torch.bfloat16, tmp_path, extra=extra)
    peft, oracle = copy.deepcopy(model), fp32_oracle(model)
    patch_model(model, backend=backend, max_gpu_adapters=2)
    stored = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["a"].weight
    assert stored.device.type == "cpu" and stored.is_pinned()
    sources = [source for unit in pool_of(model).units for source in (unit.source_a, *unit.source_b)]
    assert all(source.is_cuda for source in sources), "the copies read the host storage through DMA, not zero-copy"
    compared = []
    for rows in (["a", "b", "__base__", "v"], ["c", "d", "c", "d"], ["b", "c", "v", "__base__"]):
        batch, names = oracle_batch(rows, "cuda", rows=64, length=16)
        compared.append([twin(**batch, adapter_names=names).logits for twin in (model, peft, oracle)])
    assert pool_of(model).stats["misses"] == 5 and "v" not in pool_of(model).resident
    mask = torch.cat([batch["attention_mask"]] * 3)
    ours, peft_logits, expected = (torch.cat(parts) for parts in zip(*compared, strict=True))
    assert_no_worse_than_peft_logits(ours, peft_logits, expected, mask, label=f"pool {backend} bf16")


@pytest.mark.gpu
@torch.no_grad()
def test_compiled_generate_on_gpu_does_not_recompile_on_a_swap(tmp_path):
    """Inductor with CUDA graphs (transformers' default compile config) over a pool of 2: assignments that swap
    adapters in and out run on one compilation, each no worse than PEFT's bf16 against an fp32 oracle."""
    model, _, _ = gpu_test_model(torch.bfloat16, tmp_path, extra={"d": {"r": 4, "lora_alpha": 8}})
    peft, oracle = copy.deepcopy(model), fp32_oracle(model)
    patch_model(model, backend="triton", max_gpu_adapters=2)
    static = {
        "max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "pad_token_id": 0,
        "cache_implementation": "static",
    }  # fmt: skip
    torch._dynamo.reset()
    counters.clear()
    after_first, compared = None, []
    for rows in (["a", "b", "__base__", "a"], ["c", "d", "c", "d"], ["b", "a", "b", "__base__"], ["d", "d", "a", "d"]):
        batch, names = oracle_batch(rows, "cuda", rows=64, length=16)
        compared.append(generated_vs_oracle(model, peft, oracle, batch, names, static))
        after_first = after_first or compilations()
    assert after_first[0] >= 1, "the decode step was not compiled"
    assert compilations() == after_first, f"recompiled after a swap: {dict(counters['frames'])}"
    assert pool_of(model).stats["misses"] >= 6
    ours, peft_logits, expected = (torch.cat(parts) for parts in zip(*compared, strict=True))
    assert_no_worse_than_peft_logits(ours, peft_logits, expected, label="compiled pool bf16")


def test_no_device_view_of_memory_a_gpu_cannot_read():
    """``device_view`` gives None (the pool then copies from the host tensors) for a CPU device and for memory that
    is not page-locked."""
    host = torch.randn(64)
    assert device_view(host, torch.device("cpu")) is None
    assert device_view(host, torch.device("cuda", 0)) is None


@pytest.mark.gpu
@pytest.mark.parametrize("numel", [1000, 3 << 20])  # (below and above the exact-pinning size)
@torch.no_grad()
def test_device_view_reads_and_sees_the_host_memory(numel):
    """A CUDA view of page-locked host storage holds the host's values, and a later host write shows through it."""
    host = host_empty(numel, torch.bfloat16, pin=True)
    host.copy_(torch.randn(numel))
    view = device_view(host, torch.device("cuda", torch.cuda.current_device()))
    assert view is not None and view.is_cuda and view.dtype == host.dtype and view.shape == host.shape
    copied = torch.full_like(view, float("nan"))
    copied.copy_(view)
    assert torch.equal(copied.cpu(), host)
    host[-3:] = torch.tensor([1.0, 2.0, 3.0])
    assert view[-3:].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.gpu
@torch.no_grad()
def test_pool_gpu_memory_is_bounded():
    """Under a pool of K the adapters hold K slots' worth of GPU memory, whatever the number registered: 8 adapters
    of one rank, K = 2: at most 2/8 of their bytes, plus 10% and 1 MiB (metadata, the plan)."""
    torch.manual_seed(0)
    base = tiny.build_base_model("llama", dtype=torch.bfloat16).cuda()
    config = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="x0", autocast_adapter_dtype=False).eval()
    for index in range(1, 8):
        model.add_adapter(f"x{index}", config, autocast_adapter_dtype=False)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    batch = {key: value.cuda() for key, value in tiny.random_prompts(4, 8, seed=1).items()}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    patch_model(model, backend="triton", max_gpu_adapters=2)  # the adapters move to host memory
    model(**batch, adapter_names=["x0", "x5", "__base__", "x5"])
    on_gpu = adapter_bytes + torch.cuda.memory_allocated() - before
    bound = adapter_bytes * 2 / 8 * 1.1 + 2**20
    print(f"adapters {adapter_bytes} bytes; pooled on the GPU {on_gpu} bytes; bound {bound:.0f}")
    assert on_gpu <= bound
