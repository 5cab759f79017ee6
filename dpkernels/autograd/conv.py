"""Autograd function of a Conv1d/Conv2d under per-example clipping.

Forward is ``F.conv1d`` / ``F.conv2d`` with symmetric zero padding (the layer applies any other
padding with F.pad before, as nn.Conv1d/nn.Conv2d do, so autograd differentiates it). Backward
returns grad_input as torch computes it (``aten.convolution_backward``, input gradient only)
and, instead of weight and bias gradients, hands (x, G) to the layer's collector, which records
the per-example squared norms (``functional.conv_sq_norms``) and keeps (x, G) for the clipped
sum at step time. The batch is always dimension 0.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from ._record import record


class DPConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: Tuple[int, ...],
        padding: Tuple[int, ...],
        dilation: Tuple[int, ...],
        groups: int,
        collector: Any,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        ctx.collector = collector
        conv = F.conv1d if weight.dim() == 3 else F.conv2d
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        grad_output = grad_output.to(x.dtype)
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.convolution_backward(
                grad_output,
                x,
                weight.to(x.dtype),
                None,
                stride,
                padding,
                dilation,
                False,
                [0] * len(stride),
                groups,
                [True, False, False],
            )[0]
        record(ctx.collector, "pair", x, grad_output)
        return grad_input, None, None, None, None, None, None, None
