"""Host memory for the bank's storage when the GPU holds only a pool of adapters (see ``peft_fastlora.pool``)."""

from __future__ import annotations

import ctypes
import functools
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


class _MappedHostArray:
    """``__cuda_array_interface__`` over page-locked host memory seen from the GPU; holds the host tensor, so the
    memory outlives every CUDA tensor made over it."""

    def __init__(self, host: torch.Tensor, device_pointer: int):
        self.host = host
        self.__cuda_array_interface__ = {
            "shape": (host.numel() * host.element_size(),),
            "typestr": "|u1",
            "data": (device_pointer, False),
            "version": 3,
        }


@functools.cache
def _driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor on ``device`` over the same memory as the contiguous page-locked host tensor ``host`` (its
    values, shape and dtype), or None where the GPU cannot address it.

    Why: the pool copies an adapter in as ~350 pieces (a layer's lora_A rows and lora_B block each). As host-to-device
    copies each costs ~18 µs of host time (12.7 GB/s over a call's copies on the H200); as same-device copies over
    this view they go out in a few fused ``torch._foreach_copy_`` kernels that read the host memory over PCIe
    ("zero-copy"). Page-locked memory is mapped into the GPU's address space under unified addressing; the driver
    gives its device address (``cuMemHostGetDevicePointer``; the host address itself on most systems)."""
    driver = _driver()
    if driver is None or device.type != "cuda" or not host.is_pinned() or not host.is_contiguous() or not host.numel():
        return None
    pointer = ctypes.c_uint64()
    with torch.cuda.device(device):
        torch.cuda.init()
        status = driver.cuMemHostGetDevicePointer_v2(ctypes.byref(pointer), ctypes.c_void_p(host.data_ptr()), 0)
    if status != 0:
        return None
    view = torch.as_tensor(_MappedHostArray(host, pointer.value), device=device)
    if view.data_ptr() != pointer.value:  # (torch placed it on another device and copied it: not a view)
        return None
    return view.view(host.dtype).view(host.shape)
