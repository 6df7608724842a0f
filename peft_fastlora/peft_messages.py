"""PEFT's own error messages, word for word.

A user switching from plain PEFT to a patched model must see the same errors for the same mistakes, so every
message PEFT has for mixed-adapter batches is reproduced here once (from ``peft/tuners/lora/layer.py`` and
``peft/tuners/lora/model.py``, PEFT 0.21) and raised from one place.

Where PEFT's text alone does not tell the user what to do, a hint goes below it as a Python exception note
(``BaseException.add_note``, shown under the message in a traceback): ``str(error)`` stays PEFT's, word for word.
"""

from __future__ import annotations

BASE_ADAPTER_NAME = "__base__"
"""The name PEFT gives a row that gets no LoRA at all."""


def length_mismatch(num_names: int, num_inputs: int) -> ValueError:
    """PEFT's error for an ``adapter_names`` list whose length differs from the batch size."""
    return ValueError(
        "Length of `adapter_names` should be the same as the number of inputs, but got "
        f"{num_names} and {num_inputs} respectively."
    )


def merged_adapters() -> ValueError:
    """PEFT's error for ``adapter_names`` while an adapter is merged into the base weights."""
    return ValueError(
        "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
    )


def dora_enabled() -> ValueError:
    """PEFT's error for ``adapter_names`` that name a DoRA adapter."""
    return ValueError("Cannot pass `adapter_names` when DoRA is enabled.")


def training_mode() -> ValueError:
    """PEFT's error for ``adapter_names`` while the model is in training mode, with a hint below it."""
    error = ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    return with_note(error, "peft_fastlora: call model.eval() before a mixed-adapter batch.")


def unknown_adapters(names: set[str], loaded: set[str] | None = None) -> ValueError:
    """PEFT's error for adapter names that no LoRA layer of the model holds, with a hint below it naming the
    ``loaded`` adapters and ``"__base__"``."""
    error = ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(names))}")
    if loaded is not None:
        available = ", ".join(repr(name) for name in sorted(loaded)) or "none"
        with_note(
            error,
            f"peft_fastlora: the loaded adapters are {available}; use {BASE_ADAPTER_NAME!r} for a row that gets "
            "no adapter.",
        )
    return error


def with_note(error: BaseException, note: str) -> BaseException:
    """Add ``note`` below ``error``'s message (``add_note``, Python 3.11+; on 3.10 it is kept in ``__notes__``,
    which tracebacks there do not show). Returns ``error``."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # Python 3.10
        error.__notes__ = [*getattr(error, "__notes__", []), note]
    return error


def not_a_list(adapter_names: object) -> TypeError:
    """PEFT's error for ``adapter_names`` that is not a list of strings."""
    return TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")


def empty_batch() -> ValueError:
    """Ours (PEFT has none: an empty batch fails deep inside the model with a reshape error)."""
    return ValueError(
        "peft_fastlora: the batch is empty (0 rows), so there is nothing to run; pass at least one row and one "
        "adapter name per row."
    )
