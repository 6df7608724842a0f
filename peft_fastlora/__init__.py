"""peft_fastlora: fast mixed-adapter LoRA batches inside plain transformers + PEFT.

>>> patch_model(peft_model)
>>> peft_model.generate(**batch, adapter_names=["a", "b", "__base__", "a"])
>>> print(patch_info(peft_model))  # which backend serves it, and why
"""

from .info import PatchInfo, patch_info
from .patch import patch_model, unpatch_model

__version__ = "0.1.0"

__all__ = ["patch_model", "unpatch_model", "patch_info", "PatchInfo", "__version__"]
