"""Generate for a batch whose rows use different LoRA adapters, with peft_fastlora.

Usage::

    python examples/mixed_generate.py BASE_MODEL_DIR NAME=ADAPTER_DIR [NAME=ADAPTER_DIR ...] --prompts prompts.tsv

``prompts.tsv`` has one row per line: an adapter name (or ``__base__`` for no adapter), a tab, the prompt text.
The whole file is one batch; the script prints each row's completion.
"""

from __future__ import annotations

import argparse

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_fastlora import patch_model


def read_prompts(path: str) -> tuple[list[str], list[str]]:
    """Return (adapter names, prompts) from a tab-separated file, skipping blank lines."""
    names, prompts = [], []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                name, prompt = line.rstrip("\n").split("\t", 1)
                names.append(name)
                prompts.append(prompt)
    return names, prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_model", help="folder of a transformers causal LM (with its tokenizer)")
    parser.add_argument("adapters", nargs="+", help="NAME=FOLDER of a saved PEFT LoRA adapter")
    parser.add_argument("--prompts", required=True, help="tab-separated file: adapter name, prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.base_model, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=dtype).to(device)

    (first_name, first_folder), *rest = (spec.split("=", 1) for spec in args.adapters)
    model = PeftModel.from_pretrained(base, first_folder, adapter_name=first_name)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name)
    model.eval()
    patch_model(model, backend=args.backend)

    names, prompts = read_prompts(args.prompts)
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


if __name__ == "__main__":
    main()
