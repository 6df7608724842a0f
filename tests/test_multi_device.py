"""Models split over devices (accelerate's ``device_map``): every layer reads the plan on its own device.

On two GPUs (marked ``gpu``, skipped without two CUDA devices): a bf16 Llama (``helpers.gpu_test_model``'s, 4 layers
of hidden 1024) split the way a user loads a model too large for one GPU, ``from_pretrained(..., device_map=...)``
with the embedding and layers 0-1 on cuda:0 and layers 2-3, the norm and lm_head on cuda:1, then eight adapters
(all 7 projections, ranks 4-64, one rsLoRA) loaded from disk onto the split model, so that PEFT puts each layer's
LoRA weights on that layer's device. Mixed batches with ``__base__`` rows, eager and compiled (static cache,
transformers' automatic compilation with its default config), both backends: in fp32 greedy tokens equal PEFT's
own mixed batch on the same split; in bf16 ours is no worse than PEFT's mixed batch against an fp32 copy of the
split model (DESIGN §6). The same checks run on the CPU with both halves on the CPU, through accelerate's hooks.

Two known bugs of the package (the report of the ``multigpu`` branch has the diffs) are marked ``xfail``; the fix of
each removes its mark.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_no_worse_than_peft,
    assert_no_worse_than_peft_logits,
    fp32_oracle,
    gpu_test_model,
    interpreted,
    load,
    load_peft,
    oracle_batch,
)
from test_compile import compilations, compiled_kwargs, generated_vs_oracle
from torch._dynamo.utils import counters

from peft_fastlora import patch_model, tiny, unpatch_model
from peft_fastlora.layers import is_fast_layer
from peft_fastlora.plan import BatchPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_multi_gpu import split_device_map  # noqa: E402

SPLIT = ("cuda:0", "cuda:1")
ON_THE_CPU = ("cpu", "cpu")

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

# Five adapters beside gpu_test_model's a/b/c (ranks 8/16/64): eight in all, every one on all 7 projections.
MORE_ADAPTERS = {
    "d": {"r": 4, "lora_alpha": 8, "use_rslora": True},
    "e": {"r": 32, "lora_alpha": 16},
    "f": {"r": 8, "lora_alpha": 32},
    "g": {"r": 16, "lora_alpha": 8},
    "h": {"r": 12, "lora_alpha": 24},
}
NAMES = ["a", "b", "__base__", "c", "d", "e", "f", "__base__", "g", "h", "e", "a"]


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


def load_split(base_dir: Path, adapters: dict, dtype: torch.dtype, devices: tuple[str, str]):
    """The saved base model loaded as a user loads a model too large for one device (``from_pretrained`` with
    ``split_device_map``), then ``adapters`` (``{name: folder}``) loaded onto it with PEFT: a PeftModel, eval.

    With both halves on one device transformers would not dispatch, so accelerate's ``dispatch_model`` puts on the
    hooks it puts on a split model; and PEFT re-dispatches a model whose map names the CPU (it takes that for
    offloading), so the map is hidden from PEFT while it loads."""
    from accelerate import dispatch_model
    from transformers import AutoConfig, AutoModelForCausalLM

    device_map = split_device_map(AutoConfig.from_pretrained(base_dir).num_hidden_layers, devices)
    if devices[0] != devices[1]:
        return load_peft(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map=device_map), adapters)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    dispatch_model(base, device_map, force_hooks=True, skip_keys=base._skip_keys_device_placement)  # as transformers
    hidden = base.__dict__.pop("hf_device_map")
    model = load_peft(base, adapters)
    base.hf_device_map = hidden
    return model


def assert_split(model, devices: tuple[str, str]) -> None:
    """Every fast layer's packed tensors live on its base layer's device, and fast layers sit on both devices."""
    layers = [module for module in model.modules() if is_fast_layer(module)]
    assert layers, "not patched"
    for layer in layers:
        device = layer.get_base_layer().weight.device
        packed = [value for value in vars(layer._fastlora_packed).values() if isinstance(value, torch.Tensor)]
        assert all(tensor.device == device for tensor in packed), f"packed tensors off {device}"
    assert {layer.get_base_layer().weight.device for layer in layers} == {torch.device(d) for d in devices}


def generate_kwargs(mode: str, device: str, new_tokens: int) -> dict:
    """Greedy ``generate`` kwargs: eager (the dynamic cache) or compiled (the static cache with transformers'
    automatic compilation: its default config, inductor with CUDA graphs, on CUDA; aot_eager on the CPU)."""
    options = {} if torch.device(device).type == "cuda" else {"backend": "aot_eager", "mode": None}
    kwargs = compiled_kwargs(new_tokens, **options)
    if mode == "eager":
        del kwargs["cache_implementation"], kwargs["compile_config"]
    return kwargs


def check_tokens(model, batch: dict, assignments: list[list[str]], backend: str, kwargs: dict) -> None:
    """Greedy tokens of ``model`` patched with ``backend`` equal PEFT's own mixed batch on it (uncompiled) for each
    assignment; compiled (``kwargs`` with the static cache), one compilation serves every assignment."""
    expected = [model.generate(**batch, adapter_names=names, disable_compile=True, **kwargs) for names in assignments]
    patch_model(model, backend=backend)
    torch._dynamo.reset()
    counters.clear()
    after_first = None
    for names, tokens in zip(assignments, expected, strict=True):
        actual = model.generate(**batch, adapter_names=names, **kwargs)
        mismatches = (actual != tokens).nonzero().tolist()
        assert not mismatches, f"{names}: first mismatching (row, position): {mismatches[:4]}"
        after_first = after_first or compilations()
    if "cache_implementation" in kwargs:
        assert after_first[0] >= 1, "the decode step was not compiled"
        assert compilations() == after_first, f"recompiled for a new assignment: {dict(counters['frames'])}"


def check_bf16(model, backend: str, mode: str, device: str, new_tokens: int = 24) -> None:
    """The bf16 bar (DESIGN §6) on the unpatched ``model``, against an fp32 copy of it on the same split, pooled
    over teacher-forced generate steps (128 rows): eager, also a forward over a 128 × 256 batch; compiled, three
    assignments (mixed, reversed, all ``__base__``) with one compilation."""
    peft, oracle = copy.deepcopy(model), fp32_oracle(model)  # unpatched twins: patching is in place
    assert next(model.parameters()).dtype == torch.bfloat16 and next(oracle.parameters()).dtype == torch.float32
    batch, names = oracle_batch(NAMES, device, rows=128, length=16)
    kwargs = generate_kwargs(mode, device, new_tokens)
    if mode == "eager":
        forward_batch, forward_names = oracle_batch(NAMES, device)
        assert_no_worse_than_peft(model, forward_batch, forward_names, backend, oracle, f"split forward {backend}")
        compared = [generated_vs_oracle(model, peft, oracle, batch, names, kwargs)]
    else:
        patch_model(model, backend=backend)
        torch._dynamo.reset()
        counters.clear()
        compared, after_first = [], None
        for row_names in [names, names[::-1], ["__base__"] * len(names)]:
            compared.append(generated_vs_oracle(model, peft, oracle, batch, row_names, kwargs))
            after_first = after_first or compilations()
        assert after_first[0] >= 1, "the decode step was not compiled"
        assert compilations() == after_first, f"recompiled for a new assignment: {dict(counters['frames'])}"
    ours, peft_logits, expected = (torch.cat(parts) for parts in zip(*compared, strict=True))
    assert_no_worse_than_peft_logits(ours, peft_logits, expected, label=f"split {mode} generate {backend} bf16")


@pytest.fixture(scope="module")
def wide_model_dirs(tmp_path_factory) -> tuple[Path, dict]:
    """``gpu_test_model``'s bf16 Llama and the eight adapters saved from it: (base folder, {name: folder})."""
    root = tmp_path_factory.mktemp("wide")
    model, _, _ = gpu_test_model(torch.bfloat16, root, extra=MORE_ADAPTERS, device="cpu")
    model.unload().save_pretrained(root / "base")
    return root / "base", {name: root / name for name in model.peft_config}


@pytest.fixture(scope="module")
def tiny_model_dirs(tmp_path_factory, adapter_dirs) -> tuple[Path, dict]:
    """The tiny Llama the session's adapters a/b/c were saved from, on disk: (base folder, {name: folder})."""
    root = tmp_path_factory.mktemp("tiny_base")
    tiny.save_base_model(root, "llama", seed=0)
    return root, adapter_dirs["llama"]


def on_two_gpus(test):
    """Marked ``gpu`` (run with ``-m gpu``) and skipped without two CUDA devices."""
    return pytest.mark.gpu(two_gpus(test))


# Eager tests first, so that a run cut short by a time limit has them; the compiled ones compile for tens of seconds.
@on_two_gpus
@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_split_eager_fp32_tokens_equal_peft(backend, wide_model_dirs):
    check_split_tokens(wide_model_dirs, backend, "eager")


@on_two_gpus
@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_split_eager_bf16_no_worse_than_peft(backend, wide_model_dirs):
    model = load_split(*wide_model_dirs, torch.bfloat16, SPLIT)
    check_bf16(model, backend, "eager", SPLIT[0])
    assert_split(model, SPLIT)


@on_two_gpus
@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_split_over_two_gpus_matches_peft(backend, adapter_dirs):
    """The PeftModel dispatched after its adapters were loaded: embeddings and layer 0 on cuda:0, layer 1, the norm
    and lm_head on cuda:1; greedy tokens equal PEFT's own mixed batch on the same split model (adapter c has LoRA on
    embed_tokens on cuda:0 and on lm_head on cuda:1)."""
    from accelerate import dispatch_model

    model = load("llama", adapter_dirs)
    device_map = {f"base_model.model.{name}": device for name, device in split_device_map(2, SPLIT).items()}
    model = dispatch_model(model, device_map=device_map)
    names = ["a", "b", "__base__", "c", "a", "b"]
    batch = {key: value.to(SPLIT[0]) for key, value in tiny.random_prompts(len(names), 7, seed=3).items()}
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(**batch, adapter_names=names, **kwargs)
    patch_model(model, backend=backend)
    assert_split(model, SPLIT)
    assert torch.equal(model.generate(**batch, adapter_names=names, **kwargs), expected)


@on_two_gpus
@torch.no_grad()
def test_split_compiled_base_model_control(wide_model_dirs):
    """Not ours: transformers' compiled decode of the split model (adapters disabled) gives the tokens of its
    uncompiled static-cache run. If this fails, a compiled failure of ours below is not (only) ours."""
    model = load_split(*wide_model_dirs, torch.float32, SPLIT)
    batch = {key: value.to(SPLIT[0]) for key, value in tiny.random_prompts(len(NAMES), 12, seed=5).items()}
    kwargs = generate_kwargs("compiled", SPLIT[0], 10)
    torch._dynamo.reset()
    counters.clear()
    with model.disable_adapter():
        expected = model.generate(**batch, disable_compile=True, **kwargs)
        assert torch.equal(model.generate(**batch, **kwargs), expected)
    assert compilations()[0] >= 1, "the decode step was not compiled"


COMPILED_BACKENDS = ["torch", "triton"]


@on_two_gpus
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@torch.no_grad()
def test_split_compiled_fp32_tokens_equal_peft(backend, wide_model_dirs):
    check_split_tokens(wide_model_dirs, backend, "compiled")


@on_two_gpus
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@torch.no_grad()
def test_split_compiled_bf16_no_worse_than_peft(backend, wide_model_dirs):
    model = load_split(*wide_model_dirs, torch.bfloat16, SPLIT)
    check_bf16(model, backend, "compiled", SPLIT[0])
    assert_split(model, SPLIT)


def check_split_tokens(model_dirs: tuple[Path, dict], backend: str, mode: str) -> None:
    """fp32 on the two-GPU split: greedy tokens equal PEFT's for a mixed assignment, its reverse and all base."""
    model = load_split(*model_dirs, torch.float32, SPLIT)
    batch = {key: value.to(SPLIT[0]) for key, value in tiny.random_prompts(len(NAMES), 12, seed=5).items()}
    assignments = [NAMES, NAMES[::-1], ["__base__"] * len(NAMES)]
    check_tokens(model, batch, assignments, backend, generate_kwargs(mode, SPLIT[0], 10))
    assert_split(model, SPLIT)


# Interpreted Triton costs ~0.1 s a launch on the CPU: one assignment and two new tokens there.
@pytest.mark.parametrize(
    "mode,backend,assignments,new_tokens",
    [
        ("eager", "torch", 2, 3),
        ("compiled", "torch", 2, 3),
        pytest.param("eager", "triton", 1, 2, marks=interpreted),
        pytest.param("compiled", "triton", 1, 2, marks=interpreted),
    ],
)
@torch.no_grad()
def test_split_on_the_cpu(mode, backend, assignments, new_tokens, tiny_model_dirs):
    """The two-GPU test's check and its model loading on the CPU, both halves there with accelerate's hooks (which
    break a compiled model into one frame per hooked module): tiny Llama, adapters a/b/c."""
    model = load_split(*tiny_model_dirs, torch.float32, ON_THE_CPU)
    assert hasattr(model.get_base_model().model.layers[1], "_hf_hook"), "accelerate's hooks are missing"
    batch = tiny.random_prompts(6, 7, seed=3)
    rows = [["a", "b", "__base__", "c", "a", "b"], ["c", "__base__", "b", "a", "a", "c"]][:assignments]
    check_tokens(model, batch, rows, backend, generate_kwargs(mode, "cpu", new_tokens))


@torch.no_grad()
def test_dispatched_after_the_adapters_on_the_cpu(adapter_dirs):
    """accelerate hooks every module it dispatches, LoRA layers included, when the adapters are loaded first (a
    dispatch_model of a PeftModel, or PEFT's own re-dispatch of a device_map that offloads to the CPU). Patched
    after the dispatch, and dispatched after the patch: tokens equal PEFT's, and after unpatch_model too."""
    from accelerate import dispatch_model

    names = ["a", "b", "__base__", "c", "a", "b"]
    batch = tiny.random_prompts(len(names), 7, seed=3)
    kwargs = generate_kwargs("eager", "cpu", 4)
    for patch_first in (False, True):
        model = load("llama", adapter_dirs)
        expected = model.generate(**batch, adapter_names=names, **kwargs)
        if patch_first:
            patch_model(model, backend="torch")
        dispatch_model(model.get_base_model(), split_device_map(2, ON_THE_CPU), force_hooks=True)
        patch_model(model, backend="torch")
        assert torch.equal(model.generate(**batch, adapter_names=names, **kwargs), expected), f"{patch_first=}"
        unpatch_model(model)
        assert torch.equal(model.generate(**batch, adapter_names=names, **kwargs), expected), f"{patch_first=}"


@torch.no_grad()
def test_forwards_bound_by_accelerate_hooks_follow_patch_and_unpatch():
    """accelerate keeps a layer's bound forward (``_old_forward``; ``forward`` again once the hook is removed): after
    patch, unpatch, hook removal and copies, each call runs the forward of the class the layer has then, and a
    user's own bound forward is left alone."""
    import copy
    import types

    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from peft_fastlora import unpatch_model

    def build():
        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(tiny.build_base_model("llama"), config, adapter_name="a")
        model.add_adapter("b", LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        return model.eval()

    def hook_layers(model):
        for module in model.modules():
            if isinstance(module, LoraLayer):
                add_hook_to_module(module, ModelHook())

    names = ["a", "b", "__base__", "a"]
    batch = tiny.random_prompts(len(names), 6, seed=1)
    expected = build()(**batch, adapter_names=names).logits
    model = build()
    hook_layers(model)
    patch_model(model, backend="torch")
    assert torch.equal(model(**batch, adapter_names=names).logits, expected)
    copied = copy.deepcopy(model)
    assert torch.equal(copied(**batch, adapter_names=names).logits, expected)
    copied = unpatch_model(copy.deepcopy(model))
    assert torch.equal(copied(**batch, adapter_names=names).logits, expected)
    remove_hook_from_module(model.get_base_model(), recurse=True)
    assert torch.equal(model(**batch, adapter_names=names).logits, expected)
    unpatch_model(model)
    assert torch.equal(model(**batch, adapter_names=names).logits, expected)

    model = build()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    peft_forward = type(q_proj).forward

    def own_forward(self, x, *args, **kwargs):
        calls.append(1)
        return peft_forward(self, x, *args, **kwargs)

    q_proj.forward = types.MethodType(own_forward, q_proj)
    add_hook_to_module(q_proj, ModelHook())
    patch_model(model, backend="torch")
    model(**batch, adapter_names=["a"] * len(names))
    assert calls  # the user's wrapper still runs
