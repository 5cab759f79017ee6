"""Autograd function of an embedding table under per-example clipping.

Forward is ``F.embedding``. Backward returns no weight gradient (nor one for the integer
tokens): it hands (tokens, G) to the layer's collector, which records the per-example squared
norms (``functional.embedding_sq_norms``) and keeps (tokens, G) for the clipped-sum pass at
step time, or, for a table small next to the sequence (``choose_embedding_method``), the
per-example gradients themselves (``functional.embedding_per_example_grads``). The recorded
tensors are ``layout.batch_first`` views (the examples on dimension 0, the layout every kernel
takes; ``dpkernels.engine.guard.ExampleLayout``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .. import functional
from ..ops.embedding_grads import choose_embedding_method
from ._record import record


class DPEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        tokens: torch.Tensor,
        weight: torch.Tensor,
        collector: Any,
        layout: Any,
        padding_idx: Optional[int] = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(tokens)
        ctx.collector = collector
        ctx.layout = layout
        ctx.table_shape = tuple(weight.shape)
        ctx.padding_idx = padding_idx
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        (tokens,) = ctx.saved_tensors
        tokens, grad_output = ctx.layout.batch_first(tokens), ctx.layout.batch_first(grad_output)
        B = tokens.shape[0]
        V, p = ctx.table_shape
        if choose_embedding_method(B, tokens.numel() // max(B, 1), V, p) == "per_example":
            per_example = functional.embedding_per_example_grads(
                tokens, grad_output, num_embeddings=V, padding_idx=ctx.padding_idx, check_ids=False
            )
            record(ctx.collector, "per_example", per_example)
        else:
            record(ctx.collector, "rows", tokens, grad_output)
        return None, None, None, None, None
