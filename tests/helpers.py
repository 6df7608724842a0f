"""Test helpers: loading the session's tiny adapters and comparing tensors."""

from __future__ import annotations

import os

import pytest
import torch

from peft_fastlora import tiny

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors runs only through the interpreter"
)
"""For tests that run the Triton backend on CPU tensors: conftest sets the interpreter on machines without a GPU."""


def load(architecture: str, adapter_dirs, names=("a", "b", "c"), dtype=torch.float32):
    """A fresh PeftModel of ``architecture`` with the named adapters loaded from disk."""
    base = tiny.build_base_model(architecture, dtype=dtype)
    return tiny.load_peft_model(base, {name: adapter_dirs[architecture][name] for name in names})


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Max abs difference at most ``rtol`` times the reference's max magnitude, and no NaN anywhere."""
    assert not torch.isnan(actual).any(), "output has NaN"
    scale = expected.abs().max().clamp_min(1e-12)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error <= rtol, f"relative error {error.item():.3g} > {rtol}"
