"""Replace the layers of an existing model by their DP counterparts, in place.

A registry maps a torch layer type to a function building the DP layer from it; the DP layer
shares the original's Parameter objects, so an optimizer built before conversion still holds
the right tensors. Exact types only: a subclass of nn.Linear may change forward and is not
silently converted.
"""
from __future__ import annotations

from typing import Callable, Dict, Type

import torch.nn as nn

from .conv import DPConv1d, DPConv2d
from .attention import DPMultiheadAttention
from .embedding import DPEmbedding
from .linear import DPLinear
from .norm import DPGroupNorm, DPLayerNorm, DPRMSNorm

_CONVERTERS: Dict[Type[nn.Module], Callable[[nn.Module], nn.Module]] = {
    nn.Linear: DPLinear.from_linear,
    nn.Embedding: DPEmbedding.from_embedding,
    nn.LayerNorm: DPLayerNorm.from_layer_norm,
    nn.RMSNorm: DPRMSNorm.from_rms_norm,
    nn.GroupNorm: DPGroupNorm.from_group_norm,
    nn.Conv1d: DPConv1d.from_conv,
    nn.Conv2d: DPConv2d.from_conv,
    nn.MultiheadAttention: DPMultiheadAttention.from_multihead_attention,
}


def register_converter(layer_type: Type[nn.Module], build: Callable[[nn.Module], nn.Module]) -> None:
    """Teach ``convert`` to turn ``layer_type`` into a DP module (``build(layer) -> DPModule``)."""
    _CONVERTERS[layer_type] = build


def convert(model: nn.Module) -> nn.Module:
    """Swap every registered layer of ``model`` (the model itself included) for its DP version.

    A layer registered under several names becomes one DP layer registered under all of them,
    so sharing stays visible (and is refused at backward, as per-example clipping requires).
    """
    return _convert(model, {})


def _convert(module: nn.Module, done: Dict[int, nn.Module]) -> nn.Module:
    if id(module) in done:
        return done[id(module)]
    build = _CONVERTERS.get(type(module))
    if build is not None:
        new = build(module)
    else:
        new = module
        # _modules, not named_children(): the latter skips a module's second name
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = _convert(child, done)
            if new_child is not child:
                setattr(module, name, new_child)
    done[id(module)] = new
    return new
