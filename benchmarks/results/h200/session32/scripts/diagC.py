"""Device run C (session 32), diagnosis: why our compiled call costs +22 µs per decoder layer over base's on CUDA
(replay backend, compile_overhead.py --generate) but +3 µs on a CPU. Writes, per row, the guard tree and the
transformed bytecode (TORCH_LOGS=guards,bytecode, set by the caller) of a 1-layer model, and a cProfile of 300 compiled
calls of a 10-layer model (what Python runs around the graph)."""

import cProfile
import io
import os
import pstats
import sys

sys.path.insert(0, "benchmarks")
import compile_overhead as co  # noqa: E402
import torch  # noqa: E402

out = os.environ.get("OUT", "/tmp")
device = sys.argv[1]
for row in ["base", "ours"]:
    print("=== ROW", row, flush=True)
    torch._dynamo.reset()
    model = co.build(row, 10, device)
    inner = model if row == "base" else model.get_base_model()
    from transformers import CompileConfig

    config = CompileConfig(backend=co.replaying_backend, mode=None)
    config._compile_all_devices = True
    prompts = {k: v.to(device) for k, v in co.tiny.random_prompts(len(co.ASSIGNMENT), 5, seed=1).items()}
    kwargs = {
        **prompts,
        "do_sample": False,
        "cache_implementation": "static",
        "compile_config": config,
        "pad_token_id": 0,
        "max_new_tokens": 40,
        "min_new_tokens": 40,
    }
    if row == "ours":
        kwargs["adapter_names"] = co.ASSIGNMENT
    with torch.no_grad():
        model.generate(**kwargs)
    compiled = inner._compiled_call
    captured = []

    def keep(*args, captured=captured, compiled=compiled, **call_kwargs):
        captured.append((args, call_kwargs))
        return compiled(*args, **call_kwargs)

    inner._compiled_call = keep
    with torch.no_grad():
        model.generate(**kwargs)
    args, call_kwargs = captured[5]
    # the context generate ran the calls in: re-enter it for the profiled calls
    context = model._enable_peft_forward_hooks(adapter_names=co.ASSIGNMENT) if row == "ours" else torch.no_grad()
    with torch.no_grad(), context:
        for _ in range(50):
            compiled(*args, **call_kwargs)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(300):
            compiled(*args, **call_kwargs)
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
    with open(f"{out}/cprofile_{row}_{device}.txt", "w") as handle:
        handle.write(text.getvalue())
    print(text.getvalue()[:3000], flush=True)
