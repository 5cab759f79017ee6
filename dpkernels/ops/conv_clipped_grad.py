"""Clipped, noised weight and bias gradients of a convolution.

With the notation of ``conv_patches.py`` (clip factors c (B,), noise standard deviation σ_n):

    grad_W = Σ_i c_i ∇W_i + σ_n·Z          the convolution's own weight gradient of (c∘G, x)
                                           (``conv_patches.clipped_weight_sum``: torch's conv
                                           backward, every group in one call, no patches), float32
    grad_b = Σ_i c_i Σ_l G_il + σ_n·z       the clip-sum-noise of the (B, C_out) per-example bias
                                           gradients (``clip_sum_noise.py``)

Z is ``philox_normal(key)`` at the element's row-major index in the weight, added in place by the
compiled CPU kernel on the torch backend (``philox.add_normal_``) and by the Triton generator
otherwise; the bias's z comes from stream + 1 (``PhiloxKey.next_stream``). Both are returned in
``out_dtype`` (default x's dtype). The op ``dpkernels::conv_clipped_grad`` takes the geometry as
``ConvGeometry.as_list``; on the ``cuda`` backend the bias goes through the CUDA clip-sum-noise.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from ._library import kernel_op
from ._triton import add_noise_triton_
from .clip_sum_noise import clip_sum_noise_cuda, clip_sum_noise_reference, clip_sum_noise_triton
from .conv_patches import ConvGeometry, clipped_weight_sum
from .philox import PhiloxKey, add_normal_


def _conv_clipped_grad(add_noise_: Callable, bias_sum: Callable) -> Callable:
    """The op with one backend's in-place noise and bias clip-sum-noise."""

    def run(
        x: torch.Tensor,
        grad_output: torch.Tensor,
        clip_factors: torch.Tensor,
        geometry: List[int],
        padding_mode: str,
        noise_std: float,
        key: PhiloxKey,
        out_dtype: Optional[torch.dtype],
        bias: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        geo = ConvGeometry.from_list(geometry, padding_mode)
        bias_key = key.next_stream() if bias else None
        out_dtype = out_dtype or x.dtype
        grad_w = clipped_weight_sum(x, grad_output, clip_factors, geo)
        if noise_std != 0.0:  # element e of the noise at row-major index e of the weight, whatever its strides
            grad_w = grad_w.contiguous()
            add_noise_(grad_w.view(-1), noise_std, key)
        grad_b = None
        if bias:
            per_example_bias = grad_output.sum(dim=tuple(range(2, grad_output.dim())), dtype=torch.float32)
            grad_b = bias_sum(per_example_bias, clip_factors, noise_std, bias_key).to(out_dtype)
        return grad_w.to(out_dtype), grad_b

    run.__name__ = run.__qualname__ = f"conv_clipped_grad_{add_noise_.__name__}_{bias_sum.__name__}"
    return run


def _conv_clipped_grad_fake(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    clip_factors: torch.Tensor,
    geometry: List[int],
    padding_mode: str,
    noise_std: float,
    key: torch.Tensor,
    out_dtype: Optional[torch.dtype],
    bias: bool,
):
    geo = ConvGeometry.from_list(geometry, padding_mode)
    dtype = out_dtype or x.dtype
    return (x.new_empty(geo.weight_shape, dtype=dtype), x.new_empty((geo.out_channels,), dtype=dtype) if bias else None)


# dpkernels::conv_clipped_grad (ops/_library.py) -> [grad_W (weight_shape), grad_b (C_out,)?]
OP = kernel_op(
    "conv_clipped_grad",
    "(Tensor x, Tensor grad_output, Tensor clip_factors, int[] geometry, str padding_mode, float noise_std, "
    "Tensor key, ScalarType? out_dtype, bool bias) -> Tensor[]",
    torch=_conv_clipped_grad(add_normal_, clip_sum_noise_reference),
    triton=_conv_clipped_grad(add_noise_triton_, clip_sum_noise_triton),
    cuda=_conv_clipped_grad(add_noise_triton_, clip_sum_noise_cuda),
    fake=_conv_clipped_grad_fake,
    key_args=(6,),
    optional_outputs=True,
)
