"""Per-example affine gradients of LayerNorm, RMSNorm and GroupNorm (math: ``dpkernels.ops.norm_affine_grads``)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..ops import norm_affine_grads as _nag
from . import _checks


def layer_norm_per_example_grads(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    normalized_shape: "int | tuple[int, ...]",
    *,
    eps: float = 1e-5,
    weight: bool = True,
    bias: bool = True,
    mean: Optional[torch.Tensor] = None,
    rstd: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-example (weight, bias) gradients of ``nn.LayerNorm``, float32 (B, *normalized_shape) each.

    x: the layer input (B, *, *normalized_shape); grad_output: ∂L/∂y, same shape and dtype.
    ``mean``/``rstd``: the forward's statistics (one per normalised row, as
    ``torch.native_layer_norm`` returns them); recomputed in float32 from x when omitted.
    The math is in ``dpkernels.ops.norm_affine_grads``. ``weight``/``bias``: which to compute
    (None is returned for the other).
    """
    _checks.same_shape_pair(x, grad_output, "layer_norm_per_example_grads")
    shape = _checks.normalized_dims(x, normalized_shape)
    B, n = x.shape[0], math.prod(shape)
    x3, g3 = x.reshape(B, -1, n), grad_output.reshape(B, -1, n)
    rows = x3.shape[1] * B
    mean = _checks.statistic(mean, "mean", rows, x.device)
    rstd = _checks.statistic(rstd, "rstd", rows, x.device)
    _checks.both_or_neither(mean, rstd)
    if rstd is None or rstd.dtype != torch.float32:  # low-precision statistics: recompute in float32
        var, mean = torch.var_mean(x3.float(), dim=2, correction=0)
        rstd = torch.rsqrt(var + eps)
    gw, gb = _nag.OP(x3, g3, mean, rstd, 1, True, weight, bias, backend=backend)
    return (gw.view(B, *shape) if gw is not None else None), (gb.view(B, *shape) if gb is not None else None)


def rms_norm_per_example_grads(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    normalized_shape: "int | tuple[int, ...]",
    *,
    eps: Optional[float] = None,
    rstd: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-example weight gradients of ``nn.RMSNorm``, float32 (B, *normalized_shape).

    As ``layer_norm_per_example_grads`` with no mean and no bias; ``eps`` None means
    ``torch.finfo(x.dtype).eps``, as in nn.RMSNorm.
    """
    _checks.same_shape_pair(x, grad_output, "rms_norm_per_example_grads")
    shape = _checks.normalized_dims(x, normalized_shape)
    B, n = x.shape[0], math.prod(shape)
    x3, g3 = x.reshape(B, -1, n), grad_output.reshape(B, -1, n)
    rstd = _checks.statistic(rstd, "rstd", x3.shape[1] * B, x.device)
    if rstd is None or rstd.dtype != torch.float32:
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        rstd = torch.rsqrt(x3.float().square().mean(dim=2) + eps)
    gw, _ = _nag.OP(x3, g3, None, rstd, 1, True, True, False, backend=backend)
    return gw.view(B, *shape)


def group_norm_per_example_grads(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    num_groups: int,
    *,
    eps: float = 1e-5,
    weight: bool = True,
    bias: bool = True,
    mean: Optional[torch.Tensor] = None,
    rstd: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-example (weight, bias) gradients of ``nn.GroupNorm``, float32 (B, C) each.

    x: (B, C, *); ``mean``/``rstd``: (B, num_groups) as ``torch.native_group_norm`` returns them,
    recomputed in float32 when omitted.
    """
    _checks.same_shape_pair(x, grad_output, "group_norm_per_example_grads")
    B, C = x.shape[0], x.shape[1]
    num_groups = _checks.num_groups(num_groups, C)
    x3 = x.reshape(B, C, -1).transpose(1, 2)  # (B, S, C): channels are the features
    g3 = grad_output.reshape(B, C, -1).transpose(1, 2)
    mean = _checks.statistic(mean, "mean", B * num_groups, x.device)
    rstd = _checks.statistic(rstd, "rstd", B * num_groups, x.device)
    _checks.both_or_neither(mean, rstd)
    if rstd is None or rstd.dtype != torch.float32:
        var, mean = torch.var_mean(x.float().reshape(B, num_groups, -1), dim=2, correction=0)
        rstd = torch.rsqrt(var + eps)
    return _nag.OP(x3, g3, mean, rstd, C // num_groups, False, weight, bias, backend=backend)
