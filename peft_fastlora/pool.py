"""A bounded set of adapters on the GPU, in front of every registered adapter in (pinned) host memory.

With ``patch_model(model, max_gpu_adapters=K)`` the bank keeps its storage, which PEFT's parameters are views of,
in host memory (``host_empty``), and the kernels read a pool instead: per layer (per sibling group), ``K`` GPU
slots of fixed size, each sized for the largest adapter the layer holds. Before each mixed call the adapters the
call names that are not resident are copied in (``AdapterPool.place``), into free slots or over the least
recently used adapters, one copy per layer and factor, no layer repacked. The plan then carries GPU slot ids.

What keeps a resident copy from going stale (the host storage is the truth; silent stale output is the worst bug):

- a repack of any layer (an adapter added or deleted, a parameter replaced: see ``peft_fastlora.bank``) rebuilds
  the pool, empty;
- a changed scaling rewrites the scales of the resident adapters (``rescale``);
- an in-place edit of an adapter parameter bumps its autograd version counter (``param.copy_``, an optimizer step,
  ``load_state_dict``): each call compares the version sum of the adapters it names with the one at copy-in;
- an edit through ``param.data`` (``param.data.copy_``, PEFT's hotswap) bumps no version counter: every read of a
  stored parameter's ``.data`` is counted (``watched.data_reads``) and empties the pool's residency.

Unseen, as for the bank: writes through a NumPy view or a raw pointer.

Why fixed-size slots: the device storage, its metadata tensors and the kernels' grids never change with the
assignment, so a CUDA graph (HF static cache + torch.compile) captured once replays after any swap; only the
metadata's values change, refilled in place with one host-to-device copy per call that swapped.

Copies run on the current stream, right before the forward that reads them: a side stream would only overlap them
with the previous call, which has ended by then (``generate`` reads its tokens on the host).
"""

from __future__ import annotations

import collections
import operator
import time

import numpy as np
import torch

from .bank import BASE_SLOT, PackedLora, SiblingGroup
from .peft_messages import BASE_ADAPTER_NAME
from .watched import data_reads

_version = operator.attrgetter("_version")
_META_ROWS = 5  # a PackedLora's meta: a_offsets, b_offsets, ranks, h_cols, scale bits
_GROUP_ROWS = 2  # a SiblingGroup's meta: offsets, ranks


class _PooledUnit:
    """One packed unit's GPU slots: device copies of the layout of ``host`` (the unit's packs in host memory), with
    ``capacity`` fixed-size slots, and host mirrors of the device metadata.

    Slot ``g`` of a layer owns lora_A rows ``g * cap`` onwards (``cap``: the unit's largest rank, summed over
    siblings) and lora_B elements ``g * b_cap * out`` onwards (``b_cap``: the layer's largest rank)."""

    def __init__(
        self, host: list[PackedLora], capacity: int, device: torch.device, meta: torch.Tensor, mirror: np.ndarray
    ):
        self.host = host
        group = host[0].group
        self.group_cap = group.max_rank if group is not None else host[0].max_rank
        in_features = host[0].a.shape[1]
        dtype = host[0].dtype
        a = torch.empty(capacity * self.group_cap, in_features, dtype=dtype, device=device)
        used = 0
        self.group_mirror = None
        self.device_group = None
        if group is not None:
            self.group_mirror = mirror[used : used + _GROUP_ROWS * capacity].reshape(_GROUP_ROWS, capacity)
            self.group_mirror[0] = np.arange(capacity) * self.group_cap
            self.group_mirror[1] = 0
            group_meta = meta[used : used + _GROUP_ROWS * capacity].view(_GROUP_ROWS, capacity)
            used += _GROUP_ROWS * capacity
            self.device_group = SiblingGroup(a, [], [], len(host), meta=group_meta, max_rank=self.group_cap)
        self.device: list[PackedLora] = []
        self.mirrors: list[np.ndarray] = []
        for packed in host:
            b = torch.empty(capacity * packed.max_rank * packed.out_features, dtype=dtype, device=device)
            view = meta[used : used + _META_ROWS * capacity].view(_META_ROWS, capacity)
            mirror_view = mirror[used : used + _META_ROWS * capacity].reshape(_META_ROWS, capacity)
            used += _META_ROWS * capacity
            mirror_view[:] = 0
            mirror_view[1] = np.arange(capacity) * packed.max_rank
            zeros = [0] * capacity
            pooled = PackedLora(a, b, packed.out_features, list(zeros), mirror_view[1].tolist(), list(zeros), view)
            pooled.max_rank = packed.max_rank  # (its ranks are all 0 until an adapter is copied in)
            if self.device_group is not None:
                pooled.group, pooled.leader, pooled.last = self.device_group, packed.leader, packed.last
                pooled.group_key, pooled.group_max_rank = self.device_group.key, self.group_cap
            self.device.append(pooled)
            self.mirrors.append(mirror_view)
        self.meta_size = used

    @staticmethod
    def meta_size_for(host: list[PackedLora], capacity: int) -> int:
        return (_GROUP_ROWS * capacity if host[0].group is not None else 0) + _META_ROWS * capacity * len(host)

    def copy_in(self, slot: int, gpu_slot: int) -> int:
        """Copy bank slot ``slot``'s adapter of every layer of the unit into GPU slot ``gpu_slot`` (enqueued on the
        current stream) and write its metadata into the mirrors; returns the bytes copied."""
        copied = 0
        group = self.host[0].group
        a_start = gpu_slot * self.group_cap
        if group is not None:
            rows = group.ranks[slot]
            if rows:
                source = group.a[group.offsets[slot] : group.offsets[slot] + rows]
                self.device_group.a[a_start : a_start + rows].copy_(source, non_blocking=True)
                copied += source.numel() * source.element_size()
            self.group_mirror[1, gpu_slot] = rows
        for packed, pooled, mirror in zip(self.host, self.device, self.mirrors, strict=True):
            rank, out = packed.ranks[slot], packed.out_features
            column = mirror[:, gpu_slot]
            pooled.ranks[gpu_slot] = column[2] = rank
            if not rank:
                column[4] = column[3] = 0
                continue
            if group is None:
                source = packed.a[packed.a_offsets[slot] : packed.a_offsets[slot] + rank]
                pooled.a[a_start : a_start + rank].copy_(source, non_blocking=True)
                copied += source.numel() * source.element_size()
                inner = 0
            else:
                inner = packed.a_offsets[slot] - group.offsets[slot]
            pooled.a_offsets[gpu_slot] = column[0] = a_start + inner
            column[3] = inner
            b_start = packed.b_offsets[slot] * out
            source = packed.b[b_start : b_start + rank * out]
            first = pooled.b_offsets[gpu_slot] * out
            pooled.b[first : first + rank * out].copy_(source, non_blocking=True)
            copied += source.numel() * source.element_size()
            column[4] = packed.meta[4, slot].item()  # the scale's fp32 bits
        return copied

    def rescale(self, slot: int, gpu_slot: int) -> None:
        """Rewrite the mirrored scale of GPU slot ``gpu_slot`` from bank slot ``slot``'s host value."""
        for packed, mirror in zip(self.host, self.mirrors, strict=True):
            mirror[4, gpu_slot] = packed.meta[4, slot].item() if packed.ranks[slot] else 0


class AdapterPool:
    """At most ``capacity`` adapters on ``device``, least recently used evicted first (see the module docstring).

    Parameters
    ----------
    capacity : int
        ``max_gpu_adapters``: the GPU slots per layer.
    device : torch.device
        Where the kernels run (the model's device).

    Attributes
    ----------
    stats : dict
        ``hits`` and ``misses`` (adapter placements), ``bytes`` copied, ``seconds``: host time spent in ``place``
        (the copies are asynchronous; ``copy_gpu_seconds`` gives their GPU time).
    """

    def __init__(self, capacity: int, device: torch.device):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"max_gpu_adapters must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.units: list[_PooledUnit] = []
        self.resident: collections.OrderedDict[str, int] = collections.OrderedDict()  # name → GPU slot, LRU first
        self._versions: dict[str, int] = {}  # name → its parameters' version sum when copied in
        self._parameters: dict[str, list[torch.Tensor]] = {}
        self._in_use = [0] * capacity  # per GPU slot: calls in flight that read it
        self._free = list(range(capacity))
        self._data_reads = data_reads()
        self._meta: torch.Tensor | None = None
        self._mirror_tensor: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        self._events: list[tuple] = []
        self.stats = {"hits": 0, "misses": 0, "bytes": 0, "seconds": 0.0}

    def rebuild(self, units: list[tuple[list[PackedLora], list[dict]]], slot_names: dict[int, str]) -> None:
        """New, empty GPU slots for every unit (after the bank repacked): ``units`` are ``(host packs, the layers'
        adapter parameters by name)``; nothing is resident afterwards."""
        self._wait_for_meta_copy()
        self.units = []  # free the old device storage before allocating the new
        self._meta = self._mirror_tensor = None
        self.resident.clear()
        self._versions.clear()
        self._free = [slot for slot in range(self.capacity) if not self._in_use[slot]]
        size = sum(_PooledUnit.meta_size_for(host, self.capacity) for host, _ in units)
        self._meta = torch.zeros(max(size, 1), dtype=torch.int32, device=self.device)
        self._mirror_tensor = torch.zeros(max(size, 1), dtype=torch.int32, pin_memory=self.pin)
        mirror = self._mirror_tensor.numpy()
        parameters: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
        used = 0
        for host, held in units:
            unit = _PooledUnit(host, self.capacity, self.device, self._meta[used:], mirror[used:])
            used += unit.meta_size
            self.units.append(unit)
            for packed, params in zip(host, held, strict=True):
                for slot, rank in enumerate(packed.ranks):
                    if rank:
                        parameters[slot_names[slot]].extend(params[slot_names[slot]])
        self._parameters = dict(parameters)
        self._meta.copy_(self._mirror_tensor)
        self._data_reads = data_reads()

    def device_packs(self) -> list[list[PackedLora]]:
        """Per unit, the device packs (in the unit's layer order) that the layers' kernels read."""
        return [unit.device for unit in self.units]

    def place(self, names: list[str], slots: dict[str, int]) -> dict[str, int]:
        """Make every adapter of ``names`` resident and mark its GPU slot in use until ``release``.

        Parameters
        ----------
        names : list[str]
            The call's adapter names (``"__base__"`` and repeats allowed).
        slots : dict[str, int]
            The bank's name → slot map (where each adapter sits in the host storage).

        Returns
        -------
        dict[str, int]
            Name → GPU slot, for every name of ``names`` (``"__base__"`` → ``BASE_SLOT``).

        Raises
        ------
        ValueError
            If the call names more distinct adapters than ``capacity``, or than the slots that calls in flight on
            other threads leave free; nothing is changed then.
        """
        started = time.perf_counter()
        wanted = list(dict.fromkeys(name for name in names if name != BASE_ADAPTER_NAME))
        if len(wanted) > self.capacity:
            raise ValueError(
                f"This batch names {len(wanted)} distinct adapters, more than max_gpu_adapters={self.capacity} "
                "can hold on the GPU at once; split the batch or patch with a larger max_gpu_adapters."
            )
        if data_reads() != self._data_reads:
            # A stored parameter's .data was read: it may have been edited in place unseen. Copy everything anew.
            self.resident.clear()
            self._versions.clear()
            self._data_reads = data_reads()
        missing = []
        for name in wanted:
            gpu_slot = self.resident.get(name)
            if gpu_slot is not None and self._versions.get(name) == self._version_sum(name):
                self.resident.move_to_end(name)
                self.stats["hits"] += 1
            else:
                missing.append(name)
        keep = set(wanted)
        reusable = [self.resident[name] for name in self.resident if name not in keep and not self._busy(name)]
        targets = [self.resident[name] for name in missing if name in self.resident and not self._busy(name)]
        stale_busy = [name for name in missing if name in self.resident and self._busy(name)]
        needed = len(missing) - len(targets)
        if needed > len(self._free) + len(reusable) or stale_busy:
            raise ValueError(
                f"This call needs {len(missing)} adapters copied to the GPU, but calls in flight on other threads "
                f"hold the GPU slots (max_gpu_adapters={self.capacity}); wait for them or raise max_gpu_adapters."
            )
        by_slot = {gpu_slot: name for name, gpu_slot in self.resident.items()}
        copied = 0
        start_event = self._record_event()
        self._wait_for_meta_copy()
        for name in missing:
            gpu_slot = self.resident.pop(name, None)
            if gpu_slot is None or self._busy_slot(gpu_slot):
                if self._free:
                    gpu_slot = self._free.pop(0)
                else:
                    gpu_slot = reusable.pop(0)
                    evicted = by_slot[gpu_slot]
                    del self.resident[evicted]
                    self._versions.pop(evicted, None)
            slot = slots[name]
            for unit in self.units:
                copied += unit.copy_in(slot, gpu_slot)
            self.resident[name] = gpu_slot
            self._versions[name] = self._version_sum(name)
            self.stats["misses"] += 1
        if missing:
            self._meta.copy_(self._mirror_tensor, non_blocking=self.pin)
            if self.pin:
                self._copied = torch.cuda.Event(enable_timing=True)
                self._copied.record()
                self._events.append((start_event, self._copied))
        placed = {name: self.resident[name] for name in wanted}
        for gpu_slot in placed.values():
            self._in_use[gpu_slot] += 1
        placed[BASE_ADAPTER_NAME] = BASE_SLOT
        self.stats["bytes"] += copied
        self.stats["seconds"] += time.perf_counter() - started
        return placed

    def release(self, gpu_slots: set[int]) -> None:
        """The call that ``place`` served has ended: its GPU slots may be evicted again."""
        for gpu_slot in gpu_slots:
            if gpu_slot != BASE_SLOT:
                self._in_use[gpu_slot] -= 1

    def rescale(self, host: list[PackedLora], slots: dict[str, int]) -> None:
        """The scales of unit ``host`` changed in the host storage: rewrite those of its resident adapters."""
        for unit in self.units:
            if unit.host is host:
                self._wait_for_meta_copy()
                for name, gpu_slot in self.resident.items():
                    unit.rescale(slots[name], gpu_slot)
                self._meta.copy_(self._mirror_tensor, non_blocking=self.pin)

    def copy_gpu_seconds(self) -> float:
        """GPU time of the copies ``place`` enqueued since the last call of this (waits for them)."""
        total = 0.0
        for start, end in self._events:
            if start is not None:
                end.synchronize()
                total += start.elapsed_time(end) / 1000
        self._events.clear()
        return total

    def _busy(self, name: str) -> bool:
        return self._busy_slot(self.resident[name])

    def _busy_slot(self, gpu_slot: int) -> bool:
        return self._in_use[gpu_slot] > 0

    def _version_sum(self, name: str) -> int:
        return sum(map(_version, self._parameters.get(name, ())))

    def _record_event(self) -> torch.cuda.Event | None:
        if not self.pin:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _wait_for_meta_copy(self) -> None:
        """The host mirror is the source of an asynchronous copy until that copy has run: wait before writing it."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
