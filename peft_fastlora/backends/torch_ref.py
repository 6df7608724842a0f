"""The torch backend: the plain reference every other backend must match, and the CPU path.

For each distinct adapter in the batch it gathers that adapter's rows, runs ``(x @ Aᵀ) @ (scaling·B)ᵀ`` on them
and adds the result back into the base output in place. That is PEFT's own mixed-batch algorithm, minus the
name lookups: the grouping comes precomputed from the plan and the weights come packed from the bank.

Under ``torch.compile`` that loop would bake the assignment of adapters to rows into the graph (dynamo guards on
the Python list of groups) and recompile for every new assignment. There the backend computes every row against
all packed adapters at once and masks each row to its own adapter's rank columns instead: more arithmetic
(``R`` = the sum of all ranks, not one adapter's), but one graph for any assignment of a batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bank import PackedLora
from ..plan import PlanView


class TorchBackend:
    """Loop over the distinct adapters of the batch with plain torch ops."""

    name = "torch"

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, packed: PackedLora, view: PlanView) -> None:
        """Add each row's LoRA delta to ``result`` in place.

        Parameters
        ----------
        result : torch.Tensor
            ``[N, ..., out]``, the base layer's output; updated in place.
        x : torch.Tensor
            ``[N, ..., in]``, the layer input; cast to the packed weights' dtype as PEFT does.
        packed : PackedLora
            The layer's packed adapters.
        view : PlanView
            The plan for leading size ``N``.
        """
        if torch.compiler.is_compiling():
            h = x.to(packed.dtype) @ packed.a.t()
            result += (_own_columns(h, packed, view) @ packed.b_t).to(result.dtype)
            return
        for slot, start, length in view.groups:
            weights = packed.adapter(slot)
            if weights is None:
                continue
            a, b_t = weights
            rows = view.group_rows(start, length)
            delta = (x.index_select(0, rows).to(packed.dtype) @ a.t()) @ b_t
            result.index_add_(0, rows, delta.to(result.dtype))

    def add_embedding_lora(
        self,
        result: torch.Tensor,
        input_ids: torch.Tensor,
        packed: PackedLora,
        view: PlanView,
        embed_scale: torch.Tensor | None,
    ) -> None:
        """Add each row's LoRA embedding delta to ``result`` in place.

        Parameters
        ----------
        result : torch.Tensor
            ``[N, ..., dim]``, the base embedding's output; updated in place.
        input_ids : torch.Tensor
            ``[N, ...]`` integer token ids.
        packed : PackedLora
            Here ``a`` is ``[R, vocab]``: an adapter's shrink is a column gather.
        view : PlanView
            The plan for leading size ``N``.
        embed_scale : torch.Tensor or None
            The scale some embeddings (e.g. Gemma's) apply to their output, applied to the delta too as PEFT does.
        """
        if torch.compiler.is_compiling():
            delta = _own_columns(F.embedding(input_ids, packed.a.t()), packed, view) @ packed.b_t
            if embed_scale is not None:
                delta = delta * embed_scale.to(delta.dtype)
            result += delta.to(result.dtype)
            return
        for slot, start, length in view.groups:
            weights = packed.adapter(slot)
            if weights is None:
                continue
            a, b_t = weights
            rows = view.group_rows(start, length)
            delta = F.embedding(input_ids.index_select(0, rows), a.t()) @ b_t
            if embed_scale is not None:
                delta = delta * embed_scale.to(delta.dtype)
            result.index_add_(0, rows, delta.to(result.dtype))


def _own_columns(h: torch.Tensor, packed: PackedLora, view: PlanView) -> torch.Tensor:
    """Zero every column of ``h`` (``[N, ..., R]``, all adapters' shrink outputs) that is not the row's own adapter.

    Base rows (slot -1) keep no column. The mask depends on the plan's tensors only, not on Python values, so a
    compiled graph serves any assignment."""
    own = view.row_slots[:, None] == packed.column_slots[None, :]  # [N, R]
    # where, not a multiply by the mask: a non-finite value in another adapter's column must not leak into this row.
    return torch.where(own.view(own.shape[0], *([1] * (h.dim() - 2)), own.shape[1]), h, 0)
