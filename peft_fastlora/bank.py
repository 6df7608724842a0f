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
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

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
    """

    a: torch.Tensor
    b_t: torch.Tensor
    offsets: list[int]
    ranks: list[int]
    offsets_dev: torch.Tensor
    ranks_dev: torch.Tensor

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


def adapter_weights(layer: LoraLayer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return ``{name: (A [r, in], B [out, r])}`` for the plain-LoRA adapters of a PEFT Linear or Embedding layer."""
    weights = {name: (module.weight, layer.lora_B[name].weight) for name, module in layer.lora_A.items()}
    for name, a in layer.lora_embedding_A.items():
        weights[name] = (a, layer.lora_embedding_B[name])
    return weights


def unsupported_adapters(layer: LoraLayer) -> set[str]:
    """Names of this layer's adapters that the packed path cannot serve: LoRA variants (DoRA, aLoRA, ...) and
    adapters with a ``lora_bias``. Rows naming them go through PEFT's own mixed-batch path instead."""
    names = set(getattr(layer, "lora_variant", {}))
    for name, module in layer.lora_B.items():
        if getattr(module, "bias", None) is not None:
            names.add(name)
    return names


def layer_fingerprint(layer: LoraLayer) -> tuple:
    """A cheap value that changes whenever the packing of ``layer`` would change.

    ``Tensor._version`` counts in-place writes, ``data_ptr`` changes when a parameter's storage is swapped.
    """
    parts = []
    for name, (a, b) in adapter_weights(layer).items():
        parts.append(
            (name, a.data_ptr(), a._version, b.data_ptr(), b._version, a.dtype, b.dtype, a.device, layer.scaling[name])
        )
    return tuple(parts)


def pack_layer(layer: LoraLayer, slots: dict[str, int]) -> PackedLora:
    """Pack ``layer``'s adapters in slot order without padding, scaling folded into B.

    The packed dtype is the promotion of the adapters' own dtypes, which is what PEFT computes the LoRA path in.
    """
    weights = adapter_weights(layer)
    skip = unsupported_adapters(layer)
    base_weight = layer.get_base_layer().weight
    order = sorted((slots[name], name) for name in weights if name not in skip)
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
        self.slots: dict[str, int] = {}
        self._fingerprints: dict[int, tuple] = {}
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
        for layer in self.fast_layers:
            fingerprint = layer_fingerprint(layer)
            if slots_changed or self._fingerprints.get(id(layer)) != fingerprint:
                layer._fastlora_packed = pack_layer(layer, self.slots)
                layer._fastlora_unsupported = unsupported_adapters(layer)
                self._fingerprints[id(layer)] = fingerprint

    def slot_ids(self, adapter_names: list[str]) -> list[int]:
        """Map names to slot ids, ``"__base__"`` to ``BASE_SLOT``. Names must be known (checked by the caller)."""
        return [BASE_SLOT if name == BASE_ADAPTER_NAME else self.slots[name] for name in adapter_names]
