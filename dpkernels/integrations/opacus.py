"""dpkernels' fused per-example norms inside Opacus' ghost clipping.

Opacus (1.5 and later) computes the per-sample gradient norms of ghost clipping
(``PrivacyEngine.make_private(..., grad_sample_mode="ghost")``) with one registered "norm
sampler" per layer type. Its sampler for ``nn.Linear`` materialises, for (B, T, d) inputs, the
B×T×T Gram matrices of the input and of the output gradient. ``use_fused_norms()`` registers
``linear_norm_sample`` instead, which computes the same norms with
``dpkernels.functional.linear_sq_norms`` (fused ghost/direct kernels, nothing T×T stored), and
``embedding_norm_sample`` for ``nn.Embedding`` (``functional.embedding_sq_norms``, where Opacus
builds and sorts index pairs):

    import dpkernels.integrations.opacus as dpk_opacus
    dpk_opacus.use_fused_norms()        # every Opacus ghost-clipping model from now on
    ...                                 # PrivacyEngine.make_private(..., grad_sample_mode="ghost")
    dpk_opacus.restore_opacus_norms()   # back to Opacus' own sampler

Clipping, noise and accounting stay Opacus'. Only the norms change, and they agree with Opacus'
own to float32 rounding (tests/test_integrations_opacus.py).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .. import functional

_saved: Dict[str, Optional[Callable]] = {}


def linear_norm_sample(
    layer: nn.Linear,
    activations: List[torch.Tensor],
    backprops: torch.Tensor,
    *,
    method: str = "auto",
    backend: Optional[str] = None,
) -> Dict[nn.Parameter, torch.Tensor]:
    """Opacus norm sampler for ``nn.Linear``: {parameter: per-sample gradient norm (B,)}.

    ``activations[0]`` is the layer input (B, d) or (B, *, d), ``backprops`` the output gradient
    (B, p) or (B, *, p), both batch-first (Opacus rearranges them before calling). The weight's
    norm is √(``linear_sq_norms(x, G, bias=False)``), the bias's ‖Σ_t G_t‖. Norms come back in
    ``backprops``' dtype, as Opacus' own sampler returns them (it stacks the norms of all layers).
    """
    x = activations[0].to(backprops.dtype)
    ret: Dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        sq = functional.linear_sq_norms(x, backprops, bias=False, method=method, backend=backend)
        ret[layer.weight] = sq.sqrt().to(backprops.dtype)
    if layer.bias is not None and layer.bias.requires_grad:
        B, p = backprops.shape[0], backprops.shape[-1]
        per_example_bias = backprops.reshape(B, -1, p).sum(dim=1, dtype=torch.float32)
        ret[layer.bias] = torch.linalg.vector_norm(per_example_bias, dim=1).to(backprops.dtype)
    return ret


def embedding_norm_sample(
    layer: nn.Embedding,
    activations: List[torch.Tensor],
    backprops: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> Dict[nn.Parameter, torch.Tensor]:
    """Opacus norm sampler for ``nn.Embedding``: {weight: per-sample gradient norm (B,)}.

    ``activations[0]`` are the token ids (B,) or (B, *), ``backprops`` the output gradient
    (ids.shape + (p,)). Positions holding ``layer.padding_idx`` contribute nothing, as in the
    gradient nn.Embedding computes.
    """
    ret: Dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        sq = functional.embedding_sq_norms(
            activations[0],
            backprops,
            num_embeddings=layer.num_embeddings,
            padding_idx=layer.padding_idx,
            backend=backend,
        )
        ret[layer.weight] = sq.sqrt().to(backprops.dtype)
    return ret


_FUSED = {"linear": nn.Linear, "embedding": nn.Embedding}


def _registry() -> dict:
    try:
        from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
    except ImportError as e:
        raise ImportError("dpkernels.integrations.opacus needs opacus >= 1.5 (pip install opacus)") from e
    return GradSampleModuleFastGradientClipping.NORM_SAMPLERS


def use_fused_norms(method: str = "auto", backend: Optional[str] = None) -> None:
    """Make Opacus' ghost clipping compute ``nn.Linear`` and ``nn.Embedding`` norms with dpkernels'
    fused kernels.

    Affects every ghost-clipping model, also ones already wrapped (Opacus looks the sampler up at
    each backward). ``method`` (linear layers) and ``backend`` are those of ``functional.linear_sq_norms``.
    """
    registry = _registry()
    samplers = {
        "linear": functools.partial(linear_norm_sample, method=method, backend=backend),
        "embedding": functools.partial(embedding_norm_sample, backend=backend),
    }
    for name, layer_type in _FUSED.items():
        if name not in _saved:
            _saved[name] = registry.get(layer_type)
        registry[layer_type] = samplers[name]


def restore_opacus_norms() -> None:
    """Undo ``use_fused_norms``: Opacus' own norm samplers again."""
    registry = _registry()
    for name, layer_type in _FUSED.items():
        if name not in _saved:
            continue
        previous = _saved.pop(name)
        if previous is None:
            registry.pop(layer_type, None)
        else:
            registry[layer_type] = previous
