"""Cross terms of a parameter shared by several layers (math: ``dpkernels.ops.tied_cross``)."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import tied_cross as _tied
from . import _checks


def embedding_linear_cross(
    tokens: torch.Tensor,
    grad_embedding: torch.Tensor,
    x: torch.Tensor,
    grad_head: torch.Tensor,
    *,
    padding_idx: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """⟨g_i^emb, g_i^head⟩ per example, float32 (B,), for a (V, p) table that is also the weight of a
    linear head y = x Wᵀ (the tied input/output embedding of a language model).

    tokens (B,) or (B, *) ids into the table and grad_embedding = ∂L/∂(lookup), tokens.shape + (p,);
    x (B, d) or (B, *, p) the head's input and grad_head = ∂L/∂y, x.shape[:-1] + (V,). Positions
    holding ``padding_idx`` add nothing. Σ_t Σ_s H_{s,tok_t} (x_s · G_t); the math and the kernel
    are in ``dpkernels.ops.tied_cross``.
    """
    V = grad_head.shape[-1] if isinstance(grad_head, torch.Tensor) and grad_head.dim() >= 1 else 1
    tok2, ge3, pad = _checks.as_tokens_bt(tokens, grad_embedding, V, padding_idx, check_ids=False)
    x3, gh3 = _checks.as_btd(x, grad_head)
    if x3.shape[0] != tok2.shape[0] or x3.shape[2] != ge3.shape[2]:
        raise ValueError(
            f"the embedding's batch and width {tuple(ge3.shape[::2])} do not match the head's input "
            f"{tuple(x3.shape[::2])}"
        )
    if x3.dtype != ge3.dtype:
        x3, ge3 = x3.float(), ge3.float()
    return _tied.TOKEN_LINEAR(tok2, ge3, x3, gh3, pad, backend=backend)


def linear_linear_cross(x1: torch.Tensor, grad1: torch.Tensor, x2: torch.Tensor, grad2: torch.Tensor) -> torch.Tensor:
    """⟨G1_iᵀ x1_i, G2_iᵀ x2_i⟩ per example, float32 (B,): one weight used by two linear layers."""
    a, ga = _checks.as_btd(x1, grad1)
    b, gb = _checks.as_btd(x2, grad2)
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2] or ga.shape[2] != gb.shape[2]:
        raise ValueError(
            f"the two uses do not share one weight: {tuple(ga.shape)}ᵀ{tuple(a.shape)} vs "
            f"{tuple(gb.shape)}ᵀ{tuple(b.shape)}"
        )
    return _tied.LINEAR_LINEAR(a, ga, b, gb)


def embedding_embedding_cross(
    tokens1: torch.Tensor,
    grad1: torch.Tensor,
    tokens2: torch.Tensor,
    grad2: torch.Tensor,
    *,
    num_embeddings: int,
    padding_idx: Optional[int] = None,
) -> torch.Tensor:
    """⟨g_i^(1), g_i^(2)⟩ per example, float32 (B,): one table looked up twice (an encoder's and a
    decoder's embedding)."""
    t1, g1, pad = _checks.as_tokens_bt(tokens1, grad1, num_embeddings, padding_idx, check_ids=False)
    t2, g2, _ = _checks.as_tokens_bt(tokens2, grad2, num_embeddings, padding_idx, check_ids=False)
    if t1.shape[0] != t2.shape[0] or g1.shape[2] != g2.shape[2]:
        raise ValueError("the two lookups do not share one batch and table width")
    return _tied.TOKEN_TOKEN(t1, g1, t2, g2, pad)
