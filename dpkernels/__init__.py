"""dpkernels: fused Triton and CUDA kernels for differentially private training in PyTorch.

    model, optimizer = dpkernels.make_private(model, optimizer, noise_multiplier=1.0,
                                              max_grad_norm=1.0, expected_batch_size=256)

Submodules: ``functional`` (kernels' public API), ``nn`` (DP layers, ``convert``), ``engine``
(``make_private``, ``DPOptimizer``, ``PoissonSampler``), ``accounting`` (privacy accountants;
numpy/scipy only), ``integrations`` (Opacus, Hugging Face transformers, timm); ``verify`` checks
a model's private gradient against a float64 per-example loop. Attributes are imported lazily
so that ``dpkernels.accounting`` works without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "make_private": ("dpkernels.engine", "make_private"),
    "DPOptimizer": ("dpkernels.engine", "DPOptimizer"),
    "PoissonSampler": ("dpkernels.engine", "PoissonSampler"),
    "backends": ("dpkernels.functional", "backends"),
    "PhiloxKey": ("dpkernels.ops.philox", "PhiloxKey"),
    "verify": ("dpkernels.verification", "verify"),
}
_SUBMODULES = ("functional", "nn", "engine", "ops", "autograd", "accounting", "integrations")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"dpkernels.{name}")
    raise AttributeError(f"module 'dpkernels' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY, *_SUBMODULES]
