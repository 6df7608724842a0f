"""A bounded set of adapters on the GPU, in front of every registered adapter in (pinned) host memory.

With ``patch_model(model, max_gpu_adapters=K)`` the bank keeps its storage, which PEFT's parameters are views of,
in host memory (``host_empty``), and the kernels read a pool instead: per layer (per sibling group), ``K`` GPU
slots of fixed size, each sized for the largest adapter the layer holds. Before each mixed call the adapters the
call names that are not resident are copied in (``AdapterPool.place``), into free slots or over the least
recently used adapters not held by a call in flight: one copy per layer and factor, each adapter's in one
``torch._foreach_copy_`` per dtype, no layer repacked. The plan then carries GPU slot ids.

What keeps a resident copy from going stale (the host storage is the truth; silent stale output is the worst bug):

- a repack of any layer (an adapter added or deleted, a parameter replaced: see ``peft_fastlora.bank``) rebuilds
  the pool, the resident adapters copied anew into the slots they had (a call in flight keeps reading them there);
- a changed scaling rewrites the scales of the resident adapters (``rescale``);
- an in-place edit of an adapter parameter bumps its autograd version counter (``param.copy_``, an optimizer step,
  ``load_state_dict``): each call compares the version sum of the adapters it names with the one at copy-in;
- an edit through ``param.data`` (``param.data.copy_``, PEFT's hotswap) bumps no version counter: every read of a
  stored parameter's ``.data`` is counted (``watched.data_reads``), and after one every resident adapter is copied
  anew when next named.

Unseen: writes through a NumPy view or a raw pointer, and through a ``.data`` alias taken before an earlier call
(the bank without a pool sees those: its storage is what the kernels read).

Why fixed-size slots: the device storage, its metadata tensors and the kernels' grids never change with the
assignment, so a CUDA graph (HF static cache + torch.compile) captured once replays after any swap; only the
metadata's values change, refilled in place with one host-to-device copy per call that swapped.

Copies run on the current stream, right before the forward that reads them, each adapter's as soon as it is queued
(the GPU copies one while the host prepares the next): a side stream would only overlap them with the previous
call, which has ended by then (``generate`` reads its tokens on the host).
"""

from __future__ import annotations

import collections
import operator
import time

import numpy as np
import torch

from .bank import BASE_SLOT, PackedLora, SiblingGroup
from .host_memory import device_view
from .peft_messages import BASE_ADAPTER_NAME
from .watched import data_reads

_version = operator.attrgetter("_version")
_META_ROWS = 5  # a PackedLora's meta: a_offsets, b_offsets, ranks, h_cols, scale bits
_GROUP_ROWS = 2  # a SiblingGroup's meta: offsets, ranks


class _PooledUnit:
    """One packed unit's GPU slots: ``capacity`` fixed-size slots over the layout of ``host`` (the unit's packs in
    host memory), and a host mirror of the device metadata.

    Every slot of a layer is padded to the layer's largest rank ``cap`` (over every adapter registered): lora_A rows
    ``g * group_cap + inner`` onwards (``inner``: the caps of the sibling members before it), and lora_B as an
    ``[out, cap]`` block from element ``g * cap * out``, the columns past the adapter's rank zeroed (as are the rows
    of A: they add exactly nothing). So every offset, rank and column of the metadata is fixed; a swap changes only
    the weights and the slot's scale (0 where the layer lacks the adapter). Nothing the compiled graph reads of the
    layer, Python values included, changes with a swap."""

    def __init__(
        self, host: list[PackedLora], capacity: int, device: torch.device, meta: torch.Tensor, mirror: np.ndarray
    ):
        self.host = host
        self.host_meta = [packed.meta.numpy() for packed in host]  # (host tensors: read without torch's overhead)
        # Where copies read the host storage: a CUDA view of it where the GPU can address it (zero-copy reads, one
        # fused kernel for many pieces: see ``host_memory.device_view``), else the host tensors (a DMA per piece).
        group_a = host[0].a
        self.source_a = _readable(group_a, device)
        self.source_b = [_readable(packed.b, device) for packed in host]
        self._slot_views: dict[int, list] = {}
        self.caps = [packed.max_rank for packed in host]
        # The fast path's sources per bank slot, as element ranges of flat views (``full_sources``): one slice per
        # piece, bounds read from arrays made here once (a Python loop over members and a view per piece cost
        # ~0.7 ms an adapter on a CPU, paid by every adapter a call copies for the first time).
        self._flat_a = self.source_a.view(-1)
        width = group_a.shape[1]
        ranks = np.array([packed.ranks for packed in host], dtype=np.int64).reshape(len(host), -1)
        self._full_mask = (ranks == np.array(self.caps, dtype=np.int64)[:, None]).all(axis=0)
        group = host[0].group
        if group is not None:
            starts = np.asarray(group.offsets, dtype=np.int64)
            self._a_bounds = np.stack([starts, starts + np.asarray(group.ranks, dtype=np.int64)]) * width
        else:
            starts = np.array([packed.a_offsets for packed in host], dtype=np.int64).reshape(len(host), -1)
            self._a_bounds = np.stack([starts, starts + ranks]) * width  # [2, members, slots]
        b_starts = np.array([packed.b_offsets for packed in host], dtype=np.int64).reshape(len(host), -1)
        outs = np.array([packed.out_features for packed in host], dtype=np.int64)[:, None]
        self._b_bounds = np.stack([b_starts * outs, (b_starts + ranks) * outs])  # [2, members, slots]
        self._ranks = ranks  # [members, slots]
        self._member_scales = [meta[4] for meta in self.host_meta]
        self.inner = [sum(self.caps[:index]) for index in range(len(host))]
        self.group_cap = sum(self.caps)
        slots = np.arange(capacity)
        a = torch.empty(capacity * self.group_cap, host[0].a.shape[1], dtype=host[0].dtype, device=device)
        used = 0
        self.device_group = None
        if host[0].group is not None:
            group_meta = meta[used : used + _GROUP_ROWS * capacity].view(_GROUP_ROWS, capacity)
            group_mirror = mirror[used : used + _GROUP_ROWS * capacity].reshape(_GROUP_ROWS, capacity)
            group_mirror[0], group_mirror[1] = slots * self.group_cap, self.group_cap
            used += _GROUP_ROWS * capacity
            self.device_group = SiblingGroup(a, [], [], len(host), meta=group_meta, max_rank=self.group_cap)
        self.device: list[PackedLora] = []
        self.scale_mirrors: list[np.ndarray] = []
        for packed, cap, inner in zip(host, self.caps, self.inner, strict=True):
            b = torch.empty(capacity * cap * packed.out_features, dtype=packed.dtype, device=device)
            view = meta[used : used + _META_ROWS * capacity].view(_META_ROWS, capacity)
            rows = mirror[used : used + _META_ROWS * capacity].reshape(_META_ROWS, capacity)
            used += _META_ROWS * capacity
            rows[0], rows[1], rows[2] = slots * self.group_cap + inner, slots * cap, cap
            rows[3] = inner if self.device_group is not None else 0
            rows[4] = 0
            pooled = PackedLora(a, b, packed.out_features, rows[0].tolist(), rows[1].tolist(), rows[2].tolist(), view)
            if self.device_group is not None:
                pooled.group, pooled.leader, pooled.last = self.device_group, packed.leader, packed.last
                pooled.group_key, pooled.group_max_rank = self.device_group.key, self.group_cap
            self.device.append(pooled)
            self.scale_mirrors.append(rows[4])
        self.meta_size = used

    @staticmethod
    def meta_size_for(host: list[PackedLora], capacity: int) -> int:
        return (_GROUP_ROWS * capacity if host[0].group is not None else 0) + _META_ROWS * capacity * len(host)

    def copy_in(self, slot: int, gpu_slot: int, copies: _Copies) -> int:
        """Queue the copies of bank slot ``slot``'s adapter, every layer of the unit, into GPU slot ``gpu_slot``
        (into ``copies``, which a call runs in as few ``torch._foreach_copy_`` launches as it can), zero the
        padding and mirror the scales; returns the bytes to copy from the host. Any ranks; the pool's fast path
        (``full_sources``) covers the common case of every member at its cap."""
        copied = 0
        group = self.host[0].group
        slot_targets = self._targets(gpu_slot)
        whole = group is not None and self._full(slot)
        if whole:  # every member at its cap: the group's rows of this slot are one block, as on the device
            source = self.source_a[group.offsets[slot] : group.offsets[slot] + group.ranks[slot]]
            copies.add(slot_targets[0], source)
            copied += source.nbytes
        for packed, (rows, b), cap, scales, meta, source_b in zip(
            self.host, slot_targets[1:], self.caps, self.scale_mirrors, self.host_meta, self.source_b, strict=True
        ):
            rank, out = packed.ranks[slot], packed.out_features
            if not rank:  # the layer lacks this adapter: it adds nothing (zeros, so no stale value can leak)
                rows.zero_()
                b.zero_()
                scales[gpu_slot] = 0
                continue
            if not whole:
                source = self.source_a[packed.a_offsets[slot] : packed.a_offsets[slot] + rank]
                copies.add(rows[:rank], source)
                copied += source.nbytes
                if rank < cap:
                    rows[rank:].zero_()
            b_start = packed.b_offsets[slot] * out
            source = source_b[b_start : b_start + rank * out].view(out, rank)
            copies.add(b if rank == cap else b[:, :rank], source)
            if rank < cap:
                b[:, rank:].zero_()
            copied += source.nbytes
            scales[gpu_slot] = meta[4, slot]  # the scale's fp32 bits
        return copied

    def full_layout(self) -> tuple[list[torch.Tensor], np.ndarray]:
        """Where every bank slot's pieces lie, for slots at the caps (``full_mask``): the flat source of each piece,
        in ``full_targets``' order, and ``[2, pieces, slots]`` element bounds in it (start, end)."""
        if self._a_bounds.ndim == 2:  # a group: its rows of each slot, then every member's lora_B block
            return [self._flat_a, *self.source_b], np.concatenate([self._a_bounds[:, None], self._b_bounds], axis=1)
        sources = [piece for source_b in self.source_b for piece in (self._flat_a, source_b)]
        bounds = np.stack([self._a_bounds, self._b_bounds], axis=2).reshape(2, -1, self._b_bounds.shape[-1])
        return sources, bounds

    @property
    def full_mask(self) -> np.ndarray:
        """Per bank slot: every member holds it at its cap rank (so no padding: one rank for every adapter of a
        layer, the common case), so ``full_layout`` covers it; ``copy_in`` serves the others."""
        return self._full_mask

    def full_targets(self, gpu_slot: int) -> list[torch.Tensor]:
        """GPU slot ``gpu_slot``'s pieces in ``full_sources``' order, flattened: the group's rows then every member's
        lora_B block, or (no group) every member's lora_A rows and lora_B block."""
        views = self._targets(gpu_slot)
        if views[0] is not None:
            return [views[0].view(-1), *(b.view(-1) for _, b in views[1:])]
        return [piece.view(-1) for pair in views[1:] for piece in pair]

    def _full(self, slot: int) -> bool:
        return bool(self._full_mask[slot])

    def _targets(self, gpu_slot: int) -> list:
        """GPU slot ``gpu_slot``'s views, made once: the group's rows ``[group_cap, in]`` (or None), then per
        member its lora_A rows ``[cap, in]`` and lora_B block ``[out, cap]``."""
        views = self._slot_views.get(gpu_slot)
        if views is None:
            a_start = gpu_slot * self.group_cap
            device_a = self.device[0].a
            views = [device_a[a_start : a_start + self.group_cap] if self.device_group is not None else None]
            for pooled, cap, inner in zip(self.device, self.caps, self.inner, strict=True):
                out = pooled.out_features
                rows = device_a[a_start + inner : a_start + inner + cap]
                views.append((rows, pooled.b[gpu_slot * cap * out : (gpu_slot + 1) * cap * out].view(out, cap)))
            self._slot_views[gpu_slot] = views
        return views

    def rescale(self, slots: np.ndarray, gpu_slots: np.ndarray) -> None:
        """Rewrite the mirrored scales of GPU slots ``gpu_slots`` from bank slots ``slots``' host values (0 where a
        member lacks the adapter); int64 arrays of one length."""
        for ranks, scales, host_scales in zip(self._ranks, self.scale_mirrors, self._member_scales, strict=True):
            scales[gpu_slots] = np.where(ranks[slots] > 0, host_scales[slots], 0)


def _readable(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` as the pool's copies read it: its CUDA view where the GPU can address it, else itself."""
    view = device_view(host, device)
    return host if view is None else view


class _Copies:
    """The weight copies one call queues, run by ``run`` in as few launches as torch allows:
    ``torch._foreach_copy_`` runs one fused kernel over many pairs only when every pair is dense and of one dtype
    and device (any other pair sends the whole list through its per-pair loop), so pairs are grouped by those."""

    def __init__(self):
        self.groups: dict[tuple, tuple[list, list]] = {}

    def add(self, target: torch.Tensor, source: torch.Tensor) -> None:
        """Queue ``target.copy_(source)``."""
        key = _pair_key(target, source)
        group = self.groups.setdefault(key, ([], []))
        group[0].append(target)
        group[1].append(source)

    def extend(self, grouped_targets: dict[tuple, list], grouped_sources: dict[tuple, list]) -> None:
        """Queue pairs grouped already (same keys, same order: ``_pair_key``'s groups)."""
        for key, targets in grouped_targets.items():
            group = self.groups.setdefault(key, ([], []))
            group[0].extend(targets)
            group[1].extend(grouped_sources[key])

    def run(self, non_blocking: bool) -> None:
        for targets, sources in self.groups.values():
            torch._foreach_copy_(targets, sources, non_blocking=non_blocking)

    def __bool__(self) -> bool:
        return bool(self.groups)


def _pair_key(target: torch.Tensor, source: torch.Tensor) -> tuple:
    return target.dtype, source.dtype, source.device, target.is_contiguous() and source.is_contiguous()


def _grouped_by(keys: list[tuple], tensors: list[torch.Tensor]) -> dict[tuple, list]:
    """``tensors`` split by their ``keys``, in order."""
    grouped: dict[tuple, list] = {}
    for key, tensor in zip(keys, tensors, strict=True):
        grouped.setdefault(key, []).append(tensor)
    return grouped


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
        (the copies are asynchronous; ``copy_gpu_seconds`` gives their GPU time where ``timing`` is set).
    timing : bool
        Record CUDA events around each call's copies (for ``copy_gpu_seconds``; off by default: a benchmark's).
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
        self._data_reads = data_reads()
        self._meta: torch.Tensor | None = None
        self._mirror_tensor: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        self._events: list[tuple] = []
        # The fast path's views, made once (see ``_queue``): per bank slot its sources grouped for the fused copy
        # (None: not at the caps, ``copy_in`` serves it) and bytes; per GPU slot its targets grouped alike.
        self._full_sources: dict[int, tuple[dict, int] | None] = {}
        self._full_targets: dict[int, dict] = {}
        self._full_keys: list[tuple] | None = None
        self.timing = False
        self.stats = {"hits": 0, "misses": 0, "bytes": 0, "seconds": 0.0}

    def rebuild(self, units: list[tuple[list[PackedLora], list[dict]]], slots: dict[str, int]) -> None:
        """New GPU slots for every unit (after the bank repacked): ``units`` are ``(host packs, the layers' adapter
        parameters by name)``, ``slots`` the bank's name → slot map.

        The adapters resident before stay resident in the same GPU slots, copied anew: a call in flight (a
        logits processor's call that added an adapter inside ``generate``, another thread) keeps reading its
        adapters where its plan says they are."""
        self._wait_for_meta_copy()
        previous = [(name, gpu_slot) for name, gpu_slot in self.resident.items() if name in slots]
        self.units = []  # free the old device storage before allocating the new
        self._meta = self._mirror_tensor = None
        self.resident.clear()
        self._versions.clear()
        slot_names = {slot: name for name, slot in slots.items()}
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
        self._full_sources.clear()
        self._full_targets.clear()
        self._full_keys = None
        copies = _Copies()
        for name, gpu_slot in previous:
            self._queue(slots[name], gpu_slot, copies)
            self.resident[name] = gpu_slot
            self._versions[name] = self._version_sum(name)
        self._rescale([(slots[name], gpu_slot) for name, gpu_slot in previous])
        copies.run(non_blocking=self.pin)
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
            Name → GPU slot, for every name of ``names`` (``"__base__"``, and adapters no fast layer serves, →
            ``BASE_SLOT``).

        Raises
        ------
        ValueError
            If the call names more distinct adapters than ``capacity``, or than the slots that calls in flight on
            other threads leave free; nothing is changed then.
        """
        started = time.perf_counter()
        named = dict.fromkeys(name for name in names if name != BASE_ADAPTER_NAME)
        # An adapter that no fast layer serves (left to PEFT's path everywhere) needs no slot: its rows add nothing
        # in the fast layers, as base rows do, and PEFT's hooks serve it.
        wanted = [name for name in named if name in self._parameters]
        if len(wanted) > self.capacity:
            raise ValueError(
                f"This batch names {len(wanted)} distinct adapters, more than max_gpu_adapters={self.capacity} "
                "can hold on the GPU at once; split the batch or patch with a larger max_gpu_adapters."
            )
        if data_reads() != self._data_reads:
            # A stored parameter's .data was read: it may have been edited in place unseen. Copy each anew when
            # next named (no recorded version matches).
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
        own_slots = [self.resident[name] for name in missing if name in self.resident and not self._busy(name)]
        stale_busy = [name for name in missing if name in self.resident and self._busy(name)]
        taken = set(self.resident.values())
        free = [gpu_slot for gpu_slot in range(self.capacity) if gpu_slot not in taken and not self._in_use[gpu_slot]]
        needed = len(missing) - len(own_slots)  # (a stale resident adapter is copied again into its own slot)
        if needed > len(free) + len(reusable) or stale_busy:
            raise ValueError(
                f"This call needs {len(missing)} adapters copied to the GPU, but the GPU slots are held by calls in "
                f"flight (an outer call of this thread, such as the generate a logits processor runs in, or calls "
                f"on other threads; max_gpu_adapters={self.capacity}); wait for them or raise max_gpu_adapters."
            )
        by_slot = {gpu_slot: name for name, gpu_slot in self.resident.items()}
        copied = 0
        copies = _Copies()
        queued: list[tuple[int, int]] = []
        start_event = self._record_event() if self.timing else None
        self._wait_for_meta_copy()
        for name in missing:
            gpu_slot = self.resident.pop(name, None)
            if gpu_slot is None or self._busy_slot(gpu_slot):
                if free:
                    gpu_slot = free.pop(0)
                else:
                    gpu_slot = reusable.pop(0)
                    evicted = by_slot[gpu_slot]
                    del self.resident[evicted]
                    self._versions.pop(evicted, None)
            copied += self._queue(slots[name], gpu_slot, copies)
            if self.pin:
                # Start this adapter's copies now: the GPU is idle here (the previous call has ended), so it copies
                # while the host prepares the next adapter's (session 33: 30-50 ms of host time a call, then
                # 30-80 ms of copies, one after the other).
                copies.run(non_blocking=True)
                copies = _Copies()
            queued.append((slots[name], gpu_slot))
            self.resident[name] = gpu_slot
            self._versions[name] = self._version_sum(name)
            self.stats["misses"] += 1
        self._rescale(queued)
        if missing:
            # The weight copies left (all of them from pageable memory, which copies synchronously): one call, a C++
            # loop of copies.
            copies.run(non_blocking=self.pin)
            self._meta.copy_(self._mirror_tensor, non_blocking=self.pin)
            if self.pin:
                self._copied = torch.cuda.Event(enable_timing=self.timing)
                self._copied.record()
                if start_event is not None:
                    self._events.append((start_event, self._copied))
        placed = {name: self.resident[name] for name in wanted}
        for gpu_slot in placed.values():
            self._in_use[gpu_slot] += 1
        placed[BASE_ADAPTER_NAME] = BASE_SLOT
        placed.update((name, BASE_SLOT) for name in named if name not in self._parameters)
        self.stats["bytes"] += copied
        self.stats["seconds"] += time.perf_counter() - started
        return placed

    def _queue(self, slot: int, gpu_slot: int, copies: _Copies) -> int:
        """Queue the copies of bank slot ``slot``'s adapter into GPU slot ``gpu_slot`` in every unit and mirror its
        scales; returns the bytes to copy.

        An adapter at every layer's cap rank (one rank for every adapter: the common case) has its ~350 source
        views (Llama-3-8B shape) made once and kept, ~0.6 KB of host memory each: building them anew cost ~1.5
        ms of Python an adapter, 30 ms for a call that copies 20. Others take ``copy_in``'s general path."""
        if slot not in self._full_sources:
            self._full_sources[slot] = self._sources_of(slot)
        full = self._full_sources[slot]
        if full is None:
            return sum(unit.copy_in(slot, gpu_slot, copies) for unit in self.units)
        grouped_sources, nbytes = full
        targets = self._full_targets.get(gpu_slot)
        if targets is None:
            pieces = [piece for unit in self.units for piece in unit.full_targets(gpu_slot)]
            targets = self._full_targets[gpu_slot] = _grouped_by(self._full_keys, pieces)
        copies.extend(targets, grouped_sources)
        return nbytes  # (the caller rescales: ``_rescale``)

    def _rescale(self, pairs: list[tuple[int, int]], units: list[_PooledUnit] | None = None) -> None:
        """Mirror the host scales of ``(bank slot, GPU slot)`` pairs in ``units`` (default: every unit)."""
        if pairs:
            slots, gpu_slots = np.array(pairs, dtype=np.int64).T
            for unit in self.units if units is None else units:
                unit.rescale(slots, gpu_slots)

    def _sources_of(self, slot: int) -> tuple[dict, int] | None:
        """Bank slot ``slot``'s source pieces (1-D views) grouped by ``_pair_key`` and their bytes, or None where
        some unit holds it below its cap. One slice per piece, its bounds read from one array of every unit's
        (``_full_layout``): a loop over units and members with a view or two per piece cost ~0.7 ms an adapter
        on a CPU, paid by every adapter a call copies for the first time (most of a Zipf tail's)."""
        if self._full_keys is None:
            self._full_layout()
        if not self._slot_full[slot]:
            return None
        starts, ends = self._piece_bounds[:, :, slot].tolist()
        sources = [source[start:end] for source, start, end in zip(self._piece_sources, starts, ends, strict=True)]
        nbytes = int((self._piece_itemsizes * (self._piece_bounds[1, :, slot] - self._piece_bounds[0, :, slot])).sum())
        return _grouped_by(self._full_keys, sources), nbytes

    def _full_layout(self) -> None:
        """Every unit's ``full_layout`` joined, and the pieces' copy keys (a piece's dtypes, devices and density are
        the same for every slot, so the keys are found from GPU slot 0's targets and any slot's sources)."""
        sources, bounds = [], []
        self._slot_full = np.ones(len(self.units[0].full_mask) if self.units else 0, dtype=bool)
        for unit in self.units:
            unit_sources, unit_bounds = unit.full_layout()
            sources += unit_sources
            bounds.append(unit_bounds)
            self._slot_full &= unit.full_mask
        self._piece_sources = sources
        self._piece_bounds = np.concatenate(bounds, axis=1) if bounds else np.zeros((2, 0, 0), dtype=np.int64)
        self._piece_itemsizes = np.array([source.element_size() for source in sources], dtype=np.int64)
        targets = [piece for unit in self.units for piece in unit.full_targets(0)]
        self._full_keys = [_pair_key(target, source[:0]) for target, source in zip(targets, sources, strict=True)]

    def release(self, gpu_slots: set[int]) -> None:
        """The call that ``place`` served has ended: its GPU slots may be evicted again."""
        for gpu_slot in gpu_slots:
            if gpu_slot != BASE_SLOT and self._in_use[gpu_slot]:  # (0: placed by a pool since replaced)
                self._in_use[gpu_slot] -= 1

    def rescale(self, host: list[PackedLora], slots: dict[str, int]) -> None:
        """The scales of unit ``host`` changed in the host storage: rewrite those of its resident adapters."""
        for unit in self.units:
            if unit.host is host:
                self._wait_for_meta_copy()
                # (a deleted adapter stays listed until the next rebuild; nothing reads it)
                pairs = [(slots[name], gpu_slot) for name, gpu_slot in self.resident.items() if name in slots]
                self._rescale(pairs, [unit])
                self._meta.copy_(self._mirror_tensor, non_blocking=self.pin)

    def copy_gpu_seconds(self) -> float:
        """GPU time of the copies ``place`` enqueued since the last call of this, while ``timing`` is set (waits for
        them)."""
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
