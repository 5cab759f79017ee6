"""Public functional API and the one place where a backend is chosen.

Other frameworks call these functions directly; the modules and the engine call them too.

Backends
--------
``torch``   reference implementations in plain torch ops (any device; stores Gram matrices or
            per-example gradients, so it is the slow path, meant for CPUs and checking).
``triton``  the fused Triton kernels (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1).
``cuda``    the CUDA kernels of csrc/ for the ops that have one (``clip_sum_noise``); ops without
            a CUDA kernel run their Triton kernel under this choice.

The choice, in order: the ``backend=`` argument, else the ``DPKERNELS_BACKEND`` environment
variable, else automatic: triton for CUDA tensors when triton is installed, torch otherwise.
An explicit choice that cannot run here raises an error naming the reason; it never falls back
silently. ``dpkernels.backends()`` reports what is available.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from . import _cuda
from .ops import clip_sum_noise as _csn
from .ops import linear_clipped_grad as _lcg
from .ops import linear_sq_norms as _lsn
from .ops._triton import HAS_TRITON, interpret_mode
from .ops.philox import PhiloxKey, resolve_key

BACKENDS = ("torch", "triton", "cuda")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Generator = Union[PhiloxKey, torch.Generator, None]


# ------------------------------------------------------------------ backend choice --------


def backends(load_cuda: bool = True) -> dict:
    """Which backends can run here, and why not where they cannot.

    ``load_cuda=False`` does not load the CUDA extension if nothing has yet (on a GPU machine
    without a prebuilt one, loading JIT-compiles csrc/, about a minute): its entry then says so.
    """
    triton_ok = HAS_TRITON and (torch.cuda.is_available() or interpret_mode())
    if not HAS_TRITON:
        triton_why = "triton is not installed"
    elif not triton_ok:
        triton_why = "no CUDA GPU (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"
    else:
        triton_why = None
    if not load_cuda and not _cuda.attempted():
        cuda = {"available": None, "reason": "not loaded yet (backends(load_cuda=True) loads or JIT-compiles it)"}
    else:
        cuda = {"available": _cuda.available(), "reason": _cuda.why_unavailable()}
    return {
        "torch": {"available": True, "reason": None},
        "triton": {"available": triton_ok, "reason": triton_why},
        "cuda": cuda,
    }


def select_backend(device: torch.device, backend: Optional[str] = None, *, op_has_cuda: bool = False) -> str:
    """Resolve ``backend`` (argument, env, auto) to the implementation that will run on ``device``.

    Returns "torch", "triton" or "cuda". Raises ValueError for an unknown name and RuntimeError
    when the requested backend cannot run on this device.
    """
    choice = backend if backend is not None else os.environ.get("DPKERNELS_BACKEND", "auto")
    choice = choice.lower()
    if choice not in BACKENDS + ("auto",):
        raise ValueError(f"unknown dpkernels backend {choice!r}; choose one of {BACKENDS} or 'auto'")
    on_gpu = device.type == "cuda"
    if choice == "auto":
        return "triton" if (on_gpu and HAS_TRITON) else "torch"
    if choice == "torch":
        return "torch"
    if choice == "cuda":
        if not on_gpu:
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if op_has_cuda:
            if not _cuda.available():
                raise RuntimeError(f"backend 'cuda' is unavailable: {_cuda.why_unavailable()}")
            return "cuda"
        choice = "triton"  # documented: ops without a CUDA kernel use their Triton kernel
    if not HAS_TRITON:
        raise RuntimeError("backend 'triton' requested but triton is not installed (pip install triton)")
    if not on_gpu and not interpret_mode():
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run the "
            "Triton kernels on the CPU"
        )
    return "triton"


# ------------------------------------------------------------------ input checks ----------


def _as_btd(x: torch.Tensor, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a linear layer's (input, output-gradient) pair and view both as (B, T, features)."""
    if not isinstance(x, torch.Tensor) or not isinstance(grad_output, torch.Tensor):
        raise TypeError("x and grad_output must be tensors")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, d) or (B, *, d); got {tuple(x.shape)}")
    if grad_output.dim() != x.dim() or grad_output.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"x {tuple(x.shape)} and grad_output {tuple(grad_output.shape)} must agree in every "
            "dimension but the last"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if grad_output.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but grad_output is {grad_output.dtype}: dtypes must match")
    if x.device != grad_output.device:
        raise ValueError(f"x is on {x.device} but grad_output is on {grad_output.device}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: x has batch size 0")
    B, d, p = x.shape[0], x.shape[-1], grad_output.shape[-1]
    if x.dim() == 2:
        return x.unsqueeze(1), grad_output.unsqueeze(1)
    # (B, T, d) stays a strided view; (B, *, d) with several middle dims is reshaped
    # (a view where the strides allow, else a copy)
    return x.reshape(B, -1, d), grad_output.reshape(B, -1, p)


def _check_clip_factors(clip_factors: torch.Tensor, B: int, device: torch.device) -> torch.Tensor:
    if not isinstance(clip_factors, torch.Tensor) or clip_factors.shape != (B,):
        shape = tuple(clip_factors.shape) if isinstance(clip_factors, torch.Tensor) else type(clip_factors)
        raise ValueError(f"clip_factors must be a tensor of shape ({B},), got {shape}")
    if clip_factors.device != device:
        raise ValueError(f"clip_factors is on {clip_factors.device}, the inputs on {device}")
    if not clip_factors.is_floating_point():
        raise TypeError(f"clip_factors must be floating point, got {clip_factors.dtype}")
    return clip_factors.to(torch.float32).contiguous()


def _check_noise_std(noise_std: float) -> float:
    noise_std = float(noise_std)
    if not noise_std >= 0.0 or noise_std == float("inf"):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
    return noise_std


# ------------------------------------------------------------------ public ops ------------


def linear_sq_norms(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    bias: bool = True,
    method: str = "auto",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Squared per-example gradient norms of ``y = x Wᵀ + b`` as float32 (B,).

    x: (B, d) or (B, *, d); grad_output: (B, p) or (B, *, p), same dtype (float32, bfloat16 or
    float16) and device. ``bias`` adds the bias gradient's ‖Σ_t G_it‖². ``method``: "ghost",
    "direct" or "auto"; the math and the cost model are in ``dpkernels.ops.linear_sq_norms``.
    Per-example gradients are never written to memory by the Triton kernels.
    """
    if method not in _lsn.METHODS:
        raise ValueError(f"method must be one of {_lsn.METHODS}, got {method!r}")
    x3, g3 = _as_btd(x, grad_output)
    if x3.shape[1] == 1:
        method = "rowwise"  # T = 1: both ghost and direct reduce to ‖x_i‖²‖G_i‖²
    impl = select_backend(x3.device, backend)
    if impl == "torch":
        return _lsn.linear_sq_norms_reference(x3, g3, bias, method)
    return _lsn.linear_sq_norms_triton(x3, g3, bias, method)


def linear_clipped_grad(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    clip_factors: torch.Tensor,
    *,
    bias: bool = True,
    noise_std: float = 0.0,
    generator: Generator = None,
    backend: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(grad_weight, grad_bias)`` = Σ_i c_i g_i + noise_std·z in one fused pass.

    grad_weight is (p, d) and grad_bias (p,) (None when ``bias=False``), in ``out_dtype``
    (default: x's dtype); accumulation is float32 either way.
    ``generator`` names the noise: a ``PhiloxKey`` (seed, step, stream) chosen by the caller,
    a ``torch.Generator`` (a fresh 64-bit key is drawn from it), or None (a fresh key from the
    OS CSPRNG). The weight uses the key as given; the bias uses the next stream (stream + 1),
    so the two never share a draw — a caller assigning streams to layers must leave room.
    """
    x3, g3 = _as_btd(x, grad_output)
    B = x3.shape[0]
    c = _check_clip_factors(clip_factors, B, x3.device)
    noise_std = _check_noise_std(noise_std)
    key = resolve_key(generator)
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    impl = select_backend(x3.device, backend)
    if impl == "torch":
        grad_w = _lcg.linear_clipped_grad_reference(x3, g3, c, noise_std, key, out_dtype)
    else:
        grad_w = _lcg.linear_clipped_grad_triton(x3, g3, c, noise_std, key, out_dtype)
    grad_b = None
    if bias:
        if key.stream == 2**32 - 1:
            raise ValueError("the bias draws from stream + 1: the weight's stream must be below 2**32 - 1")
        bias_key = PhiloxKey(key.seed, key.step, key.stream + 1)
        per_example_bias = g3.sum(dim=1, dtype=torch.float32)
        grad_b = clip_sum_noise(per_example_bias, c, noise_std=noise_std, generator=bias_key, backend=backend)
        grad_b = grad_b.to(out_dtype or x3.dtype)
    return grad_w, grad_b


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
    small parameters (biases, norm layers). ``generator`` as in ``linear_clipped_grad``.
    """
    if not isinstance(per_example, torch.Tensor) or per_example.dim() < 1:
        raise ValueError("per_example must be a tensor of shape (B, *param_shape)")
    if per_example.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"per_example must be float32, bfloat16 or float16, got {per_example.dtype}")
    B = per_example.shape[0]
    if B == 0:
        raise ValueError("empty batch: per_example has batch size 0")
    shape = per_example.shape[1:]
    flat = per_example.reshape(B, -1)
    c = _check_clip_factors(clip_factors, B, per_example.device)
    noise_std = _check_noise_std(noise_std)
    key = resolve_key(generator)
    impl = select_backend(per_example.device, backend, op_has_cuda=True)
    if impl == "torch":
        out = _csn.clip_sum_noise_reference(flat, c, noise_std, key)
    elif impl == "triton":
        out = _csn.clip_sum_noise_triton(flat, c, noise_std, key)
    else:
        out = _cuda.clip_sum_noise(flat, c, noise_std, key)
    return out.reshape(shape)


def gaussian_noise(
    shape: "tuple[int, ...] | torch.Size",
    *,
    std: float,
    generator: Generator = None,
    device: "torch.device | str" = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """std·z for a tensor of ``shape``, z drawn by the Philox counter scheme (element = flat index).

    The same draws as the noise the fused kernels add for the same key: a parameter that got no
    data this step (an unused layer, an empty Poisson batch) gets exactly its noise term.
    """
    from .ops._triton import philox_normal_triton
    from .ops.philox import philox_normal

    std = _check_noise_std(std)
    key = resolve_key(generator)
    device = torch.device(device)
    numel = 1
    for s in shape:
        numel *= int(s)
    if std == 0.0 or numel == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    impl = select_backend(device, backend)
    z = philox_normal_triton(numel, key, device) if impl == "triton" else philox_normal(numel, key, device)
    return (z * std).to(dtype).reshape(shape)


__all__ = [
    "gaussian_noise",
    "backends",
    "select_backend",
    "linear_sq_norms",
    "linear_clipped_grad",
    "clip_sum_noise",
    "PhiloxKey",
]
