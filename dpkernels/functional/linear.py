"""Linear layers: per-example squared norms and the clipped, noised gradient (math: ``dpkernels.ops.linear_sq_norms``,
``dpkernels.ops.linear_clipped_grad``)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops import linear_clipped_grad as _clipped
from ..ops import linear_sq_norms as _norms
from ..ops.philox import resolve_key
from . import _checks
from ._types import Generator


def linear_sq_norms(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    bias: bool = True,
    method: str = "auto",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Squared per-example gradient norms of ``y = x Wᵀ + b`` as float32 (B,).

    x: (B, d) or (B, *, d); grad_output: (B, p) or (B, *, p), same dtype (float32, bfloat16 or
    float16) and device. ``bias`` adds the bias gradient's ‖Σ_t G_it‖². ``method``: "ghost",
    "direct" or "auto"; the math and the cost model are in ``dpkernels.ops.linear_sq_norms``
    (the torch backend has its own "auto": full Gram matrices, ``choose_method_torch``).
    Per-example gradients are never written to memory by the Triton kernels.
    """
    x3, g3 = _checks.as_btd(x, grad_output)
    return _norms.OP(x3, g3, bias, _checks.norm_method(method, x3.shape[1]), backend=backend)


def linear_clipped_grad(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    clip_factors: torch.Tensor,
    *,
    bias: bool = True,
    noise_std: float = 0.0,
    generator: Generator = None,
    backend: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(grad_weight, grad_bias)`` = Σ_i c_i g_i + noise_std·z in one fused pass.

    grad_weight is (p, d) and grad_bias (p,) (None when ``bias=False``), in ``out_dtype``
    (default: x's dtype); accumulation is float32 either way.
    ``generator`` names the noise: a ``PhiloxKey`` (seed, step, stream) chosen by the caller,
    a ``torch.Generator`` (a fresh 64-bit key is drawn from it), an int64 key tensor
    (``PhiloxKey.as_tensor``), or None (a fresh key from the OS CSPRNG). The weight uses the key as
    given; the bias uses the next stream (stream + 1), so the two never share a draw — a caller
    assigning streams to layers must leave room.
    """
    x3, g3 = _checks.as_btd(x, grad_output)
    c = _checks.clip_factors(clip_factors, x3.shape[0], x3.device)
    return _clipped.OP(
        x3,
        g3,
        c,
        _checks.noise_std(noise_std),
        resolve_key(generator),
        _checks.out_dtype(out_dtype),
        bias,
        backend=backend,
    )
