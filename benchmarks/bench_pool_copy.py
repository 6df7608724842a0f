"""How fast can a pool copy adapters in? The pieces of one call's copy-in, three ways, on one GPU.

A pooled adapter of the Llama-3-8B shape (rank 16, all 7 projections, 32 decoder layers) is 352 pieces in the host
storage: per decoder layer the q/k/v and gate/up groups' lora_A rows, o's and down's lora_A rows, and the seven
lora_B blocks (84 MB in bf16). A call copies ~16 adapters (session 28's Zipf batches: 14-22).

Variants, each timed on the GPU (CUDA events) and on the host (``perf_counter`` around the enqueue), medians of
``--repeats``:

- ``dma_pieces``: ``torch._foreach_copy_`` from the page-locked host tensors (one host-to-device DMA per piece: the
  pool's path before zero-copy);
- ``zero_copy``: ``torch._foreach_copy_`` from CUDA views of the same host memory (``host_memory.device_view``):
  fused copy kernels that read the host memory over PCIe;
- ``dma_one``: one host-to-device copy of all the bytes at once (the link's floor for this size).

    python benchmarks/bench_pool_copy.py --adapters 16 --out pool_copy.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from peft_fastlora.host_memory import device_view, host_empty

HIDDEN, INTERMEDIATE, KV, LAYERS = 4096, 14336, 1024, 32


def piece_shapes(rank: int) -> list[tuple[int, int]]:
    """The pieces of one adapter, in copy order: (rows, columns) of each lora_A row block and lora_B block."""
    a_blocks = [(3 * rank, HIDDEN), (2 * rank, HIDDEN), (rank, HIDDEN), (rank, INTERMEDIATE)]
    b_blocks = [(out, rank) for out in (HIDDEN, KV, KV, HIDDEN, INTERMEDIATE, INTERMEDIATE, HIDDEN)]
    return (a_blocks + b_blocks) * LAYERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=16, help="adapters copied in one call")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="pool_copy.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    shapes = piece_shapes(args.rank) * args.adapters
    numel = sum(rows * cols for rows, cols in shapes)
    host = host_empty(numel, torch.bfloat16, pin=True)
    host.copy_(torch.randn(numel, dtype=torch.bfloat16))
    view = device_view(host, device)
    if view is None:
        raise SystemExit("device_view: this GPU cannot address the page-locked host memory")
    sources, views, targets = [], [], []
    start = 0
    for rows, cols in shapes:
        sources.append(host[start : start + rows * cols].view(rows, cols))
        views.append(view[start : start + rows * cols].view(rows, cols))
        targets.append(torch.empty(rows, cols, dtype=torch.bfloat16, device=device))
        start += rows * cols
    whole = torch.empty(numel, dtype=torch.bfloat16, device=device)
    variants = {
        "dma_pieces": lambda: torch._foreach_copy_(targets, sources, non_blocking=True),
        "zero_copy": lambda: torch._foreach_copy_(targets, views),
        "dma_one": lambda: whole.copy_(host, non_blocking=True),
    }
    checks = {}
    for name, run in variants.items():
        for target in targets:
            target.fill_(float("nan"))
        whole.fill_(float("nan"))
        run()
        torch.cuda.synchronize()
        if name == "dma_one":
            checks[name] = bool(torch.equal(whole.cpu(), host))
        else:
            checks[name] = all(torch.equal(t.cpu(), s) for t, s in zip(targets[:50], sources[:50], strict=True))
    samples: dict[str, dict[str, list[float]]] = {name: {"gpu_ms": [], "host_ms": []} for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():  # interleaved
            torch.cuda.synchronize()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            started = time.perf_counter()
            run()
            host_ms = (time.perf_counter() - started) * 1000
            end.record()
            end.synchronize()
            samples[name]["gpu_ms"].append(begin.elapsed_time(end))
            samples[name]["host_ms"].append(host_ms)
    gigabytes = numel * 2 / 1e9
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "adapters": args.adapters,
        "pieces": len(shapes),
        "gigabytes": gigabytes,
        "equal": checks,
        "variants": {},
    }
    print(f"{args.adapters} adapters, {len(shapes)} pieces, {gigabytes:.3f} GB ({torch.cuda.get_device_name()})")
    print(f"{'variant':<12} {'GPU ms':>8} {'host ms':>8} {'GB/s':>7}  equal")
    for name, sample in samples.items():
        gpu_ms, host_ms = statistics.median(sample["gpu_ms"]), statistics.median(sample["host_ms"])
        result["variants"][name] = {"gpu_ms": gpu_ms, "host_ms": host_ms, "gb_per_s": gigabytes / gpu_ms * 1000}
        result["variants"][name].update(samples=sample)
        print(f"{name:<12} {gpu_ms:8.2f} {host_ms:8.2f} {gigabytes / gpu_ms * 1000:7.1f}  {checks[name]}")
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
