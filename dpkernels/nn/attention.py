"""DPMultiheadAttention: a drop-in nn.MultiheadAttention whose projections are clipped per example.

Its trainable parameters are the input projections (the packed ``in_proj_weight`` (3E, E), or
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when kdim/vdim differ from E, and
``in_proj_bias``) and the output projection ``out_proj``, a DPLinear child. Same constructor,
same parameters, same state_dict as nn.MultiheadAttention. The attention itself (softmax of
scaled dot products, masks, dropout) has no parameters and runs as torch runs it.

Examples sit where the module's own ``batch_first`` says, (N, L, E) or (L, N, E), whatever
``make_private(batch_first=...)`` says for other layers. ``add_bias_kv=True`` with trainable
``bias_k``/``bias_v`` is refused (no per-example path for them yet): freeze them or leave the
option off.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import functional
from ..autograd.attention import DPPackedProjectionFunction, DPSplitProjectionFunction
from ..ops.philox import PhiloxKey
from .linear import DPLinear
from .module import DPModule
from .registry import register_dp_layer


def _float_mask(mask: Optional[torch.Tensor], dtype: torch.dtype, name: str) -> Optional[torch.Tensor]:
    """A boolean mask (True = not attended) as an additive float mask; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating tensor, got {mask.dtype}")
    return mask.to(dtype)


@register_dp_layer(nn.MultiheadAttention)
class DPMultiheadAttention(nn.MultiheadAttention, DPModule):
    """``nn.MultiheadAttention`` for DP training (see the module docstring)."""

    @classmethod
    def dp_from(cls, mha: nn.MultiheadAttention) -> "DPMultiheadAttention":
        """A DPMultiheadAttention sharing ``mha``'s Parameter objects (its out_proj becomes a DPLinear)."""
        new = cls.adopt(
            mha,
            (
                "embed_dim",
                "kdim",
                "vdim",
                "_qkv_same_embed_dim",
                "num_heads",
                "dropout",
                "batch_first",
                "head_dim",
                "add_zero_attn",
            ),
            ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v"),
        )
        new.out_proj = DPLinear.dp_from(mha.out_proj) if type(mha.out_proj) is not DPLinear else mha.out_proj
        return new

    from_multihead_attention = dp_from

    # ---- which parameters this module clips (out_proj is its own DP layer) -------------
    def _projection_weights(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._qkv_same_embed_dim:
            return tuple(self.in_proj_weight.split(self.embed_dim))  # type: ignore[return-value]
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _weight_names(self) -> List[str]:
        return ["in_proj_weight"] if self._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]

    def _projection_trainable(self) -> bool:
        return any(getattr(self, n).requires_grad for n in self._weight_names())

    def _bias_trainable(self) -> bool:
        return self.in_proj_bias is not None and self.in_proj_bias.requires_grad

    def dp_unsupported_reason(self) -> Optional[str]:
        weights = [getattr(self, n).requires_grad for n in self._weight_names()]
        if any(weights) and not all(weights):
            return "q/k/v projection weights must be all trainable or all frozen"
        if self._bias_trainable() and not all(weights):
            return "a trainable in_proj_bias with frozen projection weights is not supported; freeze it too"
        if any(b is not None and b.requires_grad for b in (self.bias_k, self.bias_v)):
            return (
                "add_bias_kv=True: bias_k/bias_v have no per-example clipping path yet; freeze them "
                "(requires_grad_(False)) or use add_bias_kv=False"
            )
        return None

    # ---- forward -----------------------------------------------------------------------
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        private = self.dp_private_forward() and (self._projection_trainable() or self.out_proj.weight.requires_grad)
        if not private:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        if query.dim() != 3:
            raise ValueError(
                f"DPMultiheadAttention needs batched input ({'N, L, E' if self.batch_first else 'L, N, E'}) under "
                f"private training, got query of shape {tuple(query.shape)}"
            )
        bd = 0 if self.batch_first else 1
        self_attention = query is key and key is value
        if self._projection_trainable():
            if self_attention:
                (query,), _ = self.dp_examples(query, batch_dim=bd)
                key = value = query
            else:
                (query, key, value), _ = self.dp_examples(query, key, value, batch_dim=bd)
        if is_causal and attn_mask is None:  # as nn.MultiheadAttention: is_causal is only a hint about attn_mask
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                "method `generate_square_subsequent_mask` to create this mask."
            )
        if not self.batch_first:  # work batch-first: (N, L, E) views
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value, self_attention)
        out, weights = self._attend(q, k, v, key_padding_mask, need_weights, attn_mask, average_attn_weights)
        # out_proj is a DPLinear: hand it the layout the engine expects of every layer
        engine_batch_first = self._dp_collector.batch_first
        out = self.out_proj(out if engine_batch_first else out.transpose(0, 1))
        if engine_batch_first != self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query, key, value, self_attention: bool):
        E = self.embed_dim
        if not self._projection_trainable():  # frozen projections: plain products
            w_q, w_k, w_v = self._projection_weights()
            b_q, b_k, b_v = self.in_proj_bias.split(E) if self.in_proj_bias is not None else (None, None, None)
            return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        collector = self._dp_collector.for_module(self)
        if self_attention and self._qkv_same_embed_dim:
            y = DPPackedProjectionFunction.apply(query, self.in_proj_weight, self.in_proj_bias, collector)
            return y.split(E, dim=-1)
        w_q, w_k, w_v = self._projection_weights()
        b_q, b_k, b_v = self.in_proj_bias.split(E) if self.in_proj_bias is not None else (None, None, None)
        return DPSplitProjectionFunction.apply(query, key, value, w_q, w_k, w_v, b_q, b_k, b_v, collector)

    def _attend(self, q, k, v, key_padding_mask, need_weights, attn_mask, average_attn_weights):
        """softmax(q kᵀ/√d + mask) v per head, as nn.MultiheadAttention computes it; q (N, L, E), k/v (N, S, E)."""
        N, L, E = q.shape
        H, Dh = self.num_heads, self.head_dim
        # key/value rows appended after the projections, in torch's order: bias_k/bias_v (frozen:
        # dp_unsupported_reason refuses trainable ones), then zeros; the masks grow with them
        appended = []
        if self.bias_k is not None:
            appended.append((self.bias_k.expand(N, 1, E), self.bias_v.expand(N, 1, E)))
        if self.add_zero_attn:
            appended.append((k.new_zeros(N, 1, E), v.new_zeros(N, 1, E)))
        for k_row, v_row in appended:
            k, v = torch.cat([k, k_row], dim=1), torch.cat([v, v_row], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        S = k.shape[1]
        qh = q.reshape(N, L, H, Dh).transpose(1, 2)
        kh = k.reshape(N, S, H, Dh).transpose(1, 2)
        vh = v.reshape(N, S, H, Dh).transpose(1, 2)
        mask = _float_mask(attn_mask, q.dtype, "attn_mask")
        if mask is not None:
            mask = mask.view(N, H, L, S) if mask.dim() == 3 else mask.view(1, 1, L, S)
        kpm = _float_mask(key_padding_mask, q.dtype, "key_padding_mask")
        if kpm is not None:
            kpm = kpm.view(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        if not need_weights:
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p)
            weights = None
        else:
            scores = (qh * (1.0 / math.sqrt(Dh))) @ kh.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ vh
            if average_attn_weights:
                weights = weights.mean(dim=1)
        return out.transpose(1, 2).reshape(N, L, E), weights

    # ---- the DPModule contract ---------------------------------------------------------
    def dp_sq_norms(self, payload: Any, method: str, backend: Optional[str]) -> torch.Tensor:
        _, pairs = payload
        bias = self._bias_trainable()
        return sum(functional.linear_sq_norms(x, g, bias=bias, method=method, backend=backend) for x, g in pairs)

    def dp_clipped_grads(
        self,
        payload: Any,
        clip_factors: torch.Tensor,
        noise_std: float,
        keys: Dict[str, PhiloxKey],
        backend: Optional[str],
        out_dtype: Optional[torch.dtype] = None,
    ) -> Dict[str, torch.Tensor]:
        kind, pairs = payload
        grads: Dict[str, torch.Tensor] = {}
        names = self._weight_names()
        if kind == "packed" or len(names) == 3:  # one weight per (x, G) pair: noise inside the fused GEMM
            for name, (x, g) in zip(names if kind == "split" else ["in_proj_weight"], pairs):
                grads[name] = functional.linear_clipped_grad(
                    x,
                    g,
                    clip_factors,
                    bias=False,
                    noise_std=noise_std,
                    generator=keys[name],
                    backend=backend,
                    out_dtype=out_dtype or getattr(self, name).dtype,
                )[0]
        else:  # split products into the packed weight: blocks without noise, then the weight's noise once
            blocks = [
                functional.linear_clipped_grad(
                    x,
                    g,
                    clip_factors,
                    bias=False,
                    noise_std=0.0,
                    generator=keys["in_proj_weight"],
                    backend=backend,
                    out_dtype=torch.float32,
                )[0]
                for x, g in pairs
            ]
            w = torch.cat(blocks)
            w += functional.gaussian_noise(
                w.shape, std=noise_std, generator=keys["in_proj_weight"], device=w.device, backend=backend
            )
            grads["in_proj_weight"] = w.to(out_dtype or self.in_proj_weight.dtype)
        if "in_proj_bias" in keys:
            per_example = torch.cat(
                [g.reshape(g.shape[0], -1, g.shape[-1]).sum(dim=1, dtype=torch.float32) for _, g in pairs], dim=1
            )
            grads["in_proj_bias"] = functional.clip_sum_noise(
                per_example,
                clip_factors,
                noise_std=noise_std,
                generator=keys["in_proj_bias"],
                backend=backend,
            ).to(out_dtype or self.in_proj_bias.dtype)
        return grads
