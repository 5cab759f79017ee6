"""Conv1d/Conv2d: per-example squared norms and the clipped, noised gradients (math:
``dpkernels.ops.conv_patches``, ``dpkernels.ops.conv_sq_norms``, ``dpkernels.ops.conv_clipped_grad``)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops import conv_clipped_grad as _clipped
from ..ops import conv_sq_norms as _norms
from ..ops.philox import resolve_key
from . import _checks
from ._types import Generator


def conv_sq_norms(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    weight_shape: "tuple[int, ...] | torch.Size",
    *,
    stride: "int | tuple[int, ...]" = 1,
    padding: "str | int | tuple[int, ...]" = 0,
    dilation: "int | tuple[int, ...]" = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    bias: bool = True,
    method: str = "auto",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Squared per-example gradient norms of a Conv1d/Conv2d as float32 (B,).

    x: the layer input (B, C_in, L) or (B, C_in, H, W); grad_output: ∂L/∂y (B, C_out, *out),
    same dtype (float32, bfloat16 or float16) and device. ``weight_shape`` (C_out, C_in/groups,
    *kernel) and the other arguments as for nn.Conv1d/nn.Conv2d (``padding`` "same"/"valid" or
    ints; ``padding_mode`` "zeros", "reflect", "replicate" or "circular"). ``bias`` adds the bias
    gradient's norm; ``method`` as in ``linear_sq_norms`` with L output positions as T. The
    direct method builds no patches (``dpkernels.ops.conv_sq_norms``: the Triton kernel indexes
    them, the torch backend convolves per example); the ghost method materialises them, about
    ∏k times x (``dpkernels.ops.conv_patches``).
    """
    method = _checks.conv_method(method)
    geometry = _checks.conv_geometry(x, grad_output, weight_shape, stride, padding, dilation, groups, padding_mode)
    return _norms.OP(x, grad_output, geometry.as_list(), geometry.padding_mode, bias, method, backend=backend)


def conv_clipped_grad(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    clip_factors: torch.Tensor,
    weight_shape: "tuple[int, ...] | torch.Size",
    *,
    stride: "int | tuple[int, ...]" = 1,
    padding: "str | int | tuple[int, ...]" = 0,
    dilation: "int | tuple[int, ...]" = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    bias: bool = True,
    noise_std: float = 0.0,
    generator: Generator = None,
    backend: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(grad_weight, grad_bias)`` = Σ_i c_i g_i + noise_std·z of a Conv1d/Conv2d.

    Inputs as in ``conv_sq_norms``; clip_factors (B,). grad_weight has ``weight_shape``,
    grad_bias is (C_out,) (None when ``bias=False``), both in ``out_dtype`` (default x's dtype),
    accumulated in float32. The sum is torch's convolution weight gradient of (c∘G, x) (see
    ``dpkernels.ops.conv_clipped_grad``; it follows ``torch.backends.cudnn.allow_tf32`` as the
    non-private backward does); ``backend`` picks the noise generator and the bias's
    clip-sum-noise. ``generator`` as in ``linear_clipped_grad``: the weight's draws are
    philox_normal(key) at the element's row-major index in the weight, the bias's come from
    stream + 1.
    """
    geometry = _checks.conv_geometry(x, grad_output, weight_shape, stride, padding, dilation, groups, padding_mode)
    c = _checks.clip_factors(clip_factors, x.shape[0], x.device)
    return _clipped.OP(
        x,
        grad_output,
        c,
        geometry.as_list(),
        geometry.padding_mode,
        _checks.noise_std(noise_std),
        resolve_key(generator),
        _checks.out_dtype(out_dtype),
        bias,
        backend=backend,
    )
