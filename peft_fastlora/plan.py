"""The batch plan: which adapter slot each row of the batch uses, built once per model call.

PEFT hands ``adapter_names`` to every LoRA layer and each layer regroups the rows in Python. Here the model-level
call turns the names into slot ids once, sorts the rows by slot once, and every layer reads the result.

The device-side metadata lives in one preallocated int32 buffer that is refilled in place (one host-to-device
copy per call), so a CUDA graph captured over a forward sees a new assignment of adapters to rows without a
re-capture. Layout of the buffer, each section ``capacity`` long::

    row_slots    slot of each row, BASE_SLOT (-1) for "__base__"
    sorted_rows  the LoRA rows (base rows left out), grouped by slot, in row order inside each group
    seg_slots    per segment (one per distinct slot): its slot
    seg_starts   per segment: its first position in sorted_rows
    seg_lens     per segment: its number of rows
    (one int)    the number of segments

Kernels get the full-capacity sections and read the segment count on the device, so their grids depend only on
the batch size and the number of adapters, never on which row uses which adapter: a CUDA graph captured for one
assignment replays correctly for any other of the same batch size.

A model split over several devices (accelerate's ``device_map``) reads the plan on each layer's device: the
buffer is copied once per call to every other device that asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .bank import BASE_SLOT
from .peft_messages import length_mismatch

_SECTIONS = 5


@dataclass
class PlanView:
    """The plan seen from one layer input whose leading dimension has ``num_rows`` entries.

    Attributes
    ----------
    row_slots : torch.Tensor
        int32 ``[num_rows]``, the slot of each leading-dimension entry, -1 for base rows.
    sorted_rows : torch.Tensor
        int32 ``[num_lora_rows]``, the non-base entries grouped by slot.
    groups : list[tuple[int, int, int]]
        Host copy of the segments (one per distinct non-base slot): ``(slot, start, length)``, for backends that
        loop in Python.
    segments : tuple[torch.Tensor, ...]
        For kernels: ``(sorted_rows, seg_slots, seg_starts, seg_lens)`` over the plan's full capacity (entries past
        the live ones are stale) and a one-element int32 tensor holding the number of segments.
    shrinks : dict
        The plan's (so this call's) shrink outputs shared by sibling layers (see ``share_shrink``), and the outputs
        a fused group's leader computed for its members (see ``share_outputs``).
    """

    row_slots: torch.Tensor
    sorted_rows: torch.Tensor
    groups: list[tuple[int, int, int]]
    segments: tuple[torch.Tensor, ...]
    shrinks: dict = field(default_factory=dict, repr=False, compare=False)
    _addresses: tuple[int, ...] | None = field(default=None, repr=False, compare=False)

    def share_shrink(self, group_key: int, x: torch.Tensor, h: torch.Tensor) -> None:
        """Keep the shrink output ``h`` of input ``x`` against sibling group ``group_key``'s storage for the group's
        other members (the leader calls this; holding ``x`` keeps its identity unambiguous).

        The pair lives in this call's plan, not in the group: concurrent calls (each has its own plan) cannot see
        each other's, and under torch.compile the layers reach it through the plan, which every layer reads from
        one place, where a per-group attribute made dynamo add a Python aliasing guard per member and replay a
        store per group after every call."""
        self.shrinks[group_key] = (x, _version(x), h)

    def shared_shrink(self, group_key: int, x: torch.Tensor, last: bool) -> torch.Tensor | None:
        """Group ``group_key``'s shrink output if it was computed from this very tensor, else None.

        The last member (``last``) drops the pair, so that neither the input nor ``h`` outlives the group's layers
        (a call otherwise kept every decoder layer's normed input alive until it ended: 5x base's prefill memory).
        A member that finds nothing (it reads another input, as T5's cross-attention k/v do), or whose input was
        changed in place since (a pre-hook's ``mul_``: its version counter moved), computes its own shrink."""
        entry = self.shrinks.pop(group_key, None) if last else self.shrinks.get(group_key)
        if entry is None or entry[0] is not x or entry[1] != _version(x):
            return None
        return entry[2]

    def share_outputs(self, group_key: int, x: torch.Tensor, outputs: tuple[torch.Tensor, ...] | None) -> None:
        """Keep the outputs a fused sibling group's leader computed for its other members from input ``x`` (see
        ``layers.FastLinearMixin``), in the members' order, for them to return (``shared_output``); None: the leader
        ran without computing theirs (a long input). ``x``'s version counter is kept too: a member whose input was
        changed in place since (a pre-hook's ``mul_``) gets nothing."""
        self.shrinks["outputs", group_key] = (x, _version(x), outputs)

    def shared_output(
        self, group_key: int, x: torch.Tensor, index: int, last: bool
    ) -> tuple[torch.Tensor | None, bool]:
        """``(output, missed)``: member ``index``'s (1 for the first after the leader) output from ``share_outputs``
        if the leader computed it from this very tensor, unchanged since, else None (the member then computes its
        own); ``missed`` where the leader has not run in this call yet or computed outputs this member cannot use
        (its work for the member was wasted), not where it ran without computing them. The last member drops the
        entry, as ``shared_shrink`` does."""
        key = ("outputs", group_key)
        entry = self.shrinks.pop(key, None) if last else self.shrinks.get(key)
        if entry is None:
            return None, True
        source, version, outputs = entry
        if outputs is None:
            return None, False
        if source is not x or version != _version(x):
            return None, True
        return outputs[index - 1], False

    def addresses(self) -> tuple[int, ...]:
        """The device addresses of ``segments``, read once per view (eager calls only: not while torch.compile
        traces). A launch prepared with these addresses (``kernels.launch.DirectCall``) is valid for any view
        whose addresses are equal: its tensors then sit exactly where the prepared launch reads."""
        if self._addresses is None:
            self._addresses = tuple(map(torch._C.TensorBase.data_ptr, self.segments))
        return self._addresses

    @property
    def num_rows(self) -> int:
        return self.row_slots.shape[0]

    def group_rows(self, start: int, length: int) -> torch.Tensor:
        """int32 indices of the rows of one segment (a view of ``sorted_rows``)."""
        return self.sorted_rows[start : start + length]


def version_unseen(x: torch.Tensor) -> bool:
    """Whether an in-place change of ``x`` goes unseen: while torch.compile traces (the graph has no version
    counters) and for an inference tensor (torch.inference_mode), which keeps none. There a shared entry checks only
    the input's identity, and leaders with hooks around their members share nothing
    (``layers._hooks_between_members``)."""
    return torch.compiler.is_compiling() or x.is_inference()


def _version(x: torch.Tensor) -> int | None:
    """``x``'s version counter, or None where it is unseen (``version_unseen``)."""
    return None if version_unseen(x) else x._version


def _segments(slots: list[int]) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Group the non-base rows by slot: return (rows sorted by slot, [(slot, start, length)])."""
    by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        if slot != BASE_SLOT:
            by_slot.setdefault(slot, []).append(row)
    sorted_rows: list[int] = []
    groups = []
    for slot in sorted(by_slot):
        groups.append((slot, len(sorted_rows), len(by_slot[slot])))
        sorted_rows.extend(by_slot[slot])
    return sorted_rows, groups


class BatchPlan:
    """Row → slot metadata for one model call, in preallocated buffers on one device.

    Parameters
    ----------
    device : torch.device
        Where the layers that read this plan run.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.capacity = 0
        self._buffer = torch.empty(0, dtype=torch.int32, device=self.device)
        self._staging = torch.empty(0, dtype=torch.int32)
        self.slots: list[int] = []
        self.num_input_rows = 0
        self._views: dict[tuple[int, torch.device], PlanView] = {}
        # Sibling groups' shared shrink outputs in this call, by group key (PlanView.share_shrink); every view of
        # this plan holds this dict.
        self.shrinks: dict = {}  # (group key, or ("outputs", group key)) -> (x, h or outputs)
        self._groups: list[tuple[int, int, int]] = []
        self._num_sorted = 0
        self._copies: dict[torch.device, torch.Tensor] = {}
        self._input_plan: BatchPlan | None = None  # this call's plan of the unexpanded rows, if it expands them
        self._encoder_plan: BatchPlan | None = None  # the buffers behind it, reused from call to call
        # Tokens per row of the latest input with a sequence dimension in this call (see ``view``); None: unknown.
        self.tokens_per_row: int | None = None
        self._uniform: int | None = None  # the one slot of every row, whatever their number (fill_uniform)
        # The active adapter of a plain call served as a mixed one under a GPU pool (patch._plain_call_rows); a
        # layer that leaves it to PEFT runs PEFT's plain forward. None in every other call.
        self.plain_adapter: str | None = None

    def _ensure_capacity(self, rows: int) -> None:
        if rows <= self.capacity and self.capacity:
            return
        # Grow geometrically so that a run of growing batches reallocates (and re-captures graphs) rarely.
        self.capacity = max(rows, 2 * self.capacity, 8)
        size = _SECTIONS * self.capacity + 1  # + the segment count
        # Normal tensors even when the first call runs under torch.inference_mode(): the buffers are refilled in
        # place by later calls, and an inference tensor refuses in-place updates outside inference mode.
        with torch.inference_mode(False):
            self._buffer = torch.empty(size, dtype=torch.int32, device=self.device)
            self._staging = torch.empty(size, dtype=torch.int32, pin_memory=self.device.type == "cuda")

    def _buffer_on(self, device: torch.device) -> torch.Tensor:
        """The plan buffer on ``device``: the preallocated one, or this call's copy of it for another device."""
        if device == self.device:
            return self._buffer
        if device not in self._copies:
            self._copies[device] = self._buffer.to(device)
        return self._copies[device]

    def _row_view(self, device: torch.device) -> PlanView:
        buffer, cap, rows = self._buffer_on(device), self.capacity, len(self.slots)
        return PlanView(
            row_slots=buffer[:rows],
            sorted_rows=buffer[cap : cap + self._num_sorted],
            groups=self._groups,
            segments=(
                *(buffer[index * cap : (index + 1) * cap] for index in range(1, _SECTIONS)),
                buffer[_SECTIONS * cap :],
            ),
            shrinks=self.shrinks,
        )

    def fill(self, slots: list[int], expand: int = 1) -> None:
        """Refill the plan in place for a new call.

        Parameters
        ----------
        slots : list[int]
            The slot of each input row, ``BASE_SLOT`` for base rows (length B).
        expand : int
            How many copies of each input row the model will see, consecutively (beam search and
            ``num_return_sequences`` repeat each row this often, as ``repeat_interleave`` does).
        """
        self._uniform = None
        self.plain_adapter = None
        self.num_input_rows = len(slots)
        self.slots = [slot for slot in slots for _ in range(expand)]
        rows = len(self.slots)
        sorted_rows, groups = _segments(self.slots)
        self._ensure_capacity(rows)
        # Written through a numpy view of the staging buffer: a torch.tensor per section per call left a slowly
        # growing residue of small Python allocations inside torch (tracemalloc, tests/test_calls.py).
        host = self._staging.numpy()
        host[:rows] = self.slots
        cap = self.capacity
        host[cap : cap + len(sorted_rows)] = sorted_rows
        for column, values in enumerate(zip(*groups, strict=True) if groups else ((), (), ())):
            start = (2 + column) * cap
            host[start : start + len(groups)] = values
        host[_SECTIONS * cap] = len(groups)
        # A blocking copy, once per call: the staging buffer is reused by the next call, so the copy must be done.
        self._buffer.copy_(self._staging)
        self._groups, self._num_sorted, self._copies = groups, len(sorted_rows), {}
        self.shrinks.clear()
        self._views = {(rows, self.device): self._row_view(self.device)}
        self._input_plan = None
        self.tokens_per_row = None
        if expand > 1:
            # Encoder layers of encoder-decoder models see the rows before expansion. That plan is kept and refilled,
            # so a call with beams allocates nothing new (and a captured graph keeps reading the same buffers).
            if self._encoder_plan is None:
                self._encoder_plan = BatchPlan(self.device)
            self._encoder_plan.fill(slots)
            self._input_plan = self._encoder_plan

    def fill_uniform(self, slot: int) -> None:
        """Refill the plan for a call whose every row takes ``slot``, however many rows its layers see: a plain call
        under a GPU pool, whose batch size the call does not show (see ``patch._plain_call_rows``). Each new leading
        size a layer asks for refills the plan with that many rows of ``slot`` (in eager mode, one small copy)."""
        self.fill([])
        self._uniform = slot

    def forget_shrinks(self) -> None:
        """Drop the shared shrink outputs this call still holds (at its end, to free them; see
        ``PlanView.shared_shrink``), the encoder plan's included."""
        self.shrinks.clear()
        if self._encoder_plan is not None:
            self._encoder_plan.shrinks.clear()

    def view(
        self, num_rows: int, flattened: bool, device: torch.device | None = None, tokens_per_row: int | None = None
    ) -> PlanView:
        """The plan for a layer input of leading size ``num_rows``.

        A leading size equal to the batch size is read as one entry per row, as PEFT does. A flattened input whose
        leading size is not the batch size is read per token only where that reading is known to be right: its
        leading size is exactly B × S, where S is the number of tokens per row of the latest input of this call
        that had one entry per row and a sequence dimension (``tokens_per_row``; the embedding or the attention
        projections of the same forward step). That is the flattened hidden state of OPT's fc1/fc2 or Qwen2-MoE's
        shared expert. Anything else (the tokens a router sent to one expert, the patches of a vision tower) gets
        PEFT's length error: reading it as "B rows × S tokens" would give rows the wrong adapter silently.

        Parameters
        ----------
        num_rows : int
            ``x.shape[0]`` of the layer input.
        flattened : bool
            True where the input has no sequence dimension (a 2-D Linear input, 1-D embedding ids), so that its
            leading dimension may be batch × sequence flattened into tokens.
        device : torch.device, optional
            Where the layer runs (the plan's own device when omitted); the view's tensors live there.
        tokens_per_row : int, optional
            For an input with a sequence dimension: the number of tokens of each leading entry (``S`` of a
            ``[B, S, H]`` input). Remembered for leading size ``num_rows``, it tells later flattened inputs of the
            step what B × S is.

        Raises
        ------
        ValueError
            PEFT's length-mismatch error where ``num_rows`` fits no reading of the batch known to be right.
        """
        device = self.device if device is None else device
        if self._uniform is not None and num_rows != len(self.slots):
            slot, tokens, plain = self._uniform, self.tokens_per_row, self.plain_adapter
            self.fill([slot] * num_rows)
            self._uniform, self.tokens_per_row, self.plain_adapter = slot, tokens, plain
        if num_rows == len(self.slots):
            if tokens_per_row is not None:
                self.tokens_per_row = tokens_per_row
            view = self._views.get((num_rows, device))
            if view is None:
                view = self._views[(num_rows, device)] = self._row_view(device)
            return view
        if self._input_plan is not None and num_rows == self.num_input_rows:
            # Encoder layers of encoder-decoder models see the rows before expansion.
            return self._input_plan.view(num_rows, flattened, device, tokens_per_row)
        if flattened:
            # The plans whose B × S this leading size is; with beams, the expanded rows and the encoder's rows.
            # Both matching (a coincidence of sizes) leaves the reading ambiguous, so it is refused too.
            owners = [
                plan
                for plan in (self, self._input_plan)
                if plan is not None
                and plan.tokens_per_row is not None
                and plan.slots
                and num_rows == len(plan.slots) * plan.tokens_per_row
            ]
            if len(owners) == 1:
                return owners[0]._token_view(num_rows, device)
        raise length_mismatch(len(self.slots), num_rows)

    def _token_view(self, num_rows: int, device: torch.device) -> PlanView:
        """The plan with every row repeated ``num_rows // B`` times, consecutively (a flattened [B*S, H] input).

        Cached by leading size: for a given B, the leading size alone determines S."""
        view = self._views.get((num_rows, device))
        if view is not None:
            return view
        tokens_per_row = num_rows // len(self.slots)
        row_view = self.view(len(self.slots), flattened=False, device=device)
        offsets = torch.arange(tokens_per_row, dtype=torch.int32, device=device)
        groups = [(slot, start * tokens_per_row, length * tokens_per_row) for slot, start, length in row_view.groups]
        rows, seg_slots, seg_starts, seg_lens, count = row_view.segments
        segments = (
            (rows[:, None] * tokens_per_row + offsets).reshape(-1),
            seg_slots,
            seg_starts * tokens_per_row,
            seg_lens * tokens_per_row,
            count,
        )
        view = PlanView(
            row_slots=row_view.row_slots.repeat_interleave(tokens_per_row),
            sorted_rows=segments[0][: row_view.sorted_rows.shape[0] * tokens_per_row],
            groups=groups,
            segments=segments,
            shrinks=self.shrinks,
        )
        self._views[(num_rows, device)] = view
        return view
