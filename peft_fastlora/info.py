"""``patch_info(model)``: whether a model is patched, and which backend serves it and why.

``print(model)`` stays PEFT's own (the patched layers keep their classes' names), so this is the public way to see
the patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PatchInfo:
    """What ``patch_info`` reports.

    Attributes
    ----------
    patched : bool
        Whether ``patch_model`` has patched the model (and ``unpatch_model`` has not undone it).
    backend : str or None
        The backend that serves its mixed batches: ``"triton"`` or ``"torch"``; None when not patched.
    requested : str or None
        The ``backend`` argument given to ``patch_model`` (``"auto"``, ``"triton"`` or ``"torch"``).
    reason : str or None
        Why ``backend`` serves the model: for ``"auto"``, why it chose it (e.g. the model is on CPU).
    fast_layers : int
        How many LoRA layers the packed path serves; the other LoRA layers stay on PEFT's own path.
    lora_layers : int
        How many LoRA layers the model has.
    adapters : tuple of str
        The adapters loaded on the model, sorted (a batch row may also use ``"__base__"``: no adapter).
    """

    patched: bool
    backend: str | None = None
    requested: str | None = None
    reason: str | None = None
    fast_layers: int = 0
    lora_layers: int = 0
    adapters: tuple[str, ...] = ()

    def __str__(self) -> str:
        if not self.patched:
            return "not patched by peft_fastlora"
        return (
            f"patched by peft_fastlora: backend {self.backend!r} (requested {self.requested!r}: {self.reason}); "
            f"{self.fast_layers} of {self.lora_layers} LoRA layers packed; adapters {', '.join(self.adapters)}"
        )


def patch_info(model: object) -> PatchInfo:
    """Whether ``model`` is patched by ``patch_model``, and which backend serves it and why.

    Parameters
    ----------
    model : peft.PeftModel or transformers.PreTrainedModel
        A model passed to ``patch_model`` (or not yet).

    Returns
    -------
    PatchInfo
        ``patched`` is False (and the rest empty) for a model that is not patched, including any other object.
        ``str(info)`` is a one-line summary.
    """
    state = _state(model)
    if state is None:
        return PatchInfo(patched=False)
    bank = state.bank
    return PatchInfo(
        patched=True,
        backend=getattr(state.backend, "name", type(state.backend).__name__),
        requested=state.backend_name,
        reason=getattr(state.backend, "reason", None),
        fast_layers=len(bank.fast_layers),
        lora_layers=len(bank.lora_layers),
        adapters=tuple(sorted(bank.adapter_names())),
    )


def _state(model: object):
    """The patch state of a PeftModel (on its LoraModel) or of a transformers model with adapters, or None."""
    if not isinstance(model, torch.nn.Module):
        return None
    from .patch import _patch_state

    root = getattr(model, "base_model", None)
    for candidate in (root, model):
        if isinstance(candidate, torch.nn.Module) and candidate.__dict__.get("_fastlora_state") is not None:
            # A copy (deepcopy, pickle) holds a pending state until its first call: patch it now, as that call would.
            return _patch_state(candidate)
    return None
