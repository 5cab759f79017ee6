"""DP layers for timm's own normalisation classes.

Loaded by ``dpkernels.nn.convert`` (so by ``make_private``) when timm is imported. timm's
norm classes subclass torch's and override ``forward`` only to add an optional fused kernel,
so the registry (which converts a subclass that overrides ``forward`` only when told to) is
told here that their math is the parent's:

=============================  ===================================================================
timm class (``timm.layers``)   DP version
=============================  ===================================================================
``LayerNorm``                  DPLayerNorm's private path; timm's forward otherwise
``LayerNorm2d``                LayerNorm over the channels of (B, C, H, W): the private path on the
                               (B, H, W, C) permutation, permuted back
``GroupNorm``, ``GroupNorm1``  DPGroupNorm's private path
``RmsNorm``                    RMSNorm over ``normalized_shape`` (computed in float32)
``LayerScale``, ``LayerScale2d``  x ⊙ γ: γ's per-example gradient Σ x ⊙ G by the torch.func path
                               (``dpkernels.nn.fallback``)
``VisionTransformer``          its bare ``cls_token``, ``reg_token``, ``pos_embed``: per-example
                               gradients of ``_pos_embed`` alone (the token's slice of G, G itself
                               for the added position embedding) by the torch.func path
=============================  ===================================================================

Every converted layer stays an instance of its timm class. The guard's probe checks at the first
step that the DP model computes what the timm model computes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..nn.fallback import FallbackPath
from ..nn.module import become
from ..nn.norm import DPGroupNorm, DPLayerNorm, _DPAffineNorm
from ..nn.registry import register

_NORM = "timm.layers.norm"


class LayerNorm2dPath(DPLayerNorm):
    """timm's LayerNorm2d: LayerNorm over C of (B, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._private():
            return super().forward(x)
        return self._layer_norm_private(x.permute(0, 2, 3, 1), batch_dim=0).permute(0, 3, 1, 2)


class RmsNormPath(_DPAffineNorm):
    """timm's RmsNorm: y = x̂ ⊙ w over ``normalized_shape``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._private():
            return super().forward(x)
        return self._rms_norm_private(x, self.weight, self.eps)


class VisionTransformerPath(FallbackPath):
    """timm's VisionTransformer: the model runs as timm wrote it; only ``_pos_embed``, the one method
    using the bare parameters, goes through the fallback."""

    def forward(self, *args, **kwargs):
        return super(FallbackPath, self).forward(*args, **kwargs)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not self._dp_fallback_private():
            return super()._pos_embed(x)
        return self.fallback_call(_timm_pos_embed, x)


def _timm_pos_embed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return super(VisionTransformerPath, module)._pos_embed(x)


def _builder(path: type, affine_attribute: Optional[str] = None):
    def build(module: nn.Module) -> nn.Module:
        flag = getattr(module, affine_attribute, True) if affine_attribute else True
        if flag is False or flag is None:
            return module  # no affine parameters: nothing to clip
        return become(module, path, type(module))

    return build


register(f"{_NORM}.LayerNorm", _builder(DPLayerNorm, "elementwise_affine"), dp_type=DPLayerNorm)
register(f"{_NORM}.LayerNorm2d", _builder(LayerNorm2dPath, "elementwise_affine"), dp_type=LayerNorm2dPath)
register(f"{_NORM}.GroupNorm", _builder(DPGroupNorm, "affine"), dp_type=DPGroupNorm)
register(f"{_NORM}.GroupNorm1", _builder(DPGroupNorm, "affine"), dp_type=DPGroupNorm)
register(f"{_NORM}.RmsNorm", _builder(RmsNormPath, "elementwise_affine"), dp_type=RmsNormPath)
register("timm.layers.layer_scale.LayerScale", _builder(FallbackPath), dp_type=FallbackPath)
register("timm.layers.layer_scale.LayerScale2d", _builder(FallbackPath), dp_type=FallbackPath)
register(
    "timm.models.vision_transformer.VisionTransformer",
    _builder(VisionTransformerPath),
    math=("forward", "_pos_embed"),
    dp_type=VisionTransformerPath,
)
