"""Tiny models and adapters built from configs, for the demo, the tests, the notebook and the CPU smoke benchmark.

Nothing here downloads anything: the base models are random-initialised from small configs, the adapters are
random (``init_lora_weights=False``), and both are written to disk and read back through transformers' and PEFT's
real loading code.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, Phi3Config, PretrainedConfig

VOCAB_SIZE = 128

ARCHITECTURES = ("llama", "gpt2", "opt", "phi3")

# Per architecture: its LoRA target modules (attention and MLP projections).
TARGET_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


@contextlib.contextmanager
def _quiet_peft_wrap():
    """PEFT 0.21 wraps a model by reading ``model.is_gradient_checkpointing``, which transformers ≥ 5.18 deprecates
    with a FutureWarning on every wrap. It is PEFT's read, not a problem of the demo: hide that one warning here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def tiny_config(architecture: str = "llama") -> PretrainedConfig:
    """A config for a two-layer model of width 64 and vocabulary 128 (a few hundred kB of weights)."""
    common = {"vocab_size": VOCAB_SIZE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if architecture == "llama":
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, **common,
        )  # fmt: skip
    if architecture == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if architecture == "opt":
        return OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
            max_position_embeddings=256, **common,
        )  # fmt: skip
    if architecture == "phi3":
        return Phi3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=256, **common,
        )  # fmt: skip
    raise ValueError(f"Unknown tiny architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}.")


def build_base_model(architecture: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-initialised tiny causal LM, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture), dtype=dtype)
    return model.eval()


def save_base_model(path: str | os.PathLike, architecture: str = "llama", seed: int = 0) -> None:
    """Write a tiny base model to ``path`` with ``save_pretrained``."""
    build_base_model(architecture, seed).save_pretrained(path)


def save_adapter(
    base_model,
    path: str | os.PathLike,
    seed: int,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: list[str] | str | None = None,
    **lora_kwargs,
) -> None:
    """Create a random LoRA adapter for ``base_model`` and write it to ``path`` with ``save_pretrained``.

    ``base_model`` is left untouched (PEFT wraps a copy's modules, so a fresh base is built for the wrapper).
    Extra keyword arguments go to ``LoraConfig`` (e.g. ``use_rslora=True``, ``modules_to_save=[...]``).
    """
    architecture = base_model.config.model_type
    fresh = AutoModelForCausalLM.from_config(base_model.config)
    fresh.load_state_dict(base_model.state_dict())
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules or TARGET_MODULES[architecture],
        init_lora_weights=False,
        **lora_kwargs,
    )
    torch.manual_seed(seed)
    with _quiet_peft_wrap():
        get_peft_model(fresh, config).save_pretrained(path)


def load_peft_model(base_model, adapters: dict[str, str | os.PathLike]) -> PeftModel:
    """Load ``{name: folder}`` adapters onto ``base_model`` the way a user does: ``from_pretrained`` for the first,
    ``load_adapter`` for the rest. Returns the PeftModel in eval mode."""
    (first_name, first_path), *rest = adapters.items()
    with _quiet_peft_wrap():
        model = PeftModel.from_pretrained(base_model, first_path, adapter_name=first_name)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    return model.eval()


def random_prompts(batch_size: int, length: int, seed: int, left_padding: bool = True) -> dict[str, torch.Tensor]:
    """Random token prompts of different lengths, left-padded (as for generation) with an attention mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB_SIZE, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch_size, 2):
        pad = int(torch.randint(1, max(2, length // 2), (1,), generator=generator))
        if left_padding:
            input_ids[row, :pad], attention_mask[row, :pad] = 0, 0
        else:
            input_ids[row, -pad:], attention_mask[row, -pad:] = 0, 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def save_tokenizer(path: str | os.PathLike) -> None:
    """Write a word-level tokenizer over the tiny vocabulary to ``path``: words ``w3`` … ``w127`` are tokens 3 to
    127, so text prompts like ``"w5 w17 w9"`` work with ``AutoTokenizer``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB_SIZE)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    tokenizer.save_pretrained(path)
