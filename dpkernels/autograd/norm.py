"""Autograd functions of the normalisation layers (LayerNorm, RMSNorm, GroupNorm) under per-example clipping.

Forward runs the layer as torch does and keeps what torch's own backward keeps (the input and
the statistics). Backward returns grad_input as torch computes it and, instead of weight and
bias gradients, hands the per-example affine gradients (small: (B, n) each, see
``dpkernels.ops.norm_affine_grads``) to the layer's collector. The parameters get no gradient
from autograd: only the engine writes them, clipped.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch

from .. import functional
from ._record import record


def _record(collector: Any, gw: Optional[torch.Tensor], gb: Optional[torch.Tensor]) -> None:
    """Record the per-example affine gradients there are (payload {"weight": gw, "bias": gb})."""
    if gw is not None and gb is not None:
        record(collector, "weight,bias", gw, gb)
    elif gw is not None:
        record(collector, "weight", gw)
    elif gb is not None:
        record(collector, "bias", gb)
    else:
        record(collector, "none")


class DPLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        normalized_shape: Tuple[int, ...],
        eps: float,
        collector: Any,
        layout: Any,
    ) -> torch.Tensor:
        y, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.normalized_shape, ctx.eps, ctx.collector, ctx.layout = normalized_shape, eps, collector, layout
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.native_layer_norm_backward(
                grad_output, x, ctx.normalized_shape, mean, rstd, weight, bias, [True, False, False]
            )[0]
        bf = ctx.layout.batch_first
        gw, gb = functional.layer_norm_per_example_grads(
            bf(x),
            bf(grad_output.to(x.dtype)),
            ctx.normalized_shape,
            eps=ctx.eps,
            weight=weight is not None and ctx.needs_input_grad[1],
            bias=bias is not None and ctx.needs_input_grad[2],
            mean=bf(mean),
            rstd=bf(rstd),
            backend=ctx.collector.step.backend,
        )
        _record(ctx.collector, gw, gb)
        return grad_input, None, None, None, None, None, None


def _rms_stats(x: torch.Tensor, normalized_shape: Tuple[int, ...], eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x̂ = x·ρ, ρ) in float32, ρ = 1/sqrt(mean(x²) + eps) over the normalised dims (kept)."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + eps)
    return xf * rstd, rstd


class DPRMSNormFunction(torch.autograd.Function):
    """y = x̂ ⊙ w with x̂ = x·ρ; grad_x = ρ·(ĝ − x̂·mean(ĝ ⊙ x̂)), ĝ = G ⊙ w (all in float32)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        normalized_shape: Tuple[int, ...],
        eps: float,
        collector: Any,
        layout: Any,
    ) -> torch.Tensor:
        xhat, rstd = _rms_stats(x, normalized_shape, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.normalized_shape, ctx.eps, ctx.collector, ctx.layout = normalized_shape, eps, collector, layout
        return (xhat * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            dims = tuple(range(x.dim() - len(ctx.normalized_shape), x.dim()))
            xhat = x.float() * rstd
            ghat = grad_output.float() * weight.float()
            grad_input = (rstd * (ghat - xhat * (ghat * xhat).mean(dim=dims, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            bf = ctx.layout.batch_first
            gw = functional.rms_norm_per_example_grads(
                bf(x),
                bf(grad_output.to(x.dtype)),
                ctx.normalized_shape,
                eps=ctx.eps,
                rstd=bf(rstd),
                backend=ctx.collector.step.backend,
            )
            _record(ctx.collector, gw, None)
        return grad_input, None, None, None, None, None


class DPGroupNormFunction(torch.autograd.Function):
    """GroupNorm over (B, C, *): the batch is always dimension 0 (the statistics are per example)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        num_groups: int,
        eps: float,
        collector: Any,
    ) -> torch.Tensor:
        B, C = x.shape[0], x.shape[1]
        hw = math.prod(x.shape[2:])
        x = x.contiguous()
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, B, C, hw, num_groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.eps, ctx.collector = num_groups, eps, collector
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        B, C = x.shape[0], x.shape[1]
        grad_output = grad_output.to(x.dtype).contiguous()
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.native_group_norm_backward(
                grad_output, x, mean, rstd, weight, B, C, math.prod(x.shape[2:]), ctx.num_groups, [True, False, False]
            )[0]
        gw, gb = functional.group_norm_per_example_grads(
            x,
            grad_output,
            ctx.num_groups,
            eps=ctx.eps,
            weight=weight is not None and ctx.needs_input_grad[1],
            bias=bias is not None and ctx.needs_input_grad[2],
            mean=mean,
            rstd=rstd,
            backend=ctx.collector.step.backend,
        )
        _record(ctx.collector, gw, gb)
        return grad_input, None, None, None, None, None
