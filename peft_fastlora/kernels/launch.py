"""Launchers for the segmented LoRA kernels, registered as torch custom ops so torch.compile traces them.

``lora_shrink`` returns the fp32 partial products ``h``; ``lora_expand_`` adds ``h @ B`` into ``y`` in place. Their
fake implementations only describe shapes. Grids are sized from host integers the plan already holds (segment
count, longest segment), so a launch never reads device memory on the host.

A single fused shrink+expand launch for decode was measured on the H100 and lost in every case (e.g. 20.0 µs
against 11.8 µs at M=32, 8 adapters, rank 16, 4096×4096: each program re-reads all of K serially);
``benchmarks/results/kernels_h100_fused_vs_split.txt`` holds that run. So every layer runs shrink + expand, and
siblings that read the same input share one shrink (``backends/triton.py``).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from .sgmv import expand_kernel, shrink_kernel

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Scratch allocations go through this name so that tests can poison them with NaN (unwritten reads show up).
scratch_empty = torch.empty


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def rank_block(max_rank: int) -> int:
    """The rank tile: a power of two, at least 16 (the smallest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(max_rank))


def _tiles(seg_tokens: int, num_segments: int, k: int, max_rank: int, device: torch.device) -> tuple[int, ...]:
    """``(BLOCK_M, BLOCK_K, BLOCK_N, splits, k_steps)`` for one call.

    Under the interpreter a fixed small config keeps CPU tests fast (and still splits K, to cover that path).
    On a GPU the tile over tokens follows the longest segment (decode: 16, prefill: 64), and K is split until
    there are about two programs per multiprocessor, since decode has too few tokens to fill the GPU otherwise.
    """
    width = rank_block(max_rank)
    if INTERPRETED or device.type != "cuda":
        block_m, block_k, block_n, splits = 16, 32, 32, 2
    else:
        block_m = 16 if seg_tokens <= 16 else 32 if seg_tokens <= 32 else 64
        block_k = 128 if width <= 32 else 64
        block_n = 128 if width <= 64 else 64
        programs = num_segments * triton.cdiv(seg_tokens, block_m)
        # At most 8 splits: every expand program sums all split partials, and beyond 8 that serial sum costs more
        # than the parallel shrink gains (measured: 64 splits at M=1, K=14336 made the pair 3x slower than torch).
        splits = min(triton.cdiv(2 * _multiprocessors(device), programs), 8)
    k_steps = triton.cdiv(triton.cdiv(k, block_k), max(1, min(splits, triton.cdiv(k, block_k))))
    return block_m, block_k, block_n, triton.cdiv(k, k_steps * block_k), k_steps


def launch_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    sorted_rows: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    tokens_per_row: int,
    max_seg_rows: int,
    max_rank: int,
) -> torch.Tensor:
    """``h[split, t, :rank_s] = x[t, k-split] @ A_s[:, k-split]ᵀ`` for every token t of every segment.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, K]``, unit column stride; cast to ``a``'s dtype tile by tile.
    a : torch.Tensor
        ``[R, K]`` contiguous packed lora_A rows; adapter s owns rows ``offsets[s] : offsets[s] + ranks[s]``.
    offsets, ranks : torch.Tensor
        int32 ``[num_slots]``.
    sorted_rows, seg_slots, seg_starts, seg_lens : torch.Tensor
        int32 plan metadata; rows index groups of ``tokens_per_row`` consecutive tokens.
    tokens_per_row : int
        Tokens per plan row (the sequence length for a ``[B, S, H]`` input).
    max_seg_rows, max_rank : int
        The longest segment (in rows) and the largest rank, for the grid and the rank tile.

    Returns
    -------
    torch.Tensor
        fp32 ``[splits, T, rank_block(max_rank)]`` partial sums over K; rows of tokens in no segment are unwritten.
    """
    num_tokens, k = x.shape
    num_segments = seg_slots.shape[0]
    seg_tokens = max_seg_rows * tokens_per_row
    block_m, block_k, _, splits, k_steps = _tiles(seg_tokens, num_segments, k, max_rank, x.device)
    width = rank_block(max_rank)
    h = scratch_empty(splits, num_tokens, width, dtype=torch.float32, device=x.device)
    if num_segments and seg_tokens:
        shrink_kernel[(num_segments, triton.cdiv(seg_tokens, block_m), splits)](
            x, a, h, sorted_rows, seg_slots, seg_starts, seg_lens, offsets, ranks, k, num_tokens, tokens_per_row,
            x.stride(0), BLOCK_M=block_m, BLOCK_R=width, BLOCK_K=block_k, K_STEPS=k_steps,
            PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        )  # fmt: skip
    return h


def launch_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    h_cols: torch.Tensor | None,
    b_t: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    sorted_rows: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    tokens_per_row: int,
    max_seg_rows: int,
    max_rank: int,
) -> None:
    """``y[t] += (Σ_split h[split, t, cols_s]) @ B_tₛ`` for every token t of every segment, in place.

    Parameters
    ----------
    y : torch.Tensor
        ``[T, N]``, unit column stride; fp16, bf16 or fp32. The delta is rounded to its dtype before the add.
    h : torch.Tensor
        ``launch_shrink``'s output, possibly a sibling group's (wider rows).
    h_cols : torch.Tensor or None
        int32 ``[num_slots]``: where this layer's part of slot s starts in a sibling group's ``h``; None for 0.
    b_t : torch.Tensor
        ``[R, N]`` contiguous packed ``scaling · lora_Bᵀ`` rows.
    offsets, ranks, sorted_rows, seg_slots, seg_starts, seg_lens, tokens_per_row, max_seg_rows, max_rank
        As for ``launch_shrink``, for this layer.
    """
    num_segments = seg_slots.shape[0]
    seg_tokens = max_seg_rows * tokens_per_row
    if num_segments == 0 or max_rank == 0 or seg_tokens == 0:
        return
    n = y.shape[1]
    block_m, _, block_n, _, _ = _tiles(seg_tokens, num_segments, b_t.shape[0], max_rank, y.device)
    grid = (num_segments, triton.cdiv(seg_tokens, block_m), triton.cdiv(n, block_n))
    expand_kernel[grid](
        h, offsets if h_cols is None else h_cols, b_t, y, sorted_rows, seg_slots, seg_starts, seg_lens, offsets,
        ranks, n, h.shape[1], tokens_per_row, y.stride(0), BLOCK_M=block_m, BLOCK_R=rank_block(max_rank),
        H_STRIDE=h.shape[2], BLOCK_N=block_n, SPLITS=h.shape[0], SHARED_H=h_cols is not None,
        PRECISION="ieee" if b_t.dtype == torch.float32 else "tf32",
    )  # fmt: skip


# The custom ops are what torch.compile sees; eager calls skip their dispatch cost (tens of µs per call measured on
# an H100, in every LoRA layer of every decode step) and launch directly.
shrink_op = torch.library.custom_op("peft_fastlora::lora_shrink", mutates_args=())(launch_shrink)
expand_op = torch.library.custom_op("peft_fastlora::lora_expand_", mutates_args=("y",))(launch_expand)


@shrink_op.register_fake
def _shrink_fake(x, a, offsets, ranks, sorted_rows, seg_slots, seg_starts, seg_lens, tokens_per_row, max_seg_rows,
                 max_rank):  # fmt: skip
    seg_tokens = max_seg_rows * tokens_per_row
    splits = _tiles(seg_tokens, seg_slots.shape[0], x.shape[1], max_rank, x.device)[3]
    return x.new_empty(splits, x.shape[0], rank_block(max_rank), dtype=torch.float32)


@expand_op.register_fake
def _expand_fake(y, h, h_cols, b_t, offsets, ranks, sorted_rows, seg_slots, seg_starts, seg_lens, *sizes) -> None:
    return None


def lora_shrink(*args) -> torch.Tensor:
    """``launch_shrink`` in eager mode, the registered custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        return torch.ops.peft_fastlora.lora_shrink(*args)
    return launch_shrink(*args)


def lora_expand_(*args) -> None:
    """``launch_expand`` in eager mode, the registered custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        torch.ops.peft_fastlora.lora_expand_(*args)
    else:
        launch_expand(*args)
