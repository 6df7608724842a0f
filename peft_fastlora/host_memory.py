"""Host memory for the bank's storage when the GPU holds only a pool of adapters (see ``peft_fastlora.pool``)."""

from __future__ import annotations

import mmap
import weakref

import numpy as np
import torch

_EXACT_PIN_BYTES = 1 << 20
"""Blocks from this size up are pinned exactly; smaller ones go through torch's pinned allocator (its rounding
wastes at most this much per block)."""


def host_empty(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised 1-D host tensor of ``numel`` elements, page-locked where ``pin`` (a CUDA machine).

    torch's pinned allocator rounds every block up to a power of two: the host storage of 1,000 adapters (84 GB on a
    Llama-3-8B shape) would take up to twice that. Large blocks are pinned exactly instead, as SGLang's host pools
    do: anonymous memory, registered with CUDA, unregistered when the tensor's storage is freed (the finalizer holds
    the mapping, so it is unmapped only after the unregistration)."""
    nbytes = numel * dtype.itemsize
    if not pin or nbytes < _EXACT_PIN_BYTES:
        return torch.empty(numel, dtype=dtype, pin_memory=pin)
    mapping = mmap.mmap(-1, nbytes)
    array = np.frombuffer(mapping, dtype=np.uint8)
    cudart = torch.cuda.cudart()
    status = cudart.cudaHostRegister(array.ctypes.data, nbytes, 0)
    if int(status) != 0:
        raise RuntimeError(f"peft_fastlora: could not page-lock {nbytes} bytes of host memory (CUDA error {status})")
    weakref.finalize(array, _unregister, cudart, array.ctypes.data, mapping)
    return torch.from_numpy(array).view(dtype)


def _unregister(cudart, address: int, mapping: mmap.mmap) -> None:
    cudart.cudaHostUnregister(address)
    del mapping  # (the last reference: unmapped now)
