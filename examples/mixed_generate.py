"""Generate for a batch whose rows use different LoRA adapters, with peft_fastlora.

Usage::

    python examples/mixed_generate.py BASE_MODEL_DIR NAME=ADAPTER_DIR [NAME=ADAPTER_DIR ...] --prompts prompts.tsv

``prompts.tsv`` has one row per line: an adapter name (or ``__base__`` for no adapter), a tab, the prompt text.
The whole file is one batch; the script prints each row's completion.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_fastlora import patch_model
from peft_fastlora.backends import BACKEND_NAMES


class InputError(ValueError):
    """A mistake in the command line or the prompts file, reported as one line with exit status 2."""


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """Return ``{name: folder}`` from ``NAME=FOLDER`` arguments, refusing malformed or repeated names."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise InputError(f"adapter {spec!r} must be NAME=FOLDER (a name, '=', a saved adapter's folder)")
        if name == "__base__":
            raise InputError("'__base__' is the name for no adapter; give your adapter another name")
        if name in adapters:
            raise InputError(f"adapter name {name!r} is given twice")
        if not os.path.isdir(folder):
            raise InputError(f"adapter {name!r}: folder {folder!r} does not exist")
        adapters[name] = folder
    return adapters


def read_prompts(path: str, known: set[str] | None = None) -> tuple[list[str], list[str]]:
    """Return (adapter names, prompts) from a tab-separated file, skipping blank lines. With ``known``, refuse a
    name that is neither one of them nor ``__base__``."""
    names, prompts = [], []
    try:
        handle = open(path, encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read the prompts file {path!r}: {error.strerror}") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            name, tab, prompt = line.rstrip("\n").partition("\t")
            if not tab:
                raise InputError(
                    f"{path}, line {number}: expected an adapter name, a tab, then the prompt (no tab found; "
                    "spaces do not separate the name)"
                )
            if known is not None and name not in known | {"__base__"}:
                choices = ", ".join(sorted(known))
                raise InputError(f"{path}, line {number}: unknown adapter {name!r} (loaded: {choices}; or __base__)")
            names.append(name)
            prompts.append(prompt)
    if not names:
        raise InputError(f"{path}: no prompts (one line per row: adapter name, a tab, the prompt)")
    return names, prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate for a batch whose rows use different LoRA adapters, with peft_fastlora."
    )
    parser.add_argument("base_model", help="folder of a transformers causal LM (with its tokenizer)")
    parser.add_argument("adapters", nargs="+", help="NAME=FOLDER of a saved PEFT LoRA adapter (one or more)")
    parser.add_argument(
        "--prompts", required=True, help="file with one row per line: adapter name (or __base__), a tab, the prompt"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate per row (default: 16)")
    parser.add_argument(
        "--backend", default="auto", choices=list(BACKEND_NAMES), help="peft_fastlora backend (default: auto)"
    )
    args = parser.parse_args(argv)
    try:
        adapters = parse_adapters(args.adapters)
        names, prompts = read_prompts(args.prompts, set(adapters))
    except InputError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.base_model, padding_side="left")
    if tokenizer.pad_token is None:  # many causal LMs (Llama) ship without one; padding needs it
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=dtype).to(device)

    (first_name, first_folder), *rest = adapters.items()
    model = PeftModel.from_pretrained(base, first_folder, adapter_name=first_name)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name)
    model.eval()
    patch_model(model, backend=args.backend)

    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        output = model.generate(
            **batch,
            adapter_names=names,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    completions = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    for row, (name, prompt, completion) in enumerate(zip(names, prompts, completions, strict=True)):
        print(f"[{row}] {name}: {prompt!r} -> {completion!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
