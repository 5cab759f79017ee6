"""Squared per-example gradient norms of a linear layer, without per-example gradients.

For ``y = x Wᵀ + b`` with x of shape (B, T, d) and the output gradient G of shape (B, T, p),
example i's weight gradient is ``g_i = G_iᵀ x_i`` (p × d) and its bias gradient is
``Σ_t G_it``. This module computes

    n_i = ‖G_iᵀ x_i‖²_F  (+ ‖Σ_t G_it‖²  when the layer has a bias)

as float32 (B,), by one of three methods:

ghost   ‖G_iᵀ x_i‖²_F = Σ_{t,s} (x_i x_iᵀ)_{ts} (G_i G_iᵀ)_{ts}
        The Triton kernel tiles the T×T plane, forms both Gram tiles in registers, multiplies
        them and reduces; the T×T matrices are never stored. The plane is symmetric, so only
        tiles on and above the diagonal are computed (off-diagonal ones count twice).
        The bias term is the sum of all entries of G_i G_iᵀ, taken from the same tiles.
        Cost: n(n+1)/2 tile pairs of b_T² (d + p) multiply-adds each, n = ⌈T/b_T⌉, per
        example, ≈ B·T·(T + b_T)·(d + p)/2 (``ghost_macs``).
direct  per example, accumulate each (p, d) tile of G_iᵀ x_i over T in registers, square,
        reduce. The per-example gradient is never written to memory. With a bias, x_i is
        read as [x_i, 1], so the extra column of G_iᵀ [x_i, 1] is the bias gradient Σ_t G_it
        and the same squares-and-sum gives weight and bias together.
        Cost ≈ B·T·d·p multiply-adds (one weight-gradient GEMM).
rowwise T = 1: G_iᵀ x_i is an outer product, so n_i = ‖x_i‖²·‖G_i‖² (+ ‖G_i‖²). Memory-bound.

``method="auto"`` takes rowwise when T = 1, else ghost when ghost_macs < κ·direct_macs
(about T(d + p)/2 < κ·d·p for long sequences: the symmetry halves the ghost cost) and direct
otherwise. κ = ``GHOST_EFFICIENCY`` is the measured speed of the ghost kernel relative to the
direct one per multiply-add; 1.0 until measured otherwise on a GPU.

The torch backend (``linear_sq_norms_reference``) runs the same math as plain batched matmuls:
ghost forms both T×T Gram matrices in full (B·T²·(d + p) multiply-adds, no symmetry) and direct
the (p, d) per-example gradients (B·T·d·p), so its ``auto`` (``choose_method_torch``) takes ghost
when T(d + p) < d·p.

All accumulation is float32 whatever the input dtype (float32, bfloat16, float16); float32
inputs use IEEE products (no TF32), so norms are exact to float32 rounding.
"""

from __future__ import annotations

import torch

from ._library import kernel_op
from ._tiles import ghost_block_t, upper_triangle_pairs
from ._triton import HAS_TRITON, TunedLaunch, configs, dot_flags, gemm_tile_configs, tl, triton

GHOST_EFFICIENCY = 1.0
METHODS = ("auto", "ghost", "direct")


def ghost_macs(T: int, d: int, p: int) -> int:
    """Multiply-adds of the ghost method per example: upper-triangle tile pairs (diagonal included)."""
    bt = ghost_block_t(T)
    n = -(-T // bt)
    return n * (n + 1) // 2 * bt * bt * (d + p)


def direct_macs(T: int, d: int, p: int) -> int:
    """Multiply-adds of the direct method per example: one (p, d) gradient accumulated over T."""
    return T * d * p


def choose_method(T: int, d: int, p: int) -> str:
    """The method ``auto`` uses for a (B, T, d) → (B, T, p) linear layer (see module docstring)."""
    if T == 1:
        return "rowwise"
    return "ghost" if ghost_macs(T, d, p) < GHOST_EFFICIENCY * direct_macs(T, d, p) else "direct"


def choose_method_torch(T: int, d: int, p: int) -> str:
    """The method ``auto`` uses on the torch backend (full Gram matrices, see the module docstring)."""
    if T == 1:
        return "rowwise"
    return "ghost" if T * (d + p) < d * p else "direct"


# ---------------------------------------------------------------- torch reference ----------


def linear_sq_norms_reference(x: torch.Tensor, g: torch.Tensor, bias: bool, method: str) -> torch.Tensor:
    """Reference for every method, in float32 torch ops (x: (B,T,d), g: (B,T,p)).

    ghost stores the (B,T,T) Gram matrices and direct stores the (B,p,d) per-example
    gradients: fine as a reference and a CPU path, not what the kernels do.
    """
    x = x.float()
    g = g.float()
    if method == "auto":
        method = choose_method_torch(x.shape[1], x.shape[2], g.shape[2])
    if method == "rowwise":
        if x.shape[1] != 1:
            raise ValueError("the rowwise method needs T = 1")
        gs = g.square().sum(dim=(1, 2))
        return x.square().sum(dim=(1, 2)) * gs + (gs if bias else 0.0)
    if method == "ghost":
        gram_x = torch.bmm(x, x.transpose(1, 2))
        gram_g = torch.bmm(g, g.transpose(1, 2))
        norms = (gram_x * gram_g).sum(dim=(1, 2))
    elif method == "direct":
        per_example = torch.bmm(g.transpose(1, 2), x)
        norms = per_example.square().sum(dim=(1, 2))
    else:
        raise ValueError(f"unknown method {method!r}")
    if bias:
        norms = norms + g.sum(dim=1).square().sum(dim=1)
    return norms


# ---------------------------------------------------------------- Triton kernels ----------

if HAS_TRITON:
    from ._tiles import gram_tile
    from ._triton import dot_acc

    @triton.jit
    def _linear_rowwise_kernel(
        x_ptr,
        g_ptr,
        out_ptr,
        d,
        p,
        sxb,
        sxd,
        sgb,
        sgp,
        HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        acc_x = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(0, d, BLOCK):
            cols = k + offs
            v = tl.load(x_ptr + b * sxb + cols.to(tl.int64) * sxd, mask=cols < d, other=0.0).to(tl.float32)
            acc_x += v * v
        acc_g = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(0, p, BLOCK):
            cols = k + offs
            v = tl.load(g_ptr + b * sgb + cols.to(tl.int64) * sgp, mask=cols < p, other=0.0).to(tl.float32)
            acc_g += v * v
        xs = tl.sum(acc_x, axis=0)
        gs = tl.sum(acc_g, axis=0)
        res = xs * gs
        if HAS_BIAS:
            res += gs
        tl.store(out_ptr + b, res)

    @triton.jit
    def _linear_ghost_kernel(
        x_ptr,
        g_ptr,
        pairs_ptr,
        out_w_ptr,
        out_b_ptr,
        T,
        d,
        p,
        n_pairs,
        sxb,
        sxt,
        sxd,
        sgb,
        sgt,
        sgp,
        HAS_BIAS: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # one program per (example, tile pair) on a 1-D grid: the 2nd grid axis stops at 65535
        # tile pairs, which T > ~23k (block 64) would pass
        pid = tl.program_id(0).to(tl.int64)
        b = pid // n_pairs
        pair = pid % n_pairs
        ti = tl.load(pairs_ptr + 2 * pair)
        si = tl.load(pairs_ptr + 2 * pair + 1)
        rows_t = ti * BLOCK_T + tl.arange(0, BLOCK_T)
        rows_s = si * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = rows_t < T
        mask_s = rows_s < T
        rt = rows_t.to(tl.int64)
        rs = rows_s.to(tl.int64)

        gram_x = gram_tile(x_ptr + b * sxb, rt, rs, mask_t, mask_s, d, sxt, sxd, IEEE, UPCAST, BLOCK_T, BLOCK_K)
        gram_g = gram_tile(g_ptr + b * sgb, rt, rs, mask_t, mask_s, p, sgt, sgp, IEEE, UPCAST, BLOCK_T, BLOCK_K)

        weight = tl.where(ti == si, 1.0, 2.0)
        out_off = pid  # = b * n_pairs + pair
        tl.store(out_w_ptr + out_off, weight * tl.sum(tl.sum(gram_x * gram_g, axis=1), axis=0))
        if HAS_BIAS:
            tl.store(out_b_ptr + out_off, weight * tl.sum(tl.sum(gram_g, axis=1), axis=0))

    @triton.jit
    def _linear_direct_kernel(
        x_ptr,
        g_ptr,
        out_ptr,
        T,
        d,
        p,
        out_row,
        sxb,
        sxt,
        sxd,
        sgb,
        sgt,
        sgp,
        HAS_BIAS: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        # With a bias, x is read as [x, 1] (d + 1 columns): G_iᵀ [x_i, 1] = [∇W, ∇b] of example i,
        # so the squares of one accumulator hold both norms and no reduction runs inside the loop
        # (an in-loop column sum also trips Triton 3.6's thread-locality pass in float32).
        b = tl.program_id(0).to(tl.int64)
        tp = tl.program_id(1)
        td = tl.program_id(2)
        rows_p = tp * BLOCK_P + tl.arange(0, BLOCK_P)
        cols_d = td * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_p = rows_p < p
        mask_d = cols_d < d
        bias_col = cols_d == d
        rp = rows_p.to(tl.int64)
        cd = cols_d.to(tl.int64)
        offs_t = tl.arange(0, BLOCK_T)

        acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            ts = t0 + offs_t
            tmask = ts < T
            t64 = ts.to(tl.int64)
            # G tile loaded transposed: (BLOCK_P, BLOCK_T)
            gt = tl.load(
                g_ptr + b * sgb + t64[None, :] * sgt + rp[:, None] * sgp,
                mask=mask_p[:, None] & tmask[None, :],
                other=0.0,
            )
            xt = tl.load(
                x_ptr + b * sxb + t64[:, None] * sxt + cd[None, :] * sxd,
                mask=tmask[:, None] & mask_d[None, :],
                other=0.0,
            )
            if HAS_BIAS:
                ones = tl.full((BLOCK_T, BLOCK_D), 1.0, tl.float32).to(x_ptr.dtype.element_ty)
                xt = tl.where(tmask[:, None] & bias_col[None, :], ones, xt)
            acc = dot_acc(acc, gt, xt, IEEE, UPCAST)

        # slot of this (p, d) tile in the example's row of partial sums (rows are out_row long)
        n_tiles_d = tl.cdiv(d + 1, BLOCK_D) if HAS_BIAS else tl.cdiv(d, BLOCK_D)
        tl.store(out_ptr + b * out_row + tp * n_tiles_d + td, tl.sum(tl.sum(acc * acc, axis=1), axis=0))

    # block sizes autotuned per shape on a GPU (TunedLaunch; the interpreter uses fixed ones)
    _ghost_launch = TunedLaunch(
        _linear_ghost_kernel,
        configs(*[({"BLOCK_K": k}, w, 3) for k in (32, 64, 128) for w in (4, 8)]),
        key=["T", "d", "p"],
    )
    _direct_launch = TunedLaunch(
        _linear_direct_kernel,
        gemm_tile_configs("BLOCK_P", "BLOCK_D", "BLOCK_T"),
        key=["T", "d", "p"],
        reset_to_zero=["out_ptr"],
    )


def linear_sq_norms_triton(x: torch.Tensor, g: torch.Tensor, bias: bool, method: str) -> torch.Tensor:
    """Triton kernels for each method (x: (B,T,d), g: (B,T,p), any strides)."""
    B, T, d = x.shape
    p = g.shape[2]
    if method == "auto":
        method = choose_method(T, d, p)
    if method == "rowwise":
        if T != 1:
            raise ValueError("the rowwise method needs T = 1")
        out = torch.empty(B, dtype=torch.float32, device=x.device)
        _linear_rowwise_kernel[(B,)](
            x,
            g,
            out,
            d,
            p,
            x.stride(0),
            x.stride(2),
            g.stride(0),
            g.stride(2),
            HAS_BIAS=bias,
            BLOCK=256,
        )
        return out
    if method == "ghost":
        block_t = ghost_block_t(T)
        n_t = triton.cdiv(T, block_t)
        pairs = upper_triangle_pairs(n_t, x.device)
        n_pairs = pairs.shape[0]
        out_w = torch.empty((B, n_pairs), dtype=torch.float32, device=x.device)
        out_b = torch.empty((B, n_pairs), dtype=torch.float32, device=x.device) if bias else out_w
        args = (
            x,
            g,
            pairs,
            out_w,
            out_b,
            T,
            d,
            p,
            n_pairs,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            g.stride(0),
            g.stride(1),
            g.stride(2),
        )
        _ghost_launch(
            (B * n_pairs,), args, dict(HAS_BIAS=bias, **dot_flags(x.dtype), BLOCK_T=block_t), fixed=dict(BLOCK_K=64)
        )
        return out_w.sum(dim=1) + out_b.sum(dim=1) if bias else out_w.sum(dim=1)
    if method == "direct":
        d_cols = d + 1 if bias else d  # the bias is a column of ones appended to x
        # a slot per (p, d) tile of any tiling with blocks of 32 or more; unused slots stay zero
        out_row = triton.cdiv(p, 32) * triton.cdiv(d_cols, 32)
        out = torch.zeros((B, out_row), dtype=torch.float32, device=x.device)
        args = (
            x,
            g,
            out,
            T,
            d,
            p,
            out_row,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            g.stride(0),
            g.stride(1),
            g.stride(2),
        )

        def grid(meta):
            return (B, triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(d_cols, meta["BLOCK_D"]))

        fixed = dict(BLOCK_P=64 if p > 32 else 32, BLOCK_D=64 if d_cols > 32 else 32, BLOCK_T=32 if T > 16 else 16)
        _direct_launch(grid, args, dict(HAS_BIAS=bias, **dot_flags(x.dtype)), fixed=fixed)
        return out.sum(dim=1)
    raise ValueError(f"unknown method {method!r}")


def _sq_norms_fake(x: torch.Tensor, g: torch.Tensor, bias: bool, method: str) -> torch.Tensor:
    return x.new_empty(x.shape[0], dtype=torch.float32)


# dpkernels::linear_sq_norms (ops/_library.py): x (B, T, d), G (B, T, p) -> float32 (B,)
OP = kernel_op(
    "linear_sq_norms",
    "(Tensor x, Tensor grad_output, bool bias, str method) -> Tensor",
    torch=linear_sq_norms_reference,
    triton=linear_sq_norms_triton,
    fake=_sq_norms_fake,
)
