"""DoRA rows in mixed batches: PEFT's DoRA forward as a per-row rescale of the plain LoRA result.

PEFT's DoRA output for one adapter (eval mode, ``variants.DoraLinearVariant``) is::

    y = base + (g - 1) * (base - bias) + g * scaling * B A x,    g = magnitude / ||W + scaling * B A||_row

which is ``y = bias + g * (base + scaling * B A x - bias)``: the plain LoRA result, rescaled per output feature
around the bias. So DoRA rows go through the same packed shrink/expand as LoRA rows, and a DoRA layer then
rescales the rows whose adapter is a DoRA adapter. ``g`` is computed with PEFT's own weight-norm function once per
call (PEFT computes it on every forward), since any of the weights it depends on may have been edited in place.

PEFT itself refuses ``adapter_names`` with DoRA (``Cannot pass `adapter_names` when DoRA is enabled.``); a patched
model serves DoRA in the Linear layers it packs. DoRA on any other layer (embeddings, other layer types) keeps
PEFT's error: PEFT's own per-layer mixed path for embeddings would ignore the DoRA part silently.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.integrations import dequantize_module_weight


@dataclass
class DoraScales:
    """One layer's DoRA rescale, per slot.

    Attributes
    ----------
    scales : torch.Tensor
        ``[num_slots + 1, out]``, in the adapters' dtype and at least fp32: row ``slot + 1`` holds ``g`` of that
        slot's DoRA adapter; row 0 (base rows) and rows of non-DoRA slots hold ones.
    is_dora : torch.Tensor
        bool ``[num_slots + 1]``, indexed the same way: whether the slot's adapter is a DoRA adapter here.
    bias : torch.Tensor or None
        ``[out]`` in the scales' dtype, the base layer's bias, around which the rescale happens.
    names : tuple[str, ...]
        The DoRA adapters the rows hold (``refresh_dora_scales`` recomputes them).
    """

    scales: torch.Tensor
    is_dora: torch.Tensor
    bias: torch.Tensor | None
    names: tuple[str, ...] = ()


def dora_adapters(layer: LoraLayer) -> set[str]:
    """Names of ``layer``'s DoRA adapters that the packed Linear path serves (``DoraLinearVariant`` exactly: the
    embedding and convolution variants subclass it with other formulas)."""
    return {name for name, variant in getattr(layer, "lora_variant", {}).items() if type(variant) is DoraLinearVariant}


def dora_scales(layer: LoraLayer, slots: dict[str, int], num_slots: int, names: set[str]) -> DoraScales | None:
    """The rescale buffers of the DoRA adapters ``names`` of ``layer``, filled; None if there is none.

    The buffers are made once per packing and rewritten in place by ``refresh_dora_scales`` on every call, so that
    a captured CUDA graph keeps reading them.
    """
    if not names:
        return None
    base_layer = layer.get_base_layer()
    device = base_layer.weight.device
    dtype = functools.reduce(torch.promote_types, (layer.lora_A[name].weight.dtype for name in names), torch.float32)
    scales = torch.ones(num_slots + 1, layer.out_features, dtype=dtype, device=device)
    is_dora = torch.zeros(num_slots + 1, dtype=torch.bool, device=device)
    for name in names:
        is_dora[slots[name] + 1] = True
    bias = getattr(base_layer, "bias", None)
    bias = torch.empty(layer.out_features, dtype=dtype, device=device) if bias is not None else None
    dora = DoraScales(scales=scales, is_dora=is_dora, bias=bias, names=tuple(sorted(names)))
    refresh_dora_scales(layer, slots, dora)
    return dora


@torch.no_grad()
def refresh_dora_scales(
    layer: LoraLayer, slots: dict[str, int], dora: DoraScales, named: set[str] | None = None
) -> None:
    """Recompute ``g = magnitude / ||W + scaling·B·A||`` of each DoRA adapter into ``dora``, in place.

    ``g`` depends on the base weight, A, B, the magnitude and the scaling, any of which may have been edited in
    place since the last call; PEFT recomputes the norm on every forward, the patch on every call, for the adapters
    the call names (``named``; all where None): the rows of the others are not read by it.

    The norm is PEFT's own (``DoraLinearLayer.get_weight_norm``), computed as PEFT's forward does: PEFT casts the
    layer input to the adapter's dtype before the DoRA forward, so base weight and ``B·A`` enter the norm in the
    adapter's dtype (fp32 for the fp32 adapters PEFT loads by default onto a bf16 model; computing it in bf16 costs
    accuracy). The scales are kept in that dtype, at least fp32.
    """
    names = [name for name in dora.names if named is None or name in named]
    if not names:
        return
    base_layer = layer.get_base_layer()
    weight = dequantize_module_weight(base_layer).detach()
    cast = {}  # the base weight in each adapter dtype, cast once
    for name in names:
        magnitude = layer.lora_magnitude_vector[name]
        adapter_dtype = layer.lora_A[name].weight.dtype
        if adapter_dtype not in cast:
            cast[adapter_dtype] = weight.to(adapter_dtype)
        lora_weight = (layer.lora_B[name].weight @ layer.lora_A[name].weight).to(adapter_dtype)
        norm = magnitude.get_weight_norm(
            weight=cast[adapter_dtype], lora_weight=lora_weight, scaling=layer.scaling[name]
        )
        dora.scales[slots[name] + 1] = magnitude.weight / norm
    if dora.bias is not None:
        dora.bias.copy_(base_layer.bias)


def apply_dora(result: torch.Tensor, exact: torch.Tensor, row_slots: torch.Tensor, dora: DoraScales) -> None:
    """Write ``exact`` into ``result``, DoRA rows rescaled: ``bias + g * (exact - bias)``.

    Parameters
    ----------
    result : torch.Tensor
        ``[N, ..., out]``, the layer's output tensor (the base output); overwritten in place.
    exact : torch.Tensor
        ``[N, ..., out]``, base output plus the plain LoRA delta, accumulated in at least fp32 (``dora_dtype``).
        PEFT adds the base output and the DoRA term in the adapter's dtype and rounds to the output dtype once;
        rounding base + delta first and the rescaled value again loses accuracy in bf16.
    row_slots : torch.Tensor
        int32 ``[N]``, each row's slot, -1 for base rows.
    dora : DoraScales
        The layer's per-slot rescale.

    Every row is computed and non-DoRA rows are selected back unchanged, so that nothing depends on the assignment
    of adapters to rows (one compiled graph, one CUDA graph for any assignment).
    """
    index = row_slots.long() + 1
    shape = (row_slots.shape[0], *([1] * (exact.dim() - 2)), exact.shape[-1])
    scale = dora.scales[index].view(shape)
    rescaled = exact * scale if dora.bias is None else dora.bias + scale * (exact - dora.bias)
    keep = ~dora.is_dora[index].view(*shape[:-1], 1)
    result.copy_(torch.where(keep, exact, rescaled))


def dora_dtype(result: torch.Tensor, dora: DoraScales) -> torch.dtype:
    """The dtype DoRA layers accumulate base output + LoRA delta in before the rescale: the result's and the
    scales' promotion (fp32 for a bf16 or fp16 model)."""
    return torch.promote_types(result.dtype, dora.scales.dtype)
