"""The Triton backend: one shrink and one expand launch per LoRA layer, whatever the number of adapters."""

from __future__ import annotations

import torch

from ..bank import PackedLora
from ..kernels.launch import lora_add_
from ..plan import PlanView
from .torch_ref import TorchBackend


class TritonBackend(TorchBackend):
    """Segmented-GEMM kernels for Linear layers; embeddings (a gather, one layer per model) use the torch path."""

    name = "triton"

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, packed: PackedLora, view: PlanView) -> None:
        """Add each row's LoRA delta to ``result`` in place (see ``TorchBackend.add_lora``)."""
        if not view.groups or packed.max_rank == 0:
            return
        x_tokens = x.reshape(-1, x.shape[-1])
        if x_tokens.stride(-1) != 1:
            x_tokens = x_tokens.contiguous()
        y_tokens = result.view(-1, result.shape[-1])  # base outputs are fresh contiguous tensors
        lora_add_(
            y_tokens, x_tokens, packed.a, packed.b_t, packed.offsets_dev, packed.ranks_dev,
            view.sorted_rows, view.seg_slots, view.seg_starts, view.seg_lens,
            x_tokens.shape[0] // view.num_rows, view.max_seg_len, packed.max_rank,
        )  # fmt: skip
