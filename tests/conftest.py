"""Shared fixtures: tiny models and adapters written to disk once per session, fresh seeds per test."""

from __future__ import annotations

import os

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
