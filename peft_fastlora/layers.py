"""The fast LoRA layers: PEFT's own modules with a mixed-batch forward that reads the shared batch plan.

A layer is patched by swapping its class for a subclass of its own class (``fast_class``), so the module keeps its
identity, parameters, state_dict keys, ``repr`` and every PEFT method; only ``forward`` changes. When no mixed
batch is in flight (no plan) or PEFT hands the layer ``adapter_names`` itself (a fallback chosen by the model-level
call), the forward is PEFT's own.

Where autograd must see the layer (grad mode on and the input, an adapter weight or the base weight requires grad),
the layer also takes PEFT's own mixed-batch forward, with the names of this call's rows: the kernels have no
backward, so the packed path would lose the LoRA gradients.
(A DoRA adapter there gets PEFT's own DoRA error, as in plain PEFT; run inference under ``torch.no_grad()``.)

A fast layer pickles and deep-copies as the PEFT layer it was (``__reduce_ex__``): the copy holds no patch state of
the original, and the copied model re-patches itself on its first call (see ``peft_fastlora.patch``).
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any

import torch
from peft.tuners.lora import layer as lora_layer

from . import storage_keys
from .dora import apply_dora, dora_dtype
from .plan import version_unseen
from .storage_keys import launch_fields

PATCH_ATTRIBUTES = (
    "_fastlora_state", "_fastlora_key", "_fastlora_packed", "_fastlora_unsupported", "_fastlora_siblings"
)  # fmt: skip
"""What ``patch_layer`` and the bank attach to a layer; none of it belongs in a copy or a pickle."""

ACTIVE = threading.local()
"""``ACTIVE.state``: the patch state of the innermost mixed-batch call running on this thread (set by
``patch._mixed_batch_context``), or no attribute outside one. A layer serves the call where the state's ``key`` is
its own ``_fastlora_key``; any other layer (another patched model called inside the call without
``adapter_names``) takes PEFT's plain path.

Why not the layer's own ``_fastlora_state``: under torch.compile, an object that several layers reach through their
own attributes gets an aliasing guard per layer (``layer_i._fastlora_state is layer_0._fastlora_state``), which
dynamo checks in Python on every call: 7 per decoder layer. Read here, it has one source and no such guard, and
each layer adds only an int comparison."""


class _FastLayer:
    """What every fast layer class shares: the autograd fallback's row names and pickling as PEFT's own class."""

    def _row_names(self, view) -> list[str]:
        """The adapter name of each leading-dimension entry of ``view`` (one host sync; the autograd path only)."""
        names = self._fastlora_state.bank.slot_names()
        return [names[slot] for slot in view.row_slots.tolist()]

    def __reduce_ex__(self, protocol: int):
        # Pickle as the PEFT class itself: the fast class is made at run time under PEFT's name (so pickle cannot
        # find it by name), and the patch state (lock, plan, bank) is per model, so a copy must not share it.
        # (copyreg.__newobj__ would be pickled as NEWOBJ, which insists on the object's own class.)
        peft_class = type(self)._fastlora_peft_class
        state = {key: value for key, value in self.__getstate__().items() if key not in PATCH_ATTRIBUTES}
        _rebind_forwards(state, self, type(self), peft_class)  # an accelerate hook's bound forward: a PEFT layer's
        return object.__new__, (peft_class,), state


def _needs_autograd(layer, x: torch.Tensor, state) -> bool:
    """True where autograd must record ``layer``: grad mode is on and the input, an adapter weight or the base
    weight requires grad. (A module function, as ``_route`` is: a method costs a guard per layer.)

    Raises
    ------
    RuntimeError
        There, under a GPU pool (``state.pooled``): the adapters' weights are in host memory, where PEFT's path
        (the only one with a backward) cannot read them."""
    if not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or getattr(layer.get_base_layer().weight, "requires_grad", False)):
        parts = (
            layer.lora_A, layer.lora_B, layer.lora_embedding_A, layer.lora_embedding_B, layer.lora_magnitude_vector
        )  # fmt: skip
        if not any(parameter.requires_grad for part in parts for parameter in part.parameters()):
            return False
    if state.pooled:
        raise RuntimeError(
            "peft_fastlora: with max_gpu_adapters the adapters' weights are in host memory and a forward that "
            "records gradients cannot use them; run it under torch.no_grad() (generate does), or unpatch_model "
            "to train."
        )
    return True


def _route(layer, kwargs: dict):
    """How ``layer`` (a fast layer) serves the current call: None for PEFT's own forward (no mixed call of its model
    on this thread, adapters disabled, a routed plain call whose adapter the layer leaves to PEFT, or PEFT's hook
    handing it ``adapter_names`` without a GPU pool); else ``(state, plan, peft_rows)``, ``peft_rows`` telling that
    PEFT's hook handed it names (under a pool: PEFT computes those rows, the kernels the rest).

    A module function, not a method: dynamo guards a method looked up on each layer with a check of that layer's
    ``__dict__`` on every compiled call (one per LoRA layer), a global function once."""
    state = getattr(ACTIVE, "state", None)
    if state is None or state.key != layer._fastlora_key:
        return None
    plan = state.plan
    # PEFT's ``disable_adapters`` is a property of BaseTunerLayer: read through the layer, dynamo guards that no class
    # of the layer's MRO before BaseTunerLayer defines it (5 type-dict guards per LoRA layer, ~20 µs of guard time per
    # decoder layer on every compiled call with torch 2.11); the attribute itself is in the instance's ``__dict__``
    # (LoraLayer.__init__ sets it), one guard.
    if plan is None or layer._disable_adapters:
        return None
    if plan.plain_adapter is not None and plan.plain_adapter in layer._fastlora_unsupported:
        return None  # a routed plain call (see BatchPlan.plain_adapter)
    # Only PEFT's hooks (state.peft_hooks) hand a layer adapter_names inside a mixed call; reading the flag here
    # makes dynamo guard on it, so a graph compiled without hooks is not replayed for a call with them.
    peft_rows = state.peft_hooks and "adapter_names" in kwargs
    if peft_rows and not state.pooled:
        return None
    return state, plan, peft_rows


FUSE_MAX_TOKENS = 512
"""A fused sibling group's leader computes every member's output for inputs of at most this many tokens (decode
steps, short prompts). For longer ones the members' outputs would be alive at once where a model frees some
between the calls (Llama's MLP: ``act(gate(x))`` frees gate's output before ``up(x)``), which a long prefill
pays in memory; its launches cost nothing next to its GEMMs anyway."""


def plan_output(view, fields, x: torch.Tensor) -> torch.Tensor | None:
    """A fused group member's output, computed by its leader from ``x`` itself, or None (see
    ``PlanView.shared_output``).

    A member that finds none (called before its leader, as OPT's and BART's q_proj is before k_proj, the first
    registered; or on another input, as T5's cross-attention k/v) turns the group's fusing off for as long as its
    storage lives (``PackedLora.fusing_missed``): the leader's work for it was wasted, a whole GEMM per decode step."""
    output, missed = view.shared_output(fields.group_key, x, fields.member_index, fields.last)
    if missed:
        storage_keys.lookup(fields.member_keys[0]).fusing_missed = True
    return output


def _global_hooks() -> bool:
    module = torch.nn.modules.module
    return bool(module._global_forward_pre_hooks or module._global_forward_hooks)


def _hooks_inside_group_call(leader) -> bool:
    """Whether hooks would run inside a fused leader's call (``_group_forward``), between its members' base layers
    and the group's shrink: global forward hooks, and its members' base layers' own. One that changes the shared
    input in place there would make the leader's own delta read the changed input (PEFT computes it before the
    members run), and the input's version is recorded only after: such a group does not fuse."""
    if _global_hooks():
        return True
    for sibling in leader._fastlora_siblings:  # (a plain loop: every fused leader's eager call pays this)
        base = sibling._modules["base_layer"]
        if base._forward_pre_hooks or base._forward_hooks:
            return True
    return False


def _hooks_between_members(leader) -> bool:
    """Whether hooks run between a leader's call and its members' use of what it shared (its shrink, or their
    outputs): those of ``_hooks_inside_group_call``, the leader's forward hooks, the members' own forward pre-hooks
    and forward hooks. One of them may change the shared input in place. Eager calls see that through the input's
    version counter (``PlanView``); a graph traced by torch.compile has none, nor has an inference tensor, so there a
    leader with such hooks around shares nothing with its members.

    (As for any torch.compile'd module, with torch's default ``skip_nnmodule_hook_guards`` a graph traced without
    hooks is replayed after hooks are added, and runs without them: this sees the hooks present when it traces.)"""
    if _hooks_inside_group_call(leader) or leader._forward_hooks:
        return True
    for sibling in leader._fastlora_siblings:
        if sibling._forward_pre_hooks or sibling._forward_hooks:
            return True
    return False


def _group_forward(leader, x: torch.Tensor, state, view, fields) -> torch.Tensor:
    """The leader of a fused sibling group (``bank.link_siblings``) serves every member: each member's base layer on
    ``x``, one shrink of the group, one expand launch adding every member's delta; the other members' outputs wait
    in the call's plan for their own calls (``plan_output``), which find them only for this very ``x``.

    Fewer launches (q/k/v: 1 expand instead of 3; gate/up: 1 instead of 2), each a few µs of GPU latency and, in
    eager calls, of host time. Every member still runs its own forward, so its hooks and PEFT's checks run as
    before; a member called on another input (or none) computes its own output, so a wrong guess about which
    layers read one input costs time, never correctness."""
    results = [leader.base_layer(x)]
    results += [sibling.base_layer(x) for sibling in leader._fastlora_siblings]
    state.backend.add_group_lora(results, x, leader, view, fields)
    view.share_outputs(fields.group_key, x, tuple(results[1:]))
    return results[0]


class FastLinearMixin(_FastLayer):
    """Mixed-batch forward for PEFT's ``lora.Linear`` (nn.Linear, and transformers' Conv1D via fan_in_fan_out)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        route = _route(self, kwargs)
        if route is None:
            return super().forward(x, *args, **kwargs)
        state, plan, peft_rows = route
        tokens = x.shape[1:-1].numel() if x.dim() > 2 else None  # [B, S, H]: S tokens per row (see BatchPlan.view)
        view = plan.view(x.shape[0], flattened=x.dim() == 2, device=x.device, tokens_per_row=tokens)
        if _needs_autograd(self, x, state):
            return super().forward(x, *args, adapter_names=self._row_names(view), **kwargs)
        packed = self._fastlora_packed
        fields = launch_fields(packed)  # (not packed's own fields: see launch_fields)
        # Where the input's version is unseen (torch.compile, an inference tensor), a leader with hooks around its
        # members shares nothing with them (_hooks_between_members).
        unshared = fields.leader and fields.group_key is not None
        unshared = unshared and version_unseen(x) and _hooks_between_members(self)
        if peft_rows:
            # Under a GPU pool the packed adapters' weights are in host memory, out of PEFT's reach: PEFT computes
            # the rows of the adapters it serves here (the hook named every other row "__base__"), the kernels the
            # rest (the adapters PEFT serves have rank 0 in this layer's slots).
            result = super().forward(x, *args, **kwargs)
        else:
            # Also under torch.compile: there the leader's references to its siblings are a second path to modules
            # the model reaches too, which dynamo checks with a Python aliasing guard per member on every call (3
            # per decoder layer, a few µs of host), while each launch it saves costs ~8 µs of a CUDA-graph step
            # (kernel and the gap before the next node; H200, session 32).
            if fields.fused and not (args or kwargs):
                if not fields.leader:
                    result = plan_output(view, fields, x)
                    if result is not None:
                        return result  # the leader computed it (base and delta) from this very input
                elif (
                    x.numel() <= FUSE_MAX_TOKENS * x.shape[-1]
                    and state.backend.fuses_siblings
                    and not packed.fusing_missed
                    and not unshared
                    and not _hooks_inside_group_call(self)
                ):
                    return _group_forward(self, x, state, view, fields)
                else:
                    view.share_outputs(fields.group_key, x, None)  # (members: not a miss, see plan_output)
            result = self.base_layer(x, *args, **kwargs)
        if not fields.has_dora:
            state.backend.add_lora(result, x, packed, view)
        else:
            # DoRA rows are rounded to the output dtype once, as PEFT does: delta and rescale in at least fp32.
            exact = result.to(dora_dtype(result, packed.dora))
            state.backend.add_lora(exact, x, packed, view)
            apply_dora(result, exact, view.row_slots, packed.dora)
        if unshared:
            view.shared_shrink(fields.group_key, x, last=True)  # withdraw the group's shrink: members make their own
        return result


class FastEmbeddingMixin(_FastLayer):
    """Mixed-batch forward for PEFT's ``lora.Embedding``."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        route = _route(self, kwargs)
        if route is None:
            return super().forward(x, *args, **kwargs)
        state, plan, peft_rows = route
        tokens = x.shape[1:].numel() if x.dim() > 1 else None  # ids [B, S]: S tokens per row (see BatchPlan.view)
        view = plan.view(x.shape[0], flattened=x.dim() == 1, device=x.device, tokens_per_row=tokens)
        if _needs_autograd(self, x, state):
            return super().forward(x, *args, adapter_names=self._row_names(view), **kwargs)
        # (a pool: see FastLinearMixin.forward)
        result = super().forward(x, *args, **kwargs) if peft_rows else self.base_layer(x, *args, **kwargs)
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


class _PooledLayer:
    """The fast layer of a model patched with a GPU pool: a call that reaches it outside a call of its own model
    (``model.base_model(...)``, ``model.get_base_model()(...)``, which skip the PeftModel and so the pool) would run
    PEFT's own forward on adapter weights kept in host memory; it gets a clear error instead (on a GPU, torch's
    device mismatch). A class of its own, so that unpooled models' compiled forwards read nothing more."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = getattr(ACTIVE, "state", None)
        if (state is None or state.key != self._fastlora_key) and not self._disable_adapters:  # (see _route)
            held = self.lora_A.keys() | self.lora_embedding_A.keys()
            on_host = [name for name in self.active_adapters if name in held - self._fastlora_unsupported]
            if on_host:
                raise RuntimeError(
                    f"peft_fastlora: with max_gpu_adapters, adapter {on_host[0]!r} is in host memory and only a call "
                    "of the PeftModel itself (model(...), model.generate(...)) serves it; this call reached a LoRA "
                    "layer without one (e.g. model.base_model(...) or model.get_base_model()(...))."
                )
        return super().forward(x, *args, **kwargs)


_fast_classes: dict[tuple[type, bool], type] = {}


def fast_class(peft_class: type, pooled: bool = False) -> type:
    """The patched subclass of ``peft_class`` (with ``_PooledLayer``'s check where ``pooled``), created once and
    cached.

    It keeps ``peft_class``'s name, so ``print(model)`` reads exactly as before the patch.
    """
    key = (peft_class, pooled)
    if key not in _fast_classes:
        bases = (FAST_MIXINS[peft_class], peft_class)
        namespace = {"__module__": peft_class.__module__, "_fastlora_peft_class": peft_class}
        _fast_classes[key] = type(peft_class.__name__, (_PooledLayer, *bases) if pooled else bases, namespace)
    return _fast_classes[key]


def is_fast_layer(module: torch.nn.Module) -> bool:
    """True for a layer patched by ``fast_class``."""
    return "_fastlora_peft_class" in type(module).__dict__


def patch_layer(module: torch.nn.Module, state) -> None:
    """Swap ``module`` (a PEFT Linear or Embedding) to its fast class and attach the shared patch state."""
    peft_class = type(module)
    module._fastlora_state = state
    module._fastlora_key = state.key
    module.__class__ = fast_class(peft_class, state.pooled)
    _rebind_forwards(module.__dict__, module, peft_class, module.__class__)


def unpatch_layer(module: torch.nn.Module) -> None:
    """Restore ``module``'s PEFT class and drop everything the patch attached."""
    fast = type(module)
    module.__class__ = fast._fastlora_peft_class
    for attribute in PATCH_ATTRIBUTES:
        module.__dict__.pop(attribute, None)
    _rebind_forwards(module.__dict__, module, fast, module.__class__)


FORWARD_ATTRIBUTES = ("_old_forward", "forward")
"""Instance attributes that may hold the layer's own forward bound to it: accelerate's hooks (``dispatch_model``;
PEFT re-dispatches a model whose device_map offloads) replace ``forward`` by a function that calls ``_old_forward``,
the forward bound when the hook was added, and ``remove_hook_from_module`` puts that bound method back as
``forward``."""


def _rebind_forwards(attributes: dict, module: torch.nn.Module, old_class: type, new_class: type) -> None:
    """After a class swap, re-bind the entries of ``attributes`` (the module's ``__dict__``, or the state a copy is
    made from) that hold ``old_class.forward`` bound to ``module`` to ``new_class.forward``; anything else there (a
    user's own wrapper) is left alone. Without this a hooked layer kept running PEFT's forward after the patch
    (every row got the active adapter), or the fast forward after the patch was undone (a crash)."""
    for attribute in FORWARD_ATTRIBUTES:
        bound = attributes.get(attribute)
        if isinstance(bound, types.MethodType) and bound.__self__ is module and bound.__func__ is old_class.forward:
            attributes[attribute] = types.MethodType(new_class.forward, module)
