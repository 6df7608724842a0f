"""``patch_model`` / ``unpatch_model``: swap PEFT's LoRA layers for fast ones and take over the model-level
mixed-batch call.

PEFT serves ``adapter_names`` through ``LoraModel._enable_peft_forward_hooks``, a context entered once per
``forward``/``generate`` that checks the names and then registers a pre-forward hook on every LoRA layer to hand
each one the list. The patch replaces that context, on the instance only, with ``_mixed_batch_context``:

1. the same checks, with PEFT's errors, before anything runs (so a bad call changes nothing);
2. the bank is refreshed (layers whose adapters were added, deleted or replaced are repacked; see ``bank``);
3. the batch plan is filled once: names → slots, rows grouped by slot, expanded for beam search and
   ``num_return_sequences``;
4. fast layers read the plan; only modules the packed path does not serve (other LoRA layer types,
   ``modules_to_save`` wrappers, adapters with LoRA variants) get PEFT's own hook, as before.

A transformers model with adapters loaded by transformers itself (``model.load_adapter(path, adapter_name=...)``,
the PEFT integration) has no PeftModel and no ``adapter_names`` argument at all: transformers' ``generate`` rejects
it and ``forward`` ignores it silently. There the patch wraps the instance's ``forward`` and ``generate``: they take
``adapter_names`` off the call and run the same context around it, with the same semantics and errors.

Calls inside calls and calls from several threads. Each mixed call has a plan of its own, and a thread's layers
find the plan of the innermost call running on that thread (a thread-local). The outermost call takes the state's
one stable plan (``plan_buffers``, whose device buffers a CUDA graph captured over a forward keeps reading); a call
made while that plan is taken (by a logits processor inside ``generate``, or by another thread) takes a spare plan.
The lock is held only while shared state is written: the bank's refresh and the handing out of plans, never for
the whole call, so a logits processor may wait on a model call made in another thread. PEFT's hooks for the
modules it still serves are shared by every call in flight, so each hook applies only within its own call.
Changing adapters (``load_adapter``, ``delete_adapter``, writing weights) while another thread's call is running
is a race, as it is in PEFT.

Copies. ``copy.deepcopy``, ``pickle`` and ``torch.save`` of a patched model give a model whose layers are PEFT's own
classes and whose patch state is a ``_PendingPatch`` (the backend name only): the first call on the copy patches it
again, with its own lock, plans and bank. So a pickle holds no copy of the packed weights, and loading it needs
peft_fastlora importable (pickle imports it by itself) but nothing imported beforehand.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import threading
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import AuxiliaryTrainingWrapper
from transformers import PreTrainedModel

from . import peft_messages
from .backends import get_backend
from .bank import AdapterBank, adapter_parameters, registrations, sibling_groups, watch_modules
from .dora import dora_adapters
from .layers import ACTIVE, FAST_MIXINS, is_fast_layer, patch_layer, unpatch_layer
from .plan import BatchPlan

logger = logging.getLogger(__name__)


_STATE_KEYS = itertools.count(1)


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
    plan_buffers : BatchPlan
        The stable plan, taken by every call that starts while no other call holds it (so, single-threaded, by
        every outermost call): a CUDA graph captured over a forward reads its buffers, refilled in place.
    spare_plans : list[BatchPlan]
        Plans for calls that start while ``plan_buffers`` is taken (nested or concurrent calls), kept for reuse.
    lock : threading.RLock
        Held while shared state is written: layer sync and bank refresh, and taking or giving back a plan.
    key : int
        Unique to this state; each of its layers holds it as ``_fastlora_key`` (see ``layers.ACTIVE``).
    """

    backend_name: str
    backend: object
    bank: AdapterBank
    plan_buffers: BatchPlan
    spare_plans: list[BatchPlan] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    buffers_taken: bool = False
    # The plan of the innermost mixed call running on each thread (as the attribute ``plan``).
    _local: threading.local = field(default_factory=threading.local)
    key: int = field(default_factory=lambda: next(_STATE_KEYS))
    pooled: bool = False  # the bank keeps its storage in host memory behind a GPU pool (max_gpu_adapters)

    @property
    def plan(self) -> BatchPlan | None:
        """The plan of the innermost mixed-batch call running on this thread; None outside one, which sends layers
        down PEFT's own path."""
        return getattr(self._local, "plan", None)

    @property
    def peft_hooks(self) -> bool:
        """Whether the innermost mixed call of this thread hands some modules ``adapter_names`` through PEFT's
        forward hooks. Fast layers read it, so a compiled graph carries a guard on it (see
        ``_mixed_batch_context``)."""
        return getattr(self._local, "peft_hooks", False)

    def take_plan(self) -> BatchPlan:
        """A plan for a new call: the stable one if free, else a spare (made on first need)."""
        with self.lock:
            if not self.buffers_taken:
                self.buffers_taken = True
                return self.plan_buffers
            return self.spare_plans.pop() if self.spare_plans else BatchPlan(self.plan_buffers.device)

    def give_back(self, plan: BatchPlan) -> None:
        """Return a plan taken by ``take_plan`` once its call has ended."""
        with self.lock:
            if plan is self.plan_buffers:
                self.buffers_taken = False
            else:
                self.spare_plans.append(plan)

    def __reduce__(self):
        # A copy (deepcopy, pickle, torch.save) gets a fresh patch of its own on its first call: the lock and the
        # thread-local cannot be copied, and the bank and plans belong to the original's layers and device.
        return _PendingPatch, (self.backend_name, self.bank.max_gpu_adapters)


class _PendingPatch:
    """The patch state of a copied or unpickled model until its first call re-patches it (``_patch_state``).

    Parameters
    ----------
    backend_name : str
        The backend the original was patched with (``"auto"`` picks again for wherever the copy now lives).
    max_gpu_adapters : int or None
        The original's GPU pool size (its adapters' weights, and so the copy's, are in host memory).
    """

    plan = None  # no call has run on the copy yet

    def __init__(self, backend_name: str, max_gpu_adapters: int | None = None):
        self.backend_name = backend_name
        self.max_gpu_adapters = max_gpu_adapters


_REPATCH_LOCK = threading.Lock()
"""Serialises the re-patching of copies (two threads may make the first call on one copy at once)."""


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


_ADAPTER_CONTAINERS = frozenset({*LoraLayer.adapter_layer_names, "lora_dropout"})
"""A LoRA layer's dicts of per-adapter modules (see ``_adapter_modules``)."""


def _adapter_modules(root: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module]], list[torch.nn.Module]]:
    """``(path, module)`` of every LoRA layer and ``modules_to_save`` wrapper under ``root``, in ``named_modules``
    order, each once; and every module of the tree (``root`` and each LoRA layer's own modules included), for
    ``bank.watch_modules``.

    It does not descend into LoRA layers by name (their children are only adapter weights and the base layer, ~30
    modules per layer with 8 adapters), so paths are made for the modules that need one. Nor does the tree hold the
    per-adapter modules inside a LoRA layer's adapter containers (``lora_A[name]`` ...): a new or replaced one
    registers on its container, which is in the tree, and a replaced parameter of one is either counted by the bank
    (``peft_fastlora.watched``) or checked on every call (an adapter left to PEFT's path). With 1,000 adapters they
    were 450,000 modules, seconds of every walk."""
    found, seen, tree = [], set(), [root]

    def visit(module: torch.nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            if isinstance(child, (LoraLayer, AuxiliaryTrainingWrapper)):
                found.append((prefix + name, child))
            if isinstance(child, LoraLayer):
                tree.append(child)
                for part_name, part in child._modules.items():
                    if part is not None:
                        tree.extend([part] if part_name in _ADAPTER_CONTAINERS else part.modules())
            else:
                tree.append(child)
                visit(child, f"{prefix}{name}.")

    visit(root, "")
    return found, tree


def _sync_layers(
    lora_model: LoraModel, state: PatchState | None, warn: bool = False
) -> tuple[list[LoraLayer], list[LoraLayer]]:
    """Find every LoRA layer and patch the ones the packed path serves (layers PEFT added since, too).

    With ``warn``, name the LoRA layer types left on PEFT's path in one warning. Returns
    ``(all_lora_layers, fast_layers)``; the bank also keeps the modules that PEFT's hooks serve (``peft_served``)."""
    found, tree = _adapter_modules(lora_model)
    named = [(name, module) for name, module in found if isinstance(module, LoraLayer)]
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
        watch_modules(state.bank, tree)
        fast_ids = {id(layer) for layer in fast}
        state.bank.peft_served = [module for _, module in found if id(module) not in fast_ids]
        state.bank.layer_names = {id(module): name for name, module in named}
        state.bank.sibling_candidates = sibling_groups([(n, m) for n, m in named if id(m) in fast_ids])
    return lora_layers, fast


def patch_model(
    model: PeftModel, backend: str = "auto", max_gpu_adapters: int | None = None, progressbar: bool = False
) -> PeftModel:
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
    max_gpu_adapters : int or None
        Keep at most this many adapters' weights on the GPU (see ``peft_fastlora.pool``): every adapter's weights
        move to (page-locked) host memory, PEFT's parameters included, and each call first copies in the adapters
        it names that are not on the GPU, evicting the least recently used. A call may name at most this many
        distinct adapters. None (the default): every adapter stays on the model's device.
    progressbar : bool
        Show a progress bar while the adapters are packed (on the patch, and on the first call after adapters were
        added), as PEFT's ``merge_and_unload(progressbar=True)`` does.

    Returns
    -------
    peft.PeftModel
        ``model`` itself. Patching twice is harmless; patching again with another backend switches backend, and with
        another ``max_gpu_adapters`` patches anew.

    Raises
    ------
    TypeError
        If ``model`` is neither a PeftModel holding LoRA adapters nor a transformers model with loaded adapters.
    ValueError
        If it has no LoRA layers, ``backend`` is not a backend name, or ``max_gpu_adapters`` is not a positive int
        (or is given for a model split over several devices).
    RuntimeError
        If the backend cannot run here.

    Notes
    -----
    Where autograd must record a layer (grad mode on, and its input or weights require grad), that layer takes
    PEFT's own mixed-batch path, so gradients are PEFT's; inference under ``torch.no_grad()`` (``generate`` always)
    takes the packed path. Copies (``copy.deepcopy``, ``pickle``, ``torch.save``) re-patch themselves on their first
    call.
    """
    if max_gpu_adapters is not None and (
        not isinstance(max_gpu_adapters, int) or isinstance(max_gpu_adapters, bool) or max_gpu_adapters < 1
    ):
        raise ValueError(f"max_gpu_adapters must be a positive int or None, got {max_gpu_adapters!r}")
    lora_model = _lora_root(model)
    if max_gpu_adapters is not None:
        layers = [module for module in lora_model.modules() if isinstance(module, LoraLayer)]
        devices = {str(layer.get_base_layer().weight.device) for layer in layers}
        if len(devices) > 1:
            raise ValueError(
                f"max_gpu_adapters needs the model's LoRA layers on one device; they are on {sorted(devices)}."
            )
    if "_fastlora_state" in lora_model.__dict__:
        state = _patch_state(lora_model)
        if (state.bank.max_gpu_adapters is None) == (max_gpu_adapters is None):
            _switch_backend(state, backend)
            with state.lock:
                state.bank.progressbar = progressbar
                state.bank.max_gpu_adapters = max_gpu_adapters  # a new pool size: the next call resizes the pool
            return model
        unpatch_model(model)  # the storage moves between host and GPU: patch anew
    _remove_leaked_peft_hooks(lora_model)
    state = _new_state(lora_model, backend, warn=True, max_gpu_adapters=max_gpu_adapters, progressbar=progressbar)
    if isinstance(lora_model, LoraModel):
        # An instance attribute shadows LoraModel's method for this model only; PeftModel calls it by name.
        lora_model._enable_peft_forward_hooks = functools.partial(_mixed_batch_context, lora_model)
    else:
        for method in _NATIVE_METHODS:
            setattr(lora_model, method, _NativeMethod(lora_model, method, getattr(lora_model, method)))
    logger.info("peft_fastlora: patched %d LoRA layers, backend %r", len(state.bank.fast_layers), state.backend.name)
    return model


def _remove_leaked_peft_hooks(lora_model: torch.nn.Module) -> None:
    """Remove PEFT's ``adapter_names`` pre-forward hooks that a failed mixed call of plain PEFT left on the modules.

    PEFT registers them for the length of a call and does not remove them when the call raises (e.g. its length
    error for ``num_return_sequences`` with sampling); every later call of the model then hands stale names to
    its layers, and the patched layers' base ``nn.Linear`` would be called with ``adapter_names``."""
    for module in lora_model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(getattr(hook, "func", None), "__name__", "") == "_adapter_names_pre_forward_hook":
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


def _switch_backend(state: PatchState, backend: str) -> None:
    """Patching again with another backend name switches the backend of every model sharing ``state``."""
    if backend != state.backend_name:
        state.backend = get_backend(backend, state.plan_buffers.device)
        state.backend_name = backend


def _new_state(
    lora_model: torch.nn.Module,
    backend: str,
    warn: bool = False,
    max_gpu_adapters: int | None = None,
    progressbar: bool = False,
) -> PatchState:
    """Patch ``lora_model``'s layers and attach a patch state (bank packed, plan empty); return the state.

    A PeftModel that re-wraps the base of a patched one (``PeftModel.from_pretrained(m1.get_base_model(), ...)``)
    holds m1's very LoRA layers: PEFT adds the new adapter to them and both models keep serving every adapter. The
    layers can read one plan only, so the new model shares m1's state (bank, plans, lock, backend)."""
    lora_layers, fast = _sync_layers(lora_model, None, warn=warn)
    if not lora_layers:
        raise ValueError("patch_model found no LoRA layers in this model.")
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
        state.pooled = max_gpu_adapters is not None  # before the layers are patched: it picks their class
    for layer in fast:
        if not is_fast_layer(layer):
            patch_layer(layer, state)
    _, state.bank.fast_layers = _sync_layers(lora_model, state)  # again, now that the state exists: sibling groups
    if not states:
        state.bank.max_gpu_adapters, state.bank.progressbar = max_gpu_adapters, progressbar
        state.pooled = max_gpu_adapters is not None
    state.bank.refresh()
    lora_model._fastlora_state = state
    return state


def _patch_state(lora_model: torch.nn.Module) -> PatchState:
    """``lora_model``'s patch state; a copy's pending state is replaced by a fresh patch first."""
    state = lora_model.__dict__["_fastlora_state"]
    if isinstance(state, _PendingPatch):
        with _REPATCH_LOCK:
            state = lora_model.__dict__["_fastlora_state"]
            if isinstance(state, _PendingPatch):
                state = _new_state(lora_model, state.backend_name, max_gpu_adapters=state.max_gpu_adapters)
    return state


def unpatch_model(model: PeftModel) -> PeftModel:
    """Undo ``patch_model``: restore PEFT's layer classes and PEFT's own mixed-batch path. Returns ``model``.

    The adapters' parameters get storage of their own again (contiguous copies of the same values), so the model
    holds nothing of the patch."""
    lora_model = _lora_root(model)
    state = lora_model.__dict__.pop("_fastlora_state", None)
    if state is None:
        return model
    for method in ("_enable_peft_forward_hooks", *_NATIVE_METHODS):
        lora_model.__dict__.pop(method, None)
    for module in lora_model.modules():
        if is_fast_layer(module):
            if isinstance(state, PatchState):  # a copy's pending patch never packed anything
                state.bank.release(module)
            unpatch_layer(module)
        elif isinstance(state, _PendingPatch) and state.max_gpu_adapters is not None and isinstance(module, LoraLayer):
            # A copy of a pooled model holds its adapters where the original kept them, in host memory: back to
            # the layer's device, as unpatching the original does.
            device = module.get_base_layer().weight.device
            with torch.no_grad():
                for a, b in adapter_parameters(module).values():
                    for parameter in (a, b):
                        parameter.data = parameter.data.to(device)
    return model


def _validate_names(lora_model: LoraModel, bank: AdapterBank, adapter_names: object, kwargs: dict) -> list[str]:
    """PEFT's checks on ``adapter_names``, in PEFT's order and with PEFT's messages; returns them as a list of str.

    PEFT accepts any sequence of names (a list, a tuple, a numpy array of str). Where an entry is not a str (None,
    a number, bytes), PEFT fails while it words its unknown-adapter error, with the TypeError of that wording, and so
    does this (``peft_messages.unknown_adapters`` words it the same way). Beyond PEFT: a single str, or anything
    that is not a sequence, gets PEFT's type error (PEFT gives it under beam search only, and otherwise takes a str
    as one name per character); an empty batch gets a clear error (PEFT fails deep inside the model)."""
    is_array = isinstance(adapter_names, np.ndarray) and adapter_names.ndim == 1
    if isinstance(adapter_names, (str, bytes)) or not (isinstance(adapter_names, Sequence) or is_array):
        raise peft_messages.not_a_list(adapter_names)
    if lora_model.training:
        raise peft_messages.training_mode()
    unique = {name for name in adapter_names if name != peft_messages.BASE_ADAPTER_NAME}
    unknown = unique - bank.adapter_names()
    if unknown:
        raise peft_messages.unknown_adapters(unknown, bank.adapter_names())
    num_beams = kwargs.get("num_beams")
    if isinstance(num_beams, int) and num_beams > 1 and not isinstance(adapter_names, (list, tuple)):
        raise peft_messages.not_a_list(adapter_names)  # PEFT's check before it repeats the names for the beams
    inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if len(adapter_names) == 0 and (inputs is None or len(inputs) == 0):
        raise peft_messages.empty_batch()
    refused = unique & bank.refused_dora()
    if refused or any(map(_merged, bank.lora_layers)):
        # PEFT's layers raise these in forward order, each layer its merged error before its DoRA one.
        for layer in bank.lora_layers:
            if layer.merged:
                raise peft_messages.merged_adapters()
            # DoRA is served where the packed path serves it (fast Linear layers); elsewhere PEFT's error stands.
            served = dora_adapters(layer) if is_fast_layer(layer) else set()
            if any(layer.use_dora.get(name, False) and name not in served for name in refused):
                raise peft_messages.dora_enabled()
    return [str(name) for name in adapter_names]  # numpy's str_ entries become plain str


_merged = operator.attrgetter("merged")


def _refuse_dora_left_to_peft(bank: AdapterBank, named: set[str]) -> None:
    """PEFT's DoRA error where a named DoRA adapter is left to PEFT's path in some fast layer (its dtype differs from
    the layer's other adapters, known only once the bank has packed): PEFT's own layer would raise it mid-forward."""
    if named & bank.dora_left_to_peft:
        raise peft_messages.dora_enabled()


def _expand_size(lora_model: torch.nn.Module, kwargs: dict) -> int:
    """How many copies of each input row ``generate`` will run: ``max(num_beams, num_return_sequences)``, as
    transformers' ``_expand_inputs_for_generation`` does. PEFT itself only expands for ``num_beams`` kwargs."""
    config = kwargs.get("generation_config") or getattr(_inner_model(lora_model), "generation_config", None)
    num_beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    num_return_sequences = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
    return max(int(num_beams), int(num_return_sequences))


def _hook_peft_modules(lora_model, state: PatchState, plan: BatchPlan, names: list[str], expand: int) -> list:
    """Register PEFT's ``adapter_names`` pre-forward hook, for this call, on the modules that PEFT's own path serves
    (``_peft_path_modules``); returns the handles."""
    bank = state.bank
    expanded_names = [name for name in names for _ in range(expand)]
    modules = [*bank.fast_layers, *bank.peft_served] if bank.left_to_peft & set(names) else bank.peft_served
    handles = [
        module.register_forward_pre_hook(
            functools.partial(
                _inject_adapter_names, state=state, plan=plan, adapter_names=_peft_rows(module, expanded_names)
            ),
            with_kwargs=True,
        )
        for module in _peft_path_modules(modules, set(names))
    ]
    encoder = _encoder(_inner_model(lora_model))
    if expand > 1 and encoder is not None:
        # The encoder runs on the rows before expansion (as in PEFT): hook its modules again with the originals.
        handles += [
            module.register_forward_pre_hook(
                functools.partial(
                    _inject_adapter_names, state=state, plan=plan, adapter_names=_peft_rows(module, names)
                ),
                with_kwargs=True,
            )
            for module in _peft_path_modules(encoder.modules(), set(names))
        ]
    return handles


def _peft_rows(module: torch.nn.Module, names: list[str]) -> list[str]:
    """The names PEFT's hook hands ``module``: all of them, except on a fast layer under a GPU pool, where the rows of
    packed adapters become ``"__base__"`` (their weights are in host memory; the layer adds them with the kernels,
    see ``FastLinearMixin.forward``)."""
    if not (is_fast_layer(module) and module._fastlora_state.pooled):
        return names
    served_by_peft = module._fastlora_unsupported
    base = peft_messages.BASE_ADAPTER_NAME
    return [name if name in served_by_peft else base for name in names]


def _inject_adapter_names(module, args, kwargs, state: PatchState, plan: BatchPlan, adapter_names: list[str]):
    """PEFT's pre-forward hook, for one call: module hooks are seen by every call in flight (other threads, calls
    nested inside this one), so the names go in only where this call is the innermost one of the running thread."""
    if state.plan is not plan:
        return None
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _peft_path_modules(modules, named: set[str]):
    """Of ``modules``, those that keep receiving ``adapter_names`` from a hook, as in plain PEFT: non-fast LoRA
    layers, ``modules_to_save`` wrappers, and fast layers holding a named adapter that the packed path cannot
    serve."""
    for module in modules:
        if is_fast_layer(module):
            if module._fastlora_unsupported & named:
                yield module
        elif isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
            yield module


_NATIVE_METHODS = ("forward", "generate")
"""The methods of a transformers model (adapters loaded by transformers) that the patch wraps on the instance."""


class _NativeMethod:
    """``model.<name>`` for a patched transformers model: ``adapter_names`` is taken off the call and served by the
    same context as PeftModel's (transformers would reject it, or ignore it).

    It keeps the wrapped method's signature (``functools.update_wrapper``), which transformers inspects to validate
    generate's kwargs. It is an object rather than a closure so that a copy of the model gets a wrapper bound to the
    copy (``copy.deepcopy`` would share a closure, and ``pickle`` refuses one).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The patched model.
    name : str
        ``"forward"`` or ``"generate"``.
    method : callable
        What ``model.<name>`` was before the patch.
    """

    def __init__(self, model: PreTrainedModel, name: str, method):
        self.model, self.name, self.method = model, name, method
        functools.update_wrapper(self, method)

    def __call__(self, *args, **kwargs):
        with _mixed_batch_context(self.model, *args, **kwargs):
            kwargs.pop("adapter_names", None)
            return self.method(*args, **kwargs)

    def __reduce__(self):
        return _NativeMethod, (self.model, self.name, self.method)


@contextmanager
def _mixed_batch_context(lora_model: torch.nn.Module, *args, **kwargs):
    """The patched ``LoraModel._enable_peft_forward_hooks``: one plan per model call, read by every fast layer.

    The call's plan is this thread's current plan for the length of the call (restored after, so that a call made
    inside another, e.g. by a logits processor, leaves the outer one's plan as it was). A call without
    ``adapter_names`` leaves the current plan alone: on its own it is a plain call (no plan on this thread), and
    made inside a mixed call it serves the outer call's rows, as in PEFT, whose hooks stay on every LoRA layer for
    the outer call's length (transformers' own ``generate`` calls ``forward`` this way on a native model). The lock
    is held only while the bank and the layer list are brought up to date and while a plan is taken."""
    state = _patch_state(lora_model)
    adapter_names = kwargs.get("adapter_names")
    uniform = routed = False  # a plain call served as a mixed one; one adapter for any number of rows
    if adapter_names is None and state.pooled and state.plan is None and kwargs.get("alora_offsets") is None:
        plain = _plain_call_rows(lora_model, state.bank, args, kwargs)
        if plain is not None:
            (adapter_names, uniform), routed = plain, True
    if adapter_names is None or kwargs.get("alora_offsets") is not None:
        if isinstance(lora_model, LoraModel):
            with LoraModel._enable_peft_forward_hooks(lora_model, *args, **kwargs):
                yield
        else:
            yield
        return
    with state.lock:
        bank = state.bank
        synced = (registrations(), id(lora_model))
        if bank.synced != synced or bank.confirmed != synced:
            # Something was registered on the model since the last walk: walk again, and once more on the next
            # call. torch counts a registration (its hook) before it stores the module, so a walk made in between
            # by a call on another thread misses the module; the second walk finds it.
            bank.lora_layers, bank.fast_layers = _sync_layers(lora_model, state)
            bank.confirmed = bank.synced if bank.synced == synced else None
            bank.synced = synced
        names = _validate_names(lora_model, bank, adapter_names, kwargs)
        bank.refresh(set(names))
        _refuse_dora_left_to_peft(bank, set(names))
        slots = bank.slot_ids(names)
    try:
        expand = _expand_size(lora_model, kwargs)
        local = state._local
        outer, outer_hooks = getattr(local, "plan", None), getattr(local, "peft_hooks", False)
        outer_state = getattr(ACTIVE, "state", None)
        plan = state.take_plan()
        handles = []
        try:
            if uniform:
                plan.fill_uniform(slots[0])
            else:
                plan.fill(slots, expand)  # this call's plan alone: no lock needed
            if routed:
                # A plain call: PEFT's own modules (and fast layers that leave the adapter to PEFT, see
                # FastLinearMixin.forward) take the active adapter by themselves, so no hooks.
                plan.plain_adapter = names[0]
            else:
                handles = _hook_peft_modules(lora_model, state, plan, names, expand)
            local.plan, local.peft_hooks = plan, bool(handles)
            ACTIVE.state = state
            if handles:
                # PEFT-path modules get their names through forward hooks, and dynamo by default does not guard on
                # hooks: a graph compiled with another call's hooks would be replayed silently, so guard on them.
                with _hook_guards():
                    yield
            else:
                # No hooks: hook guards on ~1,500 modules would cost ~2 ms of host time per compiled decode step. A
                # graph compiled here is still never replayed for a call with hooks: the fast layers read
                # state.peft_hooks, which dynamo guards on.
                yield
        finally:
            local.plan, local.peft_hooks = outer, outer_hooks
            ACTIVE.state = outer_state
            plan.forget_shrinks()
            for handle in handles:
                handle.remove()
            state.give_back(plan)
    finally:
        with state.lock:  # (place counts a slot in use under the lock: so must this)
            bank.release_slots(slots)  # (a GPU pool may evict this call's adapters again)


def _plain_call_rows(lora_model: torch.nn.Module, bank: AdapterBank, args: tuple, kwargs: dict):
    """Under a GPU pool, a plain call (no ``adapter_names``) as a mixed call with the active adapter on every row:
    ``(names, uniform)``, or None to leave the call to PEFT (adapters disabled, a DoRA adapter).

    The pool keeps the adapters' weights in host memory, where PEFT's own forward cannot use them; the active
    adapter is served through the pool instead, with the same result; a layer that leaves that adapter to PEFT runs
    PEFT's own plain forward (``BatchPlan.plain_adapter``). ``names`` has one entry per row where the call shows its
    batch (``generate``'s ``input_ids``); else (``PeftModelForCausalLM.forward`` keeps its inputs to itself) it is
    the one name and ``uniform`` is True: the plan then serves any number of rows with it.

    Raises
    ------
    RuntimeError
        In training mode (the pool serves inference only).
    ValueError
        If several adapters are active (PEFT adds them up; one row takes one adapter here).
    """
    fast = bank.fast_layers
    if not fast or fast[0].disable_adapters:
        return None
    if lora_model.training:
        raise RuntimeError(
            "peft_fastlora: with max_gpu_adapters the adapters' weights are in host memory and the model serves "
            "inference only; call model.eval(), or unpatch_model to train."
        )
    active = lora_model.active_adapters
    active = active() if callable(active) else active  # (a method on a transformers model)
    active = [active] if isinstance(active, str) else list(active)
    if len(active) != 1:
        raise ValueError(
            f"peft_fastlora: with max_gpu_adapters, a call without adapter_names serves one active adapter, but "
            f"{active} are active; pass adapter_names=[...] or set_adapter one of them."
        )
    name = active[0]
    if any(layer.use_dora.get(name, False) for layer in bank.lora_layers):
        return None  # DoRA adapters are not pooled: PEFT serves them from their own tensors
    inputs = kwargs.get("input_ids")
    inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
    if inputs is None and args and isinstance(args[0], torch.Tensor):
        inputs = args[0]
    if isinstance(inputs, torch.Tensor) and inputs.dim() > 0:
        return [name] * inputs.shape[0], False
    return [name], True


@functools.cache
def _hook_guards():
    """One reusable ``torch._dynamo.config.patch(skip_nnmodule_hook_guards=False)`` for every call. A fresh patch
    object per call leaked: each one makes a ContextVar that the thread's context keeps for good (~290 bytes a
    call). The patch is re-entrant and per thread (its saved values live in a ContextVar), so one object serves
    nested calls and calls from several threads."""
    return torch._dynamo.config.patch(skip_nnmodule_hook_guards=False)


def _encoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The encoder of an encoder-decoder model, or None (transformers 5 returns the model itself when it has none)."""
    get_encoder = getattr(model, "get_encoder", None)
    if get_encoder is None:
        return None
    encoder = get_encoder()
    return None if encoder is model else encoder
