"""The plain, per-token reference for the segmented LoRA kernels.

It shares nothing with the kernels' algorithm on purpose: each token looks up its own adapter and is computed
alone, so a grouping or indexing bug in a kernel cannot hide in the same bug here.
"""

from __future__ import annotations

import torch


def lora_delta_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    adapters: list[tuple[torch.Tensor, torch.Tensor, object] | None],
    token_slots: list[int],
) -> torch.Tensor:
    """Return ``y + delta`` where ``delta[t] = scale_s · (x[t] @ A_sᵀ) @ B_sᵀ`` for ``s = token_slots[t]``.

    Parameters
    ----------
    y : torch.Tensor
        ``[T, N]`` base output (not modified).
    x : torch.Tensor
        ``[T, K]`` input.
    adapters : list
        Per slot: ``(A [r, K], B [N, r], scale)`` (PEFT's layouts and scaling), or None for an adapter the layer
        lacks.
    token_slots : list[int]
        Per token: its slot, -1 for no LoRA.

    Returns
    -------
    torch.Tensor
        ``[T, N]`` in ``y``'s dtype, computed in fp32.
    """
    out = y.float().clone()
    for token, slot in enumerate(token_slots):
        if slot < 0 or adapters[slot] is None:
            continue
        a, b, scale = adapters[slot]
        out[token] += float(scale) * ((x[token].float() @ a.float().t()) @ b.float().t())
    return out.to(y.dtype)
