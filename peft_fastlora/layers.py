"""The fast LoRA layers: PEFT's own modules with a mixed-batch forward that reads the shared batch plan.

A layer is patched by swapping its class for a subclass of its own class (``fast_class``), so the module keeps its
identity, parameters, state_dict keys, ``repr`` and every PEFT method; only ``forward`` changes. When no mixed
batch is in flight (no plan) or PEFT hands the layer ``adapter_names`` itself (a fallback chosen by the model-level
call), the forward is PEFT's own.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from peft.tuners.lora import layer as lora_layer

from .dora import apply_dora, dora_dtype


class FastLinearMixin:
    """Mixed-batch forward for PEFT's ``lora.Linear`` (nn.Linear, and transformers' Conv1D via fan_in_fan_out)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = self._fastlora_state
        plan = state.plan
        # Only PEFT's hooks (state.peft_hooks) hand a layer adapter_names inside a mixed call; reading the flag here
        # makes dynamo guard on it, so a graph compiled without hooks is not replayed for a call with them.
        if plan is None or self.disable_adapters or (state.peft_hooks and "adapter_names" in kwargs):
            return super().forward(x, *args, **kwargs)
        tokens = x.shape[1:-1].numel() if x.dim() > 2 else None  # [B, S, H]: S tokens per row (see BatchPlan.view)
        view = plan.view(x.shape[0], flattened=x.dim() == 2, device=x.device, tokens_per_row=tokens)
        result = self.base_layer(x, *args, **kwargs)
        packed = self._fastlora_packed
        if packed.dora is None:
            state.backend.add_lora(result, x, packed, view)
            return result
        # DoRA rows are rounded to the output dtype once, as PEFT does: delta and rescale in at least fp32.
        exact = result.to(dora_dtype(result, packed.dora))
        state.backend.add_lora(exact, x, packed, view)
        apply_dora(result, exact, view.row_slots, packed.dora)
        return result


class FastEmbeddingMixin:
    """Mixed-batch forward for PEFT's ``lora.Embedding``."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = self._fastlora_state
        plan = state.plan
        if plan is None or self.disable_adapters or (state.peft_hooks and "adapter_names" in kwargs):
            return super().forward(x, *args, **kwargs)
        tokens = x.shape[1:].numel() if x.dim() > 1 else None  # ids [B, S]: S tokens per row (see BatchPlan.view)
        view = plan.view(x.shape[0], flattened=x.dim() == 1, device=x.device, tokens_per_row=tokens)
        result = self.base_layer(x, *args, **kwargs)
        state.backend.add_embedding_lora(result, x, self._fastlora_packed, view, self._get_embed_scale())
        return result


def _quantized_linear_classes() -> list[type]:
    """PEFT's LoRA layers over bitsandbytes' 8-bit and 4-bit Linear, where PEFT has loaded them. Their forward
    is the plain one (base output, then the LoRA delta in the adapter dtype, cast to the output dtype), so the
    packed path serves them as it serves ``lora.Linear``; the base stays bitsandbytes' quantized matmul.

    Only looked up in ``sys.modules``: PEFT imports ``peft.tuners.lora.bnb`` itself when it wraps a quantized
    layer, so a model without one never makes us import it (nor bitsandbytes' kernels)."""
    lora_bnb = sys.modules.get("peft.tuners.lora.bnb")
    if lora_bnb is None:
        return []
    return [cls for cls in (getattr(lora_bnb, "Linear8bitLt", None), getattr(lora_bnb, "Linear4bit", None)) if cls]


class _FastMixins(dict):
    """``{PEFT layer class: mixin}``; the bitsandbytes classes join on the first look-up after PEFT loaded them."""

    quantized_added = False

    def _add_quantized(self) -> None:
        if not self.quantized_added and "peft.tuners.lora.bnb" in sys.modules:
            self.update(dict.fromkeys(_quantized_linear_classes(), FastLinearMixin))
            self.quantized_added = True

    def __contains__(self, key: object) -> bool:
        self._add_quantized()
        return dict.__contains__(self, key)

    def __getitem__(self, key: type) -> type:
        self._add_quantized()
        return dict.__getitem__(self, key)


FAST_MIXINS = _FastMixins({lora_layer.Linear: FastLinearMixin, lora_layer.Embedding: FastEmbeddingMixin})
"""PEFT layer classes served by the packed path, by exact type (other subclasses keep PEFT's path, with a
warning that names them)."""

_fast_classes: dict[type, type] = {}


def fast_class(peft_class: type) -> type:
    """The patched subclass of ``peft_class``, created once and cached.

    It keeps ``peft_class``'s name, so ``print(model)`` reads exactly as before the patch.
    """
    if peft_class not in _fast_classes:
        mixin = FAST_MIXINS[peft_class]
        namespace = {"__module__": peft_class.__module__, "_fastlora_peft_class": peft_class}
        _fast_classes[peft_class] = type(peft_class.__name__, (mixin, peft_class), namespace)
    return _fast_classes[peft_class]


def is_fast_layer(module: torch.nn.Module) -> bool:
    """True for a layer patched by ``fast_class``."""
    return "_fastlora_peft_class" in type(module).__dict__


def patch_layer(module: torch.nn.Module, state) -> None:
    """Swap ``module`` (a PEFT Linear or Embedding) to its fast class and attach the shared patch state."""
    module._fastlora_state = state
    module.__class__ = fast_class(type(module))


def unpatch_layer(module: torch.nn.Module) -> None:
    """Restore ``module``'s PEFT class and drop everything the patch attached."""
    module.__class__ = type(module)._fastlora_peft_class
    for attribute in ("_fastlora_state", "_fastlora_packed", "_fastlora_unsupported"):
        module.__dict__.pop(attribute, None)
