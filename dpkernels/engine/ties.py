"""Tied parameters: one parameter, several DP layers ("uses"), one per-example gradient.

For a parameter P used by layers u = 1..U, example i's gradient is g_i = Σ_u g_i^(u) and

    ‖g_i‖² = Σ_u ‖g_i^(u)‖² + 2 Σ_{u<v} ⟨g_i^(u), g_i^(v)⟩

Each layer's recorded norm already holds its ‖g_i^(u)‖²; ``TieSet.cross_sq_norms`` adds the
cross terms, computed from the layers' recorded payloads (``dpkernels.ops.tied_cross``), so no
g_i is ever formed. The clipped sum of P is the sum of the uses' clipped sums, and P's noise is
drawn once, from P's own Philox stream (``DPOptimizer.write_private_grads``). A DP layer takes
part in a tie through ``dp_use(payload, name)``, which describes its use of parameter ``name``
as one of the three forms below, in P's own orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import functional
from ..ops import tied_cross


@dataclass(frozen=True)
class LinearUse:
    """g_i = Σ_s G_isᵀ x_is: a linear layer, x (B, S, cols), G (B, S, rows), P (rows, cols)."""

    x: torch.Tensor
    g: torch.Tensor


@dataclass(frozen=True)
class TokenUse:
    """g_i = Σ_t e_{tok_it} G_itᵀ: an embedding lookup, tokens (B, T), G (B, T, p), P (V, p)."""

    tokens: torch.Tensor
    g: torch.Tensor
    num_embeddings: int
    padding_idx: Optional[int]


@dataclass(frozen=True)
class DenseUse:
    """g_i given, (B, *P.shape): a layer that materialises its per-example gradients."""

    per_example: torch.Tensor


Use = Any  # LinearUse | TokenUse | DenseUse


def _pad(use: TokenUse) -> int:
    if use.padding_idx is None:
        return -1
    return use.padding_idx % use.num_embeddings


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, *, f) as (B, S, f)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def cross_term(a: Use, b: Use, backend: Optional[str]) -> torch.Tensor:
    """⟨g_i^(a), g_i^(b)⟩ per example, float32 (B,)."""
    if isinstance(b, TokenUse) and not isinstance(a, TokenUse):
        a, b = b, a
    if isinstance(b, DenseUse) and not isinstance(a, DenseUse):
        a, b = b, a
    if isinstance(a, TokenUse):
        if isinstance(b, LinearUse):
            return functional.embedding_linear_cross(
                a.tokens, a.g, b.x, b.g, padding_idx=a.padding_idx, backend=backend
            )
        return functional.embedding_embedding_cross(
            a.tokens, a.g, b.tokens, b.g, num_embeddings=a.num_embeddings, padding_idx=a.padding_idx
        )
    if isinstance(a, DenseUse):
        pe = a.per_example
        if isinstance(b, DenseUse):
            return tied_cross.dense_dense_cross_reference(pe, b.per_example)
        if isinstance(b, TokenUse):
            return tied_cross.dense_token_cross_reference(
                pe, b.tokens.reshape(b.tokens.shape[0], -1), _rows(b.g), _pad(b)
            )
        return tied_cross.dense_linear_cross_reference(pe.reshape(pe.shape[0], pe.shape[1], -1), _rows(b.x), _rows(b.g))
    return functional.linear_linear_cross(a.x, a.g, b.x, b.g)


class TieSet:
    """The tied parameters of one model: for each, the (DP layer name, parameter name) of its uses."""

    def __init__(self, uses: Dict[int, List[Tuple[str, str]]], params: Dict[int, nn.Parameter]) -> None:
        self.uses = {pid: u for pid, u in uses.items() if len(u) > 1}
        self.params = {pid: params[pid] for pid in self.uses}

    def __bool__(self) -> bool:
        return bool(self.uses)

    def is_tied(self, param: torch.Tensor) -> bool:
        return id(param) in self.uses

    def layer_groups(self) -> List[List[str]]:
        """The layer names of each tied parameter (they must be clipped in one group)."""
        return [sorted({layer for layer, _ in u}) for u in self.uses.values()]

    def cross_sq_norms(self, records: Dict[str, Any], backend: Optional[str]) -> Dict[str, torch.Tensor]:
        """2 Σ_{u<v} ⟨g_i^(u), g_i^(v)⟩ of every tied parameter, keyed by the first recorded use's layer
        (whose clipping group the tie's layers share); uses absent from ``records`` add nothing."""
        out: Dict[str, torch.Tensor] = {}
        for uses in self.uses.values():
            present = [(layer, name) for layer, name in uses if layer in records and records[layer].payload is not None]
            if len(present) < 2:
                continue
            forms = [records[layer].module.dp_use(records[layer].payload, name) for layer, name in present]
            total = None
            for u in range(len(forms)):
                for v in range(u + 1, len(forms)):
                    term = cross_term(forms[u], forms[v], backend)
                    total = term if total is None else total + term
            key = present[0][0]
            out[key] = 2.0 * total if key not in out else out[key] + 2.0 * total
        return out
