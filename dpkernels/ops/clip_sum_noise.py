"""Fused clip-scale-sum-noise over materialised per-example gradients.

For the small parameters (biases, normalisation-layer weights) per-example gradients are
cheap to hold: g of shape (B, n). One pass computes

    out_j = Σ_{i<B} c_i · g_ij  +  σ_noise · z_j,     z_j = philox_normal(key, element = j)

with float32 accumulation, the result cast to g's dtype. c are the clip factors (B,) float32;
z follows the counter scheme of ``dpkernels/ops/philox.py``, so every backend (torch, Triton,
CUDA) draws the same noise for the same key.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._library import kernel_op
from ._triton import HAS_TRITON, tl, triton
from .philox import PhiloxKey, add_normal_


def clip_sum_noise_reference(
    per_example: torch.Tensor, clip_factors: torch.Tensor, noise_std: float, key: PhiloxKey
) -> torch.Tensor:
    """torch reference: per_example (B, n) → (n,) in per_example's dtype."""
    acc = clip_factors.float() @ per_example.float()
    if noise_std != 0.0:
        add_normal_(acc, noise_std, key)
    return acc.to(per_example.dtype)


if HAS_TRITON:
    from ._triton import philox_normal_pairs_tl

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "stream"])
    def _clip_sum_noise_kernel(
        g_ptr,
        c_ptr,
        out_ptr,
        B,
        n,
        sgb,
        sgn,
        noise_std,
        seed_lo,
        seed_hi,
        step,
        stream,
        HAS_NOISE: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < n
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        offs_b = tl.arange(0, BLOCK_B)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b
            rmask = rows < B
            c = tl.load(c_ptr + rows, mask=rmask, other=0.0)
            v = tl.load(
                g_ptr + rows.to(tl.int64)[:, None] * sgb + cols[None, :] * sgn,
                mask=rmask[:, None] & cmask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(v * c[:, None], axis=0)
        if HAS_NOISE:
            pairs = tl.program_id(0).to(tl.int64) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            z = philox_normal_pairs_tl(pairs[None, :], seed_lo, seed_hi, step, stream)
            acc += noise_std * tl.reshape(z, (BLOCK_N,))
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def clip_sum_noise_triton(
    per_example: torch.Tensor, clip_factors: torch.Tensor, noise_std: float, key: PhiloxKey
) -> torch.Tensor:
    """Triton kernel: per_example (B, n) with any strides → (n,) in per_example's dtype."""
    B, n = per_example.shape
    out = torch.empty(n, dtype=per_example.dtype, device=per_example.device)
    block_n = 256
    _clip_sum_noise_kernel[(triton.cdiv(n, block_n),)](
        per_example,
        clip_factors,
        out,
        B,
        n,
        per_example.stride(0),
        per_example.stride(1),
        float(noise_std),
        key.seed_lo,
        key.seed_hi,
        key.step,
        key.stream,
        HAS_NOISE=noise_std != 0.0,
        BLOCK_B=16,
        BLOCK_N=block_n,
    )
    return out


def clip_sum_noise_cuda(
    per_example: torch.Tensor, clip_factors: torch.Tensor, noise_std: float, key: PhiloxKey
) -> torch.Tensor:
    """The CUDA kernel of csrc/ (``dpkernels._cuda``): per_example (B, n) → (n,)."""
    from .. import _cuda

    return _cuda.clip_sum_noise(per_example, clip_factors, noise_std, key)


def _over_rows(impl: Callable) -> Callable:
    """``impl`` on (B, n) rows as the op's implementation on (B, *shape) → shape."""

    def run(per_example: torch.Tensor, clip_factors: torch.Tensor, noise_std: float, key: PhiloxKey) -> torch.Tensor:
        B = per_example.shape[0]
        return impl(per_example.reshape(B, -1), clip_factors, noise_std, key).reshape(per_example.shape[1:])

    run.__name__ = run.__qualname__ = impl.__name__
    return run


def _clip_sum_noise_fake(
    per_example: torch.Tensor, clip_factors: torch.Tensor, noise_std: float, key: torch.Tensor
) -> torch.Tensor:
    return per_example.new_empty(per_example.shape[1:])


# dpkernels::clip_sum_noise (ops/_library.py): (B, *shape) per-example gradients -> shape
OP = kernel_op(
    "clip_sum_noise",
    "(Tensor per_example, Tensor clip_factors, float noise_std, Tensor key) -> Tensor",
    torch=_over_rows(clip_sum_noise_reference),
    triton=_over_rows(clip_sum_noise_triton),
    cuda=_over_rows(clip_sum_noise_cuda),
    fake=_clip_sum_noise_fake,
    key_args=(3,),
)
