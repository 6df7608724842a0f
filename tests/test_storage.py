"""The bank is the storage of PEFT's adapter weights: every edit a user can make after a mixed call is seen by the
next one, whatever way it takes (the table of the bank-as-storage issue), and the patch keeps one copy.

Each test runs a patched model and an unpatched deep copy of it (the oracle), makes the same change to both after
a first mixed call has packed the bank, and compares the next mixed call.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_relative, interpreted
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from peft_fastlora import patch_model, tiny, unpatch_model

NAMES = ["a", "b", "__base__", "a", "b"]
BACKENDS = ["torch", pytest.param("triton", marks=interpreted)]


def _config(rank: int, **extra) -> LoraConfig:
    targets = [*tiny.TARGET_MODULES["llama"], "embed_tokens", "lm_head"]
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, **extra)


def patched_and_oracle(backend: str, seed: int = 0):
    """``(patched model, unpatched oracle, batch)``; the patched model has served two mixed calls, so that the next
    one takes the per-call check's fast path (the first two calls after a patch walk the model, see ``patch``)."""
    torch.manual_seed(seed)
    model = get_peft_model(tiny.build_base_model("llama", seed=seed), _config(4), adapter_name="a").eval()
    model.add_adapter("b", _config(8))
    oracle = copy.deepcopy(model)
    patch_model(model, backend=backend)
    batch = tiny.random_prompts(len(NAMES), 6, seed=seed + 1)
    with torch.no_grad():
        model(**batch, adapter_names=NAMES)
        model(**batch, adapter_names=NAMES)
    state = model.base_model._fastlora_state
    assert state.bank.confirmed == state.bank.synced and state.bank._snapshot is not None
    return model, oracle, batch


def lora_layers(model) -> list[LoraLayer]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def weights(layer: LoraLayer, name: str, part: str) -> torch.nn.Parameter:
    """``lora_A``/``lora_B`` weight of adapter ``name`` in a Linear or an Embedding layer."""
    if name in layer.lora_embedding_A:
        return (layer.lora_embedding_A if part == "A" else layer.lora_embedding_B)[name]
    return (layer.lora_A if part == "A" else layer.lora_B)[name].weight


def edit_every_layer(edit, name: str, part: str):
    """Apply ``edit(parameter, fresh)`` to adapter ``name``'s ``part`` in every layer that holds it, with one fresh
    tensor per layer that both models get alike."""

    def apply(model, seed):
        generator = torch.Generator().manual_seed(seed)
        for layer in lora_layers(model):
            if name not in layer.lora_A and name not in layer.lora_embedding_A:
                continue
            parameter = weights(layer, name, part)
            # New values of the parameter's own spread: a staleness bug shows as an O(1) error, and values far
            # larger than an adapter's (0.3 against ~0.1 of a 64-wide lora_A, times a scaling of 32) made fp32
            # rounding alone pass the 1e-5 bar in one fuzzing example.
            spread = parameter.detach().float().std().clamp_min(1e-3).item()
            fresh = torch.randn(parameter.shape, generator=generator) * spread
            edit(parameter, fresh.to(device=parameter.device, dtype=parameter.dtype))

    return apply


def data_copy(parameter, fresh):
    parameter.data.copy_(fresh)


def data_mul(parameter, fresh):
    parameter.data.mul_(-1.5)


def numpy_write(parameter, fresh):
    """Through a NumPy view of the parameter's memory (which torch cannot see); on a GPU, through ``.data``."""
    if parameter.device.type != "cpu":
        parameter.data.copy_(fresh)
        return
    parameter.detach().numpy()[...] = fresh.numpy()


def data_assign(parameter, fresh):
    parameter.data = fresh.clone()


def set_scale(name: str):
    """PEFT's ``set_scale`` of adapter ``name`` in every layer that holds it."""

    def apply(model, seed):
        for layer in lora_layers(model):
            if name in layer.scaling:
                layer.set_scale(name, 0.25)

    return apply


def _scale_layer(model, seed):
    """PEFT's ``scale_layer`` (``scaling[active] *= scale``, what ``_enable_peft_forward_hooks`` of some PEFT
    methods does), on the active adapter."""
    for layer in lora_layers(model):
        layer.scale_layer(1.5 + seed % 3)


def _scaling_dict_write(model, seed):
    for layer in lora_layers(model):
        if "b" in layer.scaling:
            layer.scaling["b"] = 0.1 * (seed % 7 + 1)


def _scaling_dict_replaced(model, seed):
    """The whole dict replaced (written past PEFT's methods): a new object, unwatched."""
    for layer in lora_layers(model):
        layer.scaling = {name: value * (1.0 + seed % 5) for name, value in layer.scaling.items()}


def _load_state_dict(assign: bool):
    def apply(model, seed):
        generator = torch.Generator().manual_seed(seed)
        state = {
            key: torch.randn(value.shape, generator=generator) * 0.3
            for key, value in model.state_dict().items()
            if "lora_" in key and (".a." in key or key.endswith(".a"))
        }
        assert state
        model.load_state_dict(state, strict=False, assign=assign)

    return apply


def _add_lora_b_bias(name: str):
    """A bias given to adapter ``name``'s lora_B in every Linear layer: it becomes a lora_bias adapter, which the
    packed path leaves to PEFT's."""

    def apply(model, seed):
        generator = torch.Generator().manual_seed(seed)
        for layer in lora_layers(model):
            if name in layer.lora_B:
                module = layer.lora_B[name]
                module.bias = torch.nn.Parameter(torch.randn(module.out_features, generator=generator) * 0.3)

    return apply


def _to_float64(model, seed):
    model.to(torch.float64)


def _merge_and_unmerge(model, seed):
    model.merge_adapter(["a"])
    model.unmerge_adapter()


EDITS = {
    "lora_A.data.copy_": edit_every_layer(data_copy, "a", "A"),
    "lora_B.data.mul_": edit_every_layer(data_mul, "b", "B"),
    "numpy_view": edit_every_layer(numpy_write, "a", "B"),
    "data_assign": edit_every_layer(data_assign, "b", "A"),
    "set_scale": set_scale("b"),
    "scale_layer": _scale_layer,
    "scaling[b] =": _scaling_dict_write,
    "scaling dict replaced": _scaling_dict_replaced,
    "load_state_dict": _load_state_dict(assign=False),
    "load_state_dict_assign": _load_state_dict(assign=True),
    "model.to(float64)": _to_float64,
    "lora_B.bias added": _add_lora_b_bias("b"),
    "merge_unmerge": _merge_and_unmerge,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", list(EDITS))
@torch.no_grad()
def test_edit_after_a_call_is_seen(edit, backend):
    model, oracle, batch = patched_and_oracle(backend)
    for round_ in range(2):  # the second round edits the storage the first round's repack (if any) made
        for target in (model, oracle):
            EDITS[edit](target, seed=10 + round_)
        expected = oracle(**batch, adapter_names=NAMES).logits
        actual = model(**batch, adapter_names=NAMES).logits
        assert actual.dtype == expected.dtype
        assert_close_relative(actual, expected)
        assert (actual - oracle(**batch).logits).abs().max() > 1e-3  # the adapters matter in this batch


@torch.no_grad()
def test_scaling_dicts_are_watched_while_patched_and_plain_in_copies_and_after():
    """The per-call check counts writes into the scaling dicts instead of comparing them; a copy of the model,
    and the model once unpatched, carry plain dicts."""
    model, oracle, batch = patched_and_oracle("torch")
    assert {type(layer.scaling).__name__ for layer in lora_layers(model)} == {"WatchedScalings"}
    copied = copy.deepcopy(model)
    assert {type(layer.scaling) for layer in lora_layers(copied)} == {dict}
    unpatch_model(model)
    assert {type(layer.scaling) for layer in lora_layers(model)} == {dict}
    assert_close_relative(model(**batch, adapter_names=NAMES).logits, oracle(**batch, adapter_names=NAMES).logits)


@torch.no_grad()
def test_layers_shared_by_two_patched_models_are_served_right(adapter_dirs):
    """Two PeftModels that share LoRA layer objects (the second wraps the first's base); patch one, then the
    other, edit through the second, call the first: both read one storage."""
    oracle1 = get_peft_model(tiny.build_base_model("llama"), _config(4), adapter_name="a").eval()
    model1 = copy.deepcopy(oracle1)
    batch = tiny.random_prompts(len(NAMES), 5, seed=4)

    def rewrap(first):
        return PeftModel.from_pretrained(first.get_base_model(), adapter_dirs["llama"]["b"], adapter_name="b").eval()

    oracle2 = rewrap(oracle1)
    patch_model(model1)
    model1(**batch, adapter_names=["a"] * len(NAMES))
    model2 = patch_model(rewrap(model1))
    for model in (model2, oracle2):
        edit_every_layer(data_mul, "a", "B")(model, seed=0)
    assert_close_relative(model1(**batch, adapter_names=NAMES).logits, oracle1(**batch, adapter_names=NAMES).logits)
    assert_close_relative(model2(**batch, adapter_names=NAMES).logits, oracle2(**batch, adapter_names=NAMES).logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_step_in_train_mode_is_seen_by_the_next_mixed_call(backend):
    """Training runs PEFT's own path on the same parameters; an optimizer step writes the storage in place."""
    model, oracle, batch = patched_and_oracle(backend)
    for target in (model, oracle):
        target.train()
        parameters = [parameter for name, parameter in target.named_parameters() if "lora_" in name]
        optimizer = torch.optim.AdamW(parameters, lr=0.05)
        for _ in range(2):
            target(**batch).logits.float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        target.eval()
    with torch.no_grad():
        assert_close_relative(model(**batch, adapter_names=NAMES).logits, oracle(**batch, adapter_names=NAMES).logits)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_one_copy_of_every_adapter(backend):
    """After the patch, the adapters' parameters and the bank's storage are the same bytes: the distinct storages
    they occupy add up to exactly the adapters' own size (no padding, no second copy of q/k/v's lora_A)."""
    model, _, _ = patched_and_oracle(backend)
    parameters = [parameter for name, parameter in model.named_parameters() if "lora_" in name]
    adapter_bytes = sum(parameter.nbytes for parameter in parameters)
    storages = {
        parameter.untyped_storage().data_ptr(): parameter.untyped_storage().nbytes() for parameter in parameters
    }
    bank = {}
    for layer in model.base_model._fastlora_state.bank.fast_layers:
        for tensor in (layer._fastlora_packed.a, layer._fastlora_packed.b):
            bank[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    assert storages == bank
    assert sum(bank.values()) == adapter_bytes


@torch.no_grad()
def test_unpatch_gives_parameters_their_own_storage():
    model, oracle, batch = patched_and_oracle("torch")
    parameters = {name: parameter for name, parameter in model.named_parameters() if "lora_" in name}
    unpatch_model(model)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            assert parameter is parameters[name]
            assert type(parameter) is torch.nn.Parameter, name  # not the bank's watched class
            assert parameter.is_contiguous() and parameter.untyped_storage().nbytes() == parameter.nbytes, name
            assert torch.equal(parameter, oracle.get_parameter(name)), name
    assert all(type(module._parameters) is dict for module in model.modules())
    assert_close_relative(model(**batch, adapter_names=NAMES).logits, oracle(**batch, adapter_names=NAMES).logits)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "torch_save"])
@torch.no_grad()
def test_save_pretrained_writes_peft_bytes(tmp_path, safe):
    """``save_pretrained`` of a patched model writes what unpatched PEFT writes, and loads back equal."""
    model, oracle, batch = patched_and_oracle("torch")
    for target, folder in ((model, "patched"), (oracle, "peft")):
        target.save_pretrained(tmp_path / folder, safe_serialization=safe)
    for name in ("a", "b"):
        sub = name  # PEFT saves an adapter not named "default" in a folder of its name
        ours = (tmp_path / "patched" / sub).glob("adapter_model.*")
        theirs = (tmp_path / "peft" / sub).glob("adapter_model.*")
        (ours,), (theirs,) = list(ours), list(theirs)
        if safe:
            assert ours.read_bytes() == theirs.read_bytes(), name
        loaded = tiny.load_peft_model(tiny.build_base_model("llama"), {name: tmp_path / "patched" / sub})
        expected = oracle.get_base_model()
        for key, value in loaded.named_parameters():
            if "lora_" in key:
                assert torch.equal(value, expected.get_parameter(key.replace("base_model.model.", "", 1))), key


@torch.no_grad()
def test_native_save_pretrained_round_trips(adapter_dirs, tmp_path):
    """A transformers model with adapters loaded by transformers, patched: its own save_pretrained writes each
    adapter as unpatched transformers does."""
    from test_native import native_model

    model, oracle = native_model("llama", adapter_dirs), native_model("llama", adapter_dirs)
    patch_model(model)
    batch = tiny.random_prompts(3, 4, seed=0)
    model(**batch, adapter_names=["a", "b", "c"])
    for target, folder in ((model, "patched"), (oracle, "plain")):
        target.set_adapter("b")
        target.save_pretrained(tmp_path / folder, selected_adapters=["b"])
    ours = sorted(path.relative_to(tmp_path / "patched") for path in (tmp_path / "patched").rglob("*.safetensors"))
    theirs = sorted(path.relative_to(tmp_path / "plain") for path in (tmp_path / "plain").rglob("*.safetensors"))
    assert ours == theirs and ours
    for path in ours:
        assert (tmp_path / "patched" / path).read_bytes() == (tmp_path / "plain" / path).read_bytes()


@pytest.mark.parametrize("cycles,ranks", [(100, (8,)), (24, (8, 4, 16))], ids=["same_rank", "other_ranks"])
@torch.no_grad()
def test_delete_and_re_add_with_edits_between(cycles, ranks):
    """Delete and re-add one adapter again and again (the allocator hands the new tensors freed storage), with a
    ``.data`` edit of the other adapter between calls: every call equals PEFT."""
    model, oracle, batch = patched_and_oracle("torch", seed=3)
    for cycle in range(cycles):
        config = _config(ranks[cycle % len(ranks)])
        for target in (model, oracle):
            target.delete_adapter("b")
            torch.manual_seed(100 + cycle)
            target.add_adapter("b", config)
            target.eval()
            edit_every_layer(data_copy, "a", "B")(target, seed=cycle)
        assert_close_relative(model(**batch, adapter_names=NAMES).logits, oracle(**batch, adapter_names=NAMES).logits)


@torch.no_grad()
def test_new_adapter_keeps_the_slots_of_the_others():
    """Slots are stable: adding an adapter does not renumber the existing ones; a deleted adapter's slot is reused."""
    model, oracle, batch = patched_and_oracle("torch")
    bank = model.base_model._fastlora_state.bank
    before = dict(bank.slots)
    for target in (model, oracle):
        torch.manual_seed(5)  # the same random weights in both
        target.add_adapter("0_first_by_name", _config(2))
        target.eval()
    model(**batch, adapter_names=NAMES)
    assert {name: bank.slots[name] for name in before} == before
    for target in (model, oracle):
        target.delete_adapter("a")
        torch.manual_seed(6)
        target.add_adapter("c", _config(4))
        target.eval()
    names = ["c", "b", "0_first_by_name", "__base__", "c"]
    assert_close_relative(model(**batch, adapter_names=names).logits, oracle(**batch, adapter_names=names).logits)
    assert bank.slots["c"] == before["a"]


@pytest.mark.gpu
@torch.no_grad()
def test_patch_adds_at_most_a_tenth_of_the_adapters_bytes_gpu():
    """GPU bytes (``memory_allocated``): PEFT alone against PEFT + patch, adapters of mixed ranks {8, 16, 32, 64}
    on all 7 projections of two Llama-3-8B-wide decoder layers, PEFT's default fp32 adapters on a bf16 model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128, max_position_embeddings=256,
    )  # fmt: skip
    with torch.device("cuda"):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model = None
    for rank in (8, 16, 32, 64):
        lora = LoraConfig(r=rank, lora_alpha=16, target_modules=tiny.TARGET_MODULES["llama"], init_lora_weights=False)
        if model is None:
            model = get_peft_model(base, lora, adapter_name=f"r{rank}")
        else:
            model.add_adapter(f"r{rank}", lora)
    model = model.cuda().eval()
    adapter_bytes = sum(p.nbytes for name, p in model.named_parameters() if "lora_" in name)
    names = ["r8", "r16", "__base__", "r32", "r64"]
    batch = {key: value.cuda() for key, value in tiny.random_prompts(len(names), 4, seed=0).items()}
    # One unpatched call first: the process's first matmul allocates cuBLAS's workspace (32 MiB on the H200)
    # through the caching allocator, which is not the patch's (it failed this test when it ran first in a process).
    model(**batch)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    patch_model(model, backend="triton")
    logits = model(**batch, adapter_names=names).logits
    del logits
    torch.cuda.synchronize()
    added = torch.cuda.memory_allocated() - before
    print(f"patch added {added / 2**20:.2f} MiB to {adapter_bytes / 2**20:.1f} MiB of adapters")
    assert added <= 0.10 * adapter_bytes, (added, adapter_bytes)


def test_fresh_parameter_objects_repack(adapter_dirs):
    """PEFT replacing an adapter's modules (as delete + add does) with parameters that happen to equal the old
    values still repacks: identity, not values or pointers, decides."""
    model, oracle, batch = patched_and_oracle("torch")
    with torch.no_grad():
        for target in (model, oracle):
            for layer in lora_layers(target):
                if "a" in layer.lora_A:
                    old = layer.lora_A["a"]
                    fresh = torch.nn.Linear(old.in_features, old.out_features, bias=False)
                    fresh.weight.copy_(old.weight * 2)
                    layer.lora_A["a"] = fresh
        assert_close_relative(model(**batch, adapter_names=NAMES).logits, oracle(**batch, adapter_names=NAMES).logits)


@torch.no_grad()
def test_tensor_scalings_changed_in_place_are_seen():
    """PEFT's compiled hotswap (``prepare_model_for_compiled_hotswap``) makes every scaling a 0-d tensor that
    ``hotswap_adapter`` then changes with ``fill_``: the same object, a new value."""
    model, oracle, batch = patched_and_oracle("torch")
    for target in (model, oracle):
        for layer in lora_layers(target):
            for name in layer.scaling:
                layer.scaling[name] = torch.tensor(float(layer.scaling[name]))
    assert_close_relative(model(**batch, adapter_names=NAMES).logits, oracle(**batch, adapter_names=NAMES).logits)
    for value in (0.3, 1.7):
        for target in (model, oracle):
            for layer in lora_layers(target):
                if "b" in layer.scaling:
                    layer.scaling["b"].fill_(value)
        expected = oracle(**batch, adapter_names=NAMES).logits
        assert_close_relative(model(**batch, adapter_names=NAMES).logits, expected)


@torch.no_grad()
def test_a_refresh_that_raised_part_way_leaves_nothing_half_packed():
    """A new adapter takes a new slot; one late layer's weights are bad, so the first call raises while the bank
    repacks; once the user fixes them, the next call is right (no layer keeps per-slot arrays of the old size)."""
    model, oracle, batch = patched_and_oracle("torch")
    for target in (model, oracle):
        torch.manual_seed(7)
        target.add_adapter("c", _config(4))
        target.eval()
    q_proj = model.base_model.model.model.layers[1].self_attn.q_proj
    good = q_proj.lora_A["c"].weight.data
    q_proj.lora_A["c"].weight.data = torch.zeros(3, good.shape[1])
    names = ["c", "a", "__base__", "c", "b"]
    with pytest.raises(ValueError, match="do not fit the layer"):
        model(**batch, adapter_names=names)
    q_proj.lora_A["c"].weight.data = good
    assert_close_relative(model(**batch, adapter_names=names).logits, oracle(**batch, adapter_names=names).logits)


@torch.no_grad()
def test_dora_adapter_in_another_dtype_gets_peft_error_before_running():
    """A DoRA adapter whose dtype differs from its layers' other adapters is left to PEFT's path there, and PEFT
    refuses DoRA in a mixed batch: that error comes before anything runs, not from inside the forward."""
    from peft_fastlora.peft_messages import dora_enabled

    torch.manual_seed(0)
    model = get_peft_model(tiny.build_base_model("llama"), _config(4), adapter_name="a").eval()
    model.add_adapter("d", LoraConfig(r=8, target_modules=tiny.TARGET_MODULES["llama"], use_dora=True,
                                      init_lora_weights=False))  # fmt: skip
    for layer in lora_layers(model):
        for part in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
            if "d" in part:
                part["d"].double()
    patch_model(model.eval(), backend="torch")
    batch = tiny.random_prompts(2, 4, seed=1)
    with pytest.raises(ValueError) as error:
        model(**batch, adapter_names=["d", "a"])
    assert str(error.value) == str(dora_enabled())
    model(**batch, adapter_names=["a", "__base__"])  # the other adapters are still served


def test_calls_under_inference_mode_leave_normal_tensors():
    """A first call, or a repack, inside ``torch.inference_mode()`` makes no inference tensors of the plan buffers or
    the storage (PEFT's parameters are views of it): a later ``no_grad`` call refills the plan in place, a grad-mode
    forward trains, and an in-place edit outside inference mode works."""
    model, oracle, batch = patched_and_oracle("torch")
    for target in (model, oracle):
        torch.manual_seed(8)
        target.add_adapter("c", _config(8))
        target.eval()
    names = ["c", "a", "__base__", "b", "c"]
    with torch.inference_mode():
        model(**batch, adapter_names=names)  # repacks (a new adapter) inside inference mode
    parameters = [parameter for name, parameter in model.named_parameters() if "lora_" in name]
    assert not any(parameter.is_inference() for parameter in parameters)
    with torch.no_grad():
        for target in (model, oracle):
            edit_every_layer(data_mul, "c", "B")(target, seed=0)
        assert_close_relative(model(**batch, adapter_names=names).logits, oracle(**batch, adapter_names=names).logits)
    model(**batch).logits.float().pow(2).mean().backward()
    assert any(parameter.grad is not None for parameter in parameters)
