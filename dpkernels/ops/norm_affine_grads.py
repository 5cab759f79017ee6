"""Per-example gradients of the affine part of a normalisation layer (LayerNorm, RMSNorm, GroupNorm).

A normalisation layer computes y = x̂ ⊙ w + b, where x̂ = (x − μ)·ρ is the input normalised
with statistics μ (mean; 0 for RMSNorm) and ρ = 1/sqrt(var + eps) (rstd), and the weight w and
bias b (n features) broadcast over every other position of the example. With the example's
positions r and features j, and G = ∂L/∂y,

    gw_ij = Σ_r x̂_irj · G_irj        gb_ij = Σ_r G_irj                       (B, n) each

These are small (n numbers per example), so they are materialised; the engine's norms are
Σ_j gw_ij² + gb_ij², and the clipped sum is the clip-sum-noise of ``clip_sum_noise.py``.

Layout: x and G are (B, R, n) strided views; the statistics of element (i, r, j) sit at
``stats[i·s_b + r·s_r + (j // group)·s_n]``:

    LayerNorm / RMSNorm  x (B, *, n) → (B, R, n), stats per (i, r):  s_r = 1, s_n = 0
    GroupNorm            x (B, C, S) → (B, S, C) (a transposed view), stats per (i, group of
                         channels): s_r = 0, s_n = 1, group = C / num_groups

The Triton kernel reads x, G and the statistics once, forms x̂ in registers and reduces over r;
x̂ is never written to memory. When B × column blocks are too few programs to fill the GPU, each
example's rows are split over several programs whose partial sums are added in a fixed order
(deterministic). Accumulation is float32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._library import kernel_op
from ._triton import HAS_TRITON, tl, triton


def stat_at(stats: torch.Tensor, B: int, R: int, n: int, group: int, per_position: bool) -> torch.Tensor:
    """The statistic of every element of (B, R, n), broadcast from ``stats`` (float32)."""
    s = stats.float().reshape(B, -1)
    if per_position:  # (B, R): one per position
        return s.view(B, R, 1)
    return s.repeat_interleave(group, dim=1).view(B, 1, n)  # (B, n // group): one per channel group


def norm_affine_grads_reference(
    x: torch.Tensor,
    g: torch.Tensor,
    mean: Optional[torch.Tensor],
    rstd: torch.Tensor,
    group: int,
    per_position: bool,
    want_weight: bool,
    want_bias: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """torch reference: x, g (B, R, n) → (gw, gb), float32 (B, n) each (None where not wanted)."""
    B, R, n = x.shape
    gf = g.float()
    gw = gb = None
    if want_weight:
        xhat = x.float()
        if mean is not None:
            xhat = xhat - stat_at(mean, B, R, n, group, per_position)
        xhat = xhat * stat_at(rstd, B, R, n, group, per_position)
        gw = (xhat * gf).sum(dim=1)
    if want_bias:
        gb = gf.sum(dim=1)
    return gw, gb


if HAS_TRITON:

    @triton.jit
    def _norm_affine_grads_kernel(
        x_ptr,
        g_ptr,
        mean_ptr,
        rstd_ptr,
        gw_ptr,
        gb_ptr,
        R,
        n,
        group,
        rows_per_split,
        sxb,
        sxr,
        sxn,
        sgb,
        sgr,
        sgn,
        ssb,
        ssr,
        ssn,
        HAS_MEAN: tl.constexpr,
        WANT_W: tl.constexpr,
        WANT_B: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # program (i, column block, split): example i's rows [split·rows_per_split, +rows_per_split)
        i = tl.program_id(0).to(tl.int64)
        split = tl.program_id(2)
        r_start = split * rows_per_split
        r_end = tl.minimum(r_start + rows_per_split, R)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < n
        offs_r = tl.arange(0, BLOCK_R)
        x_base = x_ptr + i * sxb
        g_base = g_ptr + i * sgb
        s_col = (cols // group).to(tl.int64) * ssn
        acc_w = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(r_start, r_end, BLOCK_R):
            rows = (r0 + offs_r).to(tl.int64)
            mask = (rows < r_end)[:, None] & cmask[None, :]
            gv = tl.load(g_base + rows[:, None] * sgr + cols[None, :] * sgn, mask=mask, other=0.0).to(tl.float32)
            if WANT_W:
                xv = tl.load(x_base + rows[:, None] * sxr + cols[None, :] * sxn, mask=mask, other=0.0).to(tl.float32)
                s_off = i * ssb + rows[:, None] * ssr + s_col[None, :]
                rs = tl.load(rstd_ptr + s_off, mask=mask, other=0.0)
                if HAS_MEAN:
                    xv = xv - tl.load(mean_ptr + s_off, mask=mask, other=0.0)
                acc_w += tl.sum(xv * rs * gv, axis=0)
            if WANT_B:
                acc_b += tl.sum(gv, axis=0)
        out = (i * tl.num_programs(2) + split) * n + cols  # partial sums (B, splits, n)
        if WANT_W:
            tl.store(gw_ptr + out, acc_w, mask=cmask)
        if WANT_B:
            tl.store(gb_ptr + out, acc_b, mask=cmask)


def row_splits(programs: int, R: int, block_r: int, target: int = 264) -> int:
    """How many programs share one example's rows: enough for ``target`` programs in all (two per
    H100 SM) when B × column blocks alone are fewer, but never a split of fewer than 4 row blocks."""
    if programs >= target:
        return 1
    return max(1, min(-(-target // programs), R // (4 * block_r)))


def norm_affine_grads_triton(
    x: torch.Tensor,
    g: torch.Tensor,
    mean: Optional[torch.Tensor],
    rstd: torch.Tensor,
    group: int,
    per_position: bool,
    want_weight: bool,
    want_bias: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Triton kernel: x, g (B, R, n) with any strides → (gw, gb), float32 (B, n) each."""
    B, R, n = x.shape
    rstd_c = rstd.float().reshape(B, -1).contiguous()
    mean_c = mean.float().reshape(B, -1).contiguous() if mean is not None else rstd_c
    # strides of the statistics (see the module docstring): one per position, or per channel group
    ssb, ssr, ssn = (rstd_c.shape[1], 1, 0) if per_position else (rstd_c.shape[1], 0, 1)
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_r = 32 if R >= 32 else max(2, triton.next_power_of_2(R))
    n_blocks = triton.cdiv(n, block_n)
    splits = row_splits(B * n_blocks, R, block_r)
    rows_per_split = triton.cdiv(triton.cdiv(R, splits), block_r) * block_r
    splits = triton.cdiv(R, rows_per_split)
    gw = torch.empty((B, splits, n), dtype=torch.float32, device=x.device) if want_weight else None
    gb = torch.empty((B, splits, n), dtype=torch.float32, device=x.device) if want_bias else None
    dummy = gw if gw is not None else gb
    _norm_affine_grads_kernel[(B, n_blocks, splits)](
        x,
        g,
        mean_c,
        rstd_c,
        gw if gw is not None else dummy,
        gb if gb is not None else dummy,
        R,
        n,
        group,
        rows_per_split,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        g.stride(0),
        g.stride(1),
        g.stride(2),
        ssb,
        ssr,
        ssn,
        HAS_MEAN=mean is not None,
        WANT_W=want_weight,
        WANT_B=want_bias,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
    )
    return (gw.sum(dim=1) if gw is not None else None), (gb.sum(dim=1) if gb is not None else None)


def _norm_affine_grads_fake(
    x: torch.Tensor,
    g: torch.Tensor,
    mean: Optional[torch.Tensor],
    rstd: torch.Tensor,
    group: int,
    per_position: bool,
    want_weight: bool,
    want_bias: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    B, n = x.shape[0], x.shape[2]
    return (
        x.new_empty((B, n), dtype=torch.float32) if want_weight else None,
        x.new_empty((B, n), dtype=torch.float32) if want_bias else None,
    )


# dpkernels::norm_affine_grads (ops/_library.py): x, G (B, R, n) -> [gw (B, n)?, gb (B, n)?], float32
OP = kernel_op(
    "norm_affine_grads",
    "(Tensor x, Tensor grad_output, Tensor? mean, Tensor rstd, int group, bool per_position, bool want_weight, "
    "bool want_bias) -> Tensor[]",
    torch=norm_affine_grads_reference,
    triton=norm_affine_grads_triton,
    fake=_norm_affine_grads_fake,
    optional_outputs=True,
)
