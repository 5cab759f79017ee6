"""Clip-sum-noise over materialised per-example gradients, and the noise alone (math:
``dpkernels.ops.clip_sum_noise``, ``dpkernels.ops.noise``)."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import clip_sum_noise as _csn
from ..ops import noise as _noise
from ..ops.philox import check_offset, resolve_key
from . import _checks
from ._types import Generator


def clip_sum_noise(
    per_example: torch.Tensor,
    clip_factors: torch.Tensor,
    *,
    noise_std: float = 0.0,
    generator: Generator = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Σ_i c_i g_i + noise_std·z over materialised per-example gradients ``per_example`` (B, *shape).

    Returns a tensor of ``shape`` in per_example's dtype, accumulated in float32. For the
    small parameters (biases, norm layers). ``generator`` as in ``linear_clipped_grad``. Backends
    torch, triton and cuda (the csrc/ kernel).
    """
    per_example = _checks.per_example(per_example)
    c = _checks.clip_factors(clip_factors, per_example.shape[0], per_example.device)
    return _csn.OP(per_example, c, _checks.noise_std(noise_std), resolve_key(generator), backend=backend)


def gaussian_noise(
    shape: "tuple[int, ...] | torch.Size",
    *,
    std: float,
    generator: Generator = None,
    device: "torch.device | str" = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: Optional[str] = None,
    offset: int = 0,
) -> torch.Tensor:
    """std·z for a tensor of ``shape``, z drawn by the Philox counter scheme (element = flat index).

    The same draws as the noise the fused kernels add for the same key: a parameter that got no
    data this step (an unused layer, an empty Poisson batch) gets exactly its noise term.

    ``offset``: the flat index, in the whole tensor the key names, of this tensor's first element:
    the draws are elements offset .. offset + numel − 1 of that tensor's noise, computed alone (no
    full draw is made), so a rank holding one shard of a parameter draws exactly that shard's part
    of the one-process noise (on every backend; ``dpkernels.ops.noise``).
    """
    shape = [int(s) for s in shape]
    numel = 1
    for s in shape:
        numel *= s
    offset = check_offset(offset, numel)
    return _noise.OP(
        shape, _checks.noise_std(std), resolve_key(generator), offset, torch.device(device), dtype, backend=backend
    )
