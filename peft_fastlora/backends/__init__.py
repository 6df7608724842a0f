"""Backend registry: a backend adds each row's LoRA delta to a layer's base output, given the plan.

A backend provides ``add_lora(result, x, packed, view)`` and
``add_embedding_lora(result, input_ids, packed, view, embed_scale)``; see ``torch_ref.TorchBackend``, the reference
that all others must match.
"""

from __future__ import annotations

import os

import torch

from .torch_ref import TorchBackend

BACKEND_NAMES = ("auto", "triton", "flashinfer", "torch")


def _unavailable(name: str, why: str) -> RuntimeError:
    return RuntimeError(f"peft_fastlora backend {name!r} is not available: {why}")


def _triton_problem(device: torch.device) -> str | None:
    """Why Triton cannot run on ``device``, or None. On CPU it runs only through the interpreter (tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)."
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need a CUDA device (the model is on {device.type}), or TRITON_INTERPRET=1 for tests."


def get_backend(name: str, device: torch.device):
    """Return the backend object for ``name`` on ``device``.

    Parameters
    ----------
    name : str
        One of ``"auto"``, ``"triton"``, ``"flashinfer"``, ``"torch"``. ``"auto"`` picks the fastest backend that
        works on ``device``.
    device : torch.device
        The device the model's LoRA layers run on.

    Raises
    ------
    ValueError
        For a name that is not a backend.
    RuntimeError
        For a backend that cannot run here; the message says why.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"Unknown peft_fastlora backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}.")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchBackend()
    if name in ("auto", "triton"):
        why = _triton_problem(device)
        if why is None:
            from .triton import TritonBackend

            return TritonBackend()
        if name == "auto":
            return TorchBackend()
        raise _unavailable(name, why)
    raise _unavailable(name, "the FlashInfer backend is not implemented yet; use backend='torch'.")
