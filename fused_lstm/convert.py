"""``convert(model)`` swaps every torch.nn.LSTM / nn.LSTMCell of a model for the fused
module, in place; ``revert(model)`` swaps them back.

The fused modules subclass nn's and hold no state of their own, so a swap changes only
the class of each module object, as torch.nn.utils.parametrize does: the same object,
the same Parameter objects (an optimizer built before keeps working), buffers, device,
dtype, training mode, hooks and parametrizations.
"""
import warnings
from typing import Dict, List, Type

from torch import nn
from torch.nn.utils import parametrize

from .modules import LSTM, LSTMCell

__all__ = ["convert", "revert"]

_TO_FUSED: Dict[type, type] = {nn.LSTM: LSTM, nn.LSTMCell: LSTMCell}
_TO_NN: Dict[type, type] = {LSTM: nn.LSTM, LSTMCell: nn.LSTMCell}


def _base_class(module: nn.Module) -> type:
    """The module's own class: for a parametrized module, the class parametrize derived
    its ``Parametrized...`` class from."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _swap_class(module: nn.Module, new_base: type) -> None:
    if not parametrize.is_parametrized(module):
        module.__class__ = new_base
        return
    # parametrize's class holds the parametrized tensors as properties: the same class
    # body over the new base (and remove_parametrizations then leaves the new base).
    old = type(module)
    body = {k: v for k, v in old.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(old.__name__, (new_base,), body)


def _swap(model: nn.Module, mapping: Dict[type, type], skip: List[Type[nn.Module]],
          what: str) -> nn.Module:
    unknown = set()
    for module in model.modules():
        base = _base_class(module)
        if base in mapping:
            _swap_class(module, mapping[base])
        elif isinstance(module, tuple(skip)) and base not in mapping.values():
            unknown.add(f"{base.__module__}.{base.__qualname__}")
    if unknown:
        warnings.warn(f"fused_lstm.{what}: left alone {len(unknown)} subclass(es) it does not "
                      f"know: {', '.join(sorted(unknown))}", stacklevel=3)
    return model


def convert(model: nn.Module) -> nn.Module:
    """Swaps every ``torch.nn.LSTM`` and ``torch.nn.LSTMCell`` in ``model`` (``model``
    itself included) for ``fused_lstm.LSTM`` / ``fused_lstm.LSTMCell``, in place, and
    returns ``model``.

    Each module keeps its identity, Parameter objects, device, dtype, training mode,
    hooks and parametrizations, so an optimizer built before still works and
    ``isinstance(m, torch.nn.LSTM)`` still holds. Subclasses of nn.LSTM / nn.LSTMCell
    other than fused_lstm's are left alone, with a warning naming them (their forward may
    do more than nn's). Convert before wrapping the model (DDP, ``torch.compile``).

    Example::

        model = fused_lstm.convert(torch.load("model.pt", weights_only=False))
    """
    return _swap(model, _TO_FUSED, [nn.LSTM, nn.LSTMCell], "convert")


def revert(model: nn.Module) -> nn.Module:
    """Undoes :func:`convert`: every ``fused_lstm.LSTM`` / ``LSTMCell`` in ``model``
    becomes ``torch.nn.LSTM`` / ``nn.LSTMCell`` again, in place; returns ``model``.
    The weights of each reverted LSTM are re-compacted for cuDNN (``flatten_parameters``,
    a no-op on the CPU), as nn.LSTM does when moved to a GPU."""
    _swap(model, _TO_NN, [LSTM, LSTMCell], "revert")
    for module in model.modules():
        if _base_class(module) is nn.LSTM:
            module.flatten_parameters()
    return model
