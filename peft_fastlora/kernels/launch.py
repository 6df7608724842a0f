"""Launchers for the segmented LoRA kernels, registered as a torch custom op so torch.compile traces them.

``lora_add_`` mutates ``y`` in place and returns nothing; its fake implementation does nothing, which is all the
tracer needs to know. Grids are sized from host integers the plan already holds (segment count, longest
segment), so a launch never reads device memory on the host.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from .sgmv import expand_kernel, fused_kernel, shrink_kernel

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Segments of at most this many tokens (decode) take the fused single-launch kernel; longer ones (prefill) take
# shrink + expand. Chosen from the device measurements in benchmarks/results (the benchmark sets it to compare).
FUSED_MAX_SEGMENT_TOKENS = 16

# Scratch allocations go through this name so that tests can poison them with NaN (unwritten reads show up).
scratch_empty = torch.empty


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config(seg_tokens: int, num_segments: int, k: int, n: int, rank_block: int, device: torch.device) -> dict:
    """Block sizes and K-split for one call.

    Under the interpreter a fixed small config keeps CPU tests fast (and still splits K, to cover that path).
    On a GPU the tile over tokens follows the longest segment (decode: 16, prefill: 64), and K is split until
    there are about two programs per multiprocessor, since decode has too few tokens to fill the GPU otherwise.
    """
    if INTERPRETED or device.type != "cuda":
        block_k = 32
        return {"BLOCK_M": 16, "BLOCK_K": block_k, "BLOCK_N": 32, "splits": min(2, triton.cdiv(k, block_k))}
    block_m = 16 if seg_tokens <= 16 else 32 if seg_tokens <= 32 else 64
    block_k = 128 if rank_block <= 32 else 64
    block_n = 128 if rank_block <= 64 else 64
    programs = num_segments * triton.cdiv(seg_tokens, block_m)
    sms = _multiprocessors(device)
    # At most 8 splits: every expand program sums all split partials, and beyond 8 that serial sum costs more
    # than the parallel shrink gains (measured: 64 splits at M=1, K=14336 made the pair 3x slower than torch).
    splits = max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(k, block_k), 8))
    return {"BLOCK_M": block_m, "BLOCK_K": block_k, "BLOCK_N": block_n, "splits": splits}


def launch_lora_add(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
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
    """``y[t] += (x[t] @ A_sᵀ) @ B_tₛ`` for every token t of every segment, in place.

    Parameters
    ----------
    y : torch.Tensor
        ``[T, N]``, row stride arbitrary, unit column stride; fp16, bf16 or fp32.
    x : torch.Tensor
        ``[T, K]``, unit column stride; cast to ``a``'s dtype tile by tile.
    a, b_t : torch.Tensor
        ``[R, K]`` and ``[R, N]`` contiguous packed adapters.
    offsets, ranks : torch.Tensor
        int32 ``[num_slots]``.
    sorted_rows, seg_slots, seg_starts, seg_lens : torch.Tensor
        int32 plan metadata; rows index groups of ``tokens_per_row`` consecutive tokens.
    tokens_per_row : int
        Tokens per plan row (the sequence length for a ``[B, S, H]`` input).
    max_seg_rows, max_rank : int
        The longest segment (in rows) and the largest rank, for the grid and the rank tile.
    """
    num_segments = seg_slots.shape[0]
    if num_segments == 0 or max_rank == 0:
        return
    num_tokens, k = x.shape
    n = y.shape[1]
    seg_tokens = max_seg_rows * tokens_per_row
    rank_block = max(16, triton.next_power_of_2(max_rank))
    config = _config(seg_tokens, num_segments, k, n, rank_block, x.device)
    block_m, splits = config["BLOCK_M"], config["splits"]
    k_per_split = triton.cdiv(triton.cdiv(k, splits), config["BLOCK_K"]) * config["BLOCK_K"]
    splits = triton.cdiv(k, k_per_split)
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    mblocks = triton.cdiv(seg_tokens, block_m)
    metadata = (sorted_rows, seg_slots, seg_starts, seg_lens, offsets, ranks)
    n_tiles = triton.cdiv(n, config["BLOCK_N"])
    if seg_tokens <= FUSED_MAX_SEGMENT_TOKENS:
        fused_kernel[(num_segments, mblocks, n_tiles)](
            x, a, b_t, y, *metadata, k, n, tokens_per_row, x.stride(0), y.stride(0),
            BLOCK_M=block_m, BLOCK_R=rank_block, BLOCK_K=config["BLOCK_K"], K_STEPS=triton.cdiv(k, config["BLOCK_K"]),
            BLOCK_N=config["BLOCK_N"], PRECISION=precision,
        )  # fmt: skip
        return
    h = scratch_empty(splits, num_tokens, rank_block, dtype=torch.float32, device=x.device)
    shrink_kernel[(num_segments, mblocks, splits)](
        x, a, h, *metadata, k, num_tokens, tokens_per_row, x.stride(0),
        BLOCK_M=block_m, BLOCK_R=rank_block, BLOCK_K=config["BLOCK_K"], K_STEPS=k_per_split // config["BLOCK_K"],
        PRECISION=precision,
    )  # fmt: skip
    expand_kernel[(num_segments, mblocks, n_tiles)](
        h, b_t, y, *metadata, n, num_tokens, tokens_per_row, y.stride(0),
        BLOCK_M=block_m, BLOCK_R=rank_block, BLOCK_N=config["BLOCK_N"], SPLITS=splits, PRECISION=precision,
    )  # fmt: skip


# The custom op is what torch.compile sees; eager calls skip its dispatch cost (tens of µs per call measured on an
# H100, in every LoRA layer of every decode step) and launch directly.
lora_add_op = torch.library.custom_op("peft_fastlora::lora_add_", mutates_args=("y",))(launch_lora_add)


@lora_add_op.register_fake
def _lora_add_fake(y, x, a, b_t, offsets, ranks, sorted_rows, seg_slots, seg_starts, seg_lens, *sizes) -> None:
    return None


def lora_add_(*args) -> None:
    """``launch_lora_add`` in eager mode, the registered custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        torch.ops.peft_fastlora.lora_add_(*args)
    else:
        launch_lora_add(*args)
