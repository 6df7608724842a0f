"""Writes that replace an adapter weight without registering anything, counted where they happen.

The bank's storage is the only copy of the adapter weights: PEFT's parameters are views of it, so an in-place edit
of any kind is seen with no check at all. What a view cannot see is a parameter that stops being one, and two
writes do that without passing through torch's registration hooks (``bank.watch_modules``):

- ``param.data = tensor`` (user code; ``Module._apply``, i.e. ``model.to``/``.half()``; PEFT's hotswap of another
  rank), which changes the tensor under the same Parameter object;
- ``module._parameters[name] = new`` (accelerate's ``set_module_tensor_to_device``, ``Module._apply`` under
  ``torch.__future__.set_overwrite_module_params_on_conversion``, ``del module.weight``), which puts another object
  in its place.

Without a count of them, the per-call check had to read every adapter parameter's identity and address: 3 ms per
``generate`` call on the H200 with 8 adapters, 10 ms on a CPU with 32, growing with every adapter registered. Here
each stored parameter becomes a ``BankParameter`` (a ``torch.nn.Parameter`` whose ``data`` setter counts) and each
dict holding one a ``WatchedParameters`` (a dict whose writes count); the per-call check compares one counter
(``writes``), so its cost is the number of layers, not of weights.

What stays unseen: ``torch.utils.swap_tensors`` on a stored parameter (PEFT and transformers do not call it; torch
does under ``torch.__future__.set_swap_module_params_on_conversion(True)``, which the bank checks, see
``bank._Snapshot``), and writes from C code into the dicts. A stored parameter of another Parameter class is not
converted: the bank checks it by identity and address on every call, as before.

``unwatch`` gives PEFT back plain Parameters and dicts (``unpatch_model``); copies and pickles of either class are
plain too, so a copied model carries nothing of the patch.
"""

from __future__ import annotations

import itertools

import torch

_COUNTER = itertools.count(1)  # next() is atomic under the GIL: writes from several threads are each counted
_WRITES = [0]
_SCALING_WRITES = [0]
_DATA_READS = [0]
_tensor_data = torch._C.TensorBase.data  # the C getset descriptor behind ``Tensor.data``


def _count() -> None:
    _WRITES[0] = next(_COUNTER)


def _count_scaling() -> None:
    _SCALING_WRITES[0] = next(_COUNTER)


def scaling_writes() -> int:
    """A number that changes with every write into a ``WatchedScalings`` dict."""
    return _SCALING_WRITES[0]


def writes() -> int:
    """A number that changes with every counted write (see the module docstring)."""
    return _WRITES[0]


def data_reads() -> int:
    """How many times a stored parameter's ``.data`` has been read. ``param.data`` is how code edits a parameter in
    place without autograd's version counter seeing it (``param.data.copy_``, PEFT's hotswap), so a GPU pool that
    keeps copies of the weights treats each read as a possible write (see ``peft_fastlora.pool``)."""
    return _DATA_READS[0]


def data_quietly(parameter: torch.Tensor) -> torch.Tensor:
    """``parameter.data`` without counting it (the bank's own reads)."""
    return _tensor_data.__get__(parameter)


def set_data_quietly(parameter: torch.Tensor, data: torch.Tensor) -> None:
    """``parameter.data = data`` without counting it: the bank's own repointing of a parameter at its rows."""
    _tensor_data.__set__(parameter, data)


class BankParameter(torch.nn.Parameter):
    """A ``torch.nn.Parameter`` whose storage is the bank's; ``param.data = tensor`` is counted (see ``writes``), and
    so is every read of ``param.data`` (see ``data_reads``).

    Everything else is ``Parameter``'s own. A deep copy is a plain ``Parameter`` (pickling already gives one)."""

    @property
    def data(self) -> torch.Tensor:
        _DATA_READS[0] += 1  # (a lost increment under a race still leaves the count moved)
        return _tensor_data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        _count()
        _tensor_data.__set__(self, value)

    def __deepcopy__(self, memo: dict) -> torch.nn.Parameter:
        if id(self) in memo:
            return memo[id(self)]
        data = _tensor_data.__get__(self).clone(memory_format=torch.preserve_format)
        result = torch.nn.Parameter(data, self.requires_grad)
        memo[id(self)] = result
        return result


def _counted(method_name: str, count=_count):
    method = getattr(dict, method_name)

    def counted(self, *args, **kwargs):
        count()
        return method(self, *args, **kwargs)

    counted.__name__ = method_name
    return counted


class WatchedParameters(dict):
    """A module's ``_parameters`` dict whose writes are counted (see ``writes``); copies and pickles are plain
    dicts."""

    __slots__ = ()
    __setitem__ = _counted("__setitem__")
    __delitem__ = _counted("__delitem__")
    __ior__ = _counted("__ior__")
    pop = _counted("pop")
    popitem = _counted("popitem")
    clear = _counted("clear")
    update = _counted("update")
    setdefault = _counted("setdefault")

    def __reduce_ex__(self, protocol: int):
        return dict, (dict(self),)


class WatchedScalings(dict):
    """A LoRA layer's ``scaling`` dict whose writes are counted (see ``scaling_writes``): PEFT changes a scaling
    only through the dict (``update_layer``, ``set_scale``, ``scale_layer``, ``unscale_layer``, deletion), so the
    per-call check skips comparing every layer's dict, of every registered adapter, while the count stands (3 ms a
    call on a CPU for 32 layers and 400 adapters). Copies and pickles are plain dicts."""

    __slots__ = ()
    __setitem__ = _counted("__setitem__", _count_scaling)
    __delitem__ = _counted("__delitem__", _count_scaling)
    __ior__ = _counted("__ior__", _count_scaling)
    pop = _counted("pop", _count_scaling)
    popitem = _counted("popitem", _count_scaling)
    clear = _counted("clear", _count_scaling)
    update = _counted("update", _count_scaling)
    setdefault = _counted("setdefault", _count_scaling)

    def __reduce_ex__(self, protocol: int):
        return dict, (dict(self),)


def watch_scaling(layer: torch.nn.Module) -> dict:
    """Make ``layer.scaling`` a ``WatchedScalings`` (same entries) and return it."""
    scaling = layer.__dict__["scaling"]
    if type(scaling) is not WatchedScalings:
        layer.__dict__["scaling"] = scaling = WatchedScalings(scaling)
    return scaling


def unwatch_scaling(layer: torch.nn.Module) -> None:
    """Undo ``watch_scaling``: a plain dict."""
    scaling = layer.__dict__.get("scaling")
    if type(scaling) is WatchedScalings:
        layer.__dict__["scaling"] = dict(scaling)


def watch(module: torch.nn.Module, names: list[str]) -> None:
    """Count writes into ``module._parameters`` and ``.data`` assignments to its parameters ``names`` (those of
    plain ``torch.nn.Parameter`` class; another class is left as it is, see ``is_watched``)."""
    parameters = module.__dict__["_parameters"]
    if type(parameters) is dict:
        # (the module's own __dict__: nn.Module.__setattr__ would look for a Parameter in the value)
        module.__dict__["_parameters"] = parameters = WatchedParameters(parameters)
    for name in names:
        if type(parameters[name]) is torch.nn.Parameter:
            parameters[name].__class__ = BankParameter


def unwatch(module: torch.nn.Module) -> None:
    """Undo ``watch``: plain Parameters in a plain dict."""
    parameters = module.__dict__["_parameters"]
    for parameter in parameters.values():
        if type(parameter) is BankParameter:
            parameter.__class__ = torch.nn.Parameter
    if type(parameters) is WatchedParameters:
        module.__dict__["_parameters"] = dict(parameters)


def is_watched(parameters: dict, parameter: torch.Tensor) -> bool:
    """True where both a replacement of ``parameter`` in ``parameters`` and its ``.data = tensor`` are counted."""
    return type(parameters) is WatchedParameters and type(parameter) is BankParameter
