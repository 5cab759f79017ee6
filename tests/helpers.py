"""Small helpers the kernel tests share (they may use dpkernels; the oracle in oracle.py does not)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dpkernels.ops.philox import PhiloxKey, philox_normal


def random_clip_factors(B: int, device, seed: int) -> torch.Tensor:
    """Random factors in (0, 1], the first exactly 1 (an unclipped example)."""
    c = torch.rand(B, generator=torch.Generator().manual_seed(seed + B)) * 0.95 + 0.05
    c[0] = 1.0
    return c.to(device)


def assert_close_scaled(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Equal within ``tol`` relative, and ``tol`` times the reference's largest magnitude absolute."""
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=tol, atol=tol * max(scale, 1e-30))


def philox_noise(key: PhiloxKey, shape: Sequence[int], std: float, device="cpu") -> torch.Tensor:
    """std·z over the flat, row-major tensor of ``shape``: the counter scheme's draws, float64."""
    return (std * philox_normal(math.prod(shape), key, device)).double().view(*shape)
