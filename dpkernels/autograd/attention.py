"""Autograd functions of multi-head attention's input projections under per-example clipping.

The projections are linear layers (q = x_q W_qᵀ + b_q, and so for k, v), so the per-example
math is the linear layer's (``dpkernels.ops.linear_sq_norms``, ``linear_clipped_grad``). Two
forms, each one autograd node so that the layer records once per step:

packed  self-attention with nn.MultiheadAttention's packed (3E, E) weight: one product
        y = x Wᵀ + b, (B, L, 3E); backward records (x, G) with G = [G_q, G_k, G_v]. One norm
        computation and one fused clipped-sum GEMM cover all three projections.
split   query, key and value differ (cross-attention) or have their own weights (kdim, vdim):
        three products; backward records the three (x_j, G_j). The norm is the sum of the
        three linear norms (the rows of the packed weight are disjoint blocks).

Inputs are batch-first, (B, L, ·). Backward returns the input gradients as usual and no
weight or bias gradient: only the engine writes those, clipped.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ._record import record


class DPPackedProjectionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], collector: Any
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.collector = collector
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_input = grad_output @ weight.to(grad_output.dtype) if ctx.needs_input_grad[0] else None
        record(ctx.collector, "packed", x, grad_output)
        return grad_input, None, None, None


class DPSplitProjectionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        w_q: torch.Tensor,
        w_k: torch.Tensor,
        w_v: torch.Tensor,
        b_q: Optional[torch.Tensor],
        b_k: Optional[torch.Tensor],
        b_v: Optional[torch.Tensor],
        collector: Any,
    ):
        ctx.save_for_backward(query, key, value, w_q, w_k, w_v)
        ctx.collector = collector
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    @staticmethod
    def backward(ctx: Any, g_q: torch.Tensor, g_k: torch.Tensor, g_v: torch.Tensor):
        query, key, value, w_q, w_k, w_v = ctx.saved_tensors
        grads = []
        for i, (g, w) in enumerate(((g_q, w_q), (g_k, w_k), (g_v, w_v))):
            grads.append(g @ w.to(g.dtype) if ctx.needs_input_grad[i] else None)
        record(ctx.collector, "split", query, g_q, key, g_k, value, g_v)
        return (*grads, None, None, None, None, None, None, None)
