"""Host time of one LoRA layer's mixed-batch delta in eager mode: what Python and the launches cost per call.

Times ``TritonBackend.add_lora`` on a decode-sized input (batch 32, one token, 4096 → 4096, 8 rank-16 adapters)
with no sync between calls, so the GPU work (a few µs) hides behind the host and the wall time per call is the host
cost; beside it, one bare Triton launch of each kernel and a plain ``torch.mm`` of the same output size.

    python benchmarks/host_overhead.py
"""

from __future__ import annotations

import time

import torch

from peft_fastlora.backends.triton import TritonBackend
from peft_fastlora.bank import PackedLora
from peft_fastlora.kernels import launch
from peft_fastlora.plan import BatchPlan


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    rows, k, n, ranks = 32, 4096, 4096, [16] * 8
    offsets = [16 * slot for slot in range(8)]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int32, device="cuda")  # noqa: E731
    a = torch.randn(128, k, device="cuda", dtype=torch.bfloat16)
    b_t = torch.randn(128, n, device="cuda", dtype=torch.bfloat16)
    packed = PackedLora(a, b_t, offsets, ranks, as_tensor(offsets), as_tensor(ranks))
    plan = BatchPlan("cuda")
    plan.fill([row % 8 for row in range(rows)])
    view = plan.view(rows, flattened=False)
    x = torch.randn(rows, 1, k, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(rows, 1, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    backend = TritonBackend()
    plan_args = (*view.segments, 1)
    h = launch.launch_shrink(x.view(rows, k), a, packed.offsets_dev, packed.ranks_dev, *plan_args, 16)
    results = {
        "add_lora (shrink + expand, with Python)": per_call_us(lambda: backend.add_lora(y, x, packed, view)),
        "launch_shrink": per_call_us(
            lambda: launch.launch_shrink(x.view(rows, k), a, packed.offsets_dev, packed.ranks_dev, *plan_args, 16)
        ),
        "launch_expand": per_call_us(
            lambda: launch.launch_expand(
                y.view(rows, n), h, None, b_t, packed.offsets_dev, packed.ranks_dev, *plan_args, 16
            )
        ),
        "plan.view": per_call_us(lambda: plan.view(rows, flattened=False, device=x.device)),
        "torch.nn.functional.linear (base layer)": per_call_us(lambda: torch.nn.functional.linear(x, w)),
        "torch.empty (scratch)": per_call_us(lambda: torch.empty(2, rows, 16, device="cuda")),
    }
    for name, value in results.items():
        print(f"{name:>45}: {value:7.1f} µs per call")


if __name__ == "__main__":
    main()
