"""Argument checks of the functional API, in one place: each public op checks its arguments here
and views them in the layout its kernels take, so that the op itself is one dispatch call."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops.conv_patches import ConvGeometry
from ..ops.linear_sq_norms import METHODS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOKEN_DTYPES = (torch.int32, torch.int64)


# ------------------------------------------------------------------ linear layers ---------


def _float_pair_on_one_device(x: torch.Tensor, grad_output: torch.Tensor) -> None:
    """A layer's input and output gradient: one float dtype, one device, a non-empty batch."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if grad_output.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but grad_output is {grad_output.dtype}: dtypes must match")
    if x.device != grad_output.device:
        raise ValueError(f"x is on {x.device} but grad_output is on {grad_output.device}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: x has batch size 0")


def as_btd(x: torch.Tensor, grad_output: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Check a linear layer's (input, output-gradient) pair and view both as (B, T, features)."""
    if not isinstance(x, torch.Tensor) or not isinstance(grad_output, torch.Tensor):
        raise TypeError("x and grad_output must be tensors")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, d) or (B, *, d); got {tuple(x.shape)}")
    if grad_output.dim() != x.dim() or grad_output.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"x {tuple(x.shape)} and grad_output {tuple(grad_output.shape)} must agree in every dimension but the last"
        )
    _float_pair_on_one_device(x, grad_output)
    B, d, p = x.shape[0], x.shape[-1], grad_output.shape[-1]
    if x.dim() == 2:
        return x.unsqueeze(1), grad_output.unsqueeze(1)
    # (B, T, d) stays a strided view; (B, *, d) with several middle dims is reshaped
    # (a view where the strides allow, else a copy)
    return x.reshape(B, -1, d), grad_output.reshape(B, -1, p)


def norm_method(method: str, T: int) -> str:
    """``method`` checked; T = 1 makes it "rowwise" (both ghost and direct reduce to ‖x_i‖²‖G_i‖²)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return "rowwise" if T == 1 else method


# ------------------------------------------------------------------ clipping and noise ----


def clip_factors(clip_factors: torch.Tensor, B: int, device: torch.device) -> torch.Tensor:
    """The clip factors as contiguous float32 (B,) on ``device``."""
    if not isinstance(clip_factors, torch.Tensor) or clip_factors.shape != (B,):
        shape = tuple(clip_factors.shape) if isinstance(clip_factors, torch.Tensor) else type(clip_factors)
        raise ValueError(f"clip_factors must be a tensor of shape ({B},), got {shape}")
    if clip_factors.device != device:
        raise ValueError(f"clip_factors is on {clip_factors.device}, the inputs on {device}")
    if not clip_factors.is_floating_point():
        raise TypeError(f"clip_factors must be floating point, got {clip_factors.dtype}")
    return clip_factors.to(torch.float32).contiguous()


def noise_std(noise_std: float) -> float:
    noise_std = float(noise_std)
    if not noise_std >= 0.0 or noise_std == float("inf"):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
    return noise_std


def out_dtype(dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def per_example(per_example: torch.Tensor) -> torch.Tensor:
    """Materialised per-example gradients (B, *shape) of a float dtype, B > 0."""
    if not isinstance(per_example, torch.Tensor) or per_example.dim() < 1:
        raise ValueError("per_example must be a tensor of shape (B, *param_shape)")
    if per_example.dtype not in FLOAT_DTYPES:
        raise TypeError(f"per_example must be float32, bfloat16 or float16, got {per_example.dtype}")
    if per_example.shape[0] == 0:
        raise ValueError("empty batch: per_example has batch size 0")
    return per_example


# ------------------------------------------------------------------ normalisation layers --


def same_shape_pair(x: torch.Tensor, grad_output: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(grad_output, torch.Tensor):
        raise TypeError("x and grad_output must be tensors")
    if x.shape != grad_output.shape:
        raise ValueError(
            f"{what}: x {tuple(x.shape)} and grad_output {tuple(grad_output.shape)} must have the same shape"
        )
    if x.dtype not in FLOAT_DTYPES or grad_output.dtype != x.dtype:
        raise TypeError(
            f"{what}: x and grad_output must share one dtype of float32, bfloat16, float16; got "
            f"{x.dtype} and {grad_output.dtype}"
        )
    if x.device != grad_output.device:
        raise ValueError(f"x is on {x.device} but grad_output is on {grad_output.device}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{what}: need a non-empty batch of shape (B, ...), got {tuple(x.shape)}")


def statistic(stat: Optional[torch.Tensor], name: str, numel: int, device: torch.device) -> Optional[torch.Tensor]:
    if stat is None:
        return None
    if not isinstance(stat, torch.Tensor) or stat.numel() != numel or not stat.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor with {numel} elements (one per normalised group)")
    if stat.device != device:
        raise ValueError(f"{name} is on {stat.device}, x on {device}")
    return stat


def both_or_neither(mean: Optional[torch.Tensor], rstd: Optional[torch.Tensor]) -> None:
    if (mean is None) != (rstd is None):
        raise ValueError("pass both mean and rstd, or neither")


def normalized_dims(x: torch.Tensor, normalized_shape) -> Tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or tuple(x.shape[x.dim() - len(shape) :]) != shape or x.dim() <= len(shape):
        raise ValueError(
            f"x {tuple(x.shape)} must be (B, *, {', '.join(map(str, shape))}) for normalized_shape {shape}"
        )
    return shape


def num_groups(num_groups: int, C: int) -> int:
    if not (isinstance(num_groups, int) and num_groups > 0 and C % num_groups == 0):
        raise ValueError(f"num_groups must be a positive divisor of the {C} channels, got {num_groups!r}")
    return num_groups


# ------------------------------------------------------------------ embedding -------------


def as_tokens_bt(
    tokens: torch.Tensor,
    grad_output: torch.Tensor,
    num_embeddings: int,
    padding_idx: Optional[int],
    check_ids: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Check an embedding's (token ids, output gradient) pair; view them as (B, T) and (B, T, p).

    Returns them with padding_idx normalised to [0, V), or -1 when there is none.
    """
    if not isinstance(tokens, torch.Tensor) or not isinstance(grad_output, torch.Tensor):
        raise TypeError("tokens and grad_output must be tensors")
    if tokens.dtype not in TOKEN_DTYPES:
        raise TypeError(f"tokens must be integer token ids (int32 or int64), got {tokens.dtype}")
    if tokens.dim() < 1:
        raise ValueError(f"tokens must have shape (B,) or (B, *), got {tuple(tokens.shape)}")
    if grad_output.dim() != tokens.dim() + 1 or grad_output.shape[:-1] != tokens.shape:
        raise ValueError(
            f"grad_output {tuple(grad_output.shape)} must have shape tokens.shape + (p,) with tokens "
            f"{tuple(tokens.shape)}"
        )
    if grad_output.dtype not in FLOAT_DTYPES:
        raise TypeError(f"grad_output must be float32, bfloat16 or float16, got {grad_output.dtype}")
    if tokens.device != grad_output.device:
        raise ValueError(f"tokens are on {tokens.device} but grad_output is on {grad_output.device}")
    B = tokens.shape[0]
    if B == 0:
        raise ValueError("empty batch: tokens has batch size 0")
    if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int) or num_embeddings < 1:
        raise ValueError(f"num_embeddings must be a positive int, got {num_embeddings!r}")
    V = num_embeddings
    if padding_idx is None:
        pad = -1
    elif isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not -V <= padding_idx < V:
        raise ValueError(f"padding_idx must be None or an int in [-{V}, {V}), got {padding_idx!r}")
    else:
        pad = padding_idx % V  # negative counts from the end, as in nn.Embedding
    if check_ids and tokens.numel() > 0 and not tokens.is_meta:  # meta tensors hold no ids
        lo, hi = torch.stack(torch.aminmax(tokens)).tolist()  # one host sync
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids must lie in [0, num_embeddings={V}), got ids from {lo} to {hi}")
    T = tokens.numel() // B
    p = grad_output.shape[-1]
    return tokens.reshape(B, T), grad_output.reshape(B, T, p), pad


# ------------------------------------------------------------------ convolution -----------


def conv_geometry(
    x: torch.Tensor, grad_output: torch.Tensor, weight_shape, stride, padding, dilation, groups, padding_mode
) -> ConvGeometry:
    """Check a Conv1d/Conv2d's (input, output-gradient) pair against its parameters."""
    geometry = ConvGeometry.from_args(weight_shape, stride, padding, dilation, groups, padding_mode)
    if not isinstance(x, torch.Tensor) or not isinstance(grad_output, torch.Tensor):
        raise TypeError("x and grad_output must be tensors")
    n = geometry.spatial_dims
    layout = "(B, C_in, L)" if n == 1 else "(B, C_in, H, W)"
    if x.dim() != n + 2:
        raise ValueError(
            f"x must have shape {layout} for a {n}-d convolution (weight_shape {tuple(weight_shape)}), "
            f"got {tuple(x.shape)}"
        )
    _float_pair_on_one_device(x, grad_output)
    if x.shape[1] != geometry.in_channels:
        raise ValueError(
            f"x has {x.shape[1]} channels but weight_shape {tuple(weight_shape)} with groups={groups} "
            f"needs {geometry.in_channels}"
        )
    out = geometry.output_size(x.shape[2:])
    if min(out) < 1:
        raise ValueError(
            f"x's spatial size {tuple(x.shape[2:])}, padded, is smaller than the dilated kernel: "
            "the convolution has no output"
        )
    expected = (x.shape[0], geometry.out_channels, *out)
    if tuple(grad_output.shape) != expected:
        raise ValueError(
            f"grad_output {tuple(grad_output.shape)} does not match the convolution of x "
            f"{tuple(x.shape)}, which gives {expected}"
        )
    return geometry


def conv_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method
