"""``patch_model`` / ``unpatch_model``: swap PEFT's LoRA layers for fast ones and take over the model-level
mixed-batch call.

PEFT serves ``adapter_names`` through ``LoraModel._enable_peft_forward_hooks``, a context entered once per
``forward``/``generate`` that checks the names and then registers a pre-forward hook on every LoRA layer to hand
each one the list. The patch replaces that context, on the instance only, with ``_mixed_batch_context``:

1. the same checks, with PEFT's errors, before anything runs (so a bad call changes nothing);
2. the bank is refreshed (new, deleted or overwritten adapters are repacked);
3. the batch plan is filled once: names → slots, rows grouped by slot, expanded for beam search and
   ``num_return_sequences``;
4. fast layers read the plan; only modules the packed path does not serve (other LoRA layer types,
   ``modules_to_save`` wrappers, adapters with LoRA variants) get PEFT's own hook, as before.

A transformers model with adapters loaded by transformers itself (``model.load_adapter(path, adapter_name=...)``,
the PEFT integration) has no PeftModel and no ``adapter_names`` argument at all: transformers' ``generate`` rejects
it and ``forward`` ignores it silently. There the patch wraps the instance's ``forward`` and ``generate``: they take
``adapter_names`` off the call and run the same context around it, with the same semantics and errors.
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import AuxiliaryTrainingWrapper
from transformers import PreTrainedModel

from . import peft_messages
from .backends import get_backend
from .bank import AdapterBank, sibling_groups
from .dora import dora_adapters
from .layers import FAST_MIXINS, is_fast_layer, patch_layer, unpatch_layer
from .plan import BatchPlan

logger = logging.getLogger(__name__)


@dataclass
class PatchState:
    """Everything a patched model shares between its layers.

    Attributes
    ----------
    backend_name : str
        What the user asked for (``"auto"`` included).
    backend : object
        The backend that adds LoRA deltas (see ``peft_fastlora.backends``).
    bank : AdapterBank
        Slots and packed weights.
    plan : BatchPlan or None
        The plan of the mixed-batch call in flight; None outside one, which sends layers down PEFT's own path.
    """

    backend_name: str
    backend: object
    bank: AdapterBank
    plan_buffers: BatchPlan
    plan: BatchPlan | None = None
    # True during a mixed call in which some modules get ``adapter_names`` from PEFT's forward hooks. Fast layers
    # read it, so a compiled graph carries a guard on it (see _mixed_batch_context).
    peft_hooks: bool = False
    # Serialises mixed-batch calls: the plan is shared by all layers, so two calls in flight at once would mix.
    lock: threading.RLock = field(default_factory=threading.RLock)


def _lora_root(model: object) -> torch.nn.Module:
    """The module that holds ``model``'s LoRA layers and the patch state: a PeftModel's LoraModel, or the
    transformers model itself where transformers loaded the adapters."""
    if isinstance(model, PeftModel):
        if not isinstance(model.base_model, LoraModel):
            raise TypeError(
                f"patch_model supports LoRA adapters only, but this PeftModel holds {type(model.base_model).__name__}."
            )
        return model.base_model
    if isinstance(model, PreTrainedModel) and getattr(model, "_hf_peft_config_loaded", False):
        return model
    raise TypeError(
        "patch_model expects a peft.PeftModel with LoRA adapters, or a transformers model with adapters loaded by "
        f"model.load_adapter(...), got {type(model).__name__}."
    )


def _inner_model(root: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under ``root`` (its generation config and encoder)."""
    return root.model if isinstance(root, LoraModel) else root


def _model_device(layers: list[LoraLayer]) -> torch.device:
    return layers[0].get_base_layer().weight.device


def _sync_layers(
    lora_model: LoraModel, state: PatchState | None, warn: bool = False
) -> tuple[list[LoraLayer], list[LoraLayer]]:
    """Find every LoRA layer and patch the ones the packed path serves (layers PEFT added since, too).

    With ``warn``, name the LoRA layer types left on PEFT's path in one warning. Returns
    ``(all_lora_layers, fast_layers)``."""
    named = [(name, module) for name, module in lora_model.named_modules() if isinstance(module, LoraLayer)]
    lora_layers = [module for _, module in named]
    fast, others = [], set()
    for layer in lora_layers:
        if is_fast_layer(layer):
            fast.append(layer)
        elif type(layer) in FAST_MIXINS:
            if state is not None:
                patch_layer(layer, state)
            fast.append(layer)
        else:
            others.add(type(layer).__qualname__)
    if others and warn:
        warnings.warn(
            "peft_fastlora serves these LoRA layer types through PEFT's own (slower) mixed-batch path: "
            + ", ".join(sorted(others)),
            stacklevel=3,
        )
    if state is not None:
        fast_ids = {id(layer) for layer in fast}
        state.bank.layer_names = {id(module): name for name, module in named}
        state.bank.sibling_candidates = sibling_groups([(n, m) for n, m in named if id(m) in fast_ids])
    return lora_layers, fast


def patch_model(model: PeftModel, backend: str = "auto") -> PeftModel:
    """Make ``model``'s mixed-adapter batches fast, in place.

    After the patch, ``model(**inputs, adapter_names=[...])`` and ``model.generate(**inputs, adapter_names=[...])``
    run every LoRA layer once for the whole batch through ``backend``, instead of once per distinct adapter.
    Everything else (the active adapter, ``set_adapter``, ``disable_adapter()``, merging, saving, ``print``) is
    PEFT's own behaviour, unchanged.

    Parameters
    ----------
    model : peft.PeftModel or transformers.PreTrainedModel
        A loaded PEFT model with one or more LoRA adapters, or a transformers model whose LoRA adapters were
        loaded with its own ``load_adapter`` (its ``forward`` and ``generate`` then accept ``adapter_names``).
    backend : {"auto", "triton", "torch"}
        Which kernels add the LoRA deltas. ``"auto"`` picks the fastest one that works on the model's device:
        ``"triton"`` on CUDA when Triton is installed (with a warning when it is not), else ``"torch"``.
        ``peft_fastlora.patch_info(model)`` tells which one serves the model and why.

    Returns
    -------
    peft.PeftModel
        ``model`` itself. Patching twice is harmless; patching again with another backend switches backend.

    Raises
    ------
    TypeError
        If ``model`` is neither a PeftModel holding LoRA adapters nor a transformers model with loaded adapters.
    ValueError
        If it has no LoRA layers, or ``backend`` is not a backend name.
    RuntimeError
        If the backend cannot run here.
    """
    lora_model = _lora_root(model)
    state = lora_model.__dict__.get("_fastlora_state")
    if state is not None:
        _switch_backend(state, backend)
        return model
    lora_layers, fast = _sync_layers(lora_model, None, warn=True)
    if not lora_layers:
        raise ValueError("patch_model found no LoRA layers in this model.")
    # A PeftModel that re-wraps the base of a patched one (``PeftModel.from_pretrained(m1.get_base_model(), ...)``)
    # holds m1's very LoRA layers: PEFT adds the new adapter to them and both models keep serving every adapter.
    # The layers can read one plan only, so the new model shares m1's state (bank, plan, lock, backend).
    states = {id(layer._fastlora_state): layer._fastlora_state for layer in fast if is_fast_layer(layer)}
    states = list(states.values())
    if len(states) > 1:
        raise ValueError(
            "patch_model: this model's LoRA layers belong to several patched models; unpatch_model them first."
        )
    if states:
        state = states[0]
        state.bank.lora_layers = lora_layers
        _switch_backend(state, backend)
    else:
        device = _model_device(fast or lora_layers)
        state = PatchState(backend, get_backend(backend, device), AdapterBank(lora_layers, []), BatchPlan(device))
    for layer in fast:
        if not is_fast_layer(layer):
            patch_layer(layer, state)
    _, state.bank.fast_layers = _sync_layers(lora_model, state)  # again, now that the state exists: sibling groups
    state.bank.refresh()
    lora_model._fastlora_state = state
    if isinstance(lora_model, LoraModel):
        # An instance attribute shadows LoraModel's method for this model only; PeftModel calls it by name.
        lora_model._enable_peft_forward_hooks = functools.partial(_mixed_batch_context, lora_model)
    else:
        for method in _NATIVE_METHODS:
            setattr(lora_model, method, _native_wrapper(lora_model, method))
    logger.info("peft_fastlora: patched %d LoRA layers, backend %s", len(fast), type(state.backend).__name__)
    return model


def _switch_backend(state: PatchState, backend: str) -> None:
    """Patching again with another backend name switches the backend of every model sharing ``state``."""
    if backend != state.backend_name:
        state.backend = get_backend(backend, state.plan_buffers.device)
        state.backend_name = backend


def unpatch_model(model: PeftModel) -> PeftModel:
    """Undo ``patch_model``: restore PEFT's layer classes and PEFT's own mixed-batch path. Returns ``model``."""
    lora_model = _lora_root(model)
    if lora_model.__dict__.pop("_fastlora_state", None) is None:
        return model
    for method in ("_enable_peft_forward_hooks", *_NATIVE_METHODS):
        lora_model.__dict__.pop(method, None)
    for module in lora_model.modules():
        if is_fast_layer(module):
            unpatch_layer(module)
    return model


def _validate_names(lora_model: LoraModel, bank: AdapterBank, adapter_names: object, kwargs: dict) -> list[str]:
    """PEFT's checks on ``adapter_names``, in PEFT's order and with PEFT's messages (plus an empty batch, which
    PEFT lets fail inside the model); returns them as a list."""
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(name, str) for name in adapter_names):
        raise peft_messages.not_a_list(adapter_names)
    inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if not adapter_names and (inputs is None or len(inputs) == 0):
        raise peft_messages.empty_batch()
    if lora_model.training:
        raise peft_messages.training_mode()
    unique = {name for name in adapter_names if name != peft_messages.BASE_ADAPTER_NAME}
    unknown = unique - bank.adapter_names()
    if unknown:
        raise peft_messages.unknown_adapters(unknown, bank.adapter_names())
    for layer in bank.lora_layers:
        if layer.merged:
            raise peft_messages.merged_adapters()
        # DoRA is served where the packed path serves it (fast Linear layers); elsewhere PEFT's error stands.
        served = dora_adapters(layer) if is_fast_layer(layer) else set()
        if any(layer.use_dora.get(name, False) and name not in served for name in unique):
            raise peft_messages.dora_enabled()
    return list(adapter_names)


def _expand_size(lora_model: torch.nn.Module, kwargs: dict) -> int:
    """How many copies of each input row ``generate`` will run: ``max(num_beams, num_return_sequences)``, as
    transformers' ``_expand_inputs_for_generation`` does. PEFT itself only expands for ``num_beams`` kwargs."""
    config = kwargs.get("generation_config") or getattr(_inner_model(lora_model), "generation_config", None)
    num_beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    num_return_sequences = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
    return max(int(num_beams), int(num_return_sequences))


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _peft_path_modules(lora_model: LoraModel, state: PatchState, named: set[str]):
    """Modules that keep receiving ``adapter_names`` from a hook, as in plain PEFT: non-fast LoRA layers,
    ``modules_to_save`` wrappers, and fast layers holding a named adapter that the packed path cannot serve."""
    for module in lora_model.modules():
        if is_fast_layer(module):
            if module._fastlora_unsupported & named:
                yield module
        elif isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
            yield module


_NATIVE_METHODS = ("forward", "generate")
"""The methods of a transformers model (adapters loaded by transformers) that the patch wraps on the instance."""


def _native_wrapper(model: PreTrainedModel, name: str):
    """``model.<name>`` for a patched transformers model: ``adapter_names`` is taken off the call and served by the
    same context as PeftModel's (transformers would reject it, or ignore it). It keeps the wrapped method's
    signature (``functools.wraps``), which transformers inspects to validate generate's kwargs."""
    method = getattr(model, name)

    @functools.wraps(method)
    def call(*args, **kwargs):
        with _mixed_batch_context(model, *args, **kwargs):
            kwargs.pop("adapter_names", None)
            return method(*args, **kwargs)

    return call


@contextmanager
def _mixed_batch_context(lora_model: torch.nn.Module, *args, **kwargs):
    """The patched ``LoraModel._enable_peft_forward_hooks``: one plan per model call, read by every fast layer.

    Every call on the patched model, with ``adapter_names`` or without, holds the state's lock: the plan is shared
    by all layers, so a call from another thread running at the same time would read this call's plan. Calls
    from several threads therefore run one at a time, each with exactly its own rows' adapters."""
    state: PatchState = lora_model._fastlora_state
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is None or kwargs.get("alora_offsets") is not None:
        with state.lock:
            if isinstance(lora_model, LoraModel):
                with LoraModel._enable_peft_forward_hooks(lora_model, *args, **kwargs):
                    yield
            else:
                yield
        return
    with state.lock:
        lora_layers, fast = _sync_layers(lora_model, state)
        bank = state.bank
        bank.lora_layers, bank.fast_layers = lora_layers, fast
        names = _validate_names(lora_model, bank, adapter_names, kwargs)
        bank.refresh()
        expand = _expand_size(lora_model, kwargs)
        state.plan_buffers.fill(bank.slot_ids(names), expand)
        expanded_names = [name for name in names for _ in range(expand)]
        handles = [
            module.register_forward_pre_hook(
                functools.partial(_inject_adapter_names, adapter_names=expanded_names), with_kwargs=True
            )
            for module in _peft_path_modules(lora_model, state, set(names))
        ]
        encoder = _encoder(_inner_model(lora_model))
        if expand > 1 and encoder is not None:
            # The encoder runs on the rows before expansion (as in PEFT): hook its modules again with the originals.
            handles += [
                module.register_forward_pre_hook(
                    functools.partial(_inject_adapter_names, adapter_names=names), with_kwargs=True
                )
                for module in _peft_path_modules(encoder, state, set(names))
            ]
        state.plan, state.peft_hooks = state.plan_buffers, bool(handles)
        try:
            if handles:
                # PEFT-path modules get their names through forward hooks, and dynamo by default does not guard on
                # hooks: a graph compiled with another call's hooks would be replayed silently, so guard on them.
                with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
                    yield
            else:
                # No hooks: hook guards on ~1,500 modules would cost ~2 ms of host time per compiled decode step.
                # A graph compiled here is still never replayed for a call with hooks: the fast layers read
                # state.peft_hooks, which dynamo guards on.
                yield
        finally:
            state.plan, state.peft_hooks = None, False
            bank.forget_inputs()
            for handle in handles:
                handle.remove()


def _encoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The encoder of an encoder-decoder model, or None (transformers 5 returns the model itself when it has none)."""
    get_encoder = getattr(model, "get_encoder", None)
    if get_encoder is None:
        return None
    encoder = get_encoder()
    return None if encoder is model else encoder
