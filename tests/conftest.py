"""Shared fixtures: tiny models and adapters written to disk once per session, fresh seeds per test."""

from __future__ import annotations

import os
import sys

import torch

# Without a GPU the Triton kernels run through the interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from peft_fastlora import tiny  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


POISON_INT = 2**30 + 7
"""What integer buffers of the package start as: far out of range as an index, row or slot."""


def _poison(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() or tensor.is_complex():
        return tensor.fill_(float("nan"))
    if tensor.dtype == torch.bool:
        return tensor.fill_(True)
    return tensor.fill_(POISON_INT if torch.iinfo(tensor.dtype).max > POISON_INT else -1)


@pytest.fixture(autouse=True)
def _poison_uninitialised_memory(monkeypatch):
    """Every ``torch.empty`` made by peft_fastlora (plan buffers, kernel scratch) starts poisoned: NaN for floats,
    an out-of-range value for integers. A kernel or a layer that reads memory nobody wrote then fails loudly
    instead of reading whatever the allocator left there (often zeros, which would hide the bug)."""
    from peft_fastlora.kernels import launch

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        return _poison(tensor) if caller.startswith("peft_fastlora") else tensor

    def poisoned_scratch(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    monkeypatch.setattr(launch, "scratch_empty", poisoned_scratch)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test (but reproducible from its name), so no test relies on one lucky draw.
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory):
    """Per architecture: the base model's seed and three saved adapters of different ranks, alphas and targets.

    ``a``: rank 4 on all projections; ``b``: rank 16 with rsLoRA on a subset; ``c``: rank 8 on all projections plus
    the input embedding and lm_head where the architecture has them as separate LoRA targets.
    """
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for architecture in tiny.ARCHITECTURES:
        base = tiny.build_base_model(architecture)
        targets = tiny.TARGET_MODULES[architecture]
        extra = ["embed_tokens", "lm_head"] if architecture in ("llama", "phi3") else []
        specs = {
            "a": {"r": 4, "lora_alpha": 8},
            "b": {"r": 16, "lora_alpha": 32, "use_rslora": True, "target_modules": targets[::2]},
            "c": {"r": 8, "lora_alpha": 4, "target_modules": targets + extra},
        }
        paths = {}
        for seed, (name, spec) in enumerate(specs.items(), start=1):
            paths[name] = root / architecture / name
            tiny.save_adapter(base, paths[name], seed=seed, **spec)
        dirs[architecture] = paths
    return dirs
