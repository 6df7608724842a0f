"""The adapter bank: one model-wide adapter-name → slot map, and each layer's adapters in one packed storage that
PEFT's own parameters are views of.

Storage, per layer (``PackedLora``)::

    a    [R, in]         the lora_A rows of every adapter, adapter after adapter (Embedding: in = vocabulary)
    b    [R * out]       every adapter's lora_B, each one a contiguous [out, r] block in PEFT's own layout

``R`` is the sum of the ranks the layer holds; adapter ``s`` owns rows ``a_offsets[s] : a_offsets[s] + ranks[s]``
of ``a`` and elements ``b_offsets[s] * out : (b_offsets[s] + ranks[s]) * out`` of ``b``. No rank is padded.
Siblings that read one input (q/k/v, gate/up) share one ``a``: per slot, the members' rows side by side, so one
shrink over it yields every member's ``h`` (``SiblingGroup``) and there is no second copy of lora_A.

The storage is the only copy. Packing copies each adapter in once and then points its parameters at their rows
(``param.data = view``: the Parameter objects, and so optimizers and user references, stay the same). Any in-place
edit afterwards (``param.data.copy_``, an optimizer step, a NumPy view, ``load_state_dict``) writes into the
storage the kernels read, so there is nothing to go stale and nothing to compare per weight. PEFT's scaling stays
out of the stored values (``scales``, applied by the kernels), so the views hold exactly PEFT's values and
``save_pretrained`` writes exactly PEFT's bytes.

What the views cannot see are structural changes: a parameter that no longer points into the storage
(``add_adapter``/``load_adapter``/``delete_adapter`` make new parameters; ``param.data = tensor``, ``model.to``
and ``load_state_dict(assign=True)`` replace the data), and a changed scaling (``set_scale``). Each of them is
counted where it happens: a registration through torch's hooks (``watch_modules``), a ``.data`` assignment or a
write into a ``_parameters`` dict through ``peft_fastlora.watched`` (the stored parameters are ``BankParameter``s).
So the per-call check (``_Snapshot``) compares two counters and each layer's adapter count, and rereads the
scalings: its cost grows with the layers, not with the weights. When a count moved, ``AdapterBank.refresh`` checks
each layer's adapter names and each parameter's identity and data pointer (the storage is alive, so no other
tensor can own that address), repacks the layers whose parameters moved, and rewrites the per-slot scales that
changed. DoRA's rescale is derived from the weights, so it is recomputed on every call, as PEFT recomputes it on
every forward.

Under a GPU pool (``patch_model(..., max_gpu_adapters=K)``, ``peft_fastlora.pool``) the storage is in host memory
and stays the only copy PEFT sees; the kernels read copies of the adapters a call names in K fixed GPU slots per
layer, which the pool keeps current. DoRA adapters are then left to PEFT's path.
"""

from __future__ import annotations

import collections
import functools
import operator
import warnings
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm

from .dora import DoraScales, dora_adapters, dora_scales, refresh_dora_scales
from .host_memory import host_empty
from .peft_messages import BASE_ADAPTER_NAME
from .storage_keys import register as _register_storage
from .watched import (
    BankParameter,
    data_quietly,
    is_watched,
    scaling_writes,
    set_data_quietly,
    unwatch,
    unwatch_scaling,
    watch,
    watch_scaling,
    writes,
)

BASE_SLOT = -1
"""The slot id of a ``"__base__"`` row: no LoRA."""

_REGISTRATIONS = [0]
# id → weak reference of every watched module of every patched model (see watch_modules). A bare id is not enough:
# the id of a module since freed is soon another object's, such as the fresh ModuleList of a forward, which then
# counted (a walk on every call).
_WATCHED: dict[int, weakref.ref] = {}
_WATCH_SETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # bank → what it watches


def _count_registration(module: torch.nn.Module, name: str, value: object) -> None:
    # Not while dynamo traces: a compiled forward registers modules too (transformers' `self.layers[:n]`), and a
    # traced read of _WATCHED made dynamo guard on it, so the next walk (which replaces it) recompiled the graph.
    # Nothing structural is registered inside a compiled forward.
    if torch.compiler.is_compiling():
        return
    watched = _WATCHED.get(id(module))
    if watched is not None and watched() is module:
        _REGISTRATIONS[0] += 1
    # (returns None: the registered object is kept as it is)


@functools.cache
def _install_registration_hooks() -> None:
    torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
    torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)


def watch_modules(owner: object, modules: list[torch.nn.Module]) -> None:
    """Count from now on every submodule or parameter registered on one of ``modules`` (``owner``'s model: every
    module of its tree, LoRA layers and their adapter containers included), through torch's global registration
    hooks; ``registrations`` reads the count. Replaces what ``owner`` watched before.

    Every structural change PEFT makes registers something on a module of the model: ``add_adapter`` /
    ``load_adapter`` / ``inject_adapter`` set new modules (``setattr``, ``ModuleDict.__setitem__``), ``unload``
    puts base layers back with ``setattr``, replacing a parameter object registers the new one, and so does
    ``load_state_dict(assign=True)``. While the count stands still, the module tree, the adapter modules and the
    parameter objects are as they were, so a call need not walk them again. (Deletions register nothing: the
    per-call check counts each layer's adapters for them.) Registrations elsewhere are not counted: transformers
    registers modules into a fresh ``ModuleList`` on every forward (``self.layers[: n]``)."""
    global _WATCHED
    _install_registration_hooks()
    _WATCH_SETS[owner] = {id(module): weakref.ref(module) for module in modules}
    watched: dict[int, weakref.ref] = {}
    for references in _WATCH_SETS.values():
        # Live ones only: a dead entry (a module freed since its bank's last walk) must not hide a live module of
        # another model that took its id.
        watched.update((key, reference) for key, reference in references.items() if reference() is not None)
    _WATCHED = watched  # one assignment: the hook sees the old map or the new


def registrations() -> int:
    """How many modules and parameters have been registered on watched modules so far (see ``watch_modules``)."""
    return _REGISTRATIONS[0]


class SiblingGroup:
    """The shared lora_A storage of layers that read one input (q/k/v, gate/up).

    Attributes
    ----------
    a : torch.Tensor
        ``[R, in]``; per slot, every member's lora_A rows back to back.
    offsets, ranks : list[int]
        Per slot: where its rows start in ``a``, and all members' ranks of that slot summed (a GPU pool's group:
        empty lists, its slots change with every swap).
    offsets_dev, ranks_dev : torch.Tensor
        The same as int32 ``[num_slots]``: the rows of ``meta`` (int32 ``[2, num_slots]``).
    max_rank : int
        The largest summed rank (a GPU pool's group: the largest any of its slots can hold).

    The leader (the first member called in a forward) shrinks against ``a`` and leaves the result in the call's
    plan (``PlanView.share_shrink``); a member called with the same input object reuses it and only runs its
    expand; the last member releases it. Members read what they need of the group from their own ``PackedLora``
    (``group_key``, ``group_max_rank``): under torch.compile, reading one group object from several layers made
    dynamo add an aliasing guard per member, checked in Python on every call.
    """

    def __init__(
        self,
        a: torch.Tensor,
        offsets: list[int],
        ranks: list[int],
        size: int,
        meta: torch.Tensor | None = None,
        max_rank: int | None = None,
    ):
        self.a = a
        self.size = size  # how many layers share it
        self.offsets, self.ranks = offsets, ranks
        # One int32 tensor for both: one allocation, and one address the kernels read (compiled graphs reach it
        # through ``key`` only). A GPU pool passes its own (``peft_fastlora.pool``), refilled on every swap.
        if meta is None:
            meta = torch.tensor([offsets, ranks], dtype=torch.int32, device=a.device)
        self.meta = meta
        self.offsets_dev, self.ranks_dev = self.meta[0], self.meta[1]
        self.max_rank = max(ranks, default=0) if max_rank is None else max_rank
        self.key = _register_storage(self)  # what compiled graphs name it by (see peft_fastlora.storage_keys)

    def shrink_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, offsets, ranks)`` for ``launch_shrink`` against the whole group."""
        return self.a, self.offsets_dev, self.ranks_dev


class LaunchFields(NamedTuple):
    """What a forward reads of a layer's ``PackedLora`` to choose and size its launches, as plain values.

    Under torch.compile each field read from the ``PackedLora`` itself was a guard checked on every call, 8 per LoRA
    layer; read through ``storage_keys.launch_fields`` the whole tuple is a constant of the traced graph, guarded
    only through ``key`` (which a repack renews). So none of it may change while the ``PackedLora`` lives."""

    key: int
    num_slots: int
    max_rank: int
    has_dora: bool
    group_key: int | None
    leader: bool
    last: bool
    group_max_rank: int
    fused: bool
    member_keys: tuple[int, ...]
    member_index: int
    group_rank: int


@dataclass
class PackedLora:
    """One layer's adapters in their packed storage.

    Attributes
    ----------
    a : torch.Tensor
        ``[rows, in]`` lora_A storage (a sibling group's, shared with the other members, where ``group`` is set).
    b : torch.Tensor
        1-D lora_B storage of this layer: slot s's ``[out, r]`` block starts at element ``b_offsets[s] * out``.
    out_features : int
        ``out`` (the embedding dimension for an Embedding).
    a_offsets, b_offsets, ranks : list[int]
        Per slot: its first row in ``a``, its first row (in units of ``out`` elements) in ``b``, and its rank
        (0 where the layer lacks the adapter).
    meta : torch.Tensor
        int32 ``[5, num_slots]`` on the storage's device, for kernels: the rows ``a_offsets_dev``, ``b_offsets_dev``,
        ``ranks_dev`` (the lists above), ``h_cols`` (see ``group``; zeros without one) and ``scales`` (fp32 bits).
        One tensor, so that a layer's launches read one small allocation (compiled graphs do not read it at all:
        they name the storage by ``key``).
    scales : torch.Tensor
        fp32 ``[num_slots]`` (a view of ``meta``): PEFT's ``scaling`` of each slot's adapter (0 where absent),
        applied to ``B A x``.
    max_rank : int
        The largest of ``ranks``.
    num_slots : int
        The bank's slot count (the length of the per-slot lists).
    key : int
        What compiled graphs name this storage by (see ``peft_fastlora.storage_keys``); new with every repack.
    dora : DoraScales or None
        The per-slot DoRA rescale where this layer holds DoRA adapters (see ``peft_fastlora.dora``).
    group : SiblingGroup or None
        The sibling group whose ``a`` this layer's rows live in, if any; ``leader``/``last`` say whether this
        layer shrinks for the group / releases its result, and ``h_cols`` (int32 ``[num_slots]``) where this
        layer's part of each slot starts in the group's shrink output.
    group_key, group_max_rank : int or None, int
        The group's ``key`` and ``max_rank`` (None and 0 without one), as plain ints of this layer: what a compiled
        forward reads of the group (see ``SiblingGroup``).
    fused, member_keys, member_index, group_rank : bool, tuple[int, ...], int, int
        Set by ``link_siblings``: whether the group's leader computes every member's output in one go (the base
        layers, one shrink, one expand launch for all; see ``layers.FastLinearMixin``), the members' storage keys
        (leader first), this layer's place among them, and the members' largest ``max_rank``. ``fusing_missed``
        (the leader's; not a launch field, it may change): a member found no output of the leader's, so the
        leader stops computing theirs (``layers.plan_output``).
    launches : dict
        The backend's launches prepared for this storage, per batch shape (see ``backends/triton.py``); a repack
        makes a new ``PackedLora``, so none outlives the tensors it reads.
    """

    a: torch.Tensor
    b: torch.Tensor
    out_features: int
    a_offsets: list[int]
    b_offsets: list[int]
    ranks: list[int]
    meta: torch.Tensor
    dora: DoraScales | None = None
    group: SiblingGroup | None = None
    leader: bool = False
    last: bool = False
    group_key: int | None = None
    group_max_rank: int = 0
    fused: bool = False
    fusing_missed: bool = False
    member_keys: tuple[int, ...] = ()
    member_index: int = 0
    group_rank: int = 0
    launches: dict = field(default_factory=dict, repr=False)
    max_rank: int = field(init=False)
    num_slots: int = field(init=False)
    key: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Plain ints: a compiled graph reading max(self.ranks) guarded on every element of the list.
        self.max_rank = max(self.ranks, default=0)
        self.num_slots = len(self.ranks)
        self.key = _register_storage(self)
        self.a_offsets_dev, self.b_offsets_dev, self.ranks_dev = self.meta[0], self.meta[1], self.meta[2]
        self.scales = self.meta[4].view(torch.float32)

    def shrink_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, offsets, ranks)`` for ``launch_shrink`` against this layer's own lora_A rows."""
        return self.a, self.a_offsets_dev, self.ranks_dev

    @property
    def h_cols(self) -> torch.Tensor | None:
        """int32 ``[num_slots]``: where this layer's part of each slot starts in its group's shrink output."""
        return None if self.group is None else self.meta[3]

    @functools.cached_property
    def fields(self) -> LaunchFields:
        """This storage's ``LaunchFields``, read once the packing has set every field (on the first forward)."""
        return LaunchFields(
            self.key, self.num_slots, self.max_rank, self.dora is not None, self.group_key, self.leader, self.last,
            self.group_max_rank, self.fused, self.member_keys, self.member_index, self.group_rank,
        )  # fmt: skip

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    def adapter(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(A [r, in], B [out, r], scale)`` of one slot as views of the storage (``scale`` a 0-d fp32 tensor), or
        None where this layer lacks that adapter."""
        rank = self.ranks[slot]
        if rank == 0:
            return None
        a_start, b_start = self.a_offsets[slot], self.b_offsets[slot] * self.out_features
        a = self.a[a_start : a_start + rank]
        b = self.b[b_start : b_start + rank * self.out_features].view(self.out_features, rank)
        return a, b, self.scales[slot]


AdapterSlots = dict[int, tuple[torch.Tensor, torch.Tensor, float]]
"""One layer's adapters by slot: ``{slot: (A [r, in], B [out, r], scaling)}``."""


def pack(
    members: list[AdapterSlots],
    num_slots: int,
    in_features: int,
    out_features: list[int],
    dtype: torch.dtype,
    device: torch.device | str,
    pin_memory: bool = False,
    stage_on: torch.device | None = None,
) -> list[PackedLora]:
    """Copy the adapters of one layer, or of one sibling group (2+ layers reading one input), into new storage.

    Parameters
    ----------
    members : list[AdapterSlots]
        Per layer, its adapters by slot. Values are copied (and cast to ``dtype``).
    num_slots : int
        The bank's slot count: the length of every per-slot array.
    in_features : int
        The layers' common input size.
    out_features : list[int]
        Per layer, its output size.
    dtype, device
        Of the storage.
    pin_memory : bool
        Page-lock host storage (``device`` the CPU), the source of a GPU pool's copies (``peft_fastlora.pool``).
    stage_on : torch.device or None
        Gather the adapters on this device first and move the result to ``device`` in one copy per tensor: adapters
        on a GPU packed into host storage would otherwise cost a synchronous copy per weight (~450,000 for 1,000
        adapters of a Llama-3-8B shape).

    Returns
    -------
    list[PackedLora]
        One per member, in order; with 2+ members they share ``a`` through one ``SiblingGroup``.
    """
    count = len(members)
    a_offsets, b_offsets, ranks = ([[0] * num_slots for _ in members] for _ in range(3))
    group_offsets, group_ranks, b_rows = [0] * num_slots, [0] * num_slots, [0] * count
    rows = 0
    for slot in range(num_slots):
        group_offsets[slot] = rows
        for index, adapters in enumerate(members):
            if slot in adapters:
                rank = adapters[slot][0].shape[0]
                a_offsets[index][slot], b_offsets[index][slot], ranks[index][slot] = rows, b_rows[index], rank
                rows += rank
                b_rows[index] += rank
        group_ranks[slot] = rows - group_offsets[slot]
    a = _empty(rows * in_features, dtype, device, pin_memory).view(rows, in_features)
    group = SiblingGroup(a, group_offsets, group_ranks, count) if count > 1 else None
    packs = []
    for index, adapters in enumerate(members):
        scales = [0.0] * num_slots
        for slot, (_, _, scaling) in adapters.items():
            scales[slot] = scaling
        h_cols = [0] * num_slots
        if group is not None:
            starts = zip(a_offsets[index], group_offsets, ranks[index], strict=True)
            h_cols = [start - group_start if rank else 0 for start, group_start, rank in starts]
        rows_of_meta = [a_offsets[index], b_offsets[index], ranks[index], h_cols]
        scale_bits = torch.tensor(scales, dtype=torch.float32).view(torch.int32).tolist()  # (any default dtype)
        meta = torch.tensor([*rows_of_meta, scale_bits], dtype=torch.int32)
        b = _empty(b_rows[index] * out_features[index], dtype, device, pin_memory)
        packed = PackedLora(
            a, b, out_features[index], a_offsets[index], b_offsets[index], ranks[index], meta.to(a.device)
        )  # fmt: skip
        if stage_on is not None and index == 0:
            a_stage = torch.empty_like(a, device=stage_on)
        b_stage = b if stage_on is None else torch.empty_like(b, device=stage_on)
        with torch.no_grad():
            out = out_features[index]
            for slot, (lora_a, lora_b, _) in adapters.items():
                rank, first, start = packed.ranks[slot], packed.a_offsets[slot], packed.b_offsets[slot] * out
                (a if stage_on is None else a_stage)[first : first + rank].copy_(lora_a)
                b_stage[start : start + rank * out].view(out, rank).copy_(lora_b)
            if stage_on is not None:
                b.copy_(b_stage)
        if group is not None:
            packed.group, packed.leader, packed.last = group, index == 0, index == count - 1
            packed.group_key, packed.group_max_rank = group.key, group.max_rank
        packs.append(packed)
    if stage_on is not None:
        with torch.no_grad():
            a.copy_(a_stage)
    return packs


def _empty(numel: int, dtype: torch.dtype, device: torch.device | str, pin_memory: bool) -> torch.Tensor:
    if pin_memory:
        return host_empty(numel, dtype, pin=True)
    return torch.empty(numel, dtype=dtype, device=device)


SIBLING_NAMES = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"w1", "w3"}),
)
"""Module names that, under one parent, read the same input in the architectures transformers ships. A grouping
is only a hint: a member whose input is not the leader's computes its own shrink (see PlanView.shared_shrink)."""


MAX_FUSED_MEMBERS = 3
"""The most members a group's single expand launch serves (q/k/v); larger groups launch per member."""


def link_siblings(layers: list[LoraLayer]) -> None:
    """Tell a sibling group's layers (their ``PackedLora`` just made) whether the leader serves them all at once:
    with 2 or 3 members, none holding DoRA adapters and every base layer a plain ``torch.nn.Linear`` (so every
    output is a fresh contiguous tensor of the input's dtype). The leader keeps its siblings in
    ``_fastlora_siblings`` either way: to serve them, and to see their hooks
    (``layers._hooks_between_members``)."""
    packs = [layer._fastlora_packed for layer in layers]
    fused = (
        2 <= len(layers) <= MAX_FUSED_MEMBERS
        and packs[0].group is not None
        and all(packed.dora is None for packed in packs)
        and all(type(layer.get_base_layer()) is torch.nn.Linear for layer in layers)
    )
    keys, rank = tuple(packed.key for packed in packs), max(packed.max_rank for packed in packs)
    for index, packed in enumerate(packs):
        packed.fused, packed.member_keys, packed.member_index, packed.group_rank = fused, keys, index, rank
    layers[0]._fastlora_siblings = tuple(layers[1:])


def sibling_groups(named_layers: list[tuple[str, LoraLayer]]) -> list[list[LoraLayer]]:
    """Group fast Linear layers by parent and sibling name set; keep groups of 2+ with one in_features."""
    groups: dict[tuple[str, frozenset], list[LoraLayer]] = {}
    for name, layer in named_layers:
        parent, _, leaf = name.rpartition(".")
        for names in SIBLING_NAMES:
            if leaf in names and isinstance(layer.get_base_layer(), torch.nn.Linear):
                groups.setdefault((parent, names), []).append(layer)
    return [
        members
        for members in groups.values()
        if len(members) > 1 and len({member.get_base_layer().in_features for member in members}) == 1
    ]


def adapter_parameters(layer: LoraLayer) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """``{name: (lora_A weight [r, in], lora_B weight [out, r])}`` of a PEFT Linear or Embedding layer: the
    parameters themselves (Embedding: lora_embedding_A/B)."""
    weights = {name: (module.weight, layer.lora_B[name].weight) for name, module in layer.lora_A.items()}
    for name, a in layer.lora_embedding_A.items():
        weights[name] = (a, layer.lora_embedding_B[name])
    return weights


def unsupported_adapters(layer: LoraLayer) -> dict[str, str]:
    """This layer's adapters that the packed path cannot serve, each with the reason (for the warning).

    Served are plain LoRA and Linear DoRA. Every other LoRA variant PEFT attaches to the layer (``lora_variant``:
    BD-LoRA, aLoRA, Arrow, VeLoRA, MonteCLoRA, MiCA, KaSA, and whatever PEFT adds next) changes the weights' shapes
    or the forward, so packing it as ``scaling · B A`` would be wrong; adapters with a ``lora_bias`` add a term the
    packed path lacks. Rows naming them go through PEFT's own mixed-batch path in this layer instead (DoRA on an
    embedding keeps PEFT's error, see ``patch._validate_names``).

    Returns
    -------
    dict[str, str]
        Adapter name → the variant's class name, or ``"lora_bias"``.
    """
    served_dora = dora_adapters(layer)
    names = {
        name: type(variant).__name__
        for name, variant in getattr(layer, "lora_variant", {}).items()
        if name not in served_dora
    }
    for name, module in layer.lora_B.items():
        if getattr(module, "bias", None) is not None:
            names.setdefault(name, "lora_bias")
    return names


def check_adapter_weights(layer: LoraLayer, layer_name: str, skip: dict[str, str], on_host: bool = False) -> None:
    """Raise a ValueError naming the adapter and the layer if an adapter's weights do not fit the layer (shapes) or
    sit on another device than its base weight. PEFT itself would fail later with a bare matmul or device error.

    Adapters in ``skip`` (variants left to PEFT, ``unsupported_adapters``) are not checked: they may store their
    factors in other shapes (BD-LoRA keeps only the diagonal blocks), and PEFT's own forward reads them.
    """
    base_weight = layer.get_base_layer().weight
    # A is [r, in] and B is [out, r] for Linear and Embedding alike (in = vocabulary for an embedding).
    expected = (layer.in_features, layer.out_features)
    for name, (a, b) in adapter_parameters(layer).items():
        if name in skip:
            continue
        where = f"peft_fastlora: adapter {name!r} of layer {layer_name}"
        if a.dim() != 2 or b.dim() != 2 or (a.shape[1], b.shape[0]) != expected or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{where} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not fit the layer "
                f"({expected[0]} in, {expected[1]} out, one rank); reload the adapter."
            )
        for tensor in (a, b):
            # (With a GPU pool the stored adapters live on the host: ``on_host``.)
            if tensor.device != base_weight.device and not (on_host and tensor.device.type == "cpu"):
                raise ValueError(
                    f"{where} is on {tensor.device.type} but the layer's base weight is on {base_weight.device}; "
                    "move the model and its adapters to one device (e.g. model.to(device))."
                )


def _placement(layer: LoraLayer) -> tuple:
    """The names of ``layer``'s adapters, and the identities and data pointers of their lora_A and lora_B parameters.

    This is the per-call check: it equals the value recorded at packing exactly while every parameter is still the
    same object and still points at its rows of the storage. The bank holds the recorded parameters, so their ids
    cannot be reused; the storage is alive, so no unrelated tensor can own one of its addresses. It runs over every
    adapter of every layer on every call, so it goes straight through the modules' dicts with C-level ``map``s and
    reads ``data_ptr`` without Parameter's ``__torch_function__`` (0.9 µs a call, 0.1 bare)."""
    submodules = layer._modules  # (not layer.lora_A: nn.Module.__getattr__ costs ~1 µs a lookup)
    a_modules, b_modules = submodules["lora_A"]._modules, submodules["lora_B"]._modules
    try:
        a = list(map(_weight_in, map(_parameters_of, a_modules.values())))
        b = list(map(_weight_in, map(_parameters_of, map(b_modules.__getitem__, a_modules))))
    except KeyError:  # a variant that keeps its weight elsewhere
        a = [_weight(module) for module in a_modules.values()]
        b = [_weight(b_modules[name]) for name in a_modules]
    embedding_a = submodules["lora_embedding_A"]._parameters
    embedding_b = submodules["lora_embedding_B"]._parameters
    a += embedding_a.values()
    b += map(embedding_b.__getitem__, embedding_a)
    # A bias given to a packed adapter's lora_B (``lora_B[name].bias = Parameter(...)``) makes it a lora_bias adapter,
    # which the packed path cannot serve: the layer must be packed again (the adapter then goes to PEFT's path).
    biases = tuple(module._parameters.get("bias") is not None for module in b_modules.values())
    return (
        tuple(a_modules), tuple(embedding_a), tuple(map(id, a)), tuple(map(_data_ptr, a)), tuple(map(id, b)),
        tuple(map(_data_ptr, b)), biases,
    )  # fmt: skip


def _owners(layer: LoraLayer, name: str) -> list[tuple[torch.nn.Module, str]]:
    """``[(module, key), (module, key)]``: where adapter ``name``'s lora_A and lora_B parameters are held, each as
    ``module._parameters[key]``."""
    if name in layer.lora_embedding_A:
        return [(layer.lora_embedding_A, name), (layer.lora_embedding_B, name)]
    return [(layer.lora_A[name], "weight"), (layer.lora_B[name], "weight")]


_parameters_of = operator.attrgetter("_parameters")
_weight_in = operator.itemgetter("weight")
_data_ptr = torch._C.TensorBase.data_ptr


def _plain_copy(scaling: dict) -> dict | None:
    """A copy of PEFT's scaling dict if all its values are numbers, else None (a 0-d tensor changed in place would
    compare equal to itself: see ``AdapterBank._scalings``)."""
    return dict(scaling) if all(isinstance(value, (int, float)) for value in scaling.values()) else None


def _scaling_key(scaling) -> object:
    return (scaling, scaling._version) if isinstance(scaling, torch.Tensor) else scaling


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module._parameters.get("weight")
    return module.weight if weight is None else weight  # a variant may keep it elsewhere


class _Unit:
    """The layers packed together (one layer, or a sibling group) and what the per-call check compares."""

    def __init__(self, layers: list[LoraLayer], num_slots: int):
        self.layers = layers
        self.num_slots = num_slots  # the bank's slot count when packed
        self.placements: list[tuple] = []
        self.packs: list[PackedLora] = []  # per layer, its storage (in host memory under a GPU pool)
        self.held: list[dict] = []  # the parameters the placements name, so that their ids stay unique
        self.scalings: list[tuple] = []  # per layer, per slot: the scaling in the stored scales
        # Per layer, a copy of PEFT's scaling dict where every value is a number (compared whole, in C), else None.
        self.plain_scalings: list[dict | None] = []

    def is_current(self) -> bool:
        return all(
            "_fastlora_packed" in layer.__dict__ and _placement(layer) == placement
            for layer, placement in zip(self.layers, self.placements, strict=True)
        )


def _name_dicts(layers: list[LoraLayer]) -> list[dict]:
    """The dicts that hold each layer's adapters by name: lora_A, lora_B and the embedding factors."""
    found = []
    for layer in layers:
        submodules = layer._modules
        found += (submodules["lora_A"]._modules, submodules["lora_B"]._modules)
        found += (submodules["lora_embedding_A"]._parameters, submodules["lora_embedding_B"]._parameters)
    return found


class _Placed:
    """Parameters held as ``dicts[i][keys[i]]``, with the identities and addresses they had when this was made."""

    def __init__(self, dicts: list[dict], keys: list[str]):
        self.dicts, self.keys = dicts, keys
        parameters = self.read()
        self.ids, self.pointers = list(map(id, parameters)), list(map(_data_ptr, parameters))

    def read(self) -> list:
        return list(map(operator.getitem, self.dicts, self.keys))

    def unmoved(self) -> bool:
        """True while each is the same object at the same address (C-level passes, ~0.1 µs a parameter)."""
        try:
            parameters = self.read()
        except KeyError:
            return False
        return list(map(id, parameters)) == self.ids and list(map(_data_ptr, parameters)) == self.pointers


class _Snapshot:
    """Where every adapter parameter of the fast layers stood after the bank's last full check: what the per-call
    check compares instead of walking every layer.

    It holds while no module or parameter has been registered since (``registrations``: adapters added, modules
    or parameter objects replaced), every layer holds as many adapters as then (deletions), and each adapter
    parameter in its module is the same object at the same address (``param.data = tensor``, ``model.to``, a
    parameter put straight into ``_parameters`` as accelerate's ``set_module_tensor_to_device`` and torch's
    overwrite-on-conversion ``model.to`` do; no hook sees those). Then a call only rereads the scalings.

    The last condition is read from a counter (``watched.writes``) for every parameter the bank stores, since each
    is a ``BankParameter`` in a ``WatchedParameters`` dict: the check costs ~0.1 µs per layer dict, not per weight.
    Only the rest (adapters left to PEFT's path, a Parameter of another class) are read one by one, and all of them
    while torch's ``swap_tensors`` conversion is on (``torch.__future__.set_swap_module_params_on_conversion``):
    it swaps a parameter's contents and class without a write either counter sees.

    Raises KeyError when made for a layer whose adapter weights are not where ``lora.Linear`` keeps them (a
    variant); the bank then checks unit by unit on every call.
    """

    def __init__(self, counted: int, written: int, lora_layers: list[LoraLayer], fast_layers: list[LoraLayer]):
        self.registrations, self.writes = counted, written
        self.name_dicts = _name_dicts(lora_layers)
        self.name_counts = list(map(len, self.name_dicts))
        dicts, keys = [], []
        for layer in fast_layers:
            submodules = layer._modules
            b_modules = submodules["lora_B"]._modules
            for name, module in submodules["lora_A"]._modules.items():
                dicts += (module._parameters, b_modules[name]._parameters)
                keys += ("weight", "weight")
            embedding_a, embedding_b = (
                submodules["lora_embedding_A"]._parameters,
                submodules["lora_embedding_B"]._parameters,
            )
            for name in embedding_a:
                dicts += (embedding_a, embedding_b)
                keys += (name, name)
        self.every = _Placed(dicts, keys)
        rest = [(d, k) for d, k, p in zip(dicts, keys, self.every.read(), strict=True) if not is_watched(d, p)]
        self.unwatched = _Placed([d for d, _ in rest], [k for _, k in rest])

    def holds(self) -> bool:
        if registrations() != self.registrations or writes() != self.writes:
            return False
        if list(map(len, self.name_dicts)) != self.name_counts:
            return False
        swapping = torch.__future__.get_swap_module_params_on_conversion()
        return (self.every if swapping else self.unwatched).unmoved()


class AdapterBank:
    """The model-wide adapter registry of a patched model, and the storage of every fast layer's adapters.

    Parameters
    ----------
    lora_layers : list[LoraLayer]
        Every PEFT LoRA layer of the model (fast or not): adapter names are collected from all of them, as PEFT
        does when it checks ``adapter_names``.
    fast_layers : list[LoraLayer]
        The layers served by the packed path; each gets ``_fastlora_packed``.

    Attributes
    ----------
    slots : dict[str, int]
        Adapter name → slot id, the same in every layer and stable while the adapter exists: a new adapter takes
        the lowest free slot, a deleted one frees its slot, and no other adapter is renumbered.
    num_slots : int
        The length of every per-slot array (the highest slot id in use + 1, never shrinking).
    groups : list[SiblingGroup]
        The sibling groups of the current packing.
    sibling_candidates : list[list[LoraLayer]]
        Fast layers that read one input, by parent (``sibling_groups``); each list is packed as one unit.
    layer_names : dict[int, str]
        ``id(layer)`` → module path, for error messages.
    peft_served : list[torch.nn.Module]
        LoRA layers and ``modules_to_save`` wrappers left to PEFT's hooks (set by ``patch._sync_layers``).
    """

    def __init__(self, lora_layers: list[LoraLayer], fast_layers: list[LoraLayer]):
        self._lora_layers: list[LoraLayer] = []
        self._fast_layers: list[LoraLayer] = []
        self._snapshot: _Snapshot | None = None
        # (scaling_writes() at the last walk over the scalings, the watched dicts), or None: see _watch_scalings.
        self._scales_seen: tuple[int, list] | None = None
        self._names_cache: tuple[tuple, set[str], set[str]] | None = None
        self.lora_layers = lora_layers
        self.fast_layers = fast_layers
        self.synced: tuple[int, int] | None = None  # (registrations, model id) at the last layer sync (patch.py)
        self.confirmed: tuple[int, int] | None = None  # the same, once two walks in a row saw it
        # Adapter names that some fast layer leaves to PEFT's path (all reasons / DoRA ones), as of the last check.
        self.left_to_peft: set[str] = set()
        self.dora_left_to_peft: set[str] = set()
        self.sibling_candidates: list[list[LoraLayer]] = []
        self.layer_names: dict[int, str] = {}  # id(layer) → module path, for error messages
        self.peft_served: list[torch.nn.Module] = []  # LoRA layers and wrappers left to PEFT's hooks (patch.py)
        self.slots: dict[str, int] = {}
        self.num_slots = 0
        self._units: dict[tuple[int, ...], _Unit] = {}
        self._slot_names: dict[int, str] = {}
        self.groups: list[SiblingGroup] = []
        self._warned: set[tuple[str, str]] = set()
        # A GPU pool (peft_fastlora.pool): set by patch_model before the first refresh, or None.
        self.max_gpu_adapters: int | None = None
        self.pool = None  # the AdapterPool, made on the first refresh under max_gpu_adapters
        self.progressbar = False  # a tqdm bar while packing (patch_model's progressbar)
        self.refresh()

    @property
    def lora_layers(self) -> list[LoraLayer]:
        return self._lora_layers

    @lora_layers.setter
    def lora_layers(self, layers: list[LoraLayer]) -> None:
        self._lora_layers = layers
        self._name_dicts = _name_dicts(layers)
        self._names_cache = None
        self._snapshot = None

    @property
    def fast_layers(self) -> list[LoraLayer]:
        return self._fast_layers

    @fast_layers.setter
    def fast_layers(self, layers: list[LoraLayer]) -> None:
        self._fast_layers = layers
        self._names_cache = None  # which layers serve DoRA changed
        self._snapshot = None  # it covers the layers it was made for only

    def _names(self) -> tuple[set[str], set[str]]:
        """``(adapter names, DoRA adapters some layer cannot serve)``, recomputed only when a registration or a
        deletion may have changed them."""
        key = (registrations(), *map(len, self._name_dicts))
        cached = self._names_cache
        if cached is None or cached[0] != key:
            names: set[str] = set()
            refused: set[str] = set()
            for layer in self.lora_layers:
                names |= layer.lora_A.keys()
                names |= layer.lora_embedding_A.keys()
                # DoRA is served where the packed path serves it (fast Linear layers); elsewhere PEFT's error stands.
                served = dora_adapters(layer) if "_fastlora_peft_class" in type(layer).__dict__ else set()
                refused |= {name for name, on in layer.use_dora.items() if on and name not in served}
            cached = self._names_cache = (key, names, refused)
        return cached[1], cached[2]

    def adapter_names(self) -> set[str]:
        """All adapter names held by at least one LoRA layer."""
        return set(self._names()[0])

    def refused_dora(self) -> set[str]:
        """Adapters that some LoRA layer holds as DoRA but the packed path does not serve there (PEFT's DoRA error
        applies to rows naming them)."""
        return set(self._names()[1])

    def _assign_slots(self) -> None:
        """Free the slots of deleted adapters and give new ones the lowest free slots (``num_slots`` never shrinks)."""
        names = self.adapter_names()
        for name in [name for name in self.slots if name not in names]:
            del self.slots[name]
        taken = set(self.slots.values())
        free = (slot for slot in range(len(names) + len(taken) + 1) if slot not in taken)
        for name in sorted(names - self.slots.keys()):
            self.slots[name] = next(free)
        self.num_slots = max(self.num_slots, max(self.slots.values(), default=-1) + 1)
        self._slot_names = {slot: name for name, slot in self.slots.items()}

    def refresh(self, named: set[str] | None = None) -> None:
        """Bring slots, storage and scales up to date with PEFT's layers (see the module docstring).

        Parameters
        ----------
        named : set[str] or None
            The adapters the coming call names: only their DoRA rescale is recomputed (all where None).
        """
        # Storage made inside a call under torch.inference_mode() would be inference tensors, and PEFT's parameters
        # views of them: training, a grad-mode forward or an in-place edit outside inference mode would then fail.
        with torch.inference_mode(False):
            snapshot = self._snapshot
            if snapshot is not None and snapshot.holds():
                self._refresh_values(named)
            else:
                # Both counts before the walk: a change made during it is seen by the next call.
                counted, written = registrations(), writes()
                self._snapshot = None
                self._refresh(named)
                try:
                    self._snapshot = _Snapshot(counted, written, self.lora_layers, self.fast_layers)
                except KeyError:  # a variant keeps its weights elsewhere: check unit by unit on every call
                    self._snapshot = None
            if self.max_gpu_adapters is not None and self._pool_outdated():
                self._rebuild_pool()

    def _refresh_values(self, named: set[str] | None) -> None:
        """The per-call refresh while the snapshot holds: every parameter is still a view of the storage, so
        only scalings (``set_scale``) and DoRA's rescale (derived from the weights) are reread."""
        counted = scaling_writes()  # (before the walk: a change made during it is seen by the next call)
        seen = self._scales_seen
        current = (
            seen is not None
            and seen[0] == counted
            and all(layer.__dict__.get("scaling") is scaling for layer, scaling in seen[1])
        )
        for unit in self._units.values():
            if not current:
                self._update_scales(unit)
            self._refresh_dora(unit.layers, named)
        if not current:
            self._scales_seen = self._watch_scalings(counted)

    def _watch_scalings(self, counted: int) -> tuple[int, list[tuple[LoraLayer, dict]]] | None:
        """After a walk that brought every stored scale up to date: ``(counted, (layer, its scaling dict) pairs)``,
        each dict made a ``WatchedScalings``, so that later calls skip the walk while no dict was written or
        replaced. None where a scaling is a tensor (changed in place, unseen by the count: walk every call)."""
        pairs = []
        for unit in self._units.values():
            for layer in unit.layers:
                # (the values, not the unit's plain copy: a 0-d tensor of an equal value compares equal to it)
                if _plain_copy(layer.scaling) is None:
                    return None
                pairs.append((layer, watch_scaling(layer)))
        return counted, pairs

    def _refresh_dora(self, layers: list[LoraLayer], named: set[str] | None) -> None:
        """Recompute the DoRA rescale of ``layers`` that hold DoRA adapters (of ``named`` only, where given): it is
        derived from the weights, so on every call, as PEFT does on every forward."""
        for layer in layers:
            dora = layer._fastlora_packed.dora
            if dora is not None:
                refresh_dora_scales(layer, self.slots, dora, named)

    def _refresh(self, named: set[str] | None) -> None:
        counted = scaling_writes()
        self._scales_seen = None
        self._assign_slots()
        self.groups = []
        grouped = {id(layer) for members in self.sibling_candidates for layer in members}
        units = [list(members) for members in self.sibling_candidates]
        units += [[layer] for layer in self.fast_layers if id(layer) not in grouped]
        left_to_peft: set[tuple[str, str]] = set()
        kept: dict[tuple[int, ...], _Unit] = {}
        repacked = False
        bar = tqdm(units, desc="peft_fastlora: packing adapters", disable=not self.progressbar, leave=False)
        for layers in bar:
            key = tuple(map(id, layers))
            unit = self._units.pop(key, None)
            # A unit packed for fewer slots (a new adapter took a new slot), or left behind by a refresh that raised
            # part-way, is repacked: its per-slot arrays must cover every slot a plan can name.
            if unit is None or unit.num_slots != self.num_slots or not unit.is_current():
                unit = _Unit(layers, self.num_slots)
                left_to_peft |= self._pack(unit)
                repacked = True
            else:
                self._update_scales(unit)
            self._refresh_dora(layers, named)
            kept[key] = unit
            if len(layers) > 1:
                self.groups.append(layers[0]._fastlora_packed.group)
        self._units = kept
        self._scales_seen = self._watch_scalings(counted)
        if self.max_gpu_adapters is not None and repacked:
            self._rebuild_pool()
        # Packing may have given an embedding's ParameterDict a watched _parameters dict (a new object): count
        # adapter names from the dicts that hold them now.
        self._name_dicts = _name_dicts(self.lora_layers)
        self.left_to_peft = set().union(*(layer._fastlora_unsupported for layer in self.fast_layers))
        self.dora_left_to_peft = set().union(
            *(layer._fastlora_unsupported & dora_adapters(layer) for layer in self.fast_layers)
        )
        self._warn_left_to_peft(left_to_peft)

    def _pack(self, unit: _Unit) -> set[tuple[str, str]]:
        """Copy the unit's served adapters into new storage and point their parameters at it; return the
        ``(adapter, reason)`` pairs left to PEFT's path."""
        parameters = [adapter_parameters(layer) for layer in unit.layers]
        pooled = self.max_gpu_adapters is not None
        skipped, candidates = [], []
        for layer, params in zip(unit.layers, parameters, strict=True):
            skip = unsupported_adapters(layer)
            if pooled:
                # DoRA's rescale is derived from the weights on every call, and kept per bank slot: not pooled.
                # Left to PEFT's path (its own GPU tensors), so mixed batches naming them get PEFT's DoRA error.
                skip.update(dict.fromkeys(dora_adapters(layer) - skip.keys(), "DoRA with max_gpu_adapters"))
            name = self.layer_names.get(id(layer), type(layer).__name__)
            check_adapter_weights(layer, name, skip, on_host=pooled)
            skipped.append(skip)
            candidates.append({name: pair for name, pair in params.items() if name not in skip})
        # One dtype per storage: the most common one among the adapters' lora_A. Adapters in another dtype (rare:
        # adapters loaded with different autocast settings) keep PEFT's path, which computes each in its own dtype.
        dtypes = collections.Counter(a.dtype for weights in candidates for a, _ in weights.values())
        base_weight = unit.layers[0].get_base_layer().weight
        dtype = dtypes.most_common(1)[0][0] if dtypes else base_weight.dtype
        members = []
        for layer, weights, skip in zip(unit.layers, candidates, skipped, strict=True):
            for name, (a, b) in weights.items():
                if a.dtype != dtype or b.dtype != dtype:
                    skip[name] = f"{a.dtype} weights beside {dtype} ones in one layer"
            served = {name: pair for name, pair in weights.items() if name not in skip}
            members.append({self.slots[name]: (a, b, float(layer.scaling[name])) for name, (a, b) in served.items()})
        out_features = [layer.out_features for layer in unit.layers]
        # With a GPU pool the storage is in host memory (page-locked on a CUDA machine), the pool's copy source.
        device = torch.device("cpu") if pooled else base_weight.device
        pin = pooled and base_weight.device.type == "cuda"
        # Most of the bytes on the GPU (a first packing: PEFT made them there): gather there, copy out in bulk.
        on_gpu = sum(a.numel() + b.numel() for adapters in members for a, b, _ in adapters.values() if a.is_cuda)
        everything = sum(a.numel() + b.numel() for adapters in members for a, b, _ in adapters.values())
        stage = base_weight.device if pin and 2 * on_gpu > everything else None
        packs = pack(members, self.num_slots, unit.layers[0].in_features, out_features, dtype, device, pin, stage)
        left_to_peft = set()
        for layer, skip, params in zip(unit.layers, skipped, parameters, strict=True):
            # An adapter packed before and left to PEFT now (a bias added to its lora_B) gets tensors of its own on
            # the layer's device again: PEFT's path reads them, and a pool's host storage is out of its reach.
            device = layer.get_base_layer().weight.device
            for name in skip:
                for parameter, (module, _) in zip(params[name], _owners(layer, name), strict=True):
                    if type(parameter) is BankParameter:
                        set_data_quietly(parameter, data_quietly(parameter).to(device, copy=True))
                        unwatch(module)
        for layer, packed, served, skip, params in zip(unit.layers, packs, members, skipped, parameters, strict=True):
            for slot in served:
                name = self._slot_names[slot]
                a, b = params[name]
                view_a, view_b, _ = packed.adapter(slot)
                # The Parameter objects stay; their data is now the storage. From here on, replacing one (its
                # .data or its entry in _parameters) is counted, so the per-call check need not look at it.
                set_data_quietly(a, view_a)
                set_data_quietly(b, view_b)
                for module, key in _owners(layer, name):
                    watch(module, [key])
            packed.dora = dora_scales(layer, self.slots, self.num_slots, dora_adapters(layer) - skip.keys())
            layer._fastlora_packed = packed
            layer._fastlora_unsupported = set(skip)
            left_to_peft |= set(skip.items())
            unit.placements.append(_placement(layer))
            unit.packs.append(packed)
            unit.held.append(params)
            unit.scalings.append(self._scalings(layer, served))
            unit.plain_scalings.append(_plain_copy(layer.scaling))
        if len(unit.layers) > 1:
            link_siblings(unit.layers)
        else:
            unit.layers[0].__dict__.pop("_fastlora_siblings", None)  # a former leader's siblings: not kept alive
        return left_to_peft

    def _scalings(self, layer: LoraLayer, served) -> tuple:
        """``((slot, scaling key), ...)`` of the served slots, in slot order. A scaling is a float, or a 0-d tensor
        that PEFT changes in place (``prepare_model_for_compiled_hotswap``, then ``hotswap_adapter``'s ``fill_``):
        its key is the tensor and its version counter, since the tensor compares equal to itself however it
        changed (and reading its value would cost a device sync per layer and call)."""
        return tuple((slot, _scaling_key(layer.scaling[self._slot_names[slot]])) for slot in sorted(served))

    def _update_scales(self, unit: _Unit) -> None:
        """Rewrite the stored scales of layers whose PEFT scaling changed (``set_scale``, ``scale_layer``), in place
        so that a captured CUDA graph reads the new values (and the GPU pool's copies of them)."""
        changed = False
        for index, layer in enumerate(unit.layers):
            plain = unit.plain_scalings[index]
            if plain is not None and layer.scaling == plain:
                continue  # nothing changed (the common case: one dict comparison)
            unit.plain_scalings[index] = _plain_copy(layer.scaling)
            packed = unit.packs[index]
            served = [slot for slot, rank in enumerate(packed.ranks) if rank]
            scalings = self._scalings(layer, served)
            if scalings != unit.scalings[index]:
                values = [0.0] * self.num_slots
                for slot, _ in scalings:
                    values[slot] = float(layer.scaling[self._slot_names[slot]])
                packed.scales.copy_(torch.tensor(values, dtype=torch.float32))
                unit.scalings[index] = scalings
                changed = True
        if changed and self.pool is not None:
            self.pool.rescale(unit.packs, self.slots)

    def _pool_outdated(self) -> bool:
        """Whether there is no pool yet, or it is of another size (``patch_model`` resized it) or on another device
        than the model (``model.to``, which moves no host storage, so repacks nothing)."""
        if self.pool is None:
            return True
        device = self.fast_layers[0].get_base_layer().weight.device if self.fast_layers else self.pool.device
        return self.pool.capacity != self.max_gpu_adapters or self.pool.device != device

    def _rebuild_pool(self) -> None:
        """Give every fast layer new GPU slots over the host storage just packed (``peft_fastlora.pool``)."""
        from .pool import AdapterPool  # (it builds on this module)

        units = list(self._units.values())
        device = units[0].layers[0].get_base_layer().weight.device if units else torch.device("cpu")
        if self.pool is None or self.pool.device != device or self.pool.capacity != self.max_gpu_adapters:
            self.pool = AdapterPool(self.max_gpu_adapters, device)  # (the first, after model.to, or resized)
        for unit in units:  # the kernels read the pool from here on; drop the old device storage first
            for layer, packed in zip(unit.layers, unit.packs, strict=True):
                layer._fastlora_packed = packed
        self.pool.rebuild([(unit.packs, unit.held) for unit in units], self.slots)
        for unit, device_packs in zip(units, self.pool.device_packs(), strict=True):
            for layer, pooled in zip(unit.layers, device_packs, strict=True):
                layer._fastlora_packed = pooled
            if len(unit.layers) > 1:
                link_siblings(unit.layers)
        self.groups = [packs[0].group for packs in self.pool.device_packs() if packs[0].group is not None]

    def release(self, layer: LoraLayer) -> None:
        """Give ``layer``'s adapter parameters storage of their own again (contiguous copies of their values), as
        before the patch; the layer then holds nothing of the bank's storage."""
        with torch.inference_mode(False):  # as in refresh: the parameters must not become inference tensors
            device = layer.get_base_layer().weight.device  # (a GPU pool's storage is on the host)
            for a, b in adapter_parameters(layer).values():
                for parameter in (a, b):
                    data = data_quietly(parameter)
                    copy = data.to(device, copy=True, memory_format=torch.contiguous_format)
                    set_data_quietly(parameter, copy)
            for name in adapter_parameters(layer):
                for module, _ in _owners(layer, name):
                    unwatch(module)
            unwatch_scaling(layer)
        self._scales_seen = None
        self._units = {key: unit for key, unit in self._units.items() if layer not in unit.layers}

    def _warn_left_to_peft(self, found: set[tuple[str, str]]) -> None:
        """Name, once per adapter and reason, the adapters whose rows go through PEFT's slower path (the user chose
        the patch for speed, so the slow path must not be silent)."""
        new = sorted(found - self._warned)
        if not new:
            return
        self._warned |= set(new)
        warnings.warn(
            "peft_fastlora serves these adapters through PEFT's own (slower) mixed-batch path in the layers that "
            "hold them (LoRA variants other than DoRA, lora_bias, and adapters whose dtype differs from the "
            "layer's other adapters): " + ", ".join(f"{name!r} ({reason})" for name, reason in new),
            stacklevel=4,
        )

    def slot_ids(self, adapter_names: list[str]) -> list[int]:
        """Map names to the slot ids the kernels read, ``"__base__"`` to ``BASE_SLOT``. Names must be known (checked
        by the caller). With a GPU pool these are GPU slots: the adapters are made resident first, and their slots
        stay in use until ``release_slots``."""
        if self.pool is not None:
            placed = self.pool.place(adapter_names, self.slots)
            return [placed[name] for name in adapter_names]
        return [BASE_SLOT if name == BASE_ADAPTER_NAME else self.slots[name] for name in adapter_names]

    def release_slots(self, slot_ids: list[int]) -> None:
        """The call that ``slot_ids`` served has ended (a GPU pool may evict its adapters again)."""
        if self.pool is not None:
            self.pool.release(set(slot_ids))

    def slot_names(self) -> dict[int, str]:
        """Slot id (as ``slot_ids`` gives it) → adapter name, ``BASE_SLOT`` → ``"__base__"``."""
        names = self.pool.resident if self.pool is not None else self.slots
        return {BASE_SLOT: BASE_ADAPTER_NAME, **{slot: name for name, slot in names.items()}}
