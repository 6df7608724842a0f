"""``python -m peft_fastlora demo``: a mixed-adapter batch on a tiny model, checked against plain PEFT.

It builds a small Llama-shaped model from a config (no download), creates three LoRA adapters of different ranks,
saves them and loads them back as a user would, generates greedily for one batch whose rows use different
adapters (one row uses none), and compares the patched result with unpatched PEFT's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import patch_info, patch_model, tiny
from .backends import BACKEND_NAMES, get_backend

DEMO_ADAPTERS = {"math": 4, "code": 8, "chat": 16}  # name: rank
DEMO_ROWS = ["math", "code", "__base__", "chat", "code", "math"]


TIMING_REPEATS = 5


def _median_ms(call, device: str, repeats: int = TIMING_REPEATS) -> float:
    """Median wall time of ``repeats`` calls of ``call`` in ms, after one untimed warm-up call."""
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    call()
    synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def run_demo(backend: str, architecture: str, max_new_tokens: int, device: str, timing: bool = True) -> bool:
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

    def generate():
        return model.generate(**batch, adapter_names=DEMO_ROWS, **settings)

    print(f"tiny {architecture} model, adapters {DEMO_ADAPTERS} (name: rank), device {device}")
    with torch.no_grad():
        expected = generate()
        peft_ms = _median_ms(generate, device) if timing else None
        patch_model(model, backend=backend)
        actual = generate()  # the first call packs the adapters
        fast_ms = _median_ms(generate, device) if timing else None

    prompt_length = batch["input_ids"].shape[1]
    for row, name in enumerate(DEMO_ROWS):
        print(f"row {row} {name:>8}: {actual[row, prompt_length:].tolist()}")
    matched = torch.equal(actual, expected)
    print(patch_info(model))
    if timing:
        print(
            f"generate, median of {TIMING_REPEATS} calls after a warm-up: plain PEFT mixed batch {peft_ms:.1f} ms, "
            f"patched {fast_ms:.1f} ms (a tiny model: this measures overhead, not the speed-up on real models)"
        )
    print("matched plain PEFT: all generated tokens equal" if matched else "MISMATCH against plain PEFT")
    return matched


def _setup_error(backend: str, device: str) -> str | None:
    """A user mistake in the options that would otherwise end in a traceback, as one sentence; or None."""
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        return f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)."
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device} was given, but CUDA is not available on this machine (use --device cpu)."
    try:
        if backend != "auto":  # auto always finds one (and warns from patch_model where it falls back)
            get_backend(backend, torch_device)
    except RuntimeError as error:
        return f"--backend {backend}: {str(error).removeprefix('peft_fastlora ')}"
    return None


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line's parser and its ``demo`` subcommand's parser."""
    parser = argparse.ArgumentParser(
        prog="python -m peft_fastlora",
        description="peft_fastlora command line: a demo of a mixed-adapter batch checked against plain PEFT.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run a mixed-adapter batch on a tiny model and check it against PEFT",
        description=(
            "Build a tiny model (Llama by default, see --architecture) from a config (no download), create three "
            "LoRA adapters of ranks 4, 8 and 16, save and load them, generate greedily for one batch whose rows use "
            "different adapters (one row uses none), and check the tokens against unpatched PEFT. Exit status 0 "
            "when they match."
        ),
    )
    demo.add_argument(
        "--backend",
        default="auto",
        choices=list(BACKEND_NAMES),
        help="kernels that add the LoRA deltas: auto picks triton on CUDA when Triton is installed, else torch "
        "(default: %(default)s)",
    )
    # OPT is left out: PEFT's own mixed batch, the demo's oracle, cannot run it (tests cover it per adapter).
    demo.add_argument(
        "--architecture",
        default="llama",
        choices=["llama", "gpt2", "phi3"],
        help="shape of the tiny model built from a config (default: %(default)s)",
    )
    demo.add_argument(
        "--max-new-tokens", type=int, default=8, help="tokens to generate per row (default: %(default)s)"
    )
    demo.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to run on, e.g. cpu or cuda (default here: %(default)s)",
    )
    demo.add_argument(
        "--no-timing",
        dest="timing",
        action="store_false",
        help="skip the timing line (median of 5 generate calls, plain PEFT and patched)",
    )
    return parser, demo


def main(argv: list[str] | None = None) -> int:
    args = build_parser()[0].parse_args(argv)
    problem = _setup_error(args.backend, args.device)
    if problem is None and args.max_new_tokens < 1:
        problem = f"--max-new-tokens must be at least 1, got {args.max_new_tokens}."
    if problem is not None:
        print(f"python -m peft_fastlora demo: error: {problem}", file=sys.stderr)
        return 2
    return 0 if run_demo(args.backend, args.architecture, args.max_new_tokens, args.device, args.timing) else 1


if __name__ == "__main__":
    sys.exit(main())
