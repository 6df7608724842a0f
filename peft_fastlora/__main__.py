"""``python -m peft_fastlora demo``: a mixed-adapter batch on a tiny model, checked against plain PEFT.

It builds a small Llama-shaped model from a config (no download), creates three LoRA adapters of different ranks,
saves them and loads them back as a user would, generates greedily for one batch whose rows use different
adapters (one row uses none), and compares the patched result with unpatched PEFT's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import patch_model, tiny

DEMO_ADAPTERS = {"math": 4, "code": 8, "chat": 16}  # name: rank
DEMO_ROWS = ["math", "code", "__base__", "chat", "code", "math"]


def run_demo(backend: str, architecture: str, max_new_tokens: int, device: str) -> bool:
    """Run the demo and print its report; return True when the patched tokens equal PEFT's."""
    torch.manual_seed(0)
    base = tiny.build_base_model(architecture)
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for seed, (name, rank) in enumerate(DEMO_ADAPTERS.items(), start=1):
            paths[name] = Path(folder) / name
            tiny.save_adapter(base, paths[name], seed=seed, r=rank, lora_alpha=2 * rank)
        model = tiny.load_peft_model(base, paths).to(device)
    batch = {key: value.to(device) for key, value in tiny.random_prompts(len(DEMO_ROWS), 8, seed=0).items()}
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": 0}

    print(f"tiny {architecture} model, adapters {DEMO_ADAPTERS} (name: rank), device {device}")
    with torch.no_grad():
        model.generate(**batch, adapter_names=DEMO_ROWS, **settings)  # warm-up, as for the patched run
        started = time.perf_counter()
        expected = model.generate(**batch, adapter_names=DEMO_ROWS, **settings)
        peft_seconds = time.perf_counter() - started
        patch_model(model, backend=backend)
        model.generate(**batch, adapter_names=DEMO_ROWS, **settings)  # warm-up: packs the adapters
        started = time.perf_counter()
        actual = model.generate(**batch, adapter_names=DEMO_ROWS, **settings)
        fast_seconds = time.perf_counter() - started

    prompt_length = batch["input_ids"].shape[1]
    for row, name in enumerate(DEMO_ROWS):
        print(f"row {row} {name:>8}: {actual[row, prompt_length:].tolist()}")
    matched = torch.equal(actual, expected)
    chosen = type(model.base_model._fastlora_state.backend).__name__
    print(f"plain PEFT mixed batch: {peft_seconds * 1000:.1f} ms; patched ({chosen}): {fast_seconds * 1000:.1f} ms")
    print("matched plain PEFT: all generated tokens equal" if matched else "MISMATCH against plain PEFT")
    return matched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_fastlora", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a mixed-adapter batch on a tiny model and check it against PEFT")
    demo.add_argument("--backend", default="auto", choices=["auto", "triton", "flashinfer", "torch"])
    # OPT is left out: PEFT's own mixed batch, the demo's oracle, cannot run it (tests cover it per adapter).
    demo.add_argument("--architecture", default="llama", choices=["llama", "gpt2", "phi3"])
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    return 0 if run_demo(args.backend, args.architecture, args.max_new_tokens, args.device) else 1


if __name__ == "__main__":
    sys.exit(main())
