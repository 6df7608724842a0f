"""Launchers for the segmented LoRA kernels, registered as torch custom ops so torch.compile traces them.

``launch_shrink`` returns the fp32 partial products ``h``; ``launch_expand`` adds ``h @ B`` into ``y`` in place. The
backend calls them through ``keyed_shrink`` / ``keyed_expand_`` (custom ops ``peft_fastlora::keyed_shrink`` /
``keyed_expand_`` while torch.compile traces), which take the layer's storage as an int key rather than as tensors,
so that a compiled graph has no per-layer tensor inputs to guard (see ``storage_keys``). Their fake
implementations only describe shapes. Grids are sized from the number of tokens and of adapter slots only,
never from the assignment of rows to adapters (the kernels read the live segment count on the device): a launch
never syncs with the device, and a captured CUDA graph stays valid for any assignment of the same batch size.

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

from .. import storage_keys
from .sgmv import expand_group_kernel, expand_kernel, shrink_kernel

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Scratch allocations go through this name so that tests can poison them with NaN (unwritten reads show up).
scratch_empty = torch.empty
_data_ptr = torch._C.TensorBase.data_ptr


def _specialization(arg) -> tuple:
    """What Triton compiles a kernel argument into: a tensor's dtype and 16-byte alignment; an integer's being 1,
    divisible by 16, and fitting 32 bits. Arguments that agree on all of it run the same compiled kernel."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if type(arg) is int:
        return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31
    # Triton compiles bools, floats and None by other rules; the kernels take none, so refuse rather than guess.
    raise TypeError(f"CompiledLauncher takes tensors and ints as runtime arguments, got {type(arg).__name__}")


def _fixed(arg) -> object:
    """What a ``DirectCall`` fixes of an argument: an int's value, a tensor's address and dtype."""
    return arg if type(arg) is int else (_data_ptr(arg), arg.dtype)


MAX_DIRECT = 4096
"""``DirectCall``s a ``CompiledLauncher`` keeps (layers × batch shapes); past it, it starts afresh."""


def _hooked(hook) -> bool:
    """Whether a Triton launch hook (None, or a chain of callables) would call anything."""
    return hook is not None and bool(getattr(hook, "calls", True))


class DirectCall:
    """One kernel launch prepared for one layer and one batch shape: the compiled kernel's C launcher and every
    argument but the two that change from call to call, already in the form the launcher takes (tensors as their
    addresses, which the launcher accepts as plain ints and then takes as they are).

    Through ``kernel[grid]`` (or even the compiled kernel's Python ``run``) each launch re-reads every tensor's
    ``data_ptr`` in Python and asks the driver whether each address is a device pointer: tens of µs of host time
    per launch on a slow host, twice per LoRA layer per decode step. Here a launch is one call into Triton's C
    launcher. Built by ``CompiledLauncher.direct``; see ``LayerLaunches`` for when one may be reused.
    """

    __slots__ = ("launch", "grid", "meta", "middle", "rest", "device")

    def __init__(self, launch, grid: tuple, meta: tuple, middle: tuple, rest: tuple, device: int):
        self.launch, self.grid, self.meta = launch, grid, meta
        self.middle, self.rest, self.device = middle, rest, device

    def __call__(self, first: int, second: int) -> None:
        """Launch with ``first`` and ``second`` (the addresses of the two per-call tensors) in their places."""
        if torch._C._cuda_getDevice() != self.device:  # a split model calls cuda:1's layers while cuda:0 is current
            with torch.cuda.device(self.device):
                self._launch(first, second)
        else:
            self._launch(first, second)

    def _launch(self, first: int, second: int) -> None:
        stream = torch._C._cuda_getCurrentRawStream(self.device)
        self.launch(*self.grid, stream, *self.meta, first, *self.middle, second, *self.rest)


class DirectCallMany:
    """``DirectCall`` for a launch with more than two per-call tensors (a sibling group's expand: ``h`` and every
    member's output): ``template`` holds every argument in the launcher's order, and ``positions`` the places of
    the per-call addresses, filled in on each call."""

    __slots__ = ("launch", "grid", "meta", "template", "positions", "device")

    def __init__(self, launch, grid: tuple, meta: tuple, template: tuple, positions: tuple, device: int):
        self.launch, self.grid, self.meta = launch, grid, meta
        self.template, self.positions, self.device = template, positions, device

    def __call__(self, *pointers: int) -> None:
        """Launch with ``pointers`` (the per-call tensors' addresses, in ``positions``' order) in their places."""
        arguments = list(self.template)
        for position, pointer in zip(self.positions, pointers, strict=True):
            arguments[position] = pointer
        if torch._C._cuda_getDevice() != self.device:  # (see DirectCall)
            with torch.cuda.device(self.device):
                self._launch(arguments)
        else:
            self._launch(arguments)

    def _launch(self, arguments: list) -> None:
        stream = torch._C._cuda_getCurrentRawStream(self.device)
        self.launch(*self.grid, stream, *self.meta, *arguments)


class CompiledLauncher:
    """Launch a ``@triton.jit`` kernel straight through its compiled handle once Triton has compiled it.

    ``kernel[grid](...)`` re-binds, re-specialises and re-checks every argument in Python on each call: about 50 µs
    per launch measured on an H200 (Triton 3.6), twice per LoRA layer per decode step, which made eager decode
    host-bound. The first call with a new specialisation (``_specialization`` of every argument, and the
    constexprs) has Triton compile the kernel; later calls with the same specialisation call the compiled
    kernel's launcher directly, as ``JITFunction.run`` itself does after its checks. Under the interpreter every
    call goes through Triton. Constexprs are passed as keywords, in the kernel's order, after all other arguments
    (as the kernels declare them).

    The launch runs on the device of the first argument (a tensor), with that device's current stream: a model
    split over GPUs (accelerate's ``device_map``) calls layers on cuda:1 while the current device is cuda:0, and
    Triton would launch on the current one.
    """

    def __init__(self, kernel, second: int, more: tuple[int, ...] = ()):
        self.kernel = kernel
        self.second = second  # the index of the other per-call tensor argument (the first is args[0])
        # Indices of further per-call tensors (a group expand's outputs), fixed by dtype and alignment only.
        self.more = more
        self.positions = (0, second, *more)  # every per-call tensor's index, in the order a DirectCallMany takes
        self._compiled: dict[tuple, object] = {}
        self._direct: dict[tuple, DirectCall | None] = {}

    def __call__(self, grid: tuple[int, int, int], *args, **constexprs) -> None:
        if INTERPRETED:
            self.kernel[grid](*args, **constexprs)
            return
        runtime = triton.knobs.runtime
        if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
            # A profiler's launch hooks: Triton's own path calls them.
            self.kernel[grid](*args, **constexprs, **_options(constexprs))
            return
        # A DirectCall per everything it fixes: the grid, the constexprs, every other argument (tensors by address
        # and dtype), and the dtypes and 16-byte alignment of the two per-call tensors (their specialisation). This
        # serves the compiled graph's custom ops, which get tensors rather than the layer's prepared launches.
        second = self.second
        if self.more:
            self._call_many(grid, args, constexprs)
            return
        first_ptr, second_ptr = _data_ptr(args[0]), _data_ptr(args[second])
        key = (
            grid, args[0].dtype, args[second].dtype, first_ptr & 15 == 0, second_ptr & 15 == 0,
            *map(_fixed, args[1:second]), *map(_fixed, args[second + 1 :]), *constexprs.values(),
        )  # fmt: skip
        call = self._cached_direct(key, lambda: self.direct(grid, args, constexprs, second))
        if call is not None:
            call(first_ptr, second_ptr)
            return
        self._launch_on_device(grid, args, constexprs)

    def _cached_direct(self, key: tuple, make):
        """The direct call kept under ``key``, made by ``make()`` (None: not preparable) on first use."""
        call = self._direct.get(key, False)
        if call is False:
            call = make()
            if len(self._direct) >= MAX_DIRECT:
                self._direct.clear()
            self._direct[key] = call
        return call

    def _call_many(self, grid: tuple[int, int, int], args: tuple, constexprs: dict) -> None:
        """``__call__`` for a kernel with ``more`` per-call tensors: the same keying, through ``DirectCallMany``."""
        positions = self.positions
        pointers = [_data_ptr(args[position]) for position in positions]
        key = (
            grid, *(args[position].dtype for position in positions), *(pointer & 15 == 0 for pointer in pointers),
            *(_fixed(arg) for index, arg in enumerate(args) if index not in positions), *constexprs.values(),
        )  # fmt: skip
        call = self._cached_direct(key, lambda: self.direct_many(grid, args, constexprs, positions))
        if call is not None:
            call(*pointers)
            return
        self._launch_on_device(grid, args, constexprs)

    def _launch_on_device(self, grid: tuple[int, int, int], args: tuple, constexprs: dict) -> None:
        device = args[0].device.index
        if device != torch.cuda.current_device():
            with torch.cuda.device(device):
                self._launch(device, grid, args, constexprs)
        else:
            self._launch(device, grid, args, constexprs)

    def _compiled_kernel(self, device: int, args: tuple, constexprs: dict):
        """The compiled kernel for this specialisation on ``device`` (the current device), compiled on first use."""
        key = (device, *constexprs.values(), *map(_specialization, args))
        kernel = self._compiled.get(key)
        if kernel is None:
            # Compiles; launches nothing. The options are not kernel arguments: the launches below never pass them.
            kernel = self.kernel.warmup(*args, grid=(1, 1, 1), **constexprs, **_options(constexprs))
            kernel = kernel.result() if hasattr(kernel, "result") else kernel
            self._compiled[key] = kernel
        return kernel

    def _launch(self, device: int, grid: tuple[int, int, int], args: tuple, constexprs: dict) -> None:
        kernel = self._compiled_kernel(device, args, constexprs)
        run = kernel.run  # (loads the binary on first use, which sets kernel.function)
        stream = torch._C._cuda_getCurrentRawStream(device)
        run(*grid, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *constexprs.values())

    def direct(self, grid: tuple[int, int, int], args: tuple, constexprs: dict, second: int) -> DirectCall | None:
        """A ``DirectCall`` of this launch whose per-call arguments are ``args[0]`` and ``args[second]``, or None
        where Triton's launcher is not the one this knows (another Triton version; a kernel that needs scratch
        memory, which its Python launcher allocates per call): the caller then launches through ``__call__``.

        The other arguments are fixed in the call as they are now: tensors by address, so the caller may reuse it
        only while those tensors are alive and unmoved, and with per-call tensors of the same dtype and 16-byte
        alignment as these (the specialisation it was compiled for)."""
        parts = self._launcher_parts(args, constexprs)
        if parts is None:
            return None
        launch, meta, plain, device = parts
        rest = (*plain[second + 1 :], *constexprs.values())
        return DirectCall(launch, tuple(grid), meta, tuple(plain[1:second]), rest, device)

    def direct_many(
        self, grid: tuple[int, int, int], args: tuple, constexprs: dict, positions: tuple[int, ...]
    ) -> DirectCallMany | None:
        """``direct`` for a launch whose per-call arguments are ``args[position]`` for each of ``positions``."""
        parts = self._launcher_parts(args, constexprs)
        if parts is None:
            return None
        launch, meta, plain, device = parts
        return DirectCallMany(launch, tuple(grid), meta, (*plain, *constexprs.values()), positions, device)

    def _launcher_parts(self, args: tuple, constexprs: dict) -> tuple | None:
        """``(launcher, meta, plain arguments, device)`` for a direct call of this specialisation, or None where
        Triton's launcher is not the one this knows (see ``direct``)."""
        if INTERPRETED:
            return None
        device = args[0].device.index
        with torch.cuda.device(device):
            kernel = self._compiled_kernel(device, args, constexprs)
            run = kernel.run
        launch = getattr(run, "launch", None)
        fields = ("launch_cooperative_grid", "launch_pdl", "global_scratch_size", "profile_scratch_size")
        if launch is None or not all(hasattr(run, field) for field in fields):
            return None
        if run.global_scratch_size or run.profile_scratch_size:
            return None
        # What CudaLauncher.__call__ hands its C launcher after the grid and the stream: the function, the launch
        # flags, no scratch buffers, the packed metadata, and no launch metadata or hooks (see _launch).
        meta = (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None, kernel.packed_metadata,
                None, None, None)  # fmt: skip
        plain = [_data_ptr(arg) if isinstance(arg, torch.Tensor) else arg for arg in args]
        return launch, meta, plain, device


def _options(constexprs: dict) -> dict:
    """Triton compile options that follow from a launch's constexprs: a kernel compiled with ``USE_PDL`` (which waits
    for the previous kernel in its own code) is launched as a programmatic dependent launch."""
    return {"launch_pdl": True} if constexprs.get("USE_PDL") else {}


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


PDL = os.environ.get("PEFT_FASTLORA_PDL", "0") == "1"
"""Whether kernels on GPUs that support it (compute capability 9.0 and later: Hopper, Blackwell) are launched as
programmatic dependent launches (``_dependent_launch`` in ``sgmv``); ``PEFT_FASTLORA_PDL=1`` turns it on.

Off by default: in the compiled 32-layer decode step on an H200 (session 33, runs B and C) it moved nothing we could
tell from noise (0.789× and 0.745× base with it, 0.773× without; LoRA GPU time per step 1.38 ms with, 1.32 without),
where hiding the launch gaps had been predicted to save 0.3–0.5 ms a step. Kept, and tested both ways, for a
measurement that sees the graph's edges (Nsight Systems) and for kernels ahead of ours that trigger early."""


@functools.cache
def _pdl_capable(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and not INTERPRETED
        and torch.version.hip is None  # (ROCm's MI300 reports 9.x too, and has no griddepcontrol)
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def use_pdl(device: torch.device) -> bool:
    """Whether this call's kernels on ``device`` are programmatic dependent launches (see ``PDL``)."""
    return PDL and _pdl_capable(device)


MAX_RANK_BLOCK = 64
"""The widest rank tile. Wider ranks are walked tile by tile: a rank-128 adapter stacked with its q/k/v siblings
(384 rows) once asked for a 512-wide tile and more shared memory than the GPU has."""


def _cdiv(a: int, b: int) -> int:
    # Plain arithmetic: triton.cdiv and triton.next_power_of_2 cost 2-3 µs a call on the host, per launch.
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def rank_tiles(max_rank: int) -> tuple[int, int]:
    """``(BLOCK_R, R_TILES)`` for a layer whose largest rank is ``max_rank``: a power-of-two tile of at least 16 (the
    smallest ``tl.dot`` operand) and at most ``MAX_RANK_BLOCK`` lanes, and how many such tiles cover the rank."""
    block_r = min(max(16, _next_power_of_2(max_rank)), MAX_RANK_BLOCK)
    return block_r, max(1, _cdiv(max_rank, block_r))


def h_width(max_rank: int) -> int:
    """The row width of the shrink output ``h``: every rank tile, padded (scratch only, never the weights)."""
    block_r, r_tiles = rank_tiles(max_rank)
    return block_r * r_tiles


def dot_precision(activation_dtype: torch.dtype, weight_dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: IEEE fp32 for an fp32 model, TF32 tensor cores where the activations are fp16 or
    bf16 anyway (fp32 adapters, PEFT's default, on a bf16 model: 4x faster than IEEE). TF32 keeps 10 mantissa bits:
    finer than the bf16 the delta is rounded to, and as fine as fp16, so on an fp16 model its error in the delta
    is about the size of the final rounding (PEFT computes fp32 adapters in IEEE fp32). Other dtypes run on tensor
    cores whatever this says."""
    return "ieee" if activation_dtype == torch.float32 and weight_dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=4096)  # the same few shapes every decode step: the host pays this once per shape
def _tiles(num_tokens: int, num_slots: int, rows: int, k: int, max_rank: int, device: torch.device) -> tuple:
    """``(segments, BLOCK_M, BLOCK_K, BLOCK_N, splits, k_steps)`` for one call, from assignment-free sizes.

    ``segments`` bounds the live segment count (one per distinct adapter, at most one per row). Under the
    interpreter a fixed small config keeps CPU tests fast (and still splits K, to cover that path). On a GPU the
    token tile follows the mean segment length (decode: 16, prefill: 64), and K is split until there are about two
    programs per multiprocessor, since decode has too few tokens to fill the GPU otherwise; a long prefill fills the
    GPU without splitting, so its fp32 partials stay one layer-sized activation.
    """
    segments = max(1, min(num_slots, rows))
    block_r, r_tiles = rank_tiles(max_rank)
    if INTERPRETED or device.type != "cuda":
        block_m, block_k, block_n, splits = 16, 32, 32, 2
    else:
        mean_tokens = num_tokens / segments
        block_m = 16 if mean_tokens <= 16 else 32 if mean_tokens <= 32 else 64
        block_k = 128 if block_r <= 32 else 64
        block_n = 128 if block_r <= 32 else 64
        programs = segments * _cdiv(max(1, int(mean_tokens)), block_m) * r_tiles
        # At most 8 splits: every expand program sums all split partials, and beyond 8 that serial sum costs more
        # than the parallel shrink gains (measured: 64 splits at M=1, K=14336 made the pair 3x slower than torch).
        splits = min(_cdiv(2 * _multiprocessors(device), programs), 8)
    k_steps = _cdiv(_cdiv(k, block_k), max(1, min(splits, _cdiv(k, block_k))))
    return segments, block_m, block_k, block_n, _cdiv(k, k_steps * block_k), k_steps


def launch_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    sorted_rows: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    num_segments: torch.Tensor,
    tokens_per_row: int,
    max_rank: int,
) -> torch.Tensor:
    """``h[split, t, :rank_s] = x[t, k-split] @ A_s[:, k-split]ᵀ`` for every token t of every segment.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, K]``, unit column stride; cast to ``a``'s dtype tile by tile (with TF32 dots where ``x`` is fp16/bf16
        and ``a`` fp32, see ``dot_precision``).
    a : torch.Tensor
        ``[R, K]`` contiguous packed lora_A rows; adapter s owns rows ``offsets[s] : offsets[s] + ranks[s]``.
    offsets, ranks : torch.Tensor
        int32 ``[num_slots]``.
    sorted_rows, seg_slots, seg_starts, seg_lens, num_segments : torch.Tensor
        int32 plan metadata (``PlanView.segments``); rows index groups of ``tokens_per_row`` consecutive tokens.
    tokens_per_row : int
        Tokens per plan row (the sequence length for a ``[B, S, H]`` input).
    max_rank : int
        The largest rank of the layer, for the rank tile.

    Returns
    -------
    torch.Tensor
        fp32 ``[splits, T, h_width(max_rank)]`` partial sums over K; rows of tokens in no segment, and rank lanes
        past an adapter's rank, are unwritten.
    """
    h, launch = shrink_launch(
        x, a, offsets, ranks, sorted_rows, seg_slots, seg_starts, seg_lens, num_segments, tokens_per_row, max_rank
    )
    if launch is not None:
        _shrink(launch[0], *launch[1], **launch[2])
    return h


def shrink_launch(
    x, a, offsets, ranks, sorted_rows, seg_slots, seg_starts, seg_lens, num_segments, tokens_per_row, max_rank
) -> tuple[torch.Tensor, tuple | None]:
    """``launch_shrink``'s output ``h`` (allocated, unwritten) and its launch ``(grid, args, constexprs)``, or None
    for no tokens. ``args[0]`` is ``x`` and ``args[2]`` is ``h``."""
    num_tokens, k = x.shape
    segments, block_m, block_k, _, splits, k_steps = _tiles(
        num_tokens, offsets.shape[0], num_tokens // tokens_per_row, k, max_rank, x.device
    )
    block_r, r_tiles = rank_tiles(max_rank)
    h = scratch_empty(splits, num_tokens, block_r * r_tiles, dtype=torch.float32, device=x.device)
    if not num_tokens:
        return h, None
    grid = (segments, _cdiv(num_tokens, block_m), splits * r_tiles)
    args = (
        x, a, h, sorted_rows, seg_slots, seg_starts, seg_lens, num_segments, offsets, ranks, k, num_tokens,
        tokens_per_row, x.stride(0),
    )  # fmt: skip
    constexprs = dict(
        BLOCK_M=block_m, BLOCK_R=block_r, R_TILES=r_tiles, BLOCK_K=block_k, K_STEPS=k_steps,
        PRECISION=dot_precision(x.dtype, a.dtype), USE_PDL=use_pdl(x.device),
    )  # fmt: skip
    return h, (grid, args, constexprs)


def launch_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    h_cols: torch.Tensor | None,
    b: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    sorted_rows: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    num_segments: torch.Tensor,
    tokens_per_row: int,
    max_rank: int,
) -> None:
    """``y[t] += scales[s] · (Σ_split h[split, t, cols_s]) @ B_sᵀ`` for every token t of every segment, in place.

    Parameters
    ----------
    y : torch.Tensor
        ``[T, N]``, unit column stride; fp16, bf16 or fp32. The delta is rounded to its dtype before the add.
    h : torch.Tensor
        ``launch_shrink``'s output, possibly a sibling group's (wider rows).
    h_cols : torch.Tensor or None
        int32 ``[num_slots]``: where this layer's part of slot s starts in a sibling group's ``h``; None for 0.
    b : torch.Tensor
        Flat contiguous lora_B storage: slot s's ``[N, rank_s]`` block (PEFT's layout) starts at element
        ``offsets[s] * N``.
    scales : torch.Tensor
        fp32 ``[num_slots]``, each slot's scaling.
    offsets, ranks, sorted_rows, seg_slots, seg_starts, seg_lens, num_segments, tokens_per_row, max_rank
        As for ``launch_shrink``, for this layer's ``b`` (``offsets`` in units of ``N`` elements).
    """
    launch = expand_launch(
        y, h, h_cols, b, scales, offsets, ranks, sorted_rows, seg_slots, seg_starts, seg_lens, num_segments,
        tokens_per_row, max_rank,
    )  # fmt: skip
    if launch is not None:
        _expand(launch[0], *launch[1], **launch[2])


def expand_launch(
    y, h, h_cols, b, scales, offsets, ranks, sorted_rows, seg_slots, seg_starts, seg_lens, num_segments,
    tokens_per_row, max_rank,
) -> tuple | None:  # fmt: skip
    """``launch_expand``'s launch ``(grid, args, constexprs)``, or None where it has nothing to do. ``args[0]`` is
    ``h`` and ``args[4]`` is ``y``."""
    num_tokens, n = y.shape
    if num_tokens == 0 or max_rank == 0:
        return None
    segments, block_m, _, block_n, _, _ = _tiles(
        num_tokens, offsets.shape[0], num_tokens // tokens_per_row, 1, max_rank, y.device
    )  # K (here 1) does not matter to the expand's tiles
    block_r, r_tiles = rank_tiles(max_rank)
    grid = (segments, _cdiv(num_tokens, block_m), _cdiv(n, block_n))
    args = (
        h, offsets if h_cols is None else h_cols, b, scales, y, sorted_rows, seg_slots, seg_starts, seg_lens,
        num_segments, offsets, ranks, n, h.shape[1], tokens_per_row, y.stride(0),
    )  # fmt: skip
    constexprs = dict(
        BLOCK_M=block_m, BLOCK_R=block_r, R_TILES=r_tiles, H_STRIDE=h.shape[2], BLOCK_N=block_n, SPLITS=h.shape[0],
        SHARED_H=h_cols is not None, PRECISION=dot_precision(y.dtype, b.dtype), USE_PDL=use_pdl(y.device),
    )  # fmt: skip
    return grid, args, constexprs


def expand_group_launch(
    ys, h, members, sorted_rows, seg_slots, seg_starts, seg_lens, num_segments, tokens_per_row, max_rank
) -> tuple | None:
    """The launch ``(grid, args, constexprs)`` of ``expand_group_kernel`` (``launch_expand`` for every member of a
    sibling group at once), or None where it has nothing to do.

    ``ys`` are the members' contiguous outputs ``[T, N_m]`` (2 or 3), ``h`` the group's shrink output, ``members``
    each member's ``(h_cols, b, scales, offsets, ranks)`` (as ``launch_expand`` takes them) and ``max_rank`` the
    largest of the members' ranks. ``args[0]`` is ``h``; the outputs are ``args[9]``, ``args[16]`` and
    ``args[23]`` (a two-member group's second output twice)."""
    num_tokens = ys[0].shape[0]
    if num_tokens == 0 or max_rank == 0:
        return None
    offsets = members[0][3]
    segments, block_m, _, block_n, _, _ = _tiles(
        num_tokens, offsets.shape[0], num_tokens // tokens_per_row, 1, max_rank, ys[0].device
    )
    block_r, r_tiles = rank_tiles(max_rank)
    tiles = [_cdiv(y.shape[1], block_n) for y in ys]
    grid = (segments, _cdiv(num_tokens, block_m), sum(tiles))
    per_member = [(h_cols, b, scales, y, offsets, ranks, y.shape[1]) for y, (h_cols, b, scales, offsets, ranks) in
                  zip(ys, members, strict=True)]  # fmt: skip
    if len(per_member) == 2:
        per_member.append(per_member[1])
    args = (
        h, sorted_rows, seg_slots, seg_starts, seg_lens, num_segments, *per_member[0], *per_member[1],
        *per_member[2], tiles[0], tiles[0] + tiles[1], num_tokens, tokens_per_row,
    )  # fmt: skip
    constexprs = dict(
        BLOCK_M=block_m, BLOCK_R=block_r, R_TILES=r_tiles, H_STRIDE=h.shape[2], BLOCK_N=block_n, SPLITS=h.shape[0],
        MEMBERS=len(ys), PRECISION=dot_precision(ys[0].dtype, members[0][1].dtype), USE_PDL=use_pdl(ys[0].device),
    )  # fmt: skip
    return grid, args, constexprs


_shrink = CompiledLauncher(shrink_kernel, second=2)  # per call: x and h
_expand = CompiledLauncher(expand_kernel, second=4)  # per call: h and y
_expand_group = CompiledLauncher(expand_group_kernel, second=9, more=(16, 23))  # per call: h and every output


def launch_keyed_shrink(
    x: torch.Tensor,
    sorted_rows: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    num_segments: torch.Tensor,
    tokens_per_row: int,
    key: int,
    num_slots: int,
    max_rank: int,
) -> torch.Tensor:
    """``launch_shrink`` against the lora_A storage registered under ``key`` (a layer's ``PackedLora``, or its
    sibling group's ``SiblingGroup``; see ``peft_fastlora.storage_keys``), whose ``num_slots`` and ``max_rank``
    the caller passes (the fake implementation sizes ``h`` from them)."""
    a, offsets, ranks = storage_keys.lookup(key).shrink_operands()
    plan = (sorted_rows, seg_slots, seg_starts, seg_lens, num_segments)
    return launch_shrink(x, a, offsets, ranks, *plan, tokens_per_row, max_rank)


def launch_keyed_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    sorted_rows: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    num_segments: torch.Tensor,
    tokens_per_row: int,
    key: int,
    shared: bool,
    max_rank: int,
) -> None:
    """``launch_expand`` with the lora_B storage, scales and metadata of the ``PackedLora`` registered under
    ``key``; ``shared``: ``h`` is its sibling group's shrink output (read at the layer's ``h_cols``)."""
    packed = storage_keys.lookup(key)
    plan = (sorted_rows, seg_slots, seg_starts, seg_lens, num_segments)
    h_cols = packed.h_cols if shared else None
    launch_expand(y, h, h_cols, packed.b, packed.scales, packed.b_offsets_dev, packed.ranks_dev, *plan, tokens_per_row,
                  max_rank)  # fmt: skip


def group_members(packs) -> list[tuple]:
    """Each member's ``(h_cols, b, scales, offsets, ranks)`` for ``expand_group_launch``."""
    return [(packed.h_cols, packed.b, packed.scales, packed.b_offsets_dev, packed.ranks_dev) for packed in packs]


def launch_keyed_group_expand(
    ys: list[torch.Tensor],
    h: torch.Tensor,
    sorted_rows: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    num_segments: torch.Tensor,
    tokens_per_row: int,
    keys: list[int],
    max_rank: int,
) -> None:
    """``expand_group_launch`` with the storage of the sibling group's members registered under ``keys`` (one per
    output in ``ys``), launched."""
    members = group_members([storage_keys.lookup(key) for key in keys])
    plan = (sorted_rows, seg_slots, seg_starts, seg_lens, num_segments)
    launch = expand_group_launch(ys, h, members, *plan, tokens_per_row, max_rank)
    if launch is not None:
        _expand_group(launch[0], *launch[1], **launch[2])


# The custom ops are what torch.compile sees, with the storage as a key, not as tensors (see storage_keys); eager
# calls skip their dispatch cost (tens of µs per call measured on an H100, in every LoRA layer of every decode step).
keyed_shrink_op = torch.library.custom_op("peft_fastlora::keyed_shrink", mutates_args=())(launch_keyed_shrink)
keyed_expand_op = torch.library.custom_op("peft_fastlora::keyed_expand_", mutates_args=("y",))(launch_keyed_expand)
keyed_group_expand_op = torch.library.custom_op("peft_fastlora::keyed_group_expand_", mutates_args=("ys",))(
    launch_keyed_group_expand
)


@keyed_shrink_op.register_fake
def _keyed_shrink_fake(x, sorted_rows, seg_slots, seg_starts, seg_lens, num_segments, tokens_per_row, key, num_slots,
                       max_rank):  # fmt: skip
    # Sizes are SymInts in a dynamic-shape graph (dynamo makes one after a recompile, e.g. of the frames accelerate's
    # hooks break a model into; and ints on modules where they are unspecialised): _tiles' cache cannot hash them
    # and the grid needs them, so specialise (int() guards).
    num_tokens, k, per_row = int(x.shape[0]), int(x.shape[1]), int(tokens_per_row)
    num_slots, max_rank = int(num_slots), int(max_rank)
    splits = _tiles(num_tokens, num_slots, num_tokens // per_row, k, max_rank, x.device)[4]
    return x.new_empty(splits, num_tokens, h_width(max_rank), dtype=torch.float32)


@keyed_expand_op.register_fake
def _keyed_expand_fake(y, h, *plan_and_sizes) -> None:
    return None


@keyed_group_expand_op.register_fake
def _keyed_group_expand_fake(ys, h, *plan_and_sizes) -> None:
    return None


def keyed_shrink(*args) -> torch.Tensor:
    """``launch_keyed_shrink`` in eager mode, the registered custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        return torch.ops.peft_fastlora.keyed_shrink(*args)
    return launch_keyed_shrink(*args)


def keyed_expand_(*args) -> None:
    """``launch_keyed_expand`` in eager mode, the registered custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        torch.ops.peft_fastlora.keyed_expand_(*args)
    else:
        launch_keyed_expand(*args)


def keyed_group_expand_(*args) -> None:
    """``launch_keyed_group_expand`` in eager mode, the registered custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        torch.ops.peft_fastlora.keyed_group_expand_(*args)
    else:
        launch_keyed_group_expand(*args)
