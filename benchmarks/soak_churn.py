"""Adapter churn soak: many mixed-batch calls on one patched model while adapters are added, deleted and
overwritten between calls, every call checked against an unpatched PEFT twin that sees the same changes.

Shows two things:

- **no stale weights:** every call equals the oracle (fp32 logits at 1e-5 relative, or greedy tokens equal);
- **no growth beyond the adapters actually added:** the bytes held by live tensors grow by exactly what the live
  adapters grew by (the oracle's, and the bank's storage, which the patched model's parameters are views of),
  and the bank holds what a fresh patch would pack.
  RSS (CPU) and CUDA allocated bytes are reported at the start and the end.

    python benchmarks/soak_churn.py --calls 1000 --out soak.json             # CPU, tiny Llama
    python benchmarks/soak_churn.py --calls 1000 --device cuda --backend triton
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model

from peft_fastlora import patch_model, tiny, unpatch_model

TARGETS = [*tiny.TARGET_MODULES["llama"], "embed_tokens", "lm_head"]


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage that Python objects still reference (after a collection)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        try:
            storage = tensor.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        except RuntimeError:  # fake or functional tensors (left by torch.compile) hold no memory
            continue
    return sum(storages.values())


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def adapter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "lora_" in name)


def bank_bytes(model) -> int:
    """Bytes of the bank's storage: each distinct lora_A storage (a sibling group's is shared) and each lora_B."""
    storages = {}
    for layer in model.base_model._fastlora_state.bank.fast_layers:
        packed = layer._fastlora_packed
        for tensor in (packed.a, packed.b):
            storages[tensor.untyped_storage().data_ptr()] = tensor.nbytes
    return sum(storages.values())


class Churn:
    """A patched model and its unpatched twin, changed alike by random add / delete / overwrite operations."""

    def __init__(self, backend: str, device: str, seed: int):
        self.random = random.Random(seed)
        self.device = device
        self.counter = 0
        config = self._config()
        self.model, self.oracle = self._fresh_model(config), self._fresh_model(config)
        self._copy_weights("seed")
        self.add()
        patch_model(self.model, backend=backend)
        self.operations = {"add": 0, "delete": 0, "overwrite": 0}

    def _fresh_model(self, config: LoraConfig):
        base = tiny.build_base_model("llama", seed=0).to(self.device)
        return get_peft_model(base, config, adapter_name="seed").eval()

    def _config(self) -> LoraConfig:
        targets = self.random.sample(TARGETS, self.random.randint(1, len(TARGETS)))
        rank = self.random.choice([1, 4, 8, 16])
        return LoraConfig(
            r=rank, lora_alpha=self.random.choice([4, 16]), target_modules=targets, init_lora_weights=False
        )

    def names(self) -> list[str]:
        return sorted(self.model.peft_config)

    def add(self) -> None:
        name, config = f"n{self.counter}", self._config()
        self.counter += 1
        for model in (self.model, self.oracle):
            model.add_adapter(name, config)
        self._copy_weights(name)

    def delete(self) -> None:
        victim = self.random.choice(self.names())
        for model in (self.model, self.oracle):
            if model.active_adapter == victim:
                model.set_adapter(next(name for name in self.names() if name != victim))
            model.delete_adapter(victim)

    def overwrite(self) -> None:
        """Rewrite one adapter's lora_B the ways users and loaders do: in place (``copy_``), through ``.data``
        (which autograd's version counter does not see), through a NumPy view (CPU), or by swapping the storage
        (``.data =``)."""
        name = self.random.choice(self.names())
        how = self.random.choice(
            ["copy_", "data_copy_", "data_mul_", "numpy" if self.device == "cpu" else "copy_", "swap"]
        )
        with torch.no_grad():
            for key, parameter in self.model.named_parameters():
                if f".{name}." in key and "lora_B" in key:
                    fresh = torch.randn_like(parameter) * 0.1
                    if how == "copy_":
                        parameter.copy_(fresh)
                    elif how == "data_copy_":
                        parameter.data.copy_(fresh)
                    elif how == "data_mul_":
                        parameter.data.mul_(3)
                    elif how == "numpy":
                        parameter.detach().numpy()[...] = fresh.numpy()
                    else:
                        parameter.data = fresh
        self._copy_weights(name)

    def _copy_weights(self, name: str) -> None:
        """Give the oracle the model's weights of adapter ``name`` (PEFT randomised them separately)."""
        source = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, parameter in self.oracle.named_parameters():
                if f".{name}." in key or key.endswith(f".{name}"):
                    parameter.copy_(source[key])

    def step(self) -> str:
        names = self.names()
        choices = ["overwrite"] + (["add"] if len(names) < 8 else []) + (["delete"] if len(names) > 1 else [])
        operation = self.random.choice(choices)
        getattr(self, operation)()
        self.operations[operation] += 1
        return operation

    def check_call(self, index: int, generate: bool) -> None:
        names = self.names() + ["__base__"]
        rows = [self.random.choice(names) for _ in range(self.random.randint(1, 6))]
        batch = tiny.random_prompts(len(rows), self.random.randint(2, 8), seed=index + 1)
        batch = {key: value.to(self.device) for key, value in batch.items()}
        with torch.no_grad():
            if generate:
                kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
                actual = self.model.generate(**batch, adapter_names=rows, **kwargs)
                expected = self.oracle.generate(**batch, adapter_names=rows, **kwargs)
                if not torch.equal(actual, expected):
                    raise AssertionError(f"call {index}: generated tokens differ for {rows}")
            else:
                actual = self.model(**batch, adapter_names=rows).logits
                expected = self.oracle(**batch, adapter_names=rows).logits
                error = ((actual - expected).abs().max() / expected.abs().max()).item()
                if not error <= 1e-5:
                    raise AssertionError(f"call {index}: relative logit error {error:.3g} for {rows}")


def soak(calls: int, backend: str = "torch", device: str = "cpu", seed: int = 0, generate_every: int = 1) -> dict:
    """Run ``calls`` checked calls with one churn operation before each; return the report (raises on a mismatch)."""
    churn = Churn(backend, device, seed)
    churn.check_call(-1, generate=False)  # the bank is packed before the first measurement
    start = {
        "live_tensor_bytes": live_tensor_bytes(), "adapter_bytes": adapter_bytes(churn.model),
        "bank_bytes": bank_bytes(churn.model), "rss": rss_bytes(),
        "cuda_allocated": torch.cuda.memory_allocated() if device == "cuda" else None,
    }  # fmt: skip
    started = time.perf_counter()
    for index in range(calls):
        churn.step()
        churn.check_call(index, generate=index % generate_every == 0)
    end = {
        "live_tensor_bytes": live_tensor_bytes(), "adapter_bytes": adapter_bytes(churn.model),
        "bank_bytes": bank_bytes(churn.model), "rss": rss_bytes(),
        "cuda_allocated": torch.cuda.memory_allocated() if device == "cuda" else None,
    }  # fmt: skip
    unpatch_model(churn.model)
    patch_model(churn.model, backend=backend)
    churn.check_call(calls, generate=False)
    fresh_bank_bytes = bank_bytes(churn.model)
    # The oracle holds its adapters; the model's adapters are views of the bank's storage (one copy). Anything else
    # that grew is a leak.
    explained = end["adapter_bytes"] - start["adapter_bytes"] + end["bank_bytes"] - start["bank_bytes"]
    return {
        "calls": calls, "backend": backend, "device": device, "operations": churn.operations,
        "live_adapters_end": len(churn.names()), "seconds": time.perf_counter() - started,
        "start": start, "end": end, "fresh_bank_bytes": fresh_bank_bytes,
        "unexplained_growth_bytes": end["live_tensor_bytes"] - start["live_tensor_bytes"] - explained,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generate-every", type=int, default=1, help="every n-th call is a generate (else forward)")
    parser.add_argument("--out", default="soak.json")
    args = parser.parse_args()
    report = soak(args.calls, args.backend, args.device, args.seed, args.generate_every)
    print(json.dumps(report, indent=1))
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
