"""DPLayerNorm, DPRMSNorm, DPGroupNorm: drop-in normalisation layers with a per-example clipping path.

Their per-example gradients are small ((B, n) per parameter), so backward materialises them
(``dpkernels.ops.norm_affine_grads``) and the step clips and noises them with the fused
clip-sum-noise pass (``functional.clip_sum_noise``). Memory: what the torch layer keeps, plus
(B, n) float32 per parameter until the step. BatchNorm has no such path: it mixes the examples
of a batch, and ``make_private`` refuses it.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional, Tuple

import torch
import torch.nn as nn

from ..autograd.norm import DPGroupNormFunction, DPLayerNormFunction, DPRMSNormFunction
from .linear import _autocast_enabled
from .module import DenseGradients
from .registry import register_dp_layer


def _float32_under_autocast(input: torch.Tensor) -> Tuple[torch.Tensor, ContextManager]:
    """Under autocast, the input in float32 and a context with autocast off (CUDA autocast runs norm
    layers in float32); otherwise the input as it is and a no-op context."""
    if _autocast_enabled(input.device.type):
        return input.float(), torch.autocast(input.device.type, enabled=False)
    return input, contextlib.nullcontext()


class _DPAffineNorm(DenseGradients):
    """What the three layers share: the recorded payload is {parameter name: (B, *shape) float32}."""

    def _trainable_affine(self) -> bool:
        return any(
            p is not None and p.requires_grad for p in (getattr(self, "weight", None), getattr(self, "bias", None))
        )

    def _private(self) -> bool:
        return self.dp_private_forward() and self._trainable_affine()

    def _examples(
        self, x: torch.Tensor, batched_dims: int, batch_dim: Optional[int] = None
    ) -> Tuple[torch.Tensor, Any]:
        """The input (expanded if broadcast) and the layout of its examples: dimension 0, or 1 for
        sequence-first input (batch_first=False) unless ``batch_dim`` says, as the guard admits them."""
        if x.dim() < batched_dims + 1:
            raise ValueError(
                f"{type(self).__name__} needs batched input under private training (a batch dimension before "
                f"the normalised ones), got {tuple(x.shape)}"
            )
        if batch_dim is None:
            batch_dim = 0 if self._dp_collector.batch_first or x.dim() < batched_dims + 2 else 1
        (x,), (layout,) = self.dp_examples(x, batch_dim=batch_dim)
        return x, layout

    def _layer_norm_private(self, input: torch.Tensor, batch_dim: Optional[int] = None) -> torch.Tensor:
        """LayerNorm over ``normalized_shape`` with ``weight``/``bias``, per-example affine gradients recorded."""
        input, layout = self._examples(input, len(self.normalized_shape), batch_dim)
        collector = self._dp_collector.for_module(self)
        x, precision = _float32_under_autocast(input)
        with precision:
            return DPLayerNormFunction.apply(
                x, self.weight, self.bias, tuple(self.normalized_shape), self.eps, collector, layout
            )

    def _rms_norm_private(
        self, input: torch.Tensor, weight: torch.Tensor, eps: Optional[float], batch_dim: Optional[int] = None
    ) -> torch.Tensor:
        """y = x̂ ⊙ weight, x̂ = x / sqrt(mean(x²) + eps) over weight's dimensions (the last ones), in
        float32; ``weight`` may be a function of the parameter (Gemma's 1 + w), whose per-example
        gradient Σ x̂ ⊙ G is the same."""
        shape = tuple(weight.shape)
        input, layout = self._examples(input, len(shape), batch_dim)
        collector = self._dp_collector.for_module(self)
        x, _ = _float32_under_autocast(input)  # computed in float32 inside anyway: no autocast to switch off
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        return DPRMSNormFunction.apply(x, weight, shape, eps, collector, layout)


@register_dp_layer(nn.LayerNorm)
class DPLayerNorm(nn.LayerNorm, _DPAffineNorm):
    """``nn.LayerNorm`` (same constructor, parameters and state_dict) for DP training.

    Input (B, *, *normalized_shape); with ``make_private(..., batch_first=False)``,
    (T, B, *, *normalized_shape). Under autocast the layer runs in float32 (as CUDA autocast runs
    layer_norm) and returns float32.
    """

    @classmethod
    def dp_from(cls, ln: nn.LayerNorm) -> nn.Module:
        """A DPLayerNorm sharing ``ln``'s Parameter objects (``ln`` itself when it has no affine parameters)."""
        if not ln.elementwise_affine:
            return ln
        return cls.adopt(ln, ("normalized_shape", "eps", "elementwise_affine"), ("weight", "bias"))

    from_layer_norm = dp_from

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._private():
            return super().forward(input)
        return self._layer_norm_private(input)


@register_dp_layer(nn.RMSNorm)
class DPRMSNorm(nn.RMSNorm, _DPAffineNorm):
    """``nn.RMSNorm`` (same constructor, parameters and state_dict) for DP training; ``eps=None``
    means ``torch.finfo(input.dtype).eps`` as in nn.RMSNorm. Computed in float32."""

    @classmethod
    def dp_from(cls, rms: nn.RMSNorm) -> nn.Module:
        if not rms.elementwise_affine:
            return rms
        return cls.adopt(rms, ("normalized_shape", "eps", "elementwise_affine"), ("weight",))

    from_rms_norm = dp_from

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._private():
            return super().forward(input)
        return self._rms_norm_private(input, self.weight, self.eps)


@register_dp_layer(nn.GroupNorm)
class DPGroupNorm(nn.GroupNorm, _DPAffineNorm):
    """``nn.GroupNorm`` (same constructor, parameters and state_dict) for DP training.

    Input (B, C, *): the batch is dimension 0 whatever ``batch_first`` says, since GroupNorm's
    statistics are per example along that dimension. Under autocast it runs in float32.
    """

    @classmethod
    def dp_from(cls, gn: nn.GroupNorm) -> nn.Module:
        if not gn.affine:
            return gn
        return cls.adopt(gn, ("num_groups", "num_channels", "eps", "affine"), ("weight", "bias"))

    from_group_norm = dp_from

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._private():
            return super().forward(input)
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"DPGroupNorm expects input (B, {self.num_channels}, *), got {tuple(input.shape)}")
        (input,), (layout,) = self.dp_examples(input, batch_dim=0)
        if layout.kind == "flattened":
            raise ValueError("DPGroupNorm normalises each example on its own: a flattened batch layout does not apply")
        collector = self._dp_collector.for_module(self)
        x, precision = _float32_under_autocast(input)
        with precision:
            return DPGroupNormFunction.apply(x, self.weight, self.bias, self.num_groups, self.eps, collector)
