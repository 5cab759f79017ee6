"""DP layers for Hugging Face transformers' own layer classes.

Loaded by ``dpkernels.nn.convert`` (so by ``make_private``) when transformers is imported;
importing this module registers, in ``dpkernels.nn.registry``:

===================================  ==================================================================
transformers class                   DP version
===================================  ==================================================================
``pytorch_utils.Conv1D`` (GPT-2)     a linear layer on the transposed weight: y = x W + b with W (in,
                                     out) is x (Wᵀ)ᵀ + b, so the linear kernels run on the view Wᵀ and
                                     the clipped gradient is transposed back; same state_dict
Llama, Mistral, Mixtral, Qwen2,      RMSNorm y = w ⊙ x̂, x̂ = x / sqrt(mean(x²) + ε): per-example
Qwen3, Phi3, Olmo2 ``RMSNorm``;      gradients Σ_t x̂_t ⊙ G_t (``dpkernels.ops.norm_affine_grads``)
T5 / MT5 ``LayerNorm``
Gemma, Gemma2, Gemma3 ``RMSNorm``    y = (1 + w) ⊙ x̂: the same per-example gradient
``GemmaTextScaledWordEmbedding``,    the embedding subclass' own forward (scale, offset, position ids
``OPTLearnedPositionalEmbedding``    from the attention mask) around DPEmbedding's lookup
T5 / MT5 ``Attention``               its relative position bias looked up with the (1, T_q, T_k)
                                     buckets, which the guard expands to the batch before the lookup:
                                     each example's bias gradient is then its own attention-score
                                     gradient summed per bucket, not the batch's
``OPTDecoderLayer``                  declares fc1, fc2 and final_layer_norm flattened: OPT reshapes
                                     (B, T, d) to (B·T, d) before them, batch-major
``ViTEmbeddings``                    its bare ``cls_token`` and ``position_embeddings``: per-example
                                     gradients of the embeddings' forward by the torch.func path
                                     (``dpkernels.nn.fallback``): the token's slice of G, and G
===================================  ==================================================================

Position embeddings looked up with (1, T) ids and broadcast over the batch (BERT, DistilBERT,
GPT-2's ``wpe``) need nothing here: the guard expands such inputs before the lookup
(``dpkernels.engine.guard``). Each class is registered by its qualified name, so no model module
is imported here; the guard's probe checks at the first step that every DP version computes what
the class computes (a transformers release that changes one is refused, not mistrained).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..nn.convert import declare_flattened
from ..nn.embedding import DPEmbedding
from ..nn.fallback import FallbackPath
from ..nn.linear import LinearPath
from ..nn.module import DPModule, become
from ..nn.norm import _DPAffineNorm
from ..nn.registry import register

_MODELS = "transformers.models"


class DPConv1DPath(LinearPath):
    """GPT-2's Conv1D, y = x W + b with W stored (in, out): the linear path on Wᵀ."""

    _weight_transposed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._linear_private():
            return super().forward(x)
        return self._linear_forward(x)


class RMSNormPath(_DPAffineNorm):
    """An RMSNorm class of the Llama family: weight w, epsilon in ``variance_epsilon``."""

    _dp_eps_attribute = "variance_epsilon"
    _dp_unit_offset = False  # Gemma: y = x̂ ⊙ (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._private():
            return super().forward(x)
        weight = 1.0 + self.weight.float() if self._dp_unit_offset else self.weight
        return self._rms_norm_private(x, weight, getattr(self, self._dp_eps_attribute))


class GemmaRMSNormPath(RMSNormPath):
    _dp_eps_attribute = "eps"
    _dp_unit_offset = True


class T5AttentionPath:
    """T5's attention with the relative position bias looked up per example (see the module docstring)."""

    def compute_bias(
        self, query_length: int, key_length: int, device: Optional[torch.device] = None, past_seen_tokens: int = 0
    ) -> torch.Tensor:
        table = self.relative_attention_bias
        if not (isinstance(table, DPModule) and table.weight.requires_grad and table.dp_private_forward()):
            return super().compute_bias(query_length, key_length, device=device, past_seen_tokens=past_seen_tokens)
        if device is None:
            device = table.weight.device
        context = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + past_seen_tokens
        memory = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        buckets = self._relative_position_bucket(
            memory - context,
            bidirectional=not self.is_decoder,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
        )
        values = table(buckets.unsqueeze(0))  # (B, T_q, T_k, H): the guard expands the shared buckets
        return values.permute(0, 3, 1, 2)  # (B, H, T_q, T_k), added to each example's scores


_T5_BIAS_PARAMETERS = ["self", "query_length", "key_length", "device", "past_seen_tokens"]


def _t5_attention(module: nn.Module) -> nn.Module:
    if not getattr(module, "has_relative_attention_bias", False):
        return module
    if list(inspect.signature(type(module).compute_bias).parameters) != _T5_BIAS_PARAMETERS:
        return module  # another release's signature: left as it is, and the guard refuses a trainable bias
    return become(module, T5AttentionPath, type(module))


def _opt_decoder_layer(module: nn.Module) -> nn.Module:
    declare_flattened(*(getattr(module, n) for n in ("fc1", "fc2", "final_layer_norm") if hasattr(module, n)))
    return module


def _norm_builder(path: type):
    def build(module: nn.Module) -> nn.Module:
        return become(module, path, type(module))

    return build


def _embedding_subclass(module: nn.Module) -> nn.Module:
    # the library's forward first: its super().forward(ids) then reaches DPEmbedding's private lookup
    return become(module, type(module), DPEmbedding)


register(Conv1D, _norm_builder(DPConv1DPath), dp_type=DPConv1DPath)
for _model, _cls in [
    ("llama", "LlamaRMSNorm"),
    ("mistral", "MistralRMSNorm"),
    ("mixtral", "MixtralRMSNorm"),
    ("qwen2", "Qwen2RMSNorm"),
    ("qwen3", "Qwen3RMSNorm"),
    ("phi3", "Phi3RMSNorm"),
    ("olmo2", "Olmo2RMSNorm"),
    ("t5", "T5LayerNorm"),
    ("mt5", "MT5LayerNorm"),
]:
    register(f"{_MODELS}.{_model}.modeling_{_model}.{_cls}", _norm_builder(RMSNormPath), dp_type=RMSNormPath)
for _model, _cls in [("gemma", "GemmaRMSNorm"), ("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm")]:
    register(f"{_MODELS}.{_model}.modeling_{_model}.{_cls}", _norm_builder(GemmaRMSNormPath), dp_type=GemmaRMSNormPath)
for _model, _cls in [
    ("gemma", "GemmaTextScaledWordEmbedding"),
    ("gemma2", "Gemma2TextScaledWordEmbedding"),
    ("gemma3", "Gemma3TextScaledWordEmbedding"),
    ("opt", "OPTLearnedPositionalEmbedding"),
]:
    register(f"{_MODELS}.{_model}.modeling_{_model}.{_cls}", _embedding_subclass, dp_type=DPEmbedding)
for _model, _cls in [("t5", "T5Attention"), ("mt5", "MT5Attention")]:
    register(f"{_MODELS}.{_model}.modeling_{_model}.{_cls}", _t5_attention, math=("forward", "compute_bias"))
register(f"{_MODELS}.opt.modeling_opt.OPTDecoderLayer", _opt_decoder_layer)
register(f"{_MODELS}.vit.modeling_vit.ViTEmbeddings", _norm_builder(FallbackPath), dp_type=FallbackPath)
