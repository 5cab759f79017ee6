"""Embedding tables: per-example squared norms, small tables' per-example gradients, and the clipped,
noised table gradient (math: ``dpkernels.ops.embedding_grads``)."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import embedding_grads as _emb
from ..ops.philox import resolve_key
from . import _checks
from ._types import Generator


def embedding_sq_norms(
    tokens: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    num_embeddings: int,
    padding_idx: Optional[int] = None,
    backend: Optional[str] = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """Squared per-example gradient norms of an embedding table as float32 (B,).

    tokens: (B,) or (B, *) int32/int64 ids in [0, num_embeddings); grad_output: tokens.shape + (p,)
    (float32, bfloat16 or float16) on the same device. Positions holding ``padding_idx`` add
    nothing. ‖g_i‖² = Σ_{t,s: tok_it = tok_is} G_it·G_is; the math and the kernels are in
    ``dpkernels.ops.embedding_grads``. Per-example (V, p) gradients are never formed.
    ``check_ids=False`` skips the range check of the ids (one host sync), for callers whose
    forward already ran F.embedding on them (DPEmbedding does).
    """
    tok2, g3, pad = _checks.as_tokens_bt(tokens, grad_output, num_embeddings, padding_idx, check_ids)
    return _emb.SQ_NORMS(tok2, g3, num_embeddings, pad, backend=backend)


def embedding_per_example_grads(
    tokens: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    num_embeddings: int,
    padding_idx: Optional[int] = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """Per-example gradients of an embedding table, float32 (B, num_embeddings, p): row v of example
    i is the sum of G_it over its positions holding token v (padding positions add nothing).

    For small tables only (``dpkernels.ops.embedding_grads.choose_embedding_method``): the result
    is B times the table. Inputs as in ``embedding_sq_norms``; deterministic on every device.
    """
    tok2, g3, pad = _checks.as_tokens_bt(tokens, grad_output, num_embeddings, padding_idx, check_ids)
    return _emb.PER_EXAMPLE_GRADS(tok2, g3, num_embeddings, pad)


def embedding_clipped_grad(
    tokens: torch.Tensor,
    grad_output: torch.Tensor,
    clip_factors: torch.Tensor,
    *,
    num_embeddings: int,
    padding_idx: Optional[int] = None,
    noise_std: float = 0.0,
    generator: Generator = None,
    backend: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """The embedding table's gradient Σ_i c_i g_i + noise_std·z, (num_embeddings, p).

    Inputs as in ``embedding_sq_norms``; clip_factors (B,). Accumulated in float32 and bit-for-bit
    deterministic on every device; the noise covers every row of the table, whether or not a
    token of the batch hit it. Returned in ``out_dtype`` (default: grad_output's dtype).
    ``generator`` as in ``linear_clipped_grad`` (the key's element index is the row-major index
    in the table). ``check_ids`` as in ``embedding_sq_norms``.
    """
    tok2, g3, pad = _checks.as_tokens_bt(tokens, grad_output, num_embeddings, padding_idx, check_ids)
    c = _checks.clip_factors(clip_factors, tok2.shape[0], g3.device)
    return _emb.CLIPPED_GRAD(
        tok2,
        g3,
        c,
        num_embeddings,
        pad,
        _checks.noise_std(noise_std),
        resolve_key(generator),
        _checks.out_dtype(out_dtype),
        backend=backend,
    )
