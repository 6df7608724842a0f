"""The Triton backend: a segmented shrink and a segmented expand per LoRA layer, whatever the mix of adapters.

Siblings that read the same input (q/k/v, gate/up) share the shrink: the group's leader shrinks against the
group's lora_A storage (every member's rows, slot by slot) at once, and each member then only expands its own
columns of the result; the last member releases the shared result, so no activation outlives the group.

In eager calls on a GPU the launches go through ``DirectCall``s prepared once per layer and batch shape and kept
in the layer's ``PackedLora.launches``: an eager decode step runs ~350 launches, and the host time of each one,
not the GPU's, bounded the step (see ``kernels/launch.py``).
"""

from __future__ import annotations

import torch
import triton

from ..bank import LaunchFields, PackedLora
from ..kernels import launch
from ..kernels.launch import keyed_expand_, keyed_group_expand_, keyed_shrink
from ..plan import PlanView
from ..storage_keys import launch_fields
from .torch_ref import TorchBackend

_data_ptr = torch._C.TensorBase.data_ptr

MAX_PREPARED = 64
"""Batch shapes whose launches a layer keeps (each prefill length is one): past it the layer starts afresh."""


def _tokens_and_plan(x: torch.Tensor, view: PlanView) -> tuple[torch.Tensor, tuple]:
    """``x`` as ``[tokens, in]`` with unit column stride (the kernels' layout), and the plan arguments of the keyed
    ops for it: the view's segment tensors and the tokens per row."""
    x_tokens = x.reshape(-1, x.shape[-1])
    if x_tokens.stride(-1) != 1:
        x_tokens = x_tokens.contiguous()
    return x_tokens, (*view.segments, x_tokens.shape[0] // view.num_rows)


class TritonBackend(TorchBackend):
    """Segmented-GEMM kernels for Linear layers; embeddings (a gather, one layer per model) use the torch path."""

    name = "triton"
    fuses_siblings = True

    def __init__(self):
        self.direct = not launch.INTERPRETED  # turned off for good if this Triton's launcher is not the known one

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, packed: PackedLora, view: PlanView) -> None:
        """Add each row's LoRA delta to ``result`` in place (see ``TorchBackend.add_lora``)."""
        # No test on the assignment (e.g. an all-__base__ batch) here: the launch must not depend on it, so that a
        # CUDA graph captured for one assignment replays for any other; the kernels read the segment count.
        fields = launch_fields(packed)  # (not packed.group, nor packed's own fields: see launch_fields)
        group_key = fields.group_key
        if fields.max_rank == 0:
            if group_key is not None and fields.last:
                view.shared_shrink(group_key, x, last=True)  # the last member releases it even when adding nothing
            return
        if self._direct_allowed(x, result) and self._add_lora_direct(result, x, packed, view):
            return
        x_tokens, plan = _tokens_and_plan(x, view)
        y_tokens = result.view(-1, result.shape[-1])  # base outputs are fresh contiguous tensors
        # The storage is named by key, not passed (see peft_fastlora.storage_keys): under torch.compile every
        # tensor read from an attribute is a graph input guarded on every call, 20 per decoder layer.
        h = None
        if group_key is not None:
            if fields.leader:
                h = keyed_shrink(x_tokens, *plan, group_key, fields.num_slots, fields.group_max_rank)
                view.share_shrink(group_key, x, h)
            h = view.shared_shrink(group_key, x, fields.last)
        shared = h is not None
        if h is None:
            h = keyed_shrink(x_tokens, *plan, fields.key, fields.num_slots, fields.max_rank)
        keyed_expand_(y_tokens, h, *plan, fields.key, shared, fields.max_rank)

    def add_group_lora(
        self, results: list[torch.Tensor], x: torch.Tensor, leader, view: PlanView, fields: LaunchFields
    ) -> None:
        """Add every member's LoRA delta to its base output in ``results`` (the leader's first, contiguous) in place:
        one shrink against the group's lora_A storage and one expand launch for all members (see
        ``layers._group_forward``). ``fields`` are the leader's."""
        if fields.group_rank == 0:
            return  # no member holds an adapter (the group's shrink output is then never shared: nothing to drop)
        if self._direct_allowed(x, results[0]) and self._add_group_lora_direct(results, x, leader, view, fields):
            return
        x_tokens, plan = _tokens_and_plan(x, view)
        h = keyed_shrink(x_tokens, *plan, fields.group_key, fields.num_slots, fields.group_max_rank)
        outputs = [result.view(-1, result.shape[-1]) for result in results]
        keyed_group_expand_(outputs, h, *plan, list(fields.member_keys), fields.group_rank)

    def _add_group_lora_direct(
        self, results: list[torch.Tensor], x: torch.Tensor, leader, view: PlanView, fields: LaunchFields
    ) -> bool:
        """``add_group_lora`` through the leader's prepared launches; False, having done nothing, where this
        Triton's launcher cannot be prepared."""
        if any(_data_ptr(result) & 15 for result in results[1:]):
            return False  # (the prepared expand was compiled for aligned outputs)
        packed = leader._fastlora_packed
        prepared = packed.launches
        num_tokens = x.numel() // x.shape[-1]
        key = (num_tokens, view.num_rows, view.addresses(), x.dtype, results[0].dtype)  # (see _add_lora_direct)
        group = packed.group
        h = self._shrink(
            prepared, ("group shrink", key, *group.shrink_operands(), group.max_rank), x, num_tokens, view
        )
        if h is None:
            return False
        expand = prepared.get(("group expand", key))
        if expand is None:
            packs = [packed] + [sibling._fastlora_packed for sibling in leader._fastlora_siblings]
            outputs = [result.view(num_tokens, result.shape[-1]) for result in results]
            args = launch.expand_group_launch(
                outputs, h, launch.group_members(packs), *view.segments, num_tokens // view.num_rows, fields.group_rank
            )
            if args is None:
                return True  # nothing to add (no tokens)
            expand = launch._expand_group.direct_many(*args, positions=launch._expand_group.positions)
            if expand is None:
                self.direct = False
                launch._expand_group(args[0], *args[1], **args[2])  # this call, the slow way; later calls too
                return True
            self._keep(prepared, ("group expand", key), expand)
        addresses = [_data_ptr(result) for result in results]
        if len(addresses) == 2:
            addresses.append(addresses[1])  # (a two-member group passes its second output as the third)
        expand(_data_ptr(h), *addresses)
        return True

    def _direct_allowed(self, x: torch.Tensor, result: torch.Tensor) -> bool:
        """Whether this call may launch through prepared ``DirectCall``s: an eager call (not traced by
        torch.compile) on a GPU, contiguous 16-byte-aligned activations (the specialisation the prepared launches
        were compiled for), and no Triton launch hooks (a profiler's, which only Triton's own path calls)."""
        if not self.direct or torch.compiler.is_compiling() or not x.is_cuda:
            return False
        if not (x.is_contiguous() and result.is_contiguous()) or (_data_ptr(x) | _data_ptr(result)) & 15:
            return False
        runtime = triton.knobs.runtime
        return not (launch._hooked(runtime.launch_enter_hook) or launch._hooked(runtime.launch_exit_hook))

    def _add_lora_direct(self, result: torch.Tensor, x: torch.Tensor, packed: PackedLora, view: PlanView) -> bool:
        """``add_lora`` through the layer's prepared launches (preparing those of a new batch shape); False, having
        done nothing, where this Triton's launcher cannot be prepared."""
        prepared = packed.launches
        num_tokens = x.numel() // x.shape[-1]
        # The launches read the plan's tensors at these addresses, with these sizes and dtypes: together they
        # determine every argument but the activations' addresses. The row count is not implied by the addresses
        # (a row view's sections sit at the same places for any batch size that fits the plan's buffer), and with
        # the token count it fixes tokens per row, the grid and h's shape: 4 rows × 4 tokens and 1 row × 16 tokens
        # once shared a prepared launch (silently wrong, or writes out of bounds).
        key = (num_tokens, view.num_rows, view.addresses(), x.dtype, result.dtype)
        group = packed.group
        h = None
        if group is not None:
            if packed.leader:
                shrink = ("group shrink", key, *group.shrink_operands(), group.max_rank)
                h = self._shrink(prepared, shrink, x, num_tokens, view)
                if h is None:
                    return False
                view.share_shrink(group.key, x, h)
            h = view.shared_shrink(group.key, x, packed.last)
        shared = h is not None
        if h is None:
            shrink = ("shrink", key, *packed.shrink_operands(), packed.max_rank)
            h = self._shrink(prepared, shrink, x, num_tokens, view)
            if h is None:
                return False
        expand = prepared.get(("expand", shared, key))
        if expand is None:
            args = launch.expand_launch(
                result.view(num_tokens, result.shape[-1]), h, packed.h_cols if shared else None, packed.b,
                packed.scales, packed.b_offsets_dev, packed.ranks_dev, *view.segments, num_tokens // view.num_rows,
                packed.max_rank,
            )  # fmt: skip
            if args is None:
                return True  # nothing to add (no tokens)
            expand = launch._expand.direct(*args, second=4)
            if expand is None:
                self.direct = False
                launch._expand(args[0], *args[1], **args[2])  # this call, the slow way; later calls too
                return True
            self._keep(prepared, ("expand", shared, key), expand)
        expand(_data_ptr(h), _data_ptr(result))
        return True

    def _shrink(self, prepared: dict, what: tuple, x: torch.Tensor, num_tokens: int, view: PlanView):
        """The shrink output ``h`` of ``x`` against the storage ``what`` names (``(tag, key, a, offsets, ranks,
        max_rank)``), launched through its prepared launch; None where the launch cannot be prepared."""
        tag, key, a, offsets, ranks, max_rank = what
        entry = prepared.get((tag, key))
        if entry is not None:
            call, shape = entry
            h = launch.scratch_empty(shape, dtype=torch.float32, device=x.device)
            if call is not None:
                call(_data_ptr(x), _data_ptr(h))
            return h
        h, args = launch.shrink_launch(
            x.view(num_tokens, x.shape[-1]), a, offsets, ranks, *view.segments, num_tokens // view.num_rows, max_rank
        )
        call = None
        if args is not None:
            call = launch._shrink.direct(*args, second=2)
            if call is None:
                self.direct = False
                return None
            call(_data_ptr(x), _data_ptr(h))
        self._keep(prepared, (tag, key), (call, tuple(h.shape)))
        return h

    @staticmethod
    def _keep(prepared: dict, key: tuple, value) -> None:
        if len(prepared) >= MAX_PREPARED:
            prepared.clear()
        prepared[key] = value
