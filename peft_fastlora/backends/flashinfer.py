"""The FlashInfer backend: each LoRA layer's shrink and expand through FlashInfer's segmented GEMM.

``flashinfer.gemm.SegmentGEMMWrapper.run`` multiplies consecutive row segments of one matrix by one weight matrix
each. So per layer and call the backend gathers the batch's LoRA tokens grouped by slot (the plan's permutation;
``__base__`` tokens and slots this layer lacks are in no segment), shrinks them against each slot's ``A``, expands
the result against each slot's ``B``, and adds the deltas back into the base output in row order.

- Ranks: the wrapper takes one width for all segments. The batch's adapters are copied, zero-padded to the batch's
  widest rank and with the scaling folded into B, into a scratch buffer for the call (never into the bank). One
  function reads the packed weights: ``_padded_weights``.
- The two code paths of the wrapper differ: the sm80 (Ampere) kernel adds its product into ``out``, the sm90
  (Hopper) kernel overwrites ``out``. The backend hands the sm80 path a zeroed ``out`` and the sm90 path an empty
  one, so both give the same delta; ``gemm_path`` forces either (tests run the sm80 path on Hopper too).
- One workspace buffer per device, allocated once with the wrapper.
- Host values per call: the wrapper takes the number of segments as a Python int (it sizes the launch of its
  argument kernel), and the gathered token count is a tensor shape. A CUDA graph captured over this backend
  therefore replays only the assignment it was captured with, so ``"auto"`` keeps Triton, whose launches are
  assignment-free. Under ``torch.compile`` this backend runs the torch backend's assignment-independent path.
- FlashInfer's kernels take fp16 and bf16 only, with every row 16-byte aligned (its Hopper kernel exits the
  process on a misaligned problem). Layers outside that (fp32 adapters, PEFT's default on a bf16 model; in or out
  features not a multiple of 8) run the Triton kernels instead (torch where Triton is missing), with one warning.
- Embeddings run the torch path, as in the Triton backend.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from typing import NamedTuple

import torch

from ..bank import PackedLora
from ..plan import PlanView
from .torch_ref import TorchBackend

EXTRA = "pip install 'peft-fastlora[flashinfer]'"
"""How a user gets FlashInfer: the package's optional extra."""

WORKSPACE_BYTES = 32 * 2**20
"""The float workspace handed to FlashInfer's wrapper, once per device (its sm90 grouped GEMM keeps its CUTLASS
workspace there; a few KiB at the sizes of a LoRA layer)."""

ALIGN = 8
"""Elements of fp16/bf16 in 16 bytes: every row length the kernels see (in, out, padded rank) is a multiple."""

DTYPES = (torch.float16, torch.bfloat16)


def flashinfer_problem(device: torch.device) -> str | None:
    """Why the FlashInfer backend cannot run on ``device``, or None. Imports nothing (FlashInfer's import is slow)."""
    if importlib.util.find_spec("flashinfer") is None:
        return f"flashinfer is not installed; install the extra: {EXTRA}"
    if device.type != "cuda":
        return f"FlashInfer's segmented GEMM needs a CUDA GPU (the model is on {device.type})."
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"FlashInfer's segmented GEMM needs compute capability 8.0 or newer (this GPU has {major}.{minor})."
    return None


class SegmentWeights(NamedTuple):
    """The weights of one call in the wrapper's layout.

    Attributes
    ----------
    a : torch.Tensor
        ``[num_weights, width, in]``: each weight's lora_A rows (the shrink's column-major weight).
    b : torch.Tensor
        ``[num_weights, width, out]``: each weight's ``scaling · lora_Bᵀ`` (the expand's row-major weight).
    """

    a: torch.Tensor
    b: torch.Tensor


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _padded_weights(packed: PackedLora, slots: tuple[int, ...]) -> SegmentWeights:
    """The adapters of ``slots`` (each held by this layer), ranks padded to one width, in the wrapper's layout.

    The slots' adapters are copied into zeroed scratch ``[len(slots), width, ·]``, ``width`` the widest rank among
    ``slots`` rounded up to 8, with the scaling folded into the B copy; zero rows of A and B add exactly nothing.
    The bank's storage cannot be read in place: lora_B is stored in PEFT's ``[out, r]`` blocks, unscaled, and a
    sibling layer's lora_A rows sit between its siblings' (see ``peft_fastlora.bank``).

    This is the one place that knows the packed layout.
    """
    width = _round_up(max(packed.ranks[slot] for slot in slots), ALIGN)
    a = torch.zeros(len(slots), width, packed.a.shape[1], dtype=packed.dtype, device=packed.a.device)
    b = torch.zeros(len(slots), width, packed.out_features, dtype=packed.dtype, device=packed.a.device)
    for index, slot in enumerate(slots):
        a_slot, b_slot, scale = packed.adapter(slot)
        a[index, : a_slot.shape[0]] = a_slot
        b[index, : b_slot.shape[1]] = (b_slot.t().float() * scale).to(packed.dtype)  # scale in fp32, one rounding
    return SegmentWeights(a, b)


class _Segments(NamedTuple):
    """One view's token segments for one set of slots (a layer that lacks a slot of the batch drops its rows)."""

    token_rows: torch.Tensor  # int64 [T]: the tokens of the kept segments, grouped by slot
    indptr: torch.Tensor  # int64 [n + 1]: segment boundaries in token_rows
    slot_ids: torch.Tensor  # int64 [n]: each segment's slot
    positions: torch.Tensor  # int64 [n]: 0 .. n-1
    slots: tuple[int, ...]


class FlashInferBackend(TorchBackend):
    """FlashInfer's segmented GEMM for Linear layers; embeddings use the torch path.

    Parameters
    ----------
    gemm_path : str
        ``"auto"`` (FlashInfer's choice: sm90 on Hopper, else sm80), ``"sm80"`` or ``"sm90"``.
    """

    name = "flashinfer"

    def __init__(self, gemm_path: str = "auto"):
        if gemm_path not in ("auto", "sm80", "sm90"):
            raise ValueError(f"gemm_path must be 'auto', 'sm80' or 'sm90', got {gemm_path!r}")
        self.gemm_path = gemm_path
        self._wrappers: dict[torch.device, tuple[object, str]] = {}
        # Per device: (the view the segments were derived from, {(tokens per row, slots): _Segments}). The view is
        # held, so its identity cannot be reused by a later call's view while cached.
        self._segments: dict[torch.device, tuple[PlanView, dict]] = {}
        self._lock = threading.Lock()
        self._fallback = None
        self._warned: set[str] = set()

    # -- the per-device wrapper and the per-call segments --------------------------------------------------------

    def _wrapper(self, device: torch.device) -> tuple[object, str]:
        """``(SegmentGEMMWrapper, path)`` for ``device``: one workspace per device, allocated once."""
        found = self._wrappers.get(device)
        if found is None:
            with self._lock:
                found = self._wrappers.get(device)
                if found is None:
                    from flashinfer.gemm import SegmentGEMMWrapper
                    from flashinfer.utils import determine_gemm_backend

                    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.int8, device=device)
                    path = determine_gemm_backend(device) if self.gemm_path == "auto" else self.gemm_path
                    found = self._wrappers[device] = (SegmentGEMMWrapper(workspace, backend=path), path)
        return found

    def _segments_for(self, view: PlanView, tokens_per_row: int, slots: tuple[int, ...], device) -> _Segments:
        """The token segments of ``view`` restricted to ``slots``; built once per call, shared by every layer."""
        cached = self._segments.get(device)
        if cached is None or cached[0] is not view:
            cached = self._segments[device] = (view, {})
        key = (tokens_per_row, slots)
        found = cached[1].get(key)
        if found is not None:
            return found
        kept = [(start, length) for slot, start, length in view.groups if slot in slots]
        rows = view.sorted_rows
        if len(kept) != len(view.groups):
            rows = torch.cat([view.group_rows(start, length) for start, length in kept])
        rows = rows.to(torch.int64)
        if tokens_per_row > 1:
            rows = (rows[:, None] * tokens_per_row + torch.arange(tokens_per_row, device=device)).reshape(-1)
        bounds = [0]
        for _, length in kept:
            bounds.append(bounds[-1] + length * tokens_per_row)
        host = torch.tensor([*bounds, *slots, *range(len(slots))], dtype=torch.int64)
        meta = host.to(device)
        n = len(slots)
        found = _Segments(rows, meta[: n + 1], meta[n + 1 : 2 * n + 1], meta[2 * n + 1 :], slots)
        cached[1][key] = found
        return found

    # -- the layer call ------------------------------------------------------------------------------------------

    def _unsupported(self, x: torch.Tensor, packed: PackedLora) -> str | None:
        if packed.dtype not in DTYPES:
            return (
                f"its segmented GEMM takes fp16/bf16 weights and these layers' adapters are {packed.dtype} "
                "(PEFT keeps adapters of a bf16/fp16 model in fp32 unless loaded with autocast_adapter_dtype=False)"
            )
        if packed.a.shape[1] % ALIGN or packed.out_features % ALIGN:
            return "its kernels need in and out features that are multiples of 8"
        if x.device.type != "cuda":
            return f"it needs CUDA tensors (got {x.device.type})"
        return None

    def _run_fallback(self, why: str, result, x, packed, view) -> None:
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(
                f"peft_fastlora: FlashInfer backend: {why}; those layers run the Triton kernels.", stacklevel=4
            )
        if self._fallback is None:
            from . import _triton_problem

            if _triton_problem(x.device) is None:
                from .triton import TritonBackend

                self._fallback = TritonBackend()
            else:
                self._fallback = TorchBackend()
        self._fallback.add_lora(result, x, packed, view)

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, packed: PackedLora, view: PlanView) -> None:
        """Add each row's LoRA delta to ``result`` in place (see ``TorchBackend.add_lora``)."""
        if torch.compiler.is_compiling():
            super().add_lora(result, x, packed, view)  # assignment-independent; FlashInfer needs host values
            return
        if packed.max_rank == 0:
            if packed.group_key is not None and packed.last:
                view.shared_shrink(packed.group_key, x, last=True)  # releases the group's shrink output
            return
        why = self._unsupported(x, packed)
        if why is not None:
            self._run_fallback(why, result, x, packed, view)
            return
        slots = tuple(slot for slot, _, _ in view.groups if packed.ranks[slot])
        if not slots:
            return
        x_tokens = x.reshape(-1, x.shape[-1])
        y_tokens = result.view(-1, result.shape[-1])
        tokens_per_row = x_tokens.shape[0] // view.num_rows
        segments = self._segments_for(view, tokens_per_row, slots, x.device)
        weights = _padded_weights(packed, slots)
        wrapper, path = self._wrapper(x.device)
        indices = segments.positions  # weight i is the i-th slot of the call
        xs = x_tokens.index_select(0, segments.token_rows).to(packed.dtype)
        # The sm80 kernel adds into ``out`` (C = A·B + C), the sm90 kernel overwrites it: zeros for the former.
        fresh = torch.zeros if path == "sm80" else torch.empty
        h = fresh(xs.shape[0], weights.a.shape[1], dtype=packed.dtype, device=x.device)
        wrapper.run(xs, weights.a, len(slots), True, out=h, seg_indptr=segments.indptr, weight_indices=indices)
        delta = fresh(xs.shape[0], weights.b.shape[2], dtype=packed.dtype, device=x.device)
        wrapper.run(h, weights.b, len(slots), False, out=delta, seg_indptr=segments.indptr, weight_indices=indices)
        y_tokens.index_add_(0, segments.token_rows, delta.to(result.dtype))
