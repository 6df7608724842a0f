"""peft_fastlora: fast mixed-adapter LoRA batches inside plain transformers + PEFT.

>>> patch_model(peft_model)
>>> peft_model.generate(**batch, adapter_names=["a", "b", "__base__", "a"])
"""

from .patch import patch_model, unpatch_model

__version__ = "0.1.0"

__all__ = ["patch_model", "unpatch_model", "__version__"]
