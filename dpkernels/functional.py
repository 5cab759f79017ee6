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

import math
import os
from typing import Optional, Union

import torch

from . import _cuda
from .ops import clip_sum_noise as _csn
from .ops import conv_patches as _conv
from .ops import conv_sq_norms as _conv_norms
from .ops import embedding_grads as _emb
from .ops import linear_clipped_grad as _lcg
from .ops import linear_sq_norms as _lsn
from .ops import norm_affine_grads as _nag
from .ops import tied_cross as _tied
from .ops._triton import HAS_TRITON, interpret_mode
from .ops.philox import PhiloxKey, add_normal_, resolve_key

BACKENDS = ("torch", "triton", "cuda")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Generator = Union[PhiloxKey, torch.Generator, None]


# ------------------------------------------------------------------ backend choice --------


def backends(load_cuda: bool = True, load_cpu: bool = True) -> dict:
    """Which backends can run here, and why not where they cannot.

    ``load_cuda=False`` does not load the CUDA extension if nothing has yet (on a GPU machine
    without a prebuilt one, loading JIT-compiles csrc/, about a minute): its entry then says so.
    ``cpu`` is the compiled CPU kernels the torch backend uses on CPU tensors (the Philox noise
    and the convolution patches, ``dpkernels._cpu``; JIT-compiled at first use, ``load_cpu=False``
    does not compile them); without them the torch reference computes the same, slower.
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
    from . import _cpu

    if not load_cpu and not _cpu._attempted:
        cpu = {"available": None, "reason": "not compiled yet (backends(load_cpu=True) or the first CPU noise does it)"}
    else:
        cpu = {"available": _cpu.available(), "reason": _cpu.why_unavailable()}
    return {
        "torch": {"available": True, "reason": None},
        "triton": {"available": triton_ok, "reason": triton_why},
        "cuda": cuda,
        "cpu": cpu,
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
    if impl == "torch":  # its own "auto": full Gram matrices (ops.linear_sq_norms.choose_method_torch)
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
    bias_key = None
    if bias:
        if key.stream == 2**32 - 1:
            raise ValueError("the bias draws from stream + 1: the weight's stream must be below 2**32 - 1")
        bias_key = PhiloxKey(key.seed, key.step, key.stream + 1)
    impl = select_backend(x3.device, backend)
    if impl == "torch":
        return _lcg.linear_clipped_grad_reference(x3, g3, c, noise_std, key, out_dtype, bias_key)
    grad_w = _lcg.linear_clipped_grad_triton(x3, g3, c, noise_std, key, out_dtype)
    grad_b = None
    if bias:
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
    offset: int = 0,
) -> torch.Tensor:
    """std·z for a tensor of ``shape``, z drawn by the Philox counter scheme (element = flat index).

    The same draws as the noise the fused kernels add for the same key: a parameter that got no
    data this step (an unused layer, an empty Poisson batch) gets exactly its noise term.

    ``offset``: the flat index, in the whole tensor the key names, of this tensor's first element:
    the draws are elements offset .. offset + numel − 1 of that tensor's noise, computed alone (no
    full draw is made), so a rank holding one shard of a parameter draws exactly that shard's part
    of the one-process noise. The Triton backend has no offset in its kernel: with an offset it
    draws with the torch reference on the same device (the same integers; normals within a float32
    ulp or two of the kernel's).
    """
    from .ops._triton import philox_normal_triton
    from .ops.philox import check_offset, normal, philox_normal

    std = _check_noise_std(std)
    key = resolve_key(generator)
    device = torch.device(device)
    numel = 1
    for s in shape:
        numel *= int(s)
    offset = check_offset(offset, numel)
    if std == 0.0 or numel == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    impl = select_backend(device, backend)
    if impl == "triton" and offset == 0:
        z = philox_normal_triton(numel, key, device)
    elif impl == "triton":
        z = philox_normal(numel, key, device, offset)
    else:
        z = normal(numel, key, device, offset)
    return (z * std).to(dtype).reshape(shape)


# ------------------------------------------------------------------ normalisation layers --


def _check_pair(x: torch.Tensor, grad_output: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(grad_output, torch.Tensor):
        raise TypeError("x and grad_output must be tensors")
    if x.shape != grad_output.shape:
        raise ValueError(f"{what}: x {tuple(x.shape)} and grad_output {tuple(grad_output.shape)} must have the same shape")
    if x.dtype not in _FLOAT_DTYPES or grad_output.dtype != x.dtype:
        raise TypeError(f"{what}: x and grad_output must share one dtype of float32, bfloat16, float16; got "
                        f"{x.dtype} and {grad_output.dtype}")
    if x.device != grad_output.device:
        raise ValueError(f"x is on {x.device} but grad_output is on {grad_output.device}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{what}: need a non-empty batch of shape (B, ...), got {tuple(x.shape)}")


def _check_stat(stat: Optional[torch.Tensor], name: str, numel: int, device: torch.device) -> Optional[torch.Tensor]:
    if stat is None:
        return None
    if not isinstance(stat, torch.Tensor) or stat.numel() != numel or not stat.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor with {numel} elements (one per normalised group)")
    if stat.device != device:
        raise ValueError(f"{name} is on {stat.device}, x on {device}")
    return stat


def _norm_affine_grads(x3, g3, mean, rstd, group, per_position, want_weight, want_bias, backend):
    impl = select_backend(x3.device, backend)
    if impl == "torch":
        return _nag.norm_affine_grads_reference(x3, g3, mean, rstd, group, per_position, want_weight, want_bias)
    return _nag.norm_affine_grads_triton(x3, g3, mean, rstd, group, per_position, want_weight, want_bias)


def _normalized_dims(x: torch.Tensor, normalized_shape) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() <= len(shape):
        raise ValueError(f"x {tuple(x.shape)} must be (B, *, {', '.join(map(str, shape))}) for normalized_shape {shape}")
    return shape


def layer_norm_per_example_grads(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    normalized_shape: "int | tuple[int, ...]",
    *,
    eps: float = 1e-5,
    weight: bool = True,
    bias: bool = True,
    mean: Optional[torch.Tensor] = None,
    rstd: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-example (weight, bias) gradients of ``nn.LayerNorm``, float32 (B, *normalized_shape) each.

    x: the layer input (B, *, *normalized_shape); grad_output: ∂L/∂y, same shape and dtype.
    ``mean``/``rstd``: the forward's statistics (one per normalised row, as
    ``torch.native_layer_norm`` returns them); recomputed in float32 from x when omitted.
    The math is in ``dpkernels.ops.norm_affine_grads``. ``weight``/``bias``: which to compute
    (None is returned for the other).
    """
    _check_pair(x, grad_output, "layer_norm_per_example_grads")
    shape = _normalized_dims(x, normalized_shape)
    B = x.shape[0]
    n = math.prod(shape)
    x3, g3 = x.reshape(B, -1, n), grad_output.reshape(B, -1, n)
    rows = x3.shape[1] * B
    mean, rstd = _check_stat(mean, "mean", rows, x.device), _check_stat(rstd, "rstd", rows, x.device)
    if (mean is None) != (rstd is None):
        raise ValueError("pass both mean and rstd, or neither")
    if rstd is None or rstd.dtype != torch.float32:  # low-precision statistics: recompute in float32
        var, mean = torch.var_mean(x3.float(), dim=2, correction=0)
        rstd = torch.rsqrt(var + eps)
    gw, gb = _norm_affine_grads(x3, g3, mean, rstd, 1, True, weight, bias, backend)
    return (gw.view(B, *shape) if gw is not None else None), (gb.view(B, *shape) if gb is not None else None)


def rms_norm_per_example_grads(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    normalized_shape: "int | tuple[int, ...]",
    *,
    eps: Optional[float] = None,
    rstd: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-example weight gradients of ``nn.RMSNorm``, float32 (B, *normalized_shape).

    As ``layer_norm_per_example_grads`` with no mean and no bias; ``eps`` None means
    ``torch.finfo(x.dtype).eps``, as in nn.RMSNorm.
    """
    _check_pair(x, grad_output, "rms_norm_per_example_grads")
    shape = _normalized_dims(x, normalized_shape)
    B = x.shape[0]
    n = math.prod(shape)
    x3, g3 = x.reshape(B, -1, n), grad_output.reshape(B, -1, n)
    rstd = _check_stat(rstd, "rstd", x3.shape[1] * B, x.device)
    if rstd is None or rstd.dtype != torch.float32:
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        rstd = torch.rsqrt(x3.float().square().mean(dim=2) + eps)
    gw, _ = _norm_affine_grads(x3, g3, None, rstd, 1, True, True, False, backend)
    return gw.view(B, *shape)


def group_norm_per_example_grads(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    num_groups: int,
    *,
    eps: float = 1e-5,
    weight: bool = True,
    bias: bool = True,
    mean: Optional[torch.Tensor] = None,
    rstd: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-example (weight, bias) gradients of ``nn.GroupNorm``, float32 (B, C) each.

    x: (B, C, *); ``mean``/``rstd``: (B, num_groups) as ``torch.native_group_norm`` returns them,
    recomputed in float32 when omitted.
    """
    _check_pair(x, grad_output, "group_norm_per_example_grads")
    B, C = x.shape[0], x.shape[1]
    if not (isinstance(num_groups, int) and num_groups > 0 and C % num_groups == 0):
        raise ValueError(f"num_groups must be a positive divisor of the {C} channels, got {num_groups!r}")
    x3 = x.reshape(B, C, -1).transpose(1, 2)  # (B, S, C): channels are the features
    g3 = grad_output.reshape(B, C, -1).transpose(1, 2)
    mean = _check_stat(mean, "mean", B * num_groups, x.device)
    rstd = _check_stat(rstd, "rstd", B * num_groups, x.device)
    if (mean is None) != (rstd is None):
        raise ValueError("pass both mean and rstd, or neither")
    if rstd is None or rstd.dtype != torch.float32:
        var, mean = torch.var_mean(x.float().reshape(B, num_groups, -1), dim=2, correction=0)
        rstd = torch.rsqrt(var + eps)
    return _norm_affine_grads(x3, g3, mean, rstd, C // num_groups, False, weight, bias, backend)


# ------------------------------------------------------------------ embedding -------------

_TOKEN_DTYPES = (torch.int32, torch.int64)


def _as_tokens_bt(
    tokens: torch.Tensor, grad_output: torch.Tensor, num_embeddings: int, padding_idx: Optional[int],
    check_ids: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Check an embedding's (token ids, output gradient) pair; view them as (B, T) and (B, T, p).

    Returns them with padding_idx normalised to [0, V), or -1 when there is none.
    """
    if not isinstance(tokens, torch.Tensor) or not isinstance(grad_output, torch.Tensor):
        raise TypeError("tokens and grad_output must be tensors")
    if tokens.dtype not in _TOKEN_DTYPES:
        raise TypeError(f"tokens must be integer token ids (int32 or int64), got {tokens.dtype}")
    if tokens.dim() < 1:
        raise ValueError(f"tokens must have shape (B,) or (B, *), got {tuple(tokens.shape)}")
    if grad_output.dim() != tokens.dim() + 1 or grad_output.shape[:-1] != tokens.shape:
        raise ValueError(
            f"grad_output {tuple(grad_output.shape)} must have shape tokens.shape + (p,) with tokens "
            f"{tuple(tokens.shape)}"
        )
    if grad_output.dtype not in _FLOAT_DTYPES:
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
    if check_ids and tokens.numel() > 0 and tokens.device.type != "meta":  # meta tensors hold no ids
        lo, hi = torch.stack(torch.aminmax(tokens)).tolist()  # one host sync
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids must lie in [0, num_embeddings={V}), got ids from {lo} to {hi}")
    T = tokens.numel() // B
    p = grad_output.shape[-1]
    return tokens.reshape(B, T), grad_output.reshape(B, T, p), pad


def embedding_sq_norms(
    tokens: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    num_embeddings: int,
    padding_idx: Optional[int] = None,
    backend: Optional[str] = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """Squared per-example gradient norms of an embedding table as float32 (B,).

    tokens: (B,) or (B, *) int32/int64 ids in [0, num_embeddings); grad_output: tokens.shape + (p,)
    (float32, bfloat16 or float16) on the same device. Positions holding ``padding_idx`` add
    nothing. ‖g_i‖² = Σ_{t,s: tok_it = tok_is} G_it·G_is; the math and the kernels are in
    ``dpkernels.ops.embedding_grads``. Per-example (V, p) gradients are never formed.
    ``check_ids=False`` skips the range check of the ids (one host sync), for callers whose
    forward already ran F.embedding on them (DPEmbedding does).
    """
    tok2, g3, pad = _as_tokens_bt(tokens, grad_output, num_embeddings, padding_idx, check_ids)
    impl = select_backend(g3.device, backend)
    if impl == "torch":
        return _emb.embedding_sq_norms_reference(tok2, g3, num_embeddings, pad)
    return _emb.embedding_sq_norms_triton(tok2, g3, pad)


def embedding_per_example_grads(
    tokens: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    num_embeddings: int,
    padding_idx: Optional[int] = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """Per-example gradients of an embedding table, float32 (B, num_embeddings, p): row v of example
    i is the sum of G_it over its positions holding token v (padding positions add nothing).

    For small tables only (``dpkernels.ops.embedding_grads.choose_embedding_method``): the result
    is B times the table. Inputs as in ``embedding_sq_norms``; deterministic on every device.
    """
    tok2, g3, pad = _as_tokens_bt(tokens, grad_output, num_embeddings, padding_idx, check_ids)
    return _emb.embedding_per_example_grads_reference(tok2, g3, num_embeddings, pad)


def embedding_clipped_grad(
    tokens: torch.Tensor,
    grad_output: torch.Tensor,
    clip_factors: torch.Tensor,
    *,
    num_embeddings: int,
    padding_idx: Optional[int] = None,
    noise_std: float = 0.0,
    generator: Generator = None,
    backend: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """The embedding table's gradient Σ_i c_i g_i + noise_std·z, (num_embeddings, p).

    Inputs as in ``embedding_sq_norms``; clip_factors (B,). Accumulated in float32 and bit-for-bit
    deterministic on every device; the noise covers every row of the table, whether or not a
    token of the batch hit it. Returned in ``out_dtype`` (default: grad_output's dtype).
    ``generator`` as in ``linear_clipped_grad`` (the key's element index is the row-major index
    in the table). ``check_ids`` as in ``embedding_sq_norms``.
    """
    tok2, g3, pad = _as_tokens_bt(tokens, grad_output, num_embeddings, padding_idx, check_ids)
    c = _check_clip_factors(clip_factors, tok2.shape[0], g3.device)
    noise_std = _check_noise_std(noise_std)
    key = resolve_key(generator)
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    impl = select_backend(g3.device, backend)
    if impl == "torch":
        return _emb.embedding_clipped_grad_reference(tok2, g3, c, num_embeddings, pad, noise_std, key, out_dtype)
    return _emb.embedding_clipped_grad_triton(tok2, g3, c, num_embeddings, pad, noise_std, key, out_dtype)


# ------------------------------------------------------------------ tied parameters -------


def embedding_linear_cross(
    tokens: torch.Tensor,
    grad_embedding: torch.Tensor,
    x: torch.Tensor,
    grad_head: torch.Tensor,
    *,
    padding_idx: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """⟨g_i^emb, g_i^head⟩ per example, float32 (B,), for a (V, p) table that is also the weight of a
    linear head y = x Wᵀ (the tied input/output embedding of a language model).

    tokens (B,) or (B, *) ids into the table and grad_embedding = ∂L/∂(lookup), tokens.shape + (p,);
    x (B, d) or (B, *, p) the head's input and grad_head = ∂L/∂y, x.shape[:-1] + (V,). Positions
    holding ``padding_idx`` add nothing. Σ_t Σ_s H_{s,tok_t} (x_s · G_t); the math and the kernel
    are in ``dpkernels.ops.tied_cross``.
    """
    V = grad_head.shape[-1] if isinstance(grad_head, torch.Tensor) and grad_head.dim() >= 1 else 1
    tok2, ge3, pad = _as_tokens_bt(tokens, grad_embedding, V, padding_idx, check_ids=False)
    x3, gh3 = _as_btd(x, grad_head)
    if x3.shape[0] != tok2.shape[0] or x3.shape[2] != ge3.shape[2]:
        raise ValueError(
            f"the embedding's batch and width {tuple(ge3.shape[::2])} do not match the head's input "
            f"{tuple(x3.shape[::2])}"
        )
    if x3.dtype != ge3.dtype:
        x3, ge3 = x3.float(), ge3.float()
    impl = select_backend(x3.device, backend)
    if impl == "torch":
        return _tied.token_linear_cross_reference(tok2, ge3, x3, gh3, pad)
    return _tied.token_linear_cross_triton(tok2, ge3, x3, gh3, pad)


def linear_linear_cross(x1: torch.Tensor, grad1: torch.Tensor, x2: torch.Tensor, grad2: torch.Tensor) -> torch.Tensor:
    """⟨G1_iᵀ x1_i, G2_iᵀ x2_i⟩ per example, float32 (B,): one weight used by two linear layers."""
    a, ga = _as_btd(x1, grad1)
    b, gb = _as_btd(x2, grad2)
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2] or ga.shape[2] != gb.shape[2]:
        raise ValueError(f"the two uses do not share one weight: {tuple(ga.shape)}ᵀ{tuple(a.shape)} vs "
                         f"{tuple(gb.shape)}ᵀ{tuple(b.shape)}")
    return _tied.linear_linear_cross_reference(a, ga, b, gb)


def embedding_embedding_cross(
    tokens1: torch.Tensor, grad1: torch.Tensor, tokens2: torch.Tensor, grad2: torch.Tensor, *,
    num_embeddings: int, padding_idx: Optional[int] = None,
) -> torch.Tensor:
    """⟨g_i^(1), g_i^(2)⟩ per example, float32 (B,): one table looked up twice (an encoder's and a
    decoder's embedding)."""
    t1, g1, pad = _as_tokens_bt(tokens1, grad1, num_embeddings, padding_idx, check_ids=False)
    t2, g2, _ = _as_tokens_bt(tokens2, grad2, num_embeddings, padding_idx, check_ids=False)
    if t1.shape[0] != t2.shape[0] or g1.shape[2] != g2.shape[2]:
        raise ValueError("the two lookups do not share one batch and table width")
    return _tied.token_token_cross_reference(t1, g1, t2, g2, pad)


# ------------------------------------------------------------------ convolution -----------


def _conv_geometry_and_check(
    x: torch.Tensor, grad_output: torch.Tensor, weight_shape, stride, padding, dilation, groups, padding_mode
) -> "_conv.ConvGeometry":
    """Check a Conv1d/Conv2d's (input, output-gradient) pair against its parameters."""
    geometry = _conv.ConvGeometry.from_args(weight_shape, stride, padding, dilation, groups, padding_mode)
    if not isinstance(x, torch.Tensor) or not isinstance(grad_output, torch.Tensor):
        raise TypeError("x and grad_output must be tensors")
    n = geometry.spatial_dims
    layout = "(B, C_in, L)" if n == 1 else "(B, C_in, H, W)"
    if x.dim() != n + 2:
        raise ValueError(f"x must have shape {layout} for a {n}-d convolution (weight_shape {tuple(weight_shape)}), "
                         f"got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if grad_output.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but grad_output is {grad_output.dtype}: dtypes must match")
    if x.device != grad_output.device:
        raise ValueError(f"x is on {x.device} but grad_output is on {grad_output.device}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: x has batch size 0")
    if x.shape[1] != geometry.in_channels:
        raise ValueError(f"x has {x.shape[1]} channels but weight_shape {tuple(weight_shape)} with groups={groups} "
                         f"needs {geometry.in_channels}")
    out = geometry.output_size(x.shape[2:])
    if min(out) < 1:
        raise ValueError(f"x's spatial size {tuple(x.shape[2:])}, padded, is smaller than the dilated kernel: "
                         "the convolution has no output")
    expected = (x.shape[0], geometry.out_channels, *out)
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"grad_output {tuple(grad_output.shape)} does not match the convolution of x "
                         f"{tuple(x.shape)}, which gives {expected}")
    return geometry


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
    if method not in _lsn.METHODS:
        raise ValueError(f"method must be one of {_lsn.METHODS}, got {method!r}")
    geometry = _conv_geometry_and_check(x, grad_output, weight_shape, stride, padding, dilation, groups, padding_mode)
    L = math.prod(grad_output.shape[2:])
    p_g = geometry.out_channels // geometry.groups
    impl = select_backend(x.device, backend)
    if method == "auto" and L > 1:
        choose = _lsn.choose_method_torch if impl == "torch" else _lsn.choose_method
        method = choose(L, geometry.patch_features, p_g)
    if method == "direct" and L > 1:  # no patches: the kernel indexes them, torch convolves per example
        direct = _conv_norms.conv_weight_sq_norms_reference if impl == "torch" else _conv_norms.conv_weight_sq_norms_triton
        norms = direct(x, grad_output, geometry)
        if bias:
            norms = norms + grad_output.sum(dim=tuple(range(2, grad_output.dim())), dtype=torch.float32).square().sum(1)
        return norms
    patches = _conv.input_patches(x, geometry)  # (g, B, L, d)
    rows = _conv.output_gradient_rows(grad_output, geometry)  # (g, B, L, C_out/g)
    g, B, L, d = patches.shape
    # the g groups of B examples as g·B independent linear layers, then summed per example
    norms = linear_sq_norms(patches.reshape(g * B, L, d), rows.view(g * B, L, rows.shape[-1]), bias=bias,
                            method=method, backend=backend)
    return norms.view(g, B).sum(dim=0)


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
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(grad_weight, grad_bias)`` = Σ_i c_i g_i + noise_std·z of a Conv1d/Conv2d.

    Inputs as in ``conv_sq_norms``; clip_factors (B,). grad_weight has ``weight_shape``,
    grad_bias is (C_out,) (None when ``bias=False``), both in ``out_dtype`` (default x's dtype),
    accumulated in float32. The sum is torch's convolution weight gradient of (c∘G, x) (see
    ``dpkernels.ops.conv_patches.clipped_weight_sum``; it follows ``torch.backends.cudnn.allow_tf32``
    as the non-private backward does); ``backend`` picks the noise generator and the bias's
    clip-sum-noise. ``generator`` as in ``linear_clipped_grad``: the weight's draws are
    philox_normal(key) at the element's row-major index in the weight, the bias's come from
    stream + 1.
    """
    geometry = _conv_geometry_and_check(x, grad_output, weight_shape, stride, padding, dilation, groups, padding_mode)
    B = x.shape[0]
    c = _check_clip_factors(clip_factors, B, x.device)
    noise_std = _check_noise_std(noise_std)
    key = resolve_key(generator)
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if bias and key.stream == 2**32 - 1:
        raise ValueError("the bias draws from stream + 1: the weight's stream must be below 2**32 - 1")
    out_dtype = out_dtype or x.dtype
    # Σ_i c_i ∇W_i is the convolution's own weight gradient of (c∘G, x): torch's conv backward
    # (cuDNN on a GPU), every group in one call, no patches; float32 operands, then the noise once
    grad_w = _conv.clipped_weight_sum(x, grad_output, c, geometry)
    if noise_std != 0.0 and select_backend(x.device, backend) == "torch":
        add_normal_(grad_w, noise_std, key)  # in place: the compiled CPU kernel on a CPU
    elif noise_std != 0.0:
        grad_w += gaussian_noise(grad_w.shape, std=noise_std, generator=key, device=x.device, backend=backend)
    grad_w = grad_w.to(out_dtype)
    grad_b = None
    if bias:
        bias_key = PhiloxKey(key.seed, key.step, key.stream + 1)
        per_example_bias = grad_output.sum(dim=tuple(range(2, grad_output.dim())), dtype=torch.float32)
        grad_b = clip_sum_noise(per_example_bias, c, noise_std=noise_std, generator=bias_key, backend=backend)
        grad_b = grad_b.to(out_dtype)
    return grad_w.view(tuple(weight_shape)), grad_b


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
    "embedding_clipped_grad",
    "conv_sq_norms",
    "conv_clipped_grad",
    "PhiloxKey",
]
