"""Integer keys that name packed LoRA storage, so that a compiled graph names a layer's storage instead of reading it.

Every tensor a torch.compile graph reads from a Python attribute is a graph input, guarded by dynamo and handled by
the CUDA-graph and AOT wrappers on every call: a layer's packed lora_A, lora_B and metadata were 20 such inputs per
decoder layer. Named by key, the host time a compiled 32-layer decode step adds over the base model's fell from
5.9 to 1.9 ms on the H200 (dynamo's guard check alone, on a CPU: 21.0 → 16.0 µs per decoder layer, base 6.3;
``benchmarks/compile_overhead.py``). The compiled path therefore passes the kernels' custom ops a key, a plain
int, and the op finds the storage here when it runs. A repack makes new storage under a new key, and the key is
read from the layer when traced, so dynamo's guard on it recompiles the graph rather than replaying launches of
freed storage.

The cost of that safety: a repack that keeps every shape (``delete_adapter`` then ``add_adapter`` of the same rank,
``weight.data = new_tensor``) now recompiles the decode step, where before it did not; repacks that change a shape
(an added adapter) recompiled before too. After ``torch._dynamo.config.recompile_limit`` recompilations dynamo runs
the step eagerly, correct but slower. A key is valid in this process only (``torch.export`` would freeze it).
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch

_storages: dict[int, weakref.ref] = {}
_keys = itertools.count(1)
_lock = threading.Lock()  # itertools.count is atomic under the GIL only, not on a free-threaded build


def register(storage: object) -> int:
    """A new key for ``storage`` (a ``PackedLora`` or ``SiblingGroup``), valid for as long as it lives."""
    with _lock:
        key = next(_keys)
    _storages[key] = weakref.ref(storage, lambda _, key=key: _storages.pop(key, None))
    return key


def lookup(key: int):
    """The storage registered under ``key``.

    Raises
    ------
    RuntimeError
        If it no longer exists (a graph traced against storage that a repack has since replaced; its guards should
        have sent the call to a new graph).
    """
    reference = _storages.get(key)
    storage = reference() if reference is not None else None
    if storage is None:
        raise RuntimeError(f"peft_fastlora: LoRA storage {key} no longer exists (stale compiled graph)")
    return storage


@torch._dynamo.assume_constant_result
def _traced_fields(key: int):
    # Dynamo calls this while tracing and bakes its result into the graph as a constant, guarding neither the
    # registry nor the fields: only the key the caller read from the layer (see ``launch_fields``).
    return lookup(key).fields


def launch_fields(packed):
    """``packed.fields`` (a ``bank.LaunchFields``): in eager calls read straight from ``packed``; while torch.compile
    traces, through its key, so that the graph is guarded on the key alone instead of on each field (8 guards per
    LoRA layer, checked on every compiled call). Sound because a ``PackedLora``'s fields never change while it
    lives, and a repack makes a new one under a new key."""
    if torch.compiler.is_compiling():
        return _traced_fields(packed.key)
    return packed.fields
