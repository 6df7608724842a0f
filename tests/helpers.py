"""Test helpers: loading the session's tiny adapters and comparing tensors."""

from __future__ import annotations

import torch

from peft_fastlora import tiny


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
