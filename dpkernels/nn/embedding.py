"""DPEmbedding: a drop-in nn.Embedding with a per-example clipping path."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .. import functional
from ..autograd.embedding import DPEmbeddingFunction
from ..ops.philox import PhiloxKey
from .module import DPModule
from .registry import register_dp_layer


@register_dp_layer(nn.Embedding)
class DPEmbedding(nn.Embedding, DPModule):
    """``nn.Embedding`` (same constructor, same parameter, same state_dict) for DP training.

    Outside a private engine it is exactly nn.Embedding. Attached to one (``make_private``), its
    backward reports per-example squared gradient norms (``functional.embedding_sq_norms``) and
    defers the table's gradient to the engine, which writes Σ_i c_i g_i + noise over the whole
    table (every row gets noise, whether or not a token of the batch hit it). Tokens (B,) or
    (B, *); with ``make_private(..., batch_first=False)``, (T, B, *) (the batch on dimension 1)
    or (B,). ``max_norm`` renormalises the looked-up rows in forward as nn.Embedding does.
    ``scale_grad_by_freq=True`` and ``sparse=True`` are refused under private training
    (``dp_unsupported_reason``).
    """

    @classmethod
    def dp_from(cls, embedding: nn.Embedding) -> "DPEmbedding":
        """A DPEmbedding sharing ``embedding``'s Parameter (optimizers keep pointing at it)."""
        return cls.adopt(
            embedding,
            ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
            ("weight",),
        )

    from_embedding = dp_from

    def dp_unsupported_reason(self) -> Optional[str]:
        """Why this layer, as configured, cannot be trained with per-example clipping (None if it can)."""
        if self.scale_grad_by_freq:
            return (
                "scale_grad_by_freq=True divides each row's gradient by the token's count in the whole batch, so "
                "an example's gradient would depend on the other examples' tokens (not a per-example gradient); "
                "use scale_grad_by_freq=False"
            )
        if self.sparse:
            return (
                "sparse=True asks for a sparse gradient, but the private gradient is dense (the noise covers every "
                "row of the table); use sparse=False and a dense optimizer"
            )
        return None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.dp_private_forward() and self.weight.requires_grad):
            return super().forward(input)
        return self.dp_lookup(input)

    def dp_lookup(self, input: torch.Tensor) -> torch.Tensor:
        """The private path of ``forward``: F.embedding(input, weight) with the examples' ids recorded."""
        collector = self._dp_collector.for_module(self)
        reason = self.dp_unsupported_reason()
        if reason is not None:
            raise ValueError(f"DPEmbedding '{collector.name}' cannot be trained privately: {reason}")
        if input.dim() < 1:
            raise ValueError(
                f"DPEmbedding needs batched token ids of shape (B,) or (B, *) under private training, "
                f"got {tuple(input.shape)}"
            )
        # batch_first=False: (T, B, ...) token ids carry the batch on dimension 1; (B,) stays (B,)
        batch_dim = 0 if collector.step.batch_first or input.dim() < 2 else 1
        (input,), (layout,) = self.dp_examples(input, batch_dim=batch_dim)
        if self.max_norm is not None:  # as F.embedding: rows renormalised in place, outside autograd
            input = input.contiguous()
            with torch.no_grad():
                torch.embedding_renorm_(self.weight, input, self.max_norm, self.norm_type)
        return DPEmbeddingFunction.apply(input, self.weight, collector, layout, self.padding_idx)

    def dp_sq_norms(self, kind: str, *tensors: torch.Tensor, method: str, backend: Optional[str]) -> torch.Tensor:
        # ``method`` is the linear layers' norm method (the engine passes it to every layer): unused here
        if kind == "per_example":
            (per_example,) = tensors
            return per_example.reshape(per_example.shape[0], -1).square().sum(dim=1)
        tokens, grad_output = tensors
        return functional.embedding_sq_norms(
            tokens,
            grad_output,
            num_embeddings=self.num_embeddings,
            padding_idx=self.padding_idx,
            backend=backend,
            check_ids=False,  # the forward's F.embedding checked them
        )

    def dp_use(self, payload: Any, name: str) -> Any:
        from ..engine.ties import DenseUse, TokenUse

        if payload[0] == "per_example":
            return DenseUse(payload[1])
        _, tokens, grad_output = payload
        return TokenUse(tokens, grad_output, self.num_embeddings, self.padding_idx)

    def dp_clipped_grads(
        self,
        payload: Any,
        clip_factors: torch.Tensor,
        noise_std: float,
        keys: Dict[str, PhiloxKey],
        backend: Optional[str],
        out_dtype: Optional[torch.dtype] = None,
    ) -> Dict[str, torch.Tensor]:
        if payload[0] == "per_example":
            per_example = payload[1]
            grad = functional.clip_sum_noise(
                per_example.reshape(per_example.shape[0], -1),
                clip_factors,
                noise_std=noise_std,
                generator=keys["weight"],
                backend=backend,
            )
            return {"weight": grad.view(self.weight.shape).to(out_dtype or self.weight.dtype)}
        _, tokens, grad_output = payload
        grad = functional.embedding_clipped_grad(
            tokens,
            grad_output,
            clip_factors,
            num_embeddings=self.num_embeddings,
            padding_idx=self.padding_idx,
            noise_std=noise_std,
            generator=keys["weight"],
            backend=backend,
            out_dtype=out_dtype or self.weight.dtype,
            check_ids=False,
        )
        return {"weight": grad}
