"""DPConv1d, DPConv2d: drop-in nn.Conv1d / nn.Conv2d with a per-example clipping path.

A convolution is a linear layer on patches (``dpkernels.ops.conv_patches``): the norms and the
clipped sum are the linear layer's fused kernels run on the patch matrices, which are
materialised transiently (about ∏k times the layer's input, in backward and at step).
Conv3d and the transposed convolutions have no such path yet; ``make_private`` refuses them.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .. import functional
from ..autograd.conv import DPConvFunction
from ..ops.conv_patches import ConvGeometry, pad_for_conv
from ..ops.philox import PhiloxKey
from .linear import _autocast_enabled
from .module import DPModule
from .registry import register_dp_layer

_CONV_ATTRS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)


class _DPConvNd(DPModule):
    """What DPConv1d and DPConv2d share. The recorded payload is (x, G): x the input F.conv gets
    (already padded where the padding mode or an asymmetric 'same' needs F.pad), G its output
    gradient; the conv's own padding is then symmetric zero padding."""

    _torch_type: type = nn.Module
    _spatial_dims: int = 0

    @classmethod
    def dp_from(cls, conv: nn.Module) -> nn.Module:
        """A DP convolution sharing ``conv``'s Parameter objects (optimizers keep pointing at them)."""
        if not isinstance(conv, cls._torch_type):
            raise TypeError(
                f"{cls.__name__}.from_conv needs an nn.{cls._torch_type.__name__}, got {type(conv).__name__}"
            )
        return cls.adopt(conv, _CONV_ATTRS, ("weight", "bias"))

    @classmethod
    def from_conv(cls, conv: nn.Module) -> nn.Module:
        return cls.dp_from(conv)

    def dp_unsupported_reason(self) -> Optional[str]:
        if self._bias_trainable() and not self.weight.requires_grad:
            return "a trainable bias with a frozen weight is not supported; freeze the bias too or unfreeze the weight"
        return None

    def _dp_private(self) -> bool:
        return self.dp_private_forward() and self.weight.requires_grad

    def _geometry(self) -> ConvGeometry:
        return ConvGeometry.from_args(
            self.weight.shape, self.stride, self.padding, self.dilation, self.groups, self.padding_mode
        )

    def _conv_padding(self) -> Tuple[int, ...]:
        """The symmetric zero padding the recorded x is convolved with."""
        return self._geometry().conv_padding_split()[1]

    def _private_forward(self, input: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if input.dim() != self._spatial_dims + 2:
            layout = "(B, C, L)" if self._spatial_dims == 1 else "(B, C, H, W)"
            raise ValueError(
                f"{name} needs batched input of shape {layout} under private training (the batch on dimension 0), "
                f"got {tuple(input.shape)}: unbatched input has no examples to clip"
            )
        (input,), (layout,) = self.dp_examples(input, batch_dim=0)
        if layout.kind == "flattened":
            raise ValueError(f"{name} convolves each example on its own: a flattened batch layout does not apply")
        collector = self._dp_collector.for_module(self)
        weight, bias = self.weight, self.bias
        if _autocast_enabled(input.device.type):
            # autocast's cast done here, so that the saved input, the output gradient and the
            # per-example norms all see the dtype the convolution ran in
            dtype = torch.get_autocast_dtype(input.device.type)
            input, weight = input.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        x, conv_padding = pad_for_conv(input, self._geometry())
        return DPConvFunction.apply(x, weight, bias, self.stride, conv_padding, self.dilation, self.groups, collector)

    def _conv_kwargs(self) -> Dict[str, Any]:
        return dict(
            stride=self.stride,
            padding=self._conv_padding(),
            dilation=self.dilation,
            groups=self.groups,
            padding_mode="zeros",
            bias=self._bias_trainable(),
        )

    def dp_sq_norms(
        self, x: torch.Tensor, grad_output: torch.Tensor, method: str, backend: Optional[str]
    ) -> torch.Tensor:
        return functional.conv_sq_norms(
            x, grad_output, self.weight.shape, method=method, backend=backend, **self._conv_kwargs()
        )

    def dp_clipped_grads(
        self,
        payload: Any,
        clip_factors: torch.Tensor,
        noise_std: float,
        keys: Dict[str, PhiloxKey],
        backend: Optional[str],
        out_dtype: Optional[torch.dtype] = None,
    ) -> Dict[str, torch.Tensor]:
        x, grad_output = payload
        kwargs = self._conv_kwargs()
        if kwargs["bias"] and keys["bias"].stream != keys["weight"].stream + 1:
            raise RuntimeError("internal: the bias noise stream must follow the weight's (stream + 1)")
        grad_w, grad_b = functional.conv_clipped_grad(
            x,
            grad_output,
            clip_factors,
            self.weight.shape,
            noise_std=noise_std,
            generator=keys["weight"],
            backend=backend,
            out_dtype=out_dtype or self.weight.dtype,
            **kwargs,
        )
        grads = {"weight": grad_w}
        if grad_b is not None:
            grads["bias"] = grad_b
        return grads

    def _bias_trainable(self) -> bool:
        return self.bias is not None and self.bias.requires_grad


@register_dp_layer(nn.Conv1d, math=("forward", "_conv_forward"))
class DPConv1d(nn.Conv1d, _DPConvNd):
    """``nn.Conv1d`` (same constructor, same parameters, same state_dict) for DP training.

    Outside a private engine it is exactly nn.Conv1d. Attached to one (``make_private``), its
    backward reports per-example squared gradient norms (``functional.conv_sq_norms``) and defers
    the weight and bias gradients to the engine's clipped sum (``functional.conv_clipped_grad``).
    Input (B, C_in, L): the batch is dimension 0 whatever ``batch_first`` says; unbatched
    (C_in, L) input is refused under private training.
    """

    _torch_type = nn.Conv1d
    _spatial_dims = 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._dp_private():
            return super().forward(input)
        return self._private_forward(input)


@register_dp_layer(nn.Conv2d, math=("forward", "_conv_forward"))
class DPConv2d(nn.Conv2d, _DPConvNd):
    """``nn.Conv2d`` (same constructor, same parameters, same state_dict) for DP training.

    As DPConv1d, with input (B, C_in, H, W); unbatched (C_in, H, W) input is refused under
    private training.
    """

    _torch_type = nn.Conv2d
    _spatial_dims = 2

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._dp_private():
            return super().forward(input)
        return self._private_forward(input)
