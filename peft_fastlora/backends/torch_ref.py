"""The torch backend: the plain reference every other backend must match, and the CPU path.

For each distinct adapter in the batch it gathers that adapter's rows, runs ``scaling · (x @ Aᵀ) @ Bᵀ`` on them
and adds the result back into the base output in place. That is PEFT's own mixed-batch algorithm, minus the
name lookups: the grouping comes precomputed from the plan and the weights come packed from the bank.

Under ``torch.compile`` that loop would bake the assignment of adapters to rows into the graph (dynamo guards on
the Python list of groups) and recompile for every new assignment. There the backend computes every row against
every adapter the layer holds and keeps each row's own adapter's result: more arithmetic (every adapter over the
whole batch), but one graph for any assignment of a batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bank import PackedLora
from ..plan import PlanView


class TorchBackend:
    """Loop over the distinct adapters of the batch with plain torch ops."""

    name = "torch"
    fuses_siblings = False  # whether ``add_group_lora`` serves a fused sibling group (``layers._group_forward``)

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, packed: PackedLora, view: PlanView) -> None:
        """Add each row's LoRA delta ``scaling · (x @ Aᵀ) @ Bᵀ`` to ``result`` in place.

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
        for slot, rows, (a, b, scale) in _adapters_in_batch(packed, view):
            delta = ((_rows(x, rows).to(packed.dtype) @ a.t()) @ b.t()) * scale
            _add_rows(result, rows, delta, view, slot)

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
            Here ``A`` is ``[r, vocab]``: an adapter's shrink is a column gather.
        view : PlanView
            The plan for leading size ``N``.
        embed_scale : torch.Tensor or None
            The scale some embeddings (e.g. Gemma's) apply to their output, applied to the delta too as PEFT does.
        """
        for slot, rows, (a, b, scale) in _adapters_in_batch(packed, view):
            delta = (F.embedding(_rows(input_ids, rows), a.t()) @ b.t()) * scale
            if embed_scale is not None:
                delta = delta * embed_scale.to(delta.dtype)
            _add_rows(result, rows, delta, view, slot)


def _adapters_in_batch(packed: PackedLora, view: PlanView):
    """``(slot, rows, (A, B, scale))`` per adapter to compute: in eager mode the distinct adapters of the batch,
    with the indices of their rows; while compiling every adapter the layer holds, over all rows (``rows`` None), so
    that the graph does not depend on the assignment (``_add_rows`` then keeps each row's own adapter)."""
    if torch.compiler.is_compiling():
        for slot in range(len(packed.ranks)):
            weights = packed.adapter(slot)
            if weights is not None:
                yield slot, None, weights
        return
    for slot, start, length in view.groups:
        weights = packed.adapter(slot)
        if weights is not None:
            yield slot, view.group_rows(start, length), weights


def _rows(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return tensor if rows is None else tensor.index_select(0, rows)


def _add_rows(result: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor, view: PlanView, slot: int) -> None:
    """Add ``delta`` into ``result``'s rows ``rows``; with ``rows`` None (compiling), into the rows of ``slot``.

    The mask depends on the plan's tensors only, not on Python values, so a compiled graph serves any assignment;
    ``where`` rather than a multiply, so a non-finite value computed for another adapter's row does not leak.

    As in PEFT's ``result = result + delta``, the sum is taken in the promoted dtype and rounded to ``result``'s once:
    an fp32 delta (PEFT's default fp32 adapters) is not rounded to a bf16 model's dtype before it is added."""
    if delta.dtype == result.dtype:
        if rows is not None:
            result.index_add_(0, rows, delta)
            return
        own = (view.row_slots == slot).view(-1, *([1] * (delta.dim() - 1)))
        result += torch.where(own, delta, 0)
        return
    wide = torch.promote_types(result.dtype, delta.dtype)
    if rows is not None:
        summed = (result.index_select(0, rows).to(wide) + delta.to(wide)).to(result.dtype)
        result.index_copy_(0, rows.long(), summed)  # (index_copy_ takes int64 indices only)
        return
    own = (view.row_slots == slot).view(-1, *([1] * (delta.dim() - 1)))
    result.copy_(torch.where(own, result.to(wide) + delta.to(wide), result.to(wide)).to(result.dtype))
