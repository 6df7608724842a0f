"""The Triton kernels against the per-token torch reference (and the torch backend), on CPU through
``TRITON_INTERPRET=1`` (set in conftest) in fp32 and fp16, and on a GPU at real sizes in bf16 and fp16."""

from __future__ import annotations

import pytest
import torch
from helpers import interpreted

from peft_fastlora.backends.torch_ref import TorchBackend
from peft_fastlora.backends.triton import TritonBackend
from peft_fastlora.bank import BASE_SLOT, pack
from peft_fastlora.kernels.reference import lora_delta_reference
from peft_fastlora.plan import BatchPlan

RANKS = [4, 8, 16, 64]


def random_packed(ranks, k, n, dtype, device, absent=()):
    """Packed adapters of the given ranks (slots in order), without padding; slots in ``absent`` have rank 0. Each
    slot gets its own scaling, so a kernel that ignores or mixes up the scales fails."""
    adapters = {
        slot: (torch.randn(rank, k) / k**0.5, torch.randn(n, rank) / 4, 0.5 + slot)
        for slot, rank in enumerate(ranks)
        if slot not in absent
    }
    return pack([adapters], len(ranks), k, [n], dtype, device)[0]


def adapters_of(packed):
    """Per slot ``(A, B, scale)`` or None: the reference's view of a packing."""
    return [packed.adapter(slot) for slot in range(len(packed.ranks))]


def assignment(popularity, rows, num_adapters, generator):
    """Row → slot under one popularity law (``BASE_SLOT`` is a row with no adapter)."""
    if popularity == "identical":
        return [1] * rows
    if popularity == "distinct":
        return [row % num_adapters for row in range(rows)]
    if popularity == "all_base":
        return [BASE_SLOT] * rows
    if popularity == "uniform":
        weights = torch.ones(num_adapters + 1)
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, num_adapters + 2, dtype=torch.float)
    elif popularity == "skewed":
        weights = torch.tensor([0.05] + [0.9] + [0.05 / (num_adapters - 1)] * (num_adapters - 1))
    else:
        raise ValueError(popularity)
    draws = torch.multinomial(weights, rows, replacement=True, generator=generator)
    return [int(d) - 1 for d in draws]  # draw 0 is a base row


def check(
    rows, tokens_per_row, popularity, dtype, device, k=72, n=136, ranks=RANKS, absent=(), flatten=False, backends=None
) -> float:
    """``add_lora`` of each backend (Triton and torch unless given) against the per-token fp32 reference; base rows
    (and rows of adapters the layer lacks) untouched bit for bit. Returns the largest relative error."""
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    slots = assignment(popularity, rows, len(ranks), generator)
    packed = random_packed(ranks, k, n, dtype, device, absent)
    plan = BatchPlan(device)
    plan.fill(slots)
    shape = (rows * tokens_per_row,) if flatten else (rows, tokens_per_row)
    x = torch.randn(*shape, k, device=device).to(dtype)
    y = torch.randn(*shape, n, device=device).to(dtype)
    # A layer of the step with a sequence dimension tells the plan S, so a flattened [B*S, k] input reads per token.
    plan.view(rows, flattened=False, tokens_per_row=tokens_per_row)
    view = plan.view(x.shape[0], flattened=x.dim() == 2)
    token_slots = [slot for slot in slots for _ in range(tokens_per_row)]
    expected = lora_delta_reference(y.reshape(-1, n), x.reshape(-1, k), adapters_of(packed), token_slots)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    base_rows = torch.tensor([slot == BASE_SLOT or slot in absent for slot in token_slots], device=device)
    errors = []
    for backend in backends or (TritonBackend(), TorchBackend()):
        result = y.clone()
        backend.add_lora(result, x, packed, view)
        assert not torch.isnan(result).any()
        error = (result.reshape(-1, n).float() - expected.float()).abs().max() / expected.float().abs().max()
        assert error <= tolerance, f"{backend.name}: relative error {error.item():.3g}"
        assert torch.equal(result.reshape(-1, n)[base_rows], y.reshape(-1, n)[base_rows])  # untouched, bit for bit
        errors.append(error.item())
    return max(errors)


POPULARITIES = ["identical", "distinct", "uniform", "zipf", "skewed", "all_base"]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_decode_interpreted(rows, popularity, dtype):
    check(rows, 1, popularity, dtype, "cpu")


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("popularity", ["uniform", "zipf"])
def test_many_tokens_interpreted(popularity, dtype):
    check(257, 1, popularity, dtype, "cpu", k=40, n=24, ranks=[4, 16])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_interpreted(dtype):
    check(3, 19, "distinct", dtype, "cpu", ranks=[8, 64, 4])


@interpreted
def test_flattened_tokens_interpreted():
    check(4, 5, "uniform", torch.float32, "cpu", flatten=True)


@interpreted
def test_single_adapter_and_absent_adapter_interpreted():
    check(5, 2, "identical", torch.float32, "cpu", ranks=[16, 8])
    check(7, 1, "distinct", torch.float32, "cpu", ranks=[1, 3, 128])  # the smallest rank, and one above 64
    check(6, 1, "distinct", torch.float32, "cpu", ranks=[16, 8, 4], absent=(1,))


def test_fake_ops_trace_without_running():
    """The custom ops have fake implementations: tracing with FakeTensors runs no kernel and gets h's shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y, x = torch.empty(6, 8), torch.empty(6, 4)
        rows, slots, starts, lens, count = [torch.empty(2, dtype=torch.int32) for _ in range(5)]
        plan = (rows, slots, starts, lens, count, 1)
        key = 0  # registered to no storage: a fake implementation never looks it up
        h = torch.ops.peft_fastlora.keyed_shrink(x, *plan, key, 2, 3)
        assert h.shape[1:] == (6, 16) and h.dtype == torch.float32
        torch.ops.peft_fastlora.keyed_expand_(y, h, *plan, key, False, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("popularity", ["identical", "distinct", "uniform", "zipf", "skewed", "all_base"])
@pytest.mark.parametrize("rows", [1, 3, 32, 257])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 14336), (14336, 4096)])
def test_real_sizes_gpu(rows, popularity, dtype, k, n):
    check(rows, 1, popularity, dtype, "cuda", k=k, n=n)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_gpu(dtype):
    check(8, 512, "distinct", dtype, "cuda", k=4096, n=4096, ranks=[16, 64, 8, 128])


@pytest.mark.gpu
def test_cuda_graph_replays_any_assignment():
    """Launches depend only on the batch size: a graph captured for one assignment of adapters to rows replays
    correctly after the plan is refilled with any other (all-__base__ included), with no re-capture."""
    rows, k, n, dtype = 32, 4096, 4096, torch.bfloat16
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    packed = random_packed(RANKS, k, n, dtype, "cuda")
    plan = BatchPlan("cuda")
    plan.fill(assignment("uniform", rows, len(RANKS), generator))
    view = plan.view(rows, flattened=False)
    x = torch.randn(rows, 1, k, device="cuda").to(dtype)
    y0 = torch.randn(rows, 1, n, device="cuda").to(dtype)
    y = y0.clone()
    backend = TritonBackend()

    def step():
        y.copy_(y0)
        backend.add_lora(y, x, packed, view)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for popularity in ("distinct", "zipf", "all_base", "identical", "skewed"):
        slots = assignment(popularity, rows, len(RANKS), generator)
        plan.fill(slots)
        assert plan.view(rows, flattened=False).segments[0].data_ptr() == view.segments[0].data_ptr()
        graph.replay()
        expected = lora_delta_reference(y0.view(rows, n), x.view(rows, k), adapters_of(packed), slots)
        error = (y.view(rows, n).float() - expected.float()).abs().max() / expected.float().abs().max()
        assert error <= 2e-2, (popularity, error.item())


def test_a_plan_with_beams_reuses_its_buffers():
    """Calls with beam search (rows expanded) refill the same buffers, the unexpanded rows' plan included, so a
    captured graph keeps reading them and nothing is allocated per call."""
    plan = BatchPlan("cpu")
    plan.fill([0, BASE_SLOT, 1], expand=2)
    buffers = plan.view(6, flattened=False).row_slots.data_ptr(), plan.view(3, flattened=False).row_slots.data_ptr()
    plan.fill([1, 0, 0], expand=2)
    assert plan.view(3, flattened=False).row_slots.tolist() == [1, 0, 0]
    assert plan.view(6, flattened=False).row_slots.tolist() == [1, 1, 0, 0, 0, 0]
    again = plan.view(6, flattened=False).row_slots.data_ptr(), plan.view(3, flattened=False).row_slots.data_ptr()
    assert again == buffers
