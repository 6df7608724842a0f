"""Backend registry: a backend adds each row's LoRA delta to a layer's base output, given the plan.

Every backend follows ``Backend``; ``torch_ref.TorchBackend`` is the reference that all others must match.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Protocol

import torch

from .torch_ref import TorchBackend


class Backend(Protocol):
    """What a backend does, per layer and call (``PackedLora`` from ``peft_fastlora.bank``, ``PlanView`` from
    ``peft_fastlora.plan``).

    Attributes
    ----------
    name : str
        ``"torch"``, ``"triton"`` or ``"flashinfer"``.
    reason : str
        Why it serves this model (set by ``get_backend``; ``patch_info`` reports it).
    """

    name: str
    reason: str

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, packed, view) -> None:
        """``result[t] += scale_s · (x[t] @ A_sᵀ) @ B_sᵀ`` in place, for every token t of a row whose slot s the layer
        holds; ``result`` ``[N, ..., out]``, ``x`` ``[N, ..., in]``; other rows unchanged."""

    def add_embedding_lora(self, result: torch.Tensor, input_ids: torch.Tensor, packed, view, embed_scale) -> None:
        """``result[t] += scale_s · A_s[:, ids[t]]ᵀ @ B_sᵀ`` (times ``embed_scale`` where given) in place, likewise."""


BACKEND_NAMES = ("auto", "triton", "torch", "flashinfer")
"""The backends a user can choose. ``"flashinfer"`` needs the optional extra ``peft-fastlora[flashinfer]``."""

AUTO_PICKS_FLASHINFER = False
"""Whether ``"auto"`` ever picks FlashInfer. It does not: on the H200 (benchmarks/results/FLASHINFER.md) FlashInfer's
segmented GEMM was not faster than the Triton kernels for one LoRA layer, and it needs host values per call (the
segment count), so a CUDA graph captured over it (compiled generate) would replay one assignment of adapters only.
Ask for it by name."""

logger = logging.getLogger(__name__)


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


def get_backend(name: str, device: torch.device) -> Backend:
    """Return the backend object for ``name`` on ``device``.

    The returned object has ``name`` (``"torch"``, ``"triton"`` or ``"flashinfer"``) and ``reason``, a sentence
    saying why it serves this model (for ``"auto"``, why it was chosen); ``peft_fastlora.patch_info`` reports both.
    ``"auto"`` logs its choice at INFO on the ``peft_fastlora`` logger, and warns when it falls back to torch on a
    CUDA device because Triton is not installed.

    Parameters
    ----------
    name : str
        One of ``"auto"``, ``"triton"``, ``"torch"``, ``"flashinfer"``. ``"auto"`` picks the fastest backend that
        works on ``device``: Triton on CUDA (FlashInfer, where installed, was not measured faster; see
        ``AUTO_PICKS_FLASHINFER``), torch elsewhere.
    device : torch.device
        The device the model's LoRA layers run on.

    Raises
    ------
    ValueError
        For a name that is not a backend.
    RuntimeError
        For a backend that cannot run here (``"flashinfer"`` without its extra names the extra); the message says
        why.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"Unknown peft_fastlora backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}.")
    if name == "torch":
        return _with_reason(TorchBackend(), "asked for by name")
    if name == "flashinfer":
        from .flashinfer import flashinfer_problem

        why = flashinfer_problem(device)
        if why is not None:
            raise _unavailable(name, why)
        from .flashinfer import FlashInferBackend

        return _with_reason(FlashInferBackend(), "asked for by name")
    if name == "auto" and device.type != "cuda":
        return _chosen(TorchBackend(), f"the model is on {device.type}, not CUDA; Triton kernels need CUDA")
    why = _triton_problem(device)
    if why is None:
        from .triton import TritonBackend

        if name == "triton":
            return _with_reason(TritonBackend(), "asked for by name")
        return _chosen(TritonBackend(), "the model is on CUDA and Triton is installed")
    if name == "triton":
        raise _unavailable(name, why)
    warnings.warn(
        f"peft_fastlora: backend='auto' falls back to the slower torch backend on this CUDA model: {why}",
        stacklevel=3,
    )
    return _chosen(TorchBackend(), f"fallback on CUDA: {why}")


def _with_reason(backend, reason: str):
    backend.reason = reason
    return backend


def _chosen(backend, reason: str):
    logger.info("peft_fastlora: backend='auto' chose %r: %s", backend.name, reason)
    return _with_reason(backend, reason)
