"""The torch backend: the plain reference every other backend must match, and the CPU path.

For each distinct adapter in the batch it gathers that adapter's rows, runs ``(x @ Aᵀ) @ (scaling·B)ᵀ`` on them
and adds the result back into the base output in place. That is PEFT's own mixed-batch algorithm, minus the
name lookups: the grouping comes precomputed from the plan and the weights come packed from the bank.
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
