"""One LoRA layer's shrink+expand on the GPU: torch backend vs Triton (and FlashInfer where installed), against
the HBM floor.

For each case it builds packed bf16 adapters and a plan with the tokens' adapters assigned round-robin, then
times ``backend.add_lora`` two ways:

- wall: ``triton.testing.do_bench`` of the eager call (includes Python and launch cost);
- graph: ``do_bench`` of a CUDA-graph replay of the same call (device time without the host), what CUDA-graph
  decode pays. FlashInfer's graph replays the one assignment it was captured with (its wrapper takes the segment
  count from the host), which is all this benchmark replays; it is its device time, not a graph a model could reuse.

The floor is the bytes that must move (x, y read and written, the distinct adapters' A and B) divided by the
copy bandwidth measured in the same run. Prefill is also compared with a dense single-adapter
``x @ Aᵀ @ Bᵀ`` of the same shape done by torch.

    python benchmarks/bench_kernels.py --out results/kernels.json
    python benchmarks/bench_kernels.py --tokens 1,32,512 --ranks 16 --adapters 8 --out kernels_fi.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time

import torch
import triton

from peft_fastlora.backends.torch_ref import TorchBackend
from peft_fastlora.backends.triton import TritonBackend
from peft_fastlora.bank import PackedLora, pack
from peft_fastlora.plan import BatchPlan

DTYPE = torch.bfloat16
BYTES = 2


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    source = torch.empty(2**29, dtype=DTYPE, device="cuda")
    target = torch.empty_like(source)
    milliseconds = triton.testing.do_bench(lambda: target.copy_(source), rep=200)
    return 2 * source.numel() * BYTES / (milliseconds * 1e-3)


def packed_adapters(num_adapters: int, rank: int, k: int, n: int) -> PackedLora:
    adapters = {
        slot: (torch.randn(rank, k, device="cuda") / k**0.5, torch.randn(n, rank, device="cuda") / rank, 2.0)
        for slot in range(num_adapters)
    }
    return pack([adapters], num_adapters, k, [n], DTYPE, "cuda")[0]


def graph_time(function) -> float:
    """Median milliseconds of a CUDA-graph replay of ``function``."""
    function()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    return triton.testing.do_bench(graph.replay, rep=100)


def flashinfer_backends() -> list:
    """The FlashInfer backend where it is installed and runs here, else nothing (its first call JIT-compiles)."""
    if importlib.util.find_spec("flashinfer") is None:
        return []
    from peft_fastlora.backends.flashinfer import FlashInferBackend

    return [FlashInferBackend()]


def first_call_seconds(backend) -> float:
    """Seconds of the backend's first ``add_lora`` (decode, 8 adapters, rank 16, 4096×4096), synchronized."""
    packed = packed_adapters(8, 16, 4096, 4096)
    plan = BatchPlan("cuda")
    plan.fill(list(range(8)))
    x = torch.randn(8, 1, 4096, device="cuda", dtype=DTYPE)
    y = torch.randn(8, 1, 4096, device="cuda", dtype=DTYPE)
    torch.cuda.synchronize()
    start = time.perf_counter()
    backend.add_lora(y, x, packed, plan.view(8, flattened=False))
    torch.cuda.synchronize()
    return time.perf_counter() - start


def try_graph_time(function) -> float | None:
    try:
        return graph_time(function)
    except Exception as error:  # a capture FlashInfer's wrapper refuses: report it, keep the other numbers
        print(f"graph capture failed: {type(error).__name__}: {str(error)[:200]}")
        torch.cuda.synchronize()
        return None


def run_case(
    rows: int, tokens_per_row: int, num_adapters: int, rank: int, k: int, n: int, bandwidth: float, extra=()
) -> dict:
    packed = packed_adapters(num_adapters, rank, k, n)
    plan = BatchPlan("cuda")
    plan.fill([row % num_adapters for row in range(rows)])
    view = plan.view(rows, flattened=False)
    x = torch.randn(rows, tokens_per_row, k, device="cuda", dtype=DTYPE)
    y = torch.randn(rows, tokens_per_row, n, device="cuda", dtype=DTYPE)
    tokens = rows * tokens_per_row
    distinct = min(num_adapters, rows)
    floor_bytes = BYTES * (tokens * k + 2 * tokens * n + distinct * rank * (k + n))
    floor_us = floor_bytes / bandwidth * 1e6
    result = {
        "rows": rows, "tokens_per_row": tokens_per_row, "adapters": num_adapters, "rank": rank, "k": k, "n": n,
        "floor_us": floor_us,
    }  # fmt: skip
    for backend in (TorchBackend(), TritonBackend(), *extra):
        call = lambda backend=backend: backend.add_lora(y, x, packed, view)  # noqa: E731
        result[f"{backend.name}_wall_us"] = triton.testing.do_bench(call, rep=100) * 1e3
        graph_ms = try_graph_time(call)
        result[f"{backend.name}_graph_us"] = None if graph_ms is None else graph_ms * 1e3
    if tokens_per_row > 1:
        a, b, _ = packed.adapter(0)
        dense = lambda: y.view(tokens, n).add_((x.view(tokens, k) @ a.t()) @ b.t())  # noqa: E731
        result["dense_single_adapter_us"] = triton.testing.do_bench(dense, rep=100) * 1e3
    return result


def run_siblings(rows: int, tokens_per_row: int, num_adapters: int, rank: int, k: int, outs: tuple[int, ...]) -> dict:
    """Sibling layers reading one input (q/k/v: 4096 → 4096, 1024, 1024): a shared shrink against one per layer."""
    plan = BatchPlan("cuda")
    plan.fill([row % num_adapters for row in range(rows)])
    view = plan.view(rows, flattened=False)
    x = torch.randn(rows, tokens_per_row, k, device="cuda", dtype=DTYPE)
    ys = [torch.randn(rows, tokens_per_row, n, device="cuda", dtype=DTYPE) for n in outs]
    separate = [packed_adapters(num_adapters, rank, k, n) for n in outs]
    adapters = [{slot: packed.adapter(slot) for slot in range(num_adapters)} for packed in separate]
    adapters = [{slot: (a, b, float(scale)) for slot, (a, b, scale) in member.items()} for member in adapters]
    shared = pack(adapters, num_adapters, k, list(outs), DTYPE, "cuda")  # one lora_A storage, one shrink
    backend = TritonBackend()
    packs = separate

    def run_all():
        for packed, y in zip(packs, ys, strict=True):
            backend.add_lora(y, x, packed, view)

    result = {"rows": rows, "tokens_per_row": tokens_per_row, "adapters": num_adapters, "rank": rank, "k": k,
              "outs": list(outs)}  # fmt: skip
    result["separate_wall_us"] = triton.testing.do_bench(run_all, rep=100) * 1e3
    result["separate_graph_us"] = graph_time(run_all) * 1e3
    packs = shared
    result["shared_wall_us"] = triton.testing.do_bench(run_all, rep=100) * 1e3
    result["shared_graph_us"] = graph_time(run_all) * 1e3
    return result


def cases():
    for rank in (16, 64):
        for k, n in ((4096, 4096), (4096, 14336), (14336, 4096)):
            for tokens in (1, 32, 128, 512):
                for adapters in (1, 8, 32):
                    yield tokens, 1, adapters, rank, k, n
    yield 8, 512, 8, 16, 4096, 4096
    yield 8, 512, 8, 64, 4096, 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="kernels.json")
    parser.add_argument("--quick", action="store_true", help="a handful of cases only")
    parser.add_argument("--tokens", help="comma-separated decode token counts to keep (e.g. 1,32,512)")
    parser.add_argument("--ranks", help="comma-separated ranks to keep")
    parser.add_argument("--adapters", help="comma-separated adapter counts to keep")
    parser.add_argument("--no-siblings", action="store_true", help="skip the sibling (shared shrink) table")
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    selected = list(cases())
    if args.quick:
        selected = [case for case in selected if case[0] == 32 and case[3] == 16] + selected[-2:]
    for option, index in ((args.tokens, 0), (args.ranks, 3), (args.adapters, 2)):
        if option:
            keep = {int(value) for value in option.split(",")}
            selected = [case for case in selected if case[1] > 1 or case[index] in keep]
    extra = flashinfer_backends()
    first_call_s = None
    if extra:  # the first call compiles FlashInfer's kernels (or loads them from its cache): timed apart
        first_call_s = first_call_seconds(extra[0])
        print(f"FlashInfer first call (JIT compile or cache load, and the import): {first_call_s:.1f} s")
    results = []
    header = (
        f"{'M':>5} {'S':>4} {'n':>3} {'r':>3} {'K':>6} {'N':>6} | {'floor':>7} | {'torch wall':>10} {'graph':>7} | "
        f"{'triton wall':>11} {'graph':>7} {'×floor':>7} | "
        + (f"{'flashinfer wall':>15} {'graph':>7} {'×floor':>7} | " if extra else "")
        + f"{'dense 1-ad':>10}"
    )
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, times in µs")
    print(header)
    for case in selected:
        result = run_case(*case, bandwidth, extra)
        results.append(result)
        dense = result.get("dense_single_adapter_us")
        dense_text = "-" if dense is None else f"{dense:.1f}"
        flashinfer_text = ""
        if extra:
            graph = result["flashinfer_graph_us"]
            graph_text = f"{'-':>7} {'-':>7}" if graph is None else f"{graph:>7.1f} {graph / result['floor_us']:>7.2f}"
            flashinfer_text = f"{result['flashinfer_wall_us']:>15.1f} {graph_text} | "
        print(
            f"{result['rows']:>5} {result['tokens_per_row']:>4} {result['adapters']:>3} {result['rank']:>3} "
            f"{result['k']:>6} {result['n']:>6} | {result['floor_us']:>7.1f} | {result['torch_wall_us']:>10.1f} "
            f"{result['torch_graph_us']:>7.1f} | {result['triton_wall_us']:>11.1f} {result['triton_graph_us']:>7.1f} "
            f"{result['triton_graph_us'] / result['floor_us']:>7.2f} | {flashinfer_text}{dense_text:>10}",
            flush=True,
        )
    print("siblings (q/k/v 4096 → 4096, 1024, 1024; gate/up 4096 → 14336 ×2): shared shrink vs one per layer, µs")
    print(f"{'M':>5} {'S':>4} {'n':>3} {'r':>3} {'outs':>14} | {'separate wall':>13} {'graph':>7} | "
          f"{'shared wall':>11} {'graph':>7}")  # fmt: skip
    siblings = []
    sibling_cases = ((1, 1, (4096, 1024, 1024)), (32, 1, (4096, 1024, 1024)),
                     (32, 1, (14336, 14336)), (8, 512, (4096, 1024, 1024)))  # fmt: skip
    for rows, tokens_per_row, outs in () if args.no_siblings else sibling_cases:
        result = run_siblings(rows, tokens_per_row, 8, 16, 4096, outs)
        siblings.append(result)
        print(
            f"{rows:>5} {tokens_per_row:>4} {8:>3} {16:>3} {'/'.join(map(str, outs)):>14} | "
            f"{result['separate_wall_us']:>13.1f} {result['separate_graph_us']:>7.1f} | "
            f"{result['shared_wall_us']:>11.1f} {result['shared_graph_us']:>7.1f}"
        )
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "copy_bandwidth_bytes_per_s": bandwidth, "dtype": str(DTYPE),
    }  # fmt: skip
    if extra:
        import flashinfer

        meta.update(flashinfer=flashinfer.__version__, flashinfer_first_case_s=first_call_s,
                    flashinfer_gemm_path=extra[0]._wrapper(torch.device("cuda"))[1])  # fmt: skip
    with open(args.out, "w") as handle:
        json.dump({"meta": meta, "results": results, "siblings": siblings}, handle, indent=1)


if __name__ == "__main__":
    main()
