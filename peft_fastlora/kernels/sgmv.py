"""Segmented LoRA kernels: shrink ``h = x @ A_sᵀ`` then expand ``y += scale_s · h @ B_sᵀ``, rows grouped by adapter.

The plan groups the rows of a batch by adapter slot into segments. Each program of a kernel owns one tile of
one segment, so every token in it uses the same adapter and the adapter's weight tiles are loaded once per
tile, not once per token. That serves decode (one token per row: BGMV-like, many small segments) and prefill
(long rows tiled along the sequence: SGMV) with the same code; only the block sizes change.

- Ranks are ragged: adapter ``s`` owns packed rows ``offsets[s] : offsets[s] + ranks[s]``; loads beyond the
  rank are masked, so a rank-8 adapter reads 8 rows even when its tile is 16 wide.
- ``__base__`` rows are in no segment and cost nothing.
- The shrink splits K across programs (decode has few tokens, so K is where the parallelism is); it writes
  fp32 partial sums ``h[split, token, r]`` that the expand adds up, so no atomics and no zero-fill launch.
- Any rank runs: the rank is tiled ``BLOCK_R`` lanes at a time (shrink: one program per rank tile; expand: a loop
  over rank tiles), so a rank-128 adapter in a q/k/v stack (384 rows) never asks for a 512-wide tile.
- Tokens are addressed as ``row * tokens_per_row + position``, in 64-bit once multiplied by a row stride, so
  ``tokens × features`` may pass 2³¹ (long prefills). Integer offsets only, so the kernels also run under
  ``TRITON_INTERPRET=1``.
- ``PRECISION`` is the dot precision: ``"ieee"`` for an fp32 model, ``"tf32"`` where the activations are fp16 or
  bf16. fp32 adapters (PEFT's default) on a bf16 model then use tensor cores: TF32 keeps 10 mantissa bits of the
  weights, more than the bf16 the delta is rounded to afterwards.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dependent_launch(USE_PDL: tl.constexpr):
    """The start of a kernel launched as a programmatic dependent launch (Hopper and later; ``launch_pdl``).

    Such a launch may start while the kernel before it in the stream is still running, so that its launch and
    scheduling overlap that kernel's tail: in a decode step's CUDA graph each LoRA launch leaves the GPU idle for
    about as long as its own few µs of work (measured no faster with PDL on an H200: see ``launch.PDL``).
    ``gdc_wait`` blocks every thread until the previous kernel has completed and its writes are visible, so it
    comes before the kernel's first global load or store (plan metadata included); ``gdc_launch_dependents`` then
    lets the next PDL kernel (a shrink's expand) be scheduled early, to wait in its own ``gdc_wait``."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _segment_tile(
    sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, num_segments_ptr, offsets_ptr, ranks_ptr,
    tokens_per_row, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """The tile this program owns: segment ``program_id(0)``, token block ``program_id(1)``.

    The grid covers the most segments and the longest segment the batch could have; programs past the live ones
    find nothing to do. Returns ``(active, tokens, token_mask, first_row, rank, slot)``: whether the tile holds any
    token of an adapter this layer has, the tile's token indices (int64) and mask, the adapter's first packed row
    (int64), its rank and its slot.
    """
    seg = tl.program_id(0)
    mblock = tl.program_id(1)
    live = seg < tl.load(num_segments_ptr)
    slot = tl.load(seg_slots_ptr + seg, mask=live, other=0)  # stale entries past the live ones are never used
    rank = tl.load(ranks_ptr + slot)
    seg_tokens = tl.load(seg_lens_ptr + seg, mask=live, other=0) * tokens_per_row
    position = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    token_mask = position < seg_tokens
    first_position = tl.load(seg_starts_ptr + seg, mask=live, other=0)
    row = tl.load(sorted_rows_ptr + first_position + position // tokens_per_row, mask=token_mask, other=0)
    # 64-bit from here on: a token index times a row stride passes 2^31 at ~150k tokens of a 14336-wide layer.
    tokens = row.to(tl.int64) * tokens_per_row + position % tokens_per_row
    active = (mblock * BLOCK_M < seg_tokens) & (rank > 0)
    first_row = tl.load(offsets_ptr + slot).to(tl.int64)
    return active, tokens, token_mask, first_row, rank, slot


@triton.jit
def _shrink_tile(
    x_ptr, a_ptr, tokens, token_mask, first_row, r, r_mask, k_start, K, stride_x,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """fp32 ``[BLOCK_M, BLOCK_R]`` = ``x[tokens, k-range] @ A[first_row + r, k-range]ᵀ`` over K_STEPS blocks from
    ``k_start``. The step count is a compile-time constant: a loop bound read from a kernel argument breaks the
    interpreter with NumPy >= 2.4. The mask handles K's tail. ``x`` is cast to A's dtype, as PEFT casts the input
    to the adapter's dtype."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for step in range(K_STEPS):
        kk = k_start + step * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = kk < K
        x_tile = tl.load(
            x_ptr + tokens[:, None] * stride_x + kk[None, :], mask=token_mask[:, None] & k_mask[None, :], other=0.0
        )
        a_tile = tl.load(
            a_ptr + (first_row + r)[None, :] * K + kk[:, None], mask=r_mask[None, :] & k_mask[:, None], other=0.0
        )
        acc += tl.dot(x_tile.to(a_tile.dtype), a_tile, input_precision=PRECISION)
    return acc


@triton.jit
def shrink_kernel(
    x_ptr, a_ptr, h_ptr,
    sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, num_segments_ptr, offsets_ptr, ranks_ptr,
    K, num_tokens, tokens_per_row, stride_x,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, R_TILES: tl.constexpr, BLOCK_K: tl.constexpr,
    K_STEPS: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """``h[split, t, r] = x[t, k-range] @ A_s[r, k-range]ᵀ`` for the tokens of one tile of one segment and one
    tile of ``BLOCK_R`` rank lanes (``program_id(2) = split * R_TILES + rank tile``).

    ``h`` is fp32 ``[splits, num_tokens, R_TILES * BLOCK_R]``; only the tokens of segments and the rank tiles that
    start below the adapter's rank are written (lanes past the rank inside a written tile hold zeros). ``USE_PDL``:
    launched as a programmatic dependent launch (see ``_dependent_launch``)."""
    _dependent_launch(USE_PDL)
    split = tl.program_id(2) // R_TILES
    r_start = (tl.program_id(2) % R_TILES) * BLOCK_R
    r = r_start + tl.arange(0, BLOCK_R)
    active, tokens, token_mask, first_row, rank, _ = _segment_tile(
        sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, num_segments_ptr, offsets_ptr, ranks_ptr,
        tokens_per_row, BLOCK_M,
    )  # fmt: skip
    if active & (r_start < rank):
        acc = _shrink_tile(
            x_ptr, a_ptr, tokens, token_mask, first_row, r, r < rank, split * K_STEPS * BLOCK_K, K, stride_x,
            BLOCK_M, BLOCK_R, BLOCK_K, K_STEPS, PRECISION,
        )  # fmt: skip
        h_offsets = (split * num_tokens + tokens)[:, None] * (R_TILES * BLOCK_R) + r[None, :]
        tl.store(h_ptr + h_offsets, acc, mask=token_mask[:, None])


@triton.jit
def _expand_program(
    h_ptr, h_cols_ptr, b_ptr, scales_ptr, y_ptr,
    sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, num_segments_ptr, offsets_ptr, ranks_ptr,
    N, num_tokens, tokens_per_row, stride_y, n_tile,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, R_TILES: tl.constexpr, H_STRIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, SHARED_H: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program of ``expand_kernel``: its segment tile (``program_id`` 0 and 1) and output tile ``n_tile``."""
    active, tokens, token_mask, first_row, rank, slot = _segment_tile(
        sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, num_segments_ptr, offsets_ptr, ranks_ptr,
        tokens_per_row, BLOCK_M,
    )  # fmt: skip
    if active:
        first_column = 0
        if SHARED_H:
            first_column = tl.load(h_cols_ptr + slot)
        n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        scale = tl.load(scales_ptr + slot)
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r_tile in range(R_TILES):
            if r_tile * BLOCK_R < rank:  # a rank-8 adapter beside a rank-256 one walks one tile, not four
                r = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
                r_mask = r < rank
                h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for split in range(SPLITS):
                    h_offsets = (split * num_tokens + tokens)[:, None] * H_STRIDE + (first_column + r)[None, :]
                    h += tl.load(h_ptr + h_offsets, mask=token_mask[:, None] & r_mask[None, :], other=0.0)
                b_tile = tl.load(
                    b_ptr + first_row * N + n[None, :] * rank + r[:, None],
                    mask=r_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                delta += tl.dot((h * scale).to(b_tile.dtype), b_tile, input_precision=PRECISION)
        y_offsets = tokens[:, None] * stride_y + n[None, :]
        y_mask = token_mask[:, None] & n_mask[None, :]
        y_tile = tl.load(y_ptr + y_offsets, mask=y_mask, other=0.0)
        # Round the delta to the adapters' dtype before adding, as PEFT computes it (`lora_B(lora_A(x)) * scaling`
        # in the adapters' dtype) and then adds it to the base output in the promoted dtype, rounding the sum once:
        # bf16 adapters give a bf16 delta; fp32 adapters (PEFT's default on a bf16 model) keep it in fp32, where
        # rounding it to bf16 first (as this kernel once did) rounded twice and cost argmax agreement.
        delta = delta.to(b_ptr.dtype.element_ty).to(tl.float32)  # (b_tile is the loop's: not defined here)
        tl.store(y_ptr + y_offsets, (y_tile.to(tl.float32) + delta).to(y_tile.dtype), mask=y_mask)


@triton.jit
def expand_kernel(
    h_ptr, h_cols_ptr, b_ptr, scales_ptr, y_ptr,
    sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, num_segments_ptr, offsets_ptr, ranks_ptr,
    N, num_tokens, tokens_per_row, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, R_TILES: tl.constexpr, H_STRIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, SHARED_H: tl.constexpr, PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """``y[t, n-tile] += scale_s · (Σ_split h[split, t]) @ B_s[n-tile, :]ᵀ`` for the tokens of one tile of one
    segment (the delta rounded to B's dtype, the sum to y's).

    ``B_s`` is slot s's ``[N, rank]`` block of the flat ``b`` (PEFT's lora_B layout), starting at element
    ``offsets[s] * N``: a ``[BLOCK_R, BLOCK_N]`` tile of it covers ``BLOCK_N`` consecutive rows, so it is one
    contiguous stretch of memory when the tile spans the whole rank. The rank is walked ``BLOCK_R`` lanes at a time
    (``R_TILES`` tiles cover the layer's largest rank). ``h`` rows are ``H_STRIDE`` wide. With ``SHARED_H`` it is a
    sibling group's shrink output (q/k/v stacked), and this layer's part of slot s starts at column ``h_cols[s]``;
    otherwise at column 0. ``scales`` is fp32 ``[num_slots]`` (PEFT's scaling), applied to ``h`` in fp32.
    ``USE_PDL``: as for ``shrink_kernel``."""
    _dependent_launch(USE_PDL)
    _expand_program(
        h_ptr, h_cols_ptr, b_ptr, scales_ptr, y_ptr,
        sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, num_segments_ptr, offsets_ptr, ranks_ptr,
        N, num_tokens, tokens_per_row, stride_y, tl.program_id(2),
        BLOCK_M, BLOCK_R, R_TILES, H_STRIDE, BLOCK_N, SPLITS, SHARED_H, PRECISION,
    )  # fmt: skip


@triton.jit
def expand_group_kernel(
    h_ptr, sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, num_segments_ptr,
    h_cols_0, b_0, scales_0, y_0, offsets_0, ranks_0, N_0,
    h_cols_1, b_1, scales_1, y_1, offsets_1, ranks_1, N_1,
    h_cols_2, b_2, scales_2, y_2, offsets_2, ranks_2, N_2,
    tiles_0, tiles_01, num_tokens, tokens_per_row,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, R_TILES: tl.constexpr, H_STRIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, MEMBERS: tl.constexpr, PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """``expand_kernel`` for every member of a sibling group (q/k/v: ``MEMBERS`` 3; gate/up: 2) in one launch, each
    into its own contiguous output ``y_m`` (``[num_tokens, N_m]``) from its columns of the group's shrink output
    ``h``: output tile ``program_id(2)`` belongs to member 0 below ``tiles_0``, to member 1 below ``tiles_01``, else
    to member 2. A two-member group passes member 1's arguments again as member 2's (never read). One launch
    instead of one per member: in decode each launch is a few µs of latency, on the GPU and, in eager calls, on
    the host. ``USE_PDL``: as for ``shrink_kernel``."""
    _dependent_launch(USE_PDL)
    tile = tl.program_id(2)
    if tile < tiles_0:
        _expand_program(
            h_ptr, h_cols_0, b_0, scales_0, y_0,
            sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, num_segments_ptr, offsets_0, ranks_0,
            N_0, num_tokens, tokens_per_row, N_0, tile,
            BLOCK_M, BLOCK_R, R_TILES, H_STRIDE, BLOCK_N, SPLITS, True, PRECISION,
        )  # fmt: skip
    elif MEMBERS == 2:
        _expand_program(
            h_ptr, h_cols_1, b_1, scales_1, y_1,
            sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, num_segments_ptr, offsets_1, ranks_1,
            N_1, num_tokens, tokens_per_row, N_1, tile - tiles_0,
            BLOCK_M, BLOCK_R, R_TILES, H_STRIDE, BLOCK_N, SPLITS, True, PRECISION,
        )  # fmt: skip
    elif tile < tiles_01:
        _expand_program(
            h_ptr, h_cols_1, b_1, scales_1, y_1,
            sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, num_segments_ptr, offsets_1, ranks_1,
            N_1, num_tokens, tokens_per_row, N_1, tile - tiles_0,
            BLOCK_M, BLOCK_R, R_TILES, H_STRIDE, BLOCK_N, SPLITS, True, PRECISION,
        )  # fmt: skip
    else:
        _expand_program(
            h_ptr, h_cols_2, b_2, scales_2, y_2,
            sorted_rows_ptr, seg_slots_ptr, seg_starts_ptr, seg_lens_ptr, num_segments_ptr, offsets_2, ranks_2,
            N_2, num_tokens, tokens_per_row, N_2, tile - tiles_01,
            BLOCK_M, BLOCK_R, R_TILES, H_STRIDE, BLOCK_N, SPLITS, True, PRECISION,
        )  # fmt: skip
