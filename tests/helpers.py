"""Test helpers: loading the session's tiny adapters and comparing tensors."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from peft_fastlora import patch_model, tiny

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors runs only through the interpreter"
)
"""For tests that run the Triton backend on CPU tensors: conftest sets the interpreter on machines without a GPU."""


def load(architecture: str, adapter_dirs, names=("a", "b", "c"), dtype=torch.float32):
    """A fresh PeftModel of ``architecture`` with the named adapters loaded from disk."""
    base = tiny.build_base_model(architecture, dtype=dtype)
    return tiny.load_peft_model(base, {name: adapter_dirs[architecture][name] for name in names})


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Max abs difference at most ``rtol`` times the reference's max magnitude, and no NaN anywhere."""
    assert not torch.isnan(actual).any(), "output has NaN"
    scale = expected.abs().max().clamp_min(1e-12)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error <= rtol, f"relative error {error.item():.3g} > {rtol}"


def gpu_test_model(
    dtype: torch.dtype, tmp_path, autocast_adapter_dtype: bool = True, extra: dict | None = None, device="cuda"
) -> tuple:
    """A Llama PeftModel with adapters a/b/c (ranks 8/16/64) loaded from disk, a mixed assignment of 8 rows, and a
    left-padded batch for it, on ``device``: ``(model, names, batch)``.

    fp32 uses the tiny model. bf16/fp16 use a wider one (hidden 1024) initialised with a wider weight spread (0.1,
    not 0.02), so that its logits are not a sea of near-ties at bf16 resolution. ``autocast_adapter_dtype`` is
    PEFT's: True (its default) loads the adapters of a bf16/fp16 model in fp32, False in the model's dtype.
    ``extra`` names more adapters, ``{name: save_adapter keyword arguments}``, saved from the same base model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if dtype == torch.float32:
        config = tiny.tiny_config("llama")
    else:
        config = LlamaConfig(
            hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=tiny.VOCAB_SIZE, pad_token_id=0, max_position_embeddings=256,
            initializer_range=0.1,
        )  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    specs = {name: {"r": rank, "lora_alpha": rank} for name, rank in {"a": 8, "b": 16, "c": 64}.items()}
    specs.update(extra or {})
    for seed, (name, spec) in enumerate(specs.items(), start=1):
        tiny.save_adapter(base, tmp_path / name, **{"seed": seed, **spec})
    paths = {name: tmp_path / name for name in specs}
    model = load_peft(base, paths, autocast_adapter_dtype=autocast_adapter_dtype).to(device)
    names = ["a", "b", "__base__", "c", "b", "a", "c", "c"]
    batch = {key: value.to(device) for key, value in tiny.random_prompts(len(names), 12, seed=5).items()}
    return model, names, batch


def load_peft(base, adapters: dict, autocast_adapter_dtype: bool = True):
    """``tiny.load_peft_model`` with PEFT's ``autocast_adapter_dtype`` exposed: True (PEFT's default) keeps the
    adapters of a bf16/fp16 model in fp32; False keeps them in the model's dtype."""
    from peft import PeftModel

    (first_name, first_path), *rest = adapters.items()
    model = PeftModel.from_pretrained(
        base, first_path, adapter_name=first_name, autocast_adapter_dtype=autocast_adapter_dtype
    )
    for name, path in rest:
        model.load_adapter(path, adapter_name=name, autocast_adapter_dtype=autocast_adapter_dtype)
    return model.eval()


def assert_unpatched(model) -> None:
    """``model`` is plain PEFT: no layer of ours, no patch state."""
    from peft_fastlora.layers import is_fast_layer

    inner = getattr(model, "base_model", model)
    assert "_fastlora_state" not in inner.__dict__, "the model is patched"
    assert not any(is_fast_layer(module) for module in model.modules()), "the model has fast layers"


def fp32_oracle(model):
    """An fp32 copy of an unpatched bf16/fp16 PeftModel: the same (rounded) weights and adapters, computed in fp32,
    so that it differs from the model only by the precision of the computation."""
    assert_unpatched(model)
    return copy.deepcopy(model).to(torch.float32).eval()


def oracle_error(logits: torch.Tensor, oracle: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """``(relative error, argmax agreement)`` of ``logits`` against ``oracle`` over the positions where ``mask``
    (``[batch, length]``, e.g. the attention mask) is set: ‖logits − oracle‖ / ‖oracle‖ (Frobenius norms over
    those positions' logits) and the share of those positions whose argmax equals the oracle's."""
    assert logits.shape == oracle.shape, (logits.shape, oracle.shape)
    assert not torch.isnan(logits).any(), "logits have NaN"
    keep = torch.ones(oracle.shape[:-1], dtype=torch.bool) if mask is None else mask.bool()
    keep = keep.to(oracle.device)
    actual, expected = logits.to(oracle.device).float()[keep], oracle.float()[keep]
    assert expected.shape[0] > 0, "no position to compare"
    error = (actual - expected).norm() / expected.norm().clamp_min(1e-12)
    agreement = (actual.argmax(-1) == expected.argmax(-1)).float().mean()
    return error.item(), agreement.item()


def assert_no_worse_than_peft_logits(
    ours: torch.Tensor, peft: torch.Tensor, oracle: torch.Tensor, mask: torch.Tensor | None = None, label: str = ""
) -> dict:
    """The bf16/fp16 bar (DESIGN §6): against the fp32 ``oracle``, ours' relative error is at most 1.1× PEFT's
    (plus 1e-6 for an oracle that both match exactly) and ours' argmax agreement at least PEFT's − 0.01.
    Returns ``{"ours": (error, agreement), "peft": (error, agreement)}`` and prints it (``pytest -s`` shows it)."""
    stats = {"ours": oracle_error(ours, oracle, mask), "peft": oracle_error(peft, oracle, mask)}
    (our_error, our_agreement), (peft_error, peft_agreement) = stats["ours"], stats["peft"]
    summary = (
        f"{label} vs fp32 oracle: ours error {our_error:.4g} agreement {our_agreement:.4f}; "
        f"PEFT error {peft_error:.4g} agreement {peft_agreement:.4f}"
    )
    print(summary)
    assert our_error <= 1.1 * peft_error + 1e-6, f"error above 1.1x PEFT's: {summary}"
    assert our_agreement >= peft_agreement - 0.01, f"argmax agreement below PEFT's - 0.01: {summary}"
    return stats


@torch.no_grad()
def assert_no_worse_than_peft(model, batch: dict, names: list, backend: str, oracle=None, label: str = "") -> dict:
    """Mixed-batch logits of a bf16/fp16 PeftModel, patched with ``backend``, are no worse than PEFT's own mixed
    batch of the same model, both measured against an fp32 oracle (``fp32_oracle(model)`` unless given).

    ``model`` must be unpatched: PEFT's logits are taken from it first, then it is patched **in place** (so the
    caller gets it back patched). Only positions where ``batch["attention_mask"]`` is set count."""
    assert_unpatched(model)
    oracle = fp32_oracle(model) if oracle is None else oracle
    assert_unpatched(oracle)
    assert next(oracle.parameters()).dtype == torch.float32, "the oracle must be fp32"
    expected = oracle(**batch, adapter_names=names).logits
    peft = model(**batch, adapter_names=names).logits
    assert_unpatched(model)  # PEFT's run above was PEFT's
    patch_model(model, backend=backend)
    ours = model(**batch, adapter_names=names).logits
    label = label or f"{backend} {next(model.parameters()).dtype}"
    return assert_no_worse_than_peft_logits(ours, peft, expected, batch.get("attention_mask"), label)


def oracle_batch(names: list, device, rows: int = 128, length: int = 256) -> tuple[dict, list]:
    """A large left-padded batch for the bf16/fp16 bar, ``(batch, names)``, with ``names`` repeated over ``rows``.

    Large because the bar is statistical: PEFT and ours flip different near-ties, so the difference of their
    disagreement counts grows like √positions while one point of agreement grows like positions; at ~30k positions
    one point is several standard deviations (at ~100 positions one flipped near-tie is a point)."""
    batch = {key: value.to(device) for key, value in tiny.random_prompts(rows, length, seed=11).items()}
    return batch, [names[row % len(names)] for row in range(rows)]


def run_at_once(work, threads: int, rounds: int) -> dict[int, list]:
    """Run ``work(index)`` ``rounds`` times in each of ``threads`` threads released together; return each thread's
    results by index. The first error a thread raised is raised here."""
    import threading

    results: dict[int, list] = {index: [] for index in range(threads)}
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(index: int) -> None:
        try:
            start.wait()
            for _ in range(rounds):
                results[index].append(work(index))
        except BaseException as error:  # reported by the calling thread
            errors.append(error)

    started = [threading.Thread(target=worker, args=(index,)) for index in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(timeout=300)
    if errors:
        raise errors[0]
    return results
