"""Autograd function of a linear layer under per-example clipping.

Forward is ``F.linear``. Backward returns grad_input = G W as usual and, instead of a weight
gradient, hands (x, G) to the layer's collector, which records the per-example squared norms
(``functional.linear_sq_norms``) and keeps (x, G) for the fused clipped-sum pass at step time.
The weight and bias get no gradient from autograd: only the engine writes them, clipped.
The recorded tensors are ``layout.batch_first`` views (``dpkernels.engine.guard.ExampleLayout``):
the examples on dimension 0, (B, *, d), the layout every kernel takes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ._record import record


class DPLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], collector: Any, layout: Any
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.collector = collector
        ctx.layout = layout
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_input = grad_output @ weight.to(grad_output.dtype) if ctx.needs_input_grad[0] else None
        x, grad_output = ctx.layout.batch_first(x), ctx.layout.batch_first(grad_output)
        record(ctx.collector, "pair", x, grad_output)
        return grad_input, None, None, None, None
