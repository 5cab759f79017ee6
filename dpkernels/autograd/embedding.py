"""Autograd function of an embedding table under per-example clipping.

Forward is ``F.embedding``. Backward returns no weight gradient (nor one for the integer
tokens): it hands (tokens, G) to the layer's collector, which records the per-example squared
norms (``functional.embedding_sq_norms``) and keeps (tokens, G) for the clipped-sum pass at
step time. With ``batch_dim=1`` (sequence-first tokens (T, B, ...)) the recorded tensors are
views with the batch moved to dimension 0, the layout every kernel takes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class DPEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tokens: torch.Tensor, weight: torch.Tensor, collector: Any, batch_dim: int = 0) -> torch.Tensor:
        ctx.save_for_backward(tokens)
        ctx.collector = collector
        ctx.batch_dim = batch_dim
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        (tokens,) = ctx.saved_tensors
        if ctx.batch_dim != 0:
            tokens, grad_output = tokens.movedim(ctx.batch_dim, 0), grad_output.movedim(ctx.batch_dim, 0)
        ctx.collector.record((tokens, grad_output), tokens, grad_output)
        return None, None, None, None
