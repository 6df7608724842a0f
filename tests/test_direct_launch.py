"""Eager launches through prepared ``DirectCall``s (``backends/triton.py``): the host-time path of every eager
GPU call. A prepared launch fixes every argument but the activations' addresses, so these tests change whatever
else a call can change (the assignment of adapters to rows, the batch size, the prompt length, the storage after
an edit, Triton's launch hooks) and compare with unpatched PEFT each time."""

from __future__ import annotations

import copy

import pytest
import torch
import triton
from helpers import assert_close_relative, gpu_test_model, interpreted

from peft_fastlora import patch_model, tiny
from peft_fastlora.backends import triton as triton_backend
from peft_fastlora.kernels import launch
from peft_fastlora.layers import is_fast_layer


def _prepared(model) -> int:
    """How many launches the fast layers hold prepared."""
    return sum(len(module._fastlora_packed.launches) for module in model.modules() if is_fast_layer(module))


@pytest.mark.gpu
@torch.no_grad()
def test_prepared_launches_match_peft_whatever_changes_gpu(tmp_path):
    model, names, batch = gpu_test_model(torch.float32, tmp_path)
    peft = copy.deepcopy(model)
    patch_model(model, backend="triton")

    def compare(batch: dict, names: list) -> None:
        expected = peft(**batch, adapter_names=names).logits
        actual = torch.full_like(expected, float("nan"))
        actual.copy_(model(**batch, adapter_names=names).logits)
        assert_close_relative(actual, expected)

    compare(batch, names)
    assert _prepared(model) > 0, "the eager GPU call did not use prepared launches"
    # The same shapes with other assignments: the plan is refilled in place, the prepared launches are reused.
    for shift in range(1, 4):
        compare(batch, names[shift:] + names[:shift])
    compare(batch, ["__base__"] * len(names))
    compare(batch, ["c"] * len(names))
    # Another batch size and prompt length, then the first again.
    small = {key: value.to("cuda") for key, value in tiny.random_prompts(3, 7, seed=9).items()}
    compare(small, ["b", "a", "c"])
    compare(batch, names)
    # Decode steps with a cache (one token per row) through generate, against PEFT's tokens.
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = peft.generate(**batch, adapter_names=names, **kwargs)
    assert torch.equal(model.generate(**batch, adapter_names=names, **kwargs), expected)
    # An in-place edit of an adapter (the storage the prepared launches read) and a new scaling.
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    peft_layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    for target in (layer, peft_layer):
        target.lora_B["b"].weight.data.mul_(3)
        target.set_scale("c", 0.5)
    compare(batch, names)


@pytest.mark.gpu
@torch.no_grad()
def test_triton_launch_hooks_still_see_every_launch_gpu(tmp_path):
    """A profiler's Triton launch hooks are called by Triton's own launch path only, so a call made while one is set
    takes that path (and stays right)."""
    model, names, batch = gpu_test_model(torch.float32, tmp_path)
    peft = copy.deepcopy(model)
    patch_model(model, backend="triton")
    model(**batch, adapter_names=names)  # prepares the launches
    launched = []
    hooks = triton.knobs.runtime.launch_enter_hook  # a HookChain in Triton 3.6

    def hook(metadata) -> None:
        launched.append(metadata)

    hooks.add(hook)
    try:
        actual = model(**batch, adapter_names=names).logits
    finally:
        hooks.remove(hook)
    assert launched, "no launch went through Triton while its launch hook was set"
    assert_close_relative(actual, peft(**batch, adapter_names=names).logits)


@pytest.mark.gpu
@torch.no_grad()
def test_programmatic_dependent_launches_match_peft_gpu(tmp_path, monkeypatch):
    """On Hopper and later the kernels are programmatic dependent launches (each may start before the kernel ahead of
    it ends, and waits for it in its own code before touching memory): with and without, eager calls and decode
    steps equal PEFT's."""
    model, names, batch = gpu_test_model(torch.float32, tmp_path)
    peft = copy.deepcopy(model)
    expected = peft(**batch, adapter_names=names).logits
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected_tokens = peft.generate(**batch, adapter_names=names, **kwargs)
    capable = torch.cuda.get_device_capability()[0] >= 9
    for enabled in (True, False):
        monkeypatch.setattr(launch, "PDL", enabled)  # read when a layer prepares its launches: a fresh model each
        fast = copy.deepcopy(model)
        patch_model(fast, backend="triton")
        assert launch.use_pdl(torch.device("cuda")) == (enabled and capable)
        actual = torch.full_like(expected, float("nan"))
        actual.copy_(fast(**batch, adapter_names=names).logits)
        assert_close_relative(actual, expected)
        assert torch.equal(fast.generate(**batch, adapter_names=names, **kwargs), expected_tokens)
        if enabled:  # (kernels compiled by earlier tests stay cached, so the other way round proves nothing)
            assert any(kernel.metadata.launch_pdl for kernel in launch._shrink._compiled.values()) == capable


class _InterpretedDirectCall:
    """A stand-in for ``DirectCall`` under the interpreter: like the real one it fixes every argument but the two
    per-call tensors, which it finds again by their addresses, and replays the grid and constexprs it was made
    with. So a prepared launch reused for a call it does not fit gives that call's wrong answer here too."""

    tensors: dict[int, torch.Tensor] = {}

    def __init__(self, kernel, grid, args, constexprs, second):
        self.kernel, self.grid, self.args, self.constexprs, self.second = kernel, grid, list(args), constexprs, second

    def __call__(self, first: int, second: int) -> None:
        args = list(self.args)
        args[0], args[self.second] = self.tensors[first], self.tensors[second]
        self.kernel[self.grid](*args, **self.constexprs)


class _InterpretedDirectCallMany(_InterpretedDirectCall):
    """The stand-in for ``DirectCallMany``: every per-call tensor (a group expand's ``h`` and outputs) found again
    by its address."""

    def __init__(self, kernel, grid, args, constexprs, positions):
        super().__init__(kernel, grid, args, constexprs, None)
        self.positions = positions

    def __call__(self, *pointers: int) -> None:
        args = list(self.args)
        for position, pointer in zip(self.positions, pointers, strict=True):
            args[position] = self.tensors[pointer]
        self.kernel[self.grid](*args, **self.constexprs)


@interpreted
@torch.no_grad()
def test_prepared_launches_are_keyed_by_all_they_fix_interpreted(tmp_path, monkeypatch):
    """The eager prepared-launch path, run on the CPU through the stand-in: batches of one token count and other row
    counts (4 × 4, 1 × 16, 2 × 8) once shared a prepared launch whose tokens per row and grid were the first's."""

    def data_ptr(tensor: torch.Tensor) -> int:
        address = torch._C.TensorBase.data_ptr(tensor)
        _InterpretedDirectCall.tensors[address] = tensor
        return address

    def direct(self, grid, args, constexprs, second):
        return _InterpretedDirectCall(self.kernel, grid, args, constexprs, second)

    def direct_many(self, grid, args, constexprs, positions):
        return _InterpretedDirectCallMany(self.kernel, grid, args, constexprs, positions)

    monkeypatch.setattr(triton_backend, "_data_ptr", data_ptr)
    monkeypatch.setattr(launch.CompiledLauncher, "direct", direct)
    monkeypatch.setattr(launch.CompiledLauncher, "direct_many", direct_many)
    monkeypatch.setattr(triton_backend.TritonBackend, "_direct_allowed", lambda self, x, result: x.is_contiguous())
    model, _, _ = gpu_test_model(torch.float32, tmp_path, device="cpu")
    peft = copy.deepcopy(model)
    patch_model(model, backend="triton")
    model.base_model._fastlora_state.backend.direct = True
    shapes = [(4, 4, ["a", "b", "c", "a"]), (4, 4, ["c", "a", "b", "b"]), (1, 16, ["c"]), (2, 8, ["b", "a"])]
    for seed, (rows, length, names) in enumerate(shapes):
        batch = tiny.random_prompts(rows, length, seed=seed, left_padding=False)
        expected = peft(**batch, adapter_names=names).logits
        assert_close_relative(model(**batch, adapter_names=names).logits, expected)
    assert _prepared(model) > 0, "the prepared-launch path did not run"
    group_expands = [key for module in model.modules() if is_fast_layer(module)
                     for key in module._fastlora_packed.launches if key[0] == "group expand"]  # fmt: skip
    assert group_expands, "no sibling group's expand went through a prepared launch"
