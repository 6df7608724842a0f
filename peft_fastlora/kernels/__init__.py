"""Segmented multi-LoRA kernels (Triton) and the plain torch reference they are tested against."""
