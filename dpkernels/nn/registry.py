"""One registry of DP layers: which layer types each DP layer replaces, and how it is built.

A DP layer declares the layer type(s) it replaces where it is defined::

    @register_dp_layer(nn.Linear)
    class DPLinear(nn.Linear, DPModule):
        @classmethod
        def dp_from(cls, layer: nn.Linear) -> "DPLinear": ...   # shares layer's Parameters

and ``convert`` (and so ``make_private``) swaps every registered layer of a model for its DP
version. A type may be given as a class or, so that an integration need not import a library's
modules before a model uses them, as its qualified name ``"package.module.ClassName"``.

Lookup walks the module type's MRO. A subclass of a registered type is converted by its
parent's entry only if it overrides none of the entry's ``math`` methods (``forward`` by
default): a subclass that changes ``forward`` may compute something else, so it needs an entry
of its own, and one with trainable parameters is refused, naming the class (``explain``).
Whatever an entry builds must hold every parameter of the layer it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Type, TypeVar, Union

import torch.nn as nn

LayerKey = Union[Type[nn.Module], str]
Builder = Callable[[nn.Module], nn.Module]
T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Entry:
    """How to build the DP version of one layer type."""

    key: LayerKey
    build: Builder
    math: Tuple[str, ...]
    dp_type: Optional[type] = None


_BY_TYPE: Dict[type, Entry] = {}
_BY_NAME: Dict[str, Entry] = {}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(
    key: LayerKey, build: Builder, *, math: Sequence[str] = ("forward",), dp_type: Optional[type] = None
) -> None:
    """Make ``convert`` turn layers of type ``key`` (a class or its qualified name) into ``build(layer)``.

    ``build`` returns the DP layer, sharing the layer's Parameter objects (an optimizer built before
    the conversion keeps pointing at the right tensors), or the layer itself when it has nothing to
    clip. ``math``: the methods whose override by a subclass changes what the layer computes. A
    later registration of the same key replaces the earlier one.
    """
    if not callable(build):
        raise TypeError(f"build must be callable, got {build!r}")
    entry = Entry(key, build, tuple(math), dp_type)
    if isinstance(key, str):
        _BY_NAME[key] = entry
    elif isinstance(key, type) and issubclass(key, nn.Module):
        _BY_TYPE[key] = entry
    else:
        raise TypeError(f"a layer type is an nn.Module subclass or its qualified name, got {key!r}")


def register_dp_layer(*keys: LayerKey, math: Sequence[str] = ("forward",)) -> Callable[[T], T]:
    """Class decorator: the DP layer replaces layers of the given types, built by its ``dp_from`` classmethod."""
    if not keys:
        raise TypeError("register_dp_layer needs at least one layer type")

    def decorate(dp_cls: T) -> T:
        build = getattr(dp_cls, "dp_from", None)
        if build is None:
            raise TypeError(f"{dp_cls.__name__} needs a classmethod dp_from(layer) to be registered")
        for key in keys:
            register(key, build, math=math, dp_type=dp_cls)
        return dp_cls

    return decorate


def _entry_of(cls: type) -> Optional[Entry]:
    return _BY_TYPE.get(cls) or _BY_NAME.get(qualified_name(cls))


def lookup(cls: type) -> Tuple[Optional[Entry], Optional[str]]:
    """(the entry converting layers of type ``cls``, None) or (None, why a subclass is not converted)."""
    from .module import DPModule

    if issubclass(cls, DPModule):
        return None, None  # converted already
    for ancestor in cls.__mro__:
        entry = _entry_of(ancestor)
        if entry is None:
            continue
        if ancestor is cls:
            return entry, None
        changed = [m for m in entry.math if getattr(cls, m, None) is not getattr(ancestor, m, None)]
        if changed:
            return None, (
                f"{qualified_name(cls)} subclasses {qualified_name(ancestor)} but overrides {', '.join(changed)}, so "
                f"it may compute something else than {ancestor.__name__}; dpkernels converts it only with a DP layer "
                "registered for this class (dpkernels.nn.register_dp_layer, see the README)"
            )
        return entry, None
    return None, None


def build_dp_layer(module: nn.Module) -> Optional[nn.Module]:
    """The DP version of ``module`` (None when no entry converts its type); checks it keeps every parameter."""
    entry, _ = lookup(type(module))
    if entry is None:
        return None
    new = entry.build(module)
    kept = {id(p) for p in new.parameters()}
    lost = [n for n, p in module.named_parameters(recurse=False) if id(p) not in kept]
    if lost:
        raise ValueError(
            f"the DP layer built for {qualified_name(type(module))} ({type(new).__name__}) does not hold its "
            f"parameter(s) {', '.join(lost)}: its registered converter does not fit this layer"
        )
    return new


def explain(module: nn.Module) -> Optional[str]:
    """Why ``module``, left unconverted, has no DP version (None when nothing in the registry says why)."""
    _, reason = lookup(type(module))
    return reason


def registered() -> Dict[str, str]:
    """{layer type: DP layer} of every registration, for documentation and error messages."""
    out = {}
    for entry in list(_BY_TYPE.values()) + list(_BY_NAME.values()):
        key = entry.key if isinstance(entry.key, str) else qualified_name(entry.key)
        out[key] = entry.dp_type.__name__ if entry.dp_type is not None else getattr(entry.build, "__qualname__", "?")
    return out
