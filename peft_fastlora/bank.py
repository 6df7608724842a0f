"""The adapter bank: one model-wide adapter-name → slot map, and each layer's adapters packed for the kernels.

Packing layout, per layer (``PackedLora``)::

    a    [R, in]   the lora_A rows of every adapter, stacked adapter after adapter (Embedding: in = vocabulary)
    b_t  [R, out]  the transposed lora_B of every adapter, in the same order, with PEFT's scaling folded in

where ``R`` is the sum of the ranks of the adapters that this layer holds. Adapter ``s`` owns rows
``offsets[s] : offsets[s] + ranks[s]`` of both; an adapter the layer does not hold has rank 0. No rank is padded,
so a rank-8 adapter beside a rank-64 one costs 8 rows, not 64.

The packing is a copy of PEFT's parameters, so it must follow them: every mixed-batch call first calls
``AdapterBank.refresh``, which compares a cheap fingerprint of each layer's adapters (names, storage pointers,
in-place version counters and scalings) with the one it packed from, and repacks only the layers that changed.
That catches ``load_adapter``, ``add_adapter``, ``delete_adapter``, ``param.data = ...`` and in-place
``copy_``/``load_state_dict`` alike.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from .dora import DoraScales, dora_adapters, dora_scales
from .peft_messages import BASE_ADAPTER_NAME

BASE_SLOT = -1
"""The slot id of a ``"__base__"`` row: no LoRA."""


@dataclass
class PackedLora:
    """One layer's adapters packed without padding.

    Attributes
    ----------
    a : torch.Tensor
        ``[R, in]``, the lora_A rows of all adapters, stacked in slot order.
    b_t : torch.Tensor
        ``[R, out]``, ``scaling * lora_B.T`` of all adapters, stacked in slot order.
    offsets, ranks : list[int]
        Per slot: the first row of that adapter in ``a``/``b_t`` and its rank (0 where the layer lacks it).
    offsets_dev, ranks_dev : torch.Tensor
        The same as int32 tensors on the weights' device, for kernels.
    column_slots : torch.Tensor
        int32 ``[R]``, the slot that owns each packed row (for the assignment-independent compiled torch path);
        derived from ``ranks`` when not given.
    dora : DoraScales or None
        The per-slot DoRA rescale where this layer holds DoRA adapters (see ``peft_fastlora.dora``).
    """

    a: torch.Tensor
    b_t: torch.Tensor
    offsets: list[int]
    ranks: list[int]
    offsets_dev: torch.Tensor
    ranks_dev: torch.Tensor
    column_slots: torch.Tensor | None = None
    dora: DoraScales | None = None
    # Set when the layer belongs to a sibling group (see SiblingGroup): the group, whether this layer leads it or
    # closes it, and int32 [num_slots] columns where this layer's part of each slot starts in the group's shrink
    # output.
    group: SiblingGroup | None = None
    leader: bool = False
    last: bool = False
    h_cols: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.column_slots is None:
            owners = [slot for slot, rank in enumerate(self.ranks) for _ in range(rank)]
            self.column_slots = torch.tensor(owners, dtype=torch.int32, device=self.a.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=0)

    def adapter(self, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return ``(a_s [r, in], b_t_s [r, out])`` for one slot, or None where this layer lacks that adapter."""
        rank = self.ranks[slot]
        if rank == 0:
            return None
        start = self.offsets[slot]
        return self.a[start : start + rank], self.b_t[start : start + rank]


SIBLING_NAMES = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"w1", "w3"}),
)
"""Module names that, under one parent, read the same input in the architectures transformers ships. A grouping
is only a hint: a member whose input is not the leader's computes its own shrink (see SiblingGroup.take)."""


class SiblingGroup:
    """Layers that read one input (q/k/v, gate/up) and so can share one shrink launch.

    The group packs, per slot, the lora_A rows of all members back to back (``a``, ``offsets_dev``,
    ``ranks_dev``), so one shrink over it yields every member's ``h`` side by side. The leader (the first member
    called in a forward) runs that shrink and remembers its input; a member called with the same input object
    reuses the result and only runs its expand; the last member releases it.
    """

    def __init__(self, members: list[LoraLayer]):
        self.members = members
        packs = [member._fastlora_packed for member in members]
        num_slots = len(packs[0].ranks)
        device, dtype = packs[0].a.device, packs[0].a.dtype
        offsets, ranks, parts = [0] * num_slots, [0] * num_slots, []
        columns = [[0] * num_slots for _ in packs]
        total = 0
        for slot in range(num_slots):
            offsets[slot] = total
            for index, pack in enumerate(packs):
                columns[index][slot] = ranks[slot]
                if pack.ranks[slot]:
                    parts.append(pack.a[pack.offsets[slot] : pack.offsets[slot] + pack.ranks[slot]])
                    ranks[slot] += pack.ranks[slot]
            total += ranks[slot]
        in_features = packs[0].a.shape[1]
        self.a = torch.cat(parts) if parts else torch.zeros(0, in_features, dtype=dtype, device=device)
        self.offsets_dev = torch.tensor(offsets, dtype=torch.int32, device=device)
        self.ranks_dev = torch.tensor(ranks, dtype=torch.int32, device=device)
        self.max_rank = max(ranks, default=0)
        for index, pack in enumerate(packs):
            pack.group, pack.leader, pack.last = self, index == 0, index == len(packs) - 1
            pack.h_cols = torch.tensor(columns[index], dtype=torch.int32, device=device)
        # (input, shrink output), one attribute written and read whole: calls from several threads may run at once.
        self._memo: tuple[torch.Tensor, torch.Tensor] | None = None

    def remember(self, x: torch.Tensor, h: torch.Tensor) -> None:
        """Keep the shrink output ``h`` of input ``x`` (holding ``x`` keeps its identity unambiguous)."""
        self._memo = (x, h)

    def take(self, x: torch.Tensor, last: bool) -> torch.Tensor | None:
        """The group's shrink output if it was computed from this very tensor, else None.

        The last member (``last``) to take it drops both, so that neither the input nor ``h`` outlives the group's
        layers (a call otherwise kept every decoder layer's normed input alive until it ended: 5x base's prefill
        memory). A member that finds nothing (another thread's call replaced the pair, or it reads another input)
        computes its own shrink."""
        memo = self._memo
        h = memo[1] if memo is not None and memo[0] is x else None
        if last:  # also when the last member reads another input (T5 cross-attention k/v): nothing needs h now
            self.forget()
        return h

    def forget(self) -> None:
        self._memo = None


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


def adapter_weights(layer: LoraLayer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return ``{name: (A [r, in], B [out, r])}`` for the plain-LoRA adapters of a PEFT Linear or Embedding layer."""
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


def fingerprinted_tensors(layer: LoraLayer) -> list[torch.Tensor]:
    """The tensors a layer's packing is made from: every adapter's A and B, and for DoRA adapters the magnitude and
    the base weight (which their cached norms depend on)."""
    tensors = [tensor for pair in adapter_weights(layer).values() for tensor in pair]
    for name in sorted(dora_adapters(layer)):
        tensors += [layer.lora_magnitude_vector[name].weight, layer.get_base_layer().weight]
    return tensors


def layer_fingerprint(layer: LoraLayer) -> tuple:
    """A cheap value that changes whenever the packing of ``layer`` would change.

    Per tensor of ``fingerprinted_tensors``: its identity, storage pointer, in-place version counter, shape, dtype
    and device; per adapter, its name and scaling. The bank holds the tensors it packed from (``AdapterBank``), so
    their identities cannot be reused: a deleted and re-added adapter has new parameter objects, even where the
    allocator hands them the freed storage and their version counters start again at 0 (seen: 3 of 20 such cycles
    were served stale when only pointers and versions were compared). Edits that bypass the version counter
    (``.data.copy_``, NumPy views) stay invisible to it.
    """
    tensors = tuple(
        (id(tensor), tensor.data_ptr(), tensor._version, tensor.shape, tensor.dtype, tensor.device)
        for tensor in fingerprinted_tensors(layer)
    )
    return tensors, tuple((name, layer.scaling[name]) for name in adapter_weights(layer))


def check_adapter_weights(layer: LoraLayer, layer_name: str) -> None:
    """Raise a ValueError naming the adapter and the layer if an adapter's weights do not fit the layer (shapes) or
    sit on another device than its base weight. PEFT itself would fail later with a bare matmul or device error.

    Only the adapters the packed path serves are checked: a variant left to PEFT (``unsupported_adapters``) may
    store its factors in other shapes (BD-LoRA keeps only the diagonal blocks), and PEFT's own forward reads them.
    """
    base_weight = layer.get_base_layer().weight
    # A is [r, in] and B is [out, r] for Linear and Embedding alike (in = vocabulary for an embedding).
    expected = (layer.in_features, layer.out_features)
    skip = unsupported_adapters(layer)
    for name, (a, b) in adapter_weights(layer).items():
        if name in skip:
            continue
        where = f"peft_fastlora: adapter {name!r} of layer {layer_name}"
        if a.dim() != 2 or b.dim() != 2 or (a.shape[1], b.shape[0]) != expected or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{where} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not fit the layer "
                f"({expected[0]} in, {expected[1]} out, one rank); reload the adapter."
            )
        for tensor in (a, b):
            if tensor.device != base_weight.device:
                raise ValueError(
                    f"{where} is on {tensor.device.type} but the layer's base weight is on {base_weight.device}; "
                    "move the model and its adapters to one device (e.g. model.to(device))."
                )


def pack_layer(layer: LoraLayer, slots: dict[str, int]) -> PackedLora:
    """Pack ``layer``'s adapters in slot order without padding, scaling folded into B.

    The packed dtype is the promotion of the adapters' own dtypes, which is what PEFT computes the LoRA path in.
    """
    skip = unsupported_adapters(layer)
    # Adapters left to PEFT take no part, not even in the packed dtype and device.
    weights = {name: pair for name, pair in adapter_weights(layer).items() if name not in skip}
    base_weight = layer.get_base_layer().weight
    order = sorted((slots[name], name) for name in weights)
    num_slots = len(slots)
    offsets, ranks = [0] * num_slots, [0] * num_slots
    a_parts, b_parts = [], []
    dtypes = [tensor.dtype for pair in weights.values() for tensor in pair]
    dtype = functools.reduce(torch.promote_types, dtypes) if dtypes else base_weight.dtype
    device = next(iter(weights.values()))[0].device if weights else base_weight.device
    total = 0
    for slot, name in order:
        a, b = weights[name]
        offsets[slot], ranks[slot] = total, a.shape[0]
        total += a.shape[0]
        a_parts.append(a.detach().to(device=device, dtype=dtype))
        b_parts.append((b.detach().to(device=device, dtype=dtype) * layer.scaling[name]).t())
    in_features = a_parts[0].shape[1] if a_parts else 0
    out_features = b_parts[0].shape[1] if b_parts else 0
    a_packed = torch.cat(a_parts).contiguous() if a_parts else torch.zeros(0, in_features, dtype=dtype, device=device)
    b_packed = torch.cat(b_parts).contiguous() if b_parts else torch.zeros(0, out_features, dtype=dtype, device=device)
    return PackedLora(
        a=a_packed,
        b_t=b_packed,
        offsets=offsets,
        ranks=ranks,
        offsets_dev=torch.tensor(offsets, dtype=torch.int32, device=device),
        ranks_dev=torch.tensor(ranks, dtype=torch.int32, device=device),
        dora=dora_scales(layer, slots, dora_adapters(layer) - skip.keys()),
    )


class AdapterBank:
    """The model-wide adapter registry of a patched model.

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
        Adapter name → slot id, the same in every layer; ``"__base__"`` maps to ``BASE_SLOT``.
    """

    def __init__(self, lora_layers: list[LoraLayer], fast_layers: list[LoraLayer]):
        self.lora_layers = lora_layers
        self.fast_layers = fast_layers
        self.sibling_candidates: list[list[LoraLayer]] = []
        self.layer_names: dict[int, str] = {}  # id(layer) → module path, for error messages
        self.groups: list[SiblingGroup] = []
        self.slots: dict[str, int] = {}
        self._fingerprints: dict[int, tuple] = {}
        # The tensors each layer was packed from, held so that their ids stay unique (see layer_fingerprint).
        self._packed_from: dict[int, list[torch.Tensor]] = {}
        self._warned: set[tuple[str, str]] = set()
        self.refresh()

    def adapter_names(self) -> set[str]:
        """All adapter names held by at least one LoRA layer."""
        names: set[str] = set()
        for layer in self.lora_layers:
            names |= layer.lora_A.keys()
            names |= layer.lora_embedding_A.keys()
        return names

    def refresh(self) -> None:
        """Bring the slot map and every stale layer packing up to date with PEFT's parameters."""
        names = sorted(self.adapter_names())
        slots_changed = names != list(self.slots)
        if slots_changed:
            self.slots = {name: slot for slot, name in enumerate(names)}
        repacked = False
        left_to_peft: set[tuple[str, str]] = set()
        for layer in self.fast_layers:
            fingerprint = layer_fingerprint(layer)
            # A layer without its packing was unpatched meanwhile (unpatch_model of a model sharing this bank).
            stale = "_fastlora_packed" not in layer.__dict__ or self._fingerprints.get(id(layer)) != fingerprint
            if slots_changed or stale:
                check_adapter_weights(layer, self.layer_names.get(id(layer), type(layer).__name__))
                layer._fastlora_packed = pack_layer(layer, self.slots)
                unsupported = unsupported_adapters(layer)
                layer._fastlora_unsupported = set(unsupported)
                left_to_peft |= set(unsupported.items())
                self._fingerprints[id(layer)] = fingerprint
                self._packed_from[id(layer)] = fingerprinted_tensors(layer)
                repacked = True
        if repacked or [group.members for group in self.groups] != self.sibling_candidates:
            self._build_groups()
        self._warn_left_to_peft(left_to_peft)

    def _warn_left_to_peft(self, found: set[tuple[str, str]]) -> None:
        """Name, once per adapter and reason, the adapters whose rows go through PEFT's slower path (the user chose
        the patch for speed, so the slow path must not be silent)."""
        new = sorted(found - self._warned)
        if not new:
            return
        self._warned |= set(new)
        warnings.warn(
            "peft_fastlora serves these adapters through PEFT's own (slower) mixed-batch path in the layers that "
            "hold them (LoRA variants other than DoRA, and lora_bias): "
            + ", ".join(f"{name!r} ({reason})" for name, reason in new),
            stacklevel=4,
        )

    def _build_groups(self) -> None:
        """(Re)build the shared-shrink packing of every sibling group whose members pack alike."""
        for layer in self.fast_layers:
            packed = layer._fastlora_packed
            packed.group, packed.leader, packed.last, packed.h_cols = None, False, False, None
        self.groups = []
        for members in self.sibling_candidates:
            packs = [member._fastlora_packed for member in members]
            if len({(pack.a.dtype, pack.a.device) for pack in packs}) == 1:
                self.groups.append(SiblingGroup(members))

    def forget_inputs(self) -> None:
        """Drop every group's remembered input and shrink output (at the end of a call, to free them)."""
        for group in self.groups:
            group.forget()

    def slot_ids(self, adapter_names: list[str]) -> list[int]:
        """Map names to slot ids, ``"__base__"`` to ``BASE_SLOT``. Names must be known (checked by the caller)."""
        return [BASE_SLOT if name == BASE_ADAPTER_NAME else self.slots[name] for name in adapter_names]
