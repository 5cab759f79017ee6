"""Replace the layers of an existing model by their DP counterparts, in place.

Which layers, and how, is the registry's (``dpkernels.nn.registry``): every DP layer registers
the layer types it replaces, integrations (``dpkernels.integrations``) register the layers of
Hugging Face transformers and timm when those libraries are in use, and users register their
own. The DP layer shares the original's Parameter objects, so an optimizer built before
conversion still holds the right tensors.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch.nn as nn

from . import registry


def register_converter(layer_type: registry.LayerKey, build: Callable[[nn.Module], nn.Module]) -> None:
    """Teach ``convert`` to turn ``layer_type`` into ``build(layer)`` (see ``registry.register``)."""
    registry.register(layer_type, build)


def convert(model: nn.Module) -> nn.Module:
    """Swap every registered layer of ``model`` (the model itself included) for its DP version.

    Parents are converted before their children (an integration's entry for a block may declare
    its children's layouts, ``declare_flattened``), and a DP layer's own children are converted
    too. A layer registered under several names becomes one DP layer registered under all of
    them, so sharing stays visible.
    """
    from ..integrations import load_available

    load_available()
    return _convert(model, {})


def _convert(module: nn.Module, done: Dict[int, Tuple[nn.Module, nn.Module]]) -> nn.Module:
    # done[id(original)] = (original, its DP version): holding the original keeps its id from being
    # reused by a module created later in the walk
    if id(module) in done:
        return done[id(module)][1]
    new = registry.build_dp_layer(module)
    if new is None:
        new = module
    done[id(module)] = (module, new)
    # _modules, not named_children(): the latter skips a module's second name
    for name, child in list(new._modules.items()):
        if child is None:
            continue
        new_child = _convert(child, done)
        if new_child is not child:
            setattr(new, name, new_child)
    return new


def declare_flattened(*layers: nn.Module) -> None:
    """Declare that these layers see the batch flattened batch-major: (B·R, …) rows on dimension 0,
    example i owning rows i·R … i·R+R−1 (e.g. after ``x.reshape(-1, d)`` of a (B, T, d) tensor).

    The guard then accepts any multiple of the model's batch size B on dimension 0 and clips each
    example's R rows together; its probe still checks, at the first step, that the rows follow the
    examples (a position-major flattening is refused). Works before or after ``convert``.
    """
    for layer in layers:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"declare_flattened takes modules, got {type(layer).__name__}")
        layer._dp_layout = "flattened"
