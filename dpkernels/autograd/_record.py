"""How a DP layer's backward hands its tensors to the engine, in eager code and in a compiled graph.

Every DP autograd Function ends its backward with ``record(site, kind, *tensors)``: ``site`` is the
layer's handle in the engine (``dpkernels.engine.collector.ModuleCollector``), ``kind`` names how the
tensors make the layer's payload (``PAYLOADS``). The engine computes the layer's per-example squared
norms from them at once and keeps the payload for the clipped sum at ``optimizer.step()``.

    eager      ``site.record(payload, *norm_inputs)``, a Python call
    compiled   the op ``dpkernels::record(tensors, site_id, kind)``: its kernel, which runs when the
               compiled backward runs, looks the site up by id and makes the same call

The op returns nothing, so it is registered as an ordered effect (torch's effects system threads a
token through it): the compiled graph keeps it and keeps its order, where dead-code elimination
would otherwise drop an op whose outputs nobody uses. It is tagged ``cudagraph_unsafe``: a CUDA
graph replays kernels without running Python, so a recording inside one would be lost.

Inside a compiled graph the tensors the op receives are the graph's buffers, which the compiler
may reuse for later values once the op (their last user) has run. So what the engine keeps past
the call (a flat-clipping step's (x, G), until ``optimizer.step()``) is copied there
(``ModuleCollector.record(..., keep=copy)``); what it consumes at once (per-layer clipping) is not.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

# kind -> (tensors -> (payload, *norm_inputs)): the payload a layer's dp_clipped_grads reads, and the
# arguments of its dp_sq_norms
PAYLOADS: Dict[str, Callable[[Sequence[torch.Tensor]], Tuple[Any, ...]]] = {
    # linear and conv layers: (x, G)
    "pair": lambda t: ((t[0], t[1]), t[0], t[1]),
    # embeddings: ("rows", tokens, G), or ("per_example", per-example table gradients)
    "rows": lambda t: (("rows", t[0], t[1]), "rows", t[0], t[1]),
    "per_example": lambda t: (("per_example", t[0]), "per_example", t[0]),
    # attention's input projections: one (x, G) of the packed product, or three (x_j, G_j)
    "packed": lambda t: (("packed", ((t[0], t[1]),)),) * 2,
    "split": lambda t: (("split", ((t[0], t[1]), (t[2], t[3]), (t[4], t[5]))),) * 2,
    # layers with materialised per-example gradients ({parameter name: (B, *shape)})
    "weight": lambda t: ({"weight": t[0]}, t[0]),
    "bias": lambda t: ({"bias": t[0]}, t[0]),
    "weight,bias": lambda t: ({"weight": t[0], "bias": t[1]}, t[0], t[1]),
    "none": lambda t: ({},),
}

_SITES: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_IDS = itertools.count()


def register_site(site: Any) -> int:
    """A process-unique id under which the record op finds ``site`` (held weakly)."""
    site_id = next(_IDS)
    _SITES[site_id] = site
    return site_id


def record(site: Any, kind: str, *tensors: torch.Tensor) -> None:
    """Hand a DP layer's backward tensors to its engine (see the module docstring)."""
    if torch.compiler.is_compiling():
        torch.ops.dpkernels.record(list(tensors), site.site_id, kind)
    else:
        site.record(*PAYLOADS[kind](tensors))


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


@torch.library.custom_op("dpkernels::record", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _record_op(tensors: List[torch.Tensor], site_id: int, kind: str) -> None:
    site = _SITES.get(site_id)
    if site is None:
        raise RuntimeError(
            f"a compiled backward recorded into DP layer site {site_id}, whose engine no longer exists: the model "
            "was compiled while attached to a private optimizer that has since been discarded; compile the model "
            "again after make_private"
        )
    refusal = site.step.compile_refusal
    if refusal is not None:
        raise RuntimeError(refusal)
    site.record(*PAYLOADS[kind](tensors), keep=_copy)


@_record_op.register_fake
def _record_fake(tensors: List[torch.Tensor], site_id: int, kind: str) -> None:
    return None


def _register_effect() -> None:
    """The record op as an ordered effect (kept and ordered by torch.compile), on the torch here."""
    from torch._library.effects import EffectType

    if hasattr(_record_op, "register_effect"):
        _record_op.register_effect(EffectType.ORDERED)
    else:  # older torch: the library-level registration
        torch.library._register_effectful_op("dpkernels::record", EffectType.ORDERED)


_register_effect()
