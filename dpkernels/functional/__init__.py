"""Public functional API: the kernels as functions of tensors, for other frameworks, the DP layers
and the engine.

One module per op family (``linear``, ``noise``, ``norm``, ``embedding``, ``tied``, ``conv``); each
public op checks its arguments (``_checks``) and ends in one call of its ``dpkernels::`` operator
(``dpkernels.ops._library``), which picks the backend (``dpkernels.ops._backend``: the
``backend=`` argument, else ``DPKERNELS_BACKEND``, else Triton for CUDA tensors and torch
otherwise; an explicit choice that cannot run raises, nothing falls back silently) and runs its
implementation directly in eager code, or appears as one opaque op with a fake implementation
when torch.compile traces it.

Backends
--------
``torch``   reference implementations in plain torch ops (any device; stores Gram matrices or
            per-example gradients, so it is the slow path, meant for CPUs and checking).
``triton``  the fused Triton kernels (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1).
``cuda``    the CUDA kernels of csrc/ for the ops that have one (``clip_sum_noise``); ops without
            a CUDA kernel run their Triton kernel under this choice.
``dpkernels.backends()`` reports what is available.
"""

from __future__ import annotations

from ..ops._backend import BACKENDS, backends, select_backend
from ..ops.philox import PhiloxKey
from ._types import Generator
from .conv import conv_clipped_grad, conv_sq_norms
from .embedding import embedding_clipped_grad, embedding_per_example_grads, embedding_sq_norms
from .linear import linear_clipped_grad, linear_sq_norms
from .noise import clip_sum_noise, gaussian_noise
from .norm import group_norm_per_example_grads, layer_norm_per_example_grads, rms_norm_per_example_grads
from .tied import embedding_embedding_cross, embedding_linear_cross, linear_linear_cross

__all__ = [
    "gaussian_noise",
    "backends",
    "select_backend",
    "linear_sq_norms",
    "linear_clipped_grad",
    "clip_sum_noise",
    "layer_norm_per_example_grads",
    "rms_norm_per_example_grads",
    "group_norm_per_example_grads",
    "embedding_sq_norms",
    "embedding_per_example_grads",
    "embedding_clipped_grad",
    "embedding_linear_cross",
    "linear_linear_cross",
    "embedding_embedding_cross",
    "conv_sq_norms",
    "conv_clipped_grad",
    "PhiloxKey",
    "BACKENDS",
    "Generator",
]
