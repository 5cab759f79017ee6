"""Gaussian noise alone: σ·z for a tensor of a given shape, z the Philox draws of ``philox.py``.

    out_e = σ · z_{offset + e}        e = 0 .. numel − 1, row-major in ``shape``

z is the same draw, element for element, as the noise the fused kernels add for the same key
(``clip_sum_noise.py``, ``linear_clipped_grad.py``, ...), so a parameter that got no data this step
(an unused layer, an empty Poisson batch) gets exactly its noise term. ``offset`` is the flat index,
in the whole tensor the key names, of this tensor's first element: a rank holding one shard of a
parameter draws exactly that shard's part of the one-process noise, without a full draw.

Implementations: the torch backend draws with ``philox.normal`` (the compiled CPU kernel on CPU
tensors, the torch reference elsewhere); the Triton backend with its generator kernel
(``_triton.philox_normal_triton``; one Philox call per pair of elements at offset 0, per element
otherwise). Both give the same integers; normals agree to a float32 ulp or two.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._library import kernel_op
from ._triton import philox_normal_triton
from .philox import PhiloxKey, normal


def _numel(shape: Sequence[int]) -> int:
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel


def gaussian_noise_torch(
    shape: Sequence[int], std: float, key: PhiloxKey, offset: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """σ·z by ``philox.normal`` (see the module docstring)."""
    numel = _numel(shape)
    if std == 0.0 or numel == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    return (normal(numel, key, device, offset) * std).to(dtype).reshape(shape)


def gaussian_noise_triton(
    shape: Sequence[int], std: float, key: PhiloxKey, offset: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """σ·z by the Triton generator kernel (see the module docstring)."""
    numel = _numel(shape)
    if std == 0.0 or numel == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    return (philox_normal_triton(numel, key, device, offset) * std).to(dtype).reshape(shape)


def _gaussian_noise_fake(
    shape: Sequence[int], std: float, key: torch.Tensor, offset: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    return torch.empty(shape, device=device, dtype=dtype)


# dpkernels::gaussian_noise (ops/_library.py): a factory op; its device argument picks the backend
OP = kernel_op(
    "gaussian_noise",
    "(SymInt[] shape, float std, Tensor key, SymInt offset, Device device, ScalarType dtype) -> Tensor",
    torch=gaussian_noise_torch,
    triton=gaussian_noise_triton,
    fake=_gaussian_noise_fake,
    key_args=(2,),
    device_arg=4,
)
