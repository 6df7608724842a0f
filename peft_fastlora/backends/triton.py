"""The Triton backend: a segmented shrink and a segmented expand per LoRA layer, whatever the mix of adapters.

Siblings that read the same input (q/k/v, gate/up) share the shrink: the group's leader shrinks against the
group's lora_A storage (every member's rows, slot by slot) at once, and each member then only expands its own
columns of the result; the last member releases the shared result, so no activation outlives the group.
"""

from __future__ import annotations

import torch

from ..bank import PackedLora
from ..kernels.launch import lora_expand_, lora_shrink
from ..plan import PlanView
from .torch_ref import TorchBackend


class TritonBackend(TorchBackend):
    """Segmented-GEMM kernels for Linear layers; embeddings (a gather, one layer per model) use the torch path."""

    name = "triton"

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, packed: PackedLora, view: PlanView) -> None:
        """Add each row's LoRA delta to ``result`` in place (see ``TorchBackend.add_lora``)."""
        # No test on the assignment (e.g. an all-__base__ batch) here: the launch must not depend on it, so that a
        # CUDA graph captured for one assignment replays for any other; the kernels read the segment count.
        group = packed.group
        if packed.max_rank == 0:
            if group is not None and packed.last:
                group.forget()  # the last member releases the group's shrink output even when it adds nothing
            return
        x_tokens = x.reshape(-1, x.shape[-1])
        if x_tokens.stride(-1) != 1:
            x_tokens = x_tokens.contiguous()
        y_tokens = result.view(-1, result.shape[-1])  # base outputs are fresh contiguous tensors
        tokens_per_row = x_tokens.shape[0] // view.num_rows
        plan = (*view.segments, tokens_per_row)
        h, h_cols = None, None
        if group is not None:
            if packed.leader:
                group.remember(
                    x, lora_shrink(x_tokens, group.a, group.offsets_dev, group.ranks_dev, *plan, group.max_rank)
                )
            h = group.take(x, packed.last)
            h_cols = packed.h_cols if h is not None else None
        if h is None:
            h = lora_shrink(x_tokens, packed.a, packed.a_offsets_dev, packed.ranks_dev, *plan, packed.max_rank)
        lora_expand_(
            y_tokens, h, h_cols, packed.b, packed.scales, packed.b_offsets_dev, packed.ranks_dev, *plan,
            packed.max_rank,
        )  # fmt: skip
