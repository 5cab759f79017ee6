"""Clipped, noised weight gradient of a linear layer in one GEMM.

With x (B, T, d), G (B, T, p), clip factors c (B,) and noise standard deviation σ_n:

    grad_W = Σ_i c_i G_iᵀ x_i + σ_n · Z  =  (c∘G)ᵀ x  + σ_n · Z        (p × d)

where c∘G scales every row (i, t) of G by c_i and the product runs over the flattened
B·T axis. The Triton kernel fuses the row scaling into the load of G (in float32, then
rounded to the input dtype for the tensor-core product) and adds the Philox noise Z
(counter scheme of ``dpkernels/ops/philox.py``, element index = row-major index in W)
in the epilogue, so neither c∘G nor Z is ever written to memory. Accumulation is float32;
the result is stored in ``out_dtype`` (default x's dtype; the engine asks for the parameter's,
so float32 master weights trained on bfloat16 activations get an unrounded float32 gradient).

The bias gradient Σ_i c_i Σ_t G_it + σ_n·z is the clip-sum-noise of the (B, p) per-example
bias gradients (``clip_sum_noise.py``; the torch reference sums the rows of c∘G it already
has), drawn with its own counter stream: stream + 1 of the weight's key (``PhiloxKey.next_stream``).

The op ``dpkernels::linear_clipped_grad`` returns (grad_W, grad_b or None) from x (B, T, d) and
G (B, T, p); on the ``cuda`` backend the bias goes through the CUDA clip-sum-noise kernel.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ._library import kernel_op
from ._triton import HAS_TRITON, TunedLaunch, dot_flags, gemm_tile_configs, tl, triton
from .clip_sum_noise import clip_sum_noise_cuda, clip_sum_noise_triton
from .philox import PhiloxKey, add_normal_


def linear_clipped_grad_reference(
    x: torch.Tensor,
    g: torch.Tensor,
    clip_factors: torch.Tensor,
    noise_std: float,
    key: PhiloxKey,
    out_dtype: "torch.dtype | None" = None,
    bias_key: "PhiloxKey | None" = None,
) -> "tuple[torch.Tensor, torch.Tensor | None]":
    """torch reference (x: (B,T,d), g: (B,T,p)) → (grad_W (p, d), grad_b (p,) or None) in out_dtype
    (default x's). With ``bias_key`` the bias gradient Σ_i c_i Σ_t G_it + σ_n·z (its noise from
    bias_key) is summed from the same scaled rows c∘G as the weight's GEMM."""
    B, T, d = x.shape
    p = g.shape[2]
    scaled = g.float() * clip_factors.float().view(B, 1, 1)
    acc = scaled.reshape(B * T, p).t() @ x.float().reshape(B * T, d)
    bias = scaled.sum(dim=(0, 1)) if bias_key is not None else None
    if noise_std != 0.0:
        add_normal_(acc, noise_std, key)
        if bias is not None:
            add_normal_(bias, noise_std, bias_key)
    out_dtype = out_dtype or x.dtype
    return acc.to(out_dtype), (bias.to(out_dtype) if bias is not None else None)


if HAS_TRITON:
    from ._triton import dot_acc, philox_normal_pairs_tl, philox_normal_tl

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "stream"])
    def _linear_clipped_grad_kernel(
        x_ptr,
        g_ptr,
        c_ptr,
        out_ptr,
        T,
        K,
        d,
        p,
        sxk,
        sgk,
        noise_std,
        seed_lo,
        seed_hi,
        step,
        stream,
        HAS_NOISE: tl.constexpr,
        ALIGNED2: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # x: (K, d) and G: (K, p) with unit feature stride and row strides sxk, sgk; row k
        # belongs to example k // T. Tile offsets stay small (int32); the pointers advance.
        pid_p = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        cols_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_p = rows_p < p
        mask_d = cols_d < d
        offs_k = tl.arange(0, BLOCK_K)
        g_ptrs = g_ptr + offs_k[None, :] * sgk + rows_p[:, None]  # G tile transposed: (BLOCK_P, BLOCK_K)
        x_ptrs = x_ptr + offs_k[:, None] * sxk + cols_d[None, :]  # (BLOCK_K, BLOCK_D)

        acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            kmask = ks < K
            c = tl.load(c_ptr + ks // T, mask=kmask, other=0.0)
            gt = tl.load(g_ptrs, mask=mask_p[:, None] & kmask[None, :], other=0.0)
            gt = (gt.to(tl.float32) * c[None, :]).to(g_ptr.dtype.element_ty)  # rows scaled by c_i
            xt = tl.load(x_ptrs, mask=kmask[:, None] & mask_d[None, :], other=0.0)
            acc = dot_acc(acc, gt, xt, IEEE, UPCAST)
            g_ptrs += BLOCK_K * sgk
            x_ptrs += BLOCK_K * sxk

        # element index in W (p, d), 64-bit: p·d may pass 2^31
        elem = rows_p.to(tl.int64)[:, None] * d + cols_d[None, :]
        if HAS_NOISE:
            if ALIGNED2:  # d even: a tile row holds whole pairs (one Philox call each)
                pcols = pid_d * (BLOCK_D // 2) + tl.arange(0, BLOCK_D // 2)
                pairs = rows_p.to(tl.int64)[:, None] * (d // 2) + pcols[None, :]
                acc += noise_std * philox_normal_pairs_tl(pairs, seed_lo, seed_hi, step, stream)
            else:
                acc += noise_std * philox_normal_tl(elem, seed_lo, seed_hi, step, stream)
        tl.store(out_ptr + elem, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_d[None, :])

    # GPU: tiles autotuned per shape; every config writes the whole output, so tuning is safe
    _clipped_grad_launch = TunedLaunch(
        _linear_clipped_grad_kernel,
        gemm_tile_configs("BLOCK_P", "BLOCK_D", "BLOCK_K"),
        key=["K", "d", "p"],
    )


def _rows(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, T, f) as a (B·T, f) matrix with unit column stride: a view when strides allow."""
    m = t.reshape(rows, cols)
    return m if m.stride(1) == 1 or cols == 1 else m.contiguous()


def linear_clipped_grad_triton(
    x: torch.Tensor,
    g: torch.Tensor,
    clip_factors: torch.Tensor,
    noise_std: float,
    key: PhiloxKey,
    out_dtype: "torch.dtype | None" = None,
) -> torch.Tensor:
    """Triton kernel (x: (B,T,d), g: (B,T,p), any strides; copied only when not viewable as rows)."""
    B, T, d = x.shape
    p = g.shape[2]
    out = torch.empty((p, d), dtype=out_dtype or x.dtype, device=x.device)
    x2 = _rows(x, B * T, d)
    g2 = _rows(g, B * T, p)
    args = (
        x2,
        g2,
        clip_factors,
        out,
        T,
        B * T,
        d,
        p,
        x2.stride(0),
        g2.stride(0),
        float(noise_std),
        key.seed_lo,
        key.seed_hi,
        key.step,
        key.stream,
    )

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(d, meta["BLOCK_D"]))

    fixed = dict(BLOCK_P=64 if p > 32 else 32, BLOCK_D=64 if d > 32 else 32, BLOCK_K=32)
    _clipped_grad_launch(
        grid, args, dict(HAS_NOISE=noise_std != 0.0, ALIGNED2=d % 2 == 0, **dot_flags(x.dtype)), fixed=fixed
    )
    return out


# ---------------------------------------------------------------- the op ------------------


def linear_clipped_grad_torch(
    x: torch.Tensor,
    g: torch.Tensor,
    clip_factors: torch.Tensor,
    noise_std: float,
    key: PhiloxKey,
    out_dtype: Optional[torch.dtype],
    bias: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The op on the torch backend: the reference, the bias from the same scaled rows."""
    bias_key = key.next_stream() if bias else None
    return linear_clipped_grad_reference(x, g, clip_factors, noise_std, key, out_dtype, bias_key)


def _with_bias(bias_sum: Callable) -> Callable:
    """The weight by the Triton GEMM, the bias by ``bias_sum`` (a clip-sum-noise of (B, p) rows)."""

    def run(
        x: torch.Tensor,
        g: torch.Tensor,
        clip_factors: torch.Tensor,
        noise_std: float,
        key: PhiloxKey,
        out_dtype: Optional[torch.dtype],
        bias: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        bias_key = key.next_stream() if bias else None
        grad_w = linear_clipped_grad_triton(x, g, clip_factors, noise_std, key, out_dtype)
        grad_b = None
        if bias:
            per_example_bias = g.sum(dim=1, dtype=torch.float32)
            grad_b = bias_sum(per_example_bias, clip_factors, noise_std, bias_key).to(out_dtype or x.dtype)
        return grad_w, grad_b

    run.__name__ = run.__qualname__ = f"linear_clipped_grad_with_{bias_sum.__name__}"
    return run


def _linear_clipped_grad_fake(
    x: torch.Tensor,
    g: torch.Tensor,
    clip_factors: torch.Tensor,
    noise_std: float,
    key: torch.Tensor,
    out_dtype: Optional[torch.dtype],
    bias: bool,
):
    dtype = out_dtype or x.dtype
    p, d = g.shape[2], x.shape[2]
    return x.new_empty((p, d), dtype=dtype), (x.new_empty((p,), dtype=dtype) if bias else None)


# dpkernels::linear_clipped_grad (ops/_library.py): x (B, T, d), G (B, T, p) -> [grad_W (p, d), grad_b (p,)?]
OP = kernel_op(
    "linear_clipped_grad",
    "(Tensor x, Tensor grad_output, Tensor clip_factors, float noise_std, Tensor key, ScalarType? out_dtype, "
    "bool bias) -> Tensor[]",
    torch=linear_clipped_grad_torch,
    triton=_with_bias(clip_sum_noise_triton),
    cuda=_with_bias(clip_sum_noise_cuda),
    fake=_linear_clipped_grad_fake,
    key_args=(4,),
    optional_outputs=True,
)
