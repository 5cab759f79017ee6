"""Clipping, noise and step orchestration."""

from .clipping import flat_clip_factors
from .make_private import make_private
from .optimizer import DPOptimizer
from .sampler import PoissonSampler

__all__ = ["make_private", "DPOptimizer", "PoissonSampler", "flat_clip_factors"]
