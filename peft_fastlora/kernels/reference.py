"""The plain, per-token reference for the segmented LoRA kernels.

It shares nothing with the kernels' algorithm on purpose: each token looks up its own adapter and is computed
alone, so a grouping or indexing bug in a kernel cannot hide in the same bug here.
"""

from __future__ import annotations

import torch


def lora_delta_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b_t: torch.Tensor,
    offsets: list[int],
    ranks: list[int],
    token_slots: list[int],
) -> torch.Tensor:
    """Return ``y + delta`` where ``delta[t] = (x[t] @ A_sᵀ) @ B_sᵀ`` for ``s = token_slots[t]``.

    Parameters
    ----------
    y : torch.Tensor
        ``[T, N]`` base output (not modified).
    x : torch.Tensor
        ``[T, K]`` input.
    a, b_t : torch.Tensor
        ``[R, K]`` and ``[R, N]`` packed adapters (scaling folded into ``b_t``).
    offsets, ranks : list[int]
        Per slot: first packed row and rank.
    token_slots : list[int]
        Per token: its slot, -1 for no LoRA.

    Returns
    -------
    torch.Tensor
        ``[T, N]`` in ``y``'s dtype, computed in fp32.
    """
    out = y.float().clone()
    for token, slot in enumerate(token_slots):
        if slot < 0 or ranks[slot] == 0:
            continue
        rows = slice(offsets[slot], offsets[slot] + ranks[slot])
        out[token] += (x[token].float() @ a[rows].float().t()) @ b_t[rows].float()
    return out.to(y.dtype)
