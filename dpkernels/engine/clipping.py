"""Clip factors from per-example gradient norms."""
from __future__ import annotations

import torch

CLIP_EPS = 1e-6


def flat_clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Flat clipping: c_i = min(1, C / (‖g_i‖ + 1e-6)) from ‖g_i‖² (float32 (B,)).

    ‖c_i g_i‖ ≤ C for every example, so the clipped sum has L2 sensitivity C under
    add/remove-one adjacency.
    """
    norms = sq_norms.float().clamp_min(0.0).sqrt()
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
