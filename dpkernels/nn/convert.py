"""Replace the layers of an existing model by their DP counterparts, in place.

A registry maps a torch layer type to a function building the DP layer from it; the DP layer
shares the original's Parameter objects, so an optimizer built before conversion still holds
the right tensors. Exact types only: a subclass of nn.Linear may change forward and is not
silently converted.
"""
from __future__ import annotations

from typing import Callable, Dict, Type

import torch.nn as nn

from .linear import DPLinear

_CONVERTERS: Dict[Type[nn.Module], Callable[[nn.Module], nn.Module]] = {
    nn.Linear: DPLinear.from_linear,
}


def register_converter(layer_type: Type[nn.Module], build: Callable[[nn.Module], nn.Module]) -> None:
    """Teach ``convert`` to turn ``layer_type`` into a DP module (``build(layer) -> DPModule``)."""
    _CONVERTERS[layer_type] = build


def convert(model: nn.Module) -> nn.Module:
    """Swap every registered layer of ``model`` (the model itself included) for its DP version."""
    build = _CONVERTERS.get(type(model))
    if build is not None:
        return build(model)
    for name, child in list(model.named_children()):
        new_child = convert(child)
        if new_child is not child:
            setattr(model, name, new_child)
    return model
