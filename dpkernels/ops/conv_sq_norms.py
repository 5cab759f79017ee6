"""Squared per-example gradient norms of a convolution: the op, and its direct method's kernel.

The op ``dpkernels::conv_sq_norms`` (x (B, C_in, *), G (B, C_out, *out), the geometry as
``ConvGeometry.as_list``) → float32 (B,), weight and bias:

    method  "auto": the cheaper of ghost and direct for the backend (``linear_sq_norms.choose_method``,
            ``choose_method_torch``) with L output positions as T; L = 1 is the rowwise form
    direct  (L > 1) the kernels below, no patches; the bias term ‖Σ_l G_il‖² added
    ghost   the linear layer's norms on the patches (``conv_patches``): the g groups of B examples
            folded into g·B independent linear layers, (U_ij, G_ij), then summed per example

The direct method:

With the notation of ``conv_patches.py`` (group j, patch matrix U_ij (L × d), output gradient
G_ij (L × C_out/g)), the direct method accumulates each (C_out/g × d) tile of G_ijᵀ U_ij over the
L output positions in registers, squares and reduces it:

    ‖∇W (example i)‖² = Σ_j ‖G_ijᵀ U_ij‖²_F

This kernel never materialises U: the entry U_ij[l, (c, kh, kw)] is read straight from the
(zero-padded) input at channel j·C_in/g + c, row oh·s_h − p_h + kh·d_h, column
ow·s_w − p_w + kw·d_w (l = (oh, ow)), and positions in the padding read as 0. Memory: the
(B·g, tiles) partial sums only, instead of the ∏k × input patches. Cost ≈ B·L·d·C_out
multiply-adds, one weight-gradient GEMM. A 1-D convolution is the 2-D one with H = 1. The bias
term ‖Σ_l G_il‖² is not included (the caller adds it).

The torch implementation (``conv_weight_sq_norms_reference``, the torch backend's direct method)
needs no patches either: example i's weight gradient is the convolution's own weight gradient of
(x_i, G_i), so stacking the examples along the channels and convolving with B·g groups gives all
of them in one ``aten.convolution_backward`` call (mkldnn on a CPU, cuDNN on a GPU), in chunks of
examples so that the per-example gradients of a chunk stay under ``PER_EXAMPLE_BUDGET``
elements; each is squared and summed at once. Measured on a 2-core CPU against building the
patch matrices and multiplying them (bench/bench_cpu_norms.py, bench/results/cpu_conv_norms-*):
faster on 10 of 13 ResNet/CNN layers, by up to 10× (a 3×3 16-channel 32×32 layer) and 16× (a
depthwise 56×56 one); slower where few input channels make each grouped product tiny (a
3-channel stem: 4.7 ms against 3.1) and for wide 7×7 maps, where ``auto`` takes ghost anyway.
"""

from __future__ import annotations

import math
from typing import Callable, List

import torch

from . import conv_patches as _patches
from ._library import kernel_op
from ._triton import HAS_TRITON, TunedLaunch, dot_flags, gemm_tile_configs, tl, triton
from .conv_patches import ConvGeometry, pad_for_conv
from .linear_sq_norms import choose_method, choose_method_torch, linear_sq_norms_reference, linear_sq_norms_triton

# float32 elements of per-example weight gradients the torch direct method holds at once (64 MiB)
PER_EXAMPLE_BUDGET = 1 << 24


def conv_weight_sq_norms_reference(x: torch.Tensor, grad_output: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """‖∇W (example i)‖² as float32 (B,), in torch ops: the per-example weight gradients by one
    grouped convolution backward per chunk of examples (see the module docstring); x the layer
    input (padding mode applied here), grad_output (B, C_out, *out)."""
    B = x.shape[0]
    xp, conv_padding = pad_for_conv(x, geometry)
    xp, g = xp.float(), grad_output.float()
    n = geometry.spatial_dims
    native = geometry._native
    per_example = geometry.out_channels * geometry.patch_features
    chunk = max(1, min(B, PER_EXAMPLE_BUDGET // per_example))
    norms = []
    for start in range(0, B, chunk):
        xs, gs = xp[start : start + chunk], g[start : start + chunk]
        b = xs.shape[0]
        weight_shape = (b * geometry.out_channels, geometry.in_channels // geometry.groups, *native(geometry.kernel))
        grads = torch.ops.aten.convolution_backward(
            gs.reshape(1, b * geometry.out_channels, *gs.shape[2:]),
            xs.reshape(1, b * xs.shape[1], *xs.shape[2:]),
            torch.empty(weight_shape, device=x.device),
            None,
            list(native(geometry.stride)),
            list(conv_padding),
            list(native(geometry.dilation)),
            False,
            [0] * n,
            b * geometry.groups,
            [False, True, False],
        )[1]
        norms.append(grads.view(b, -1).square().sum(dim=1))
    return norms[0] if len(norms) == 1 else torch.cat(norms)


if HAS_TRITON:
    from ._triton import dot_acc

    @triton.jit
    def _conv_direct_kernel(
        x_ptr,
        g_ptr,
        out_ptr,
        groups,
        cin_g,
        H,
        W,
        Wo,
        L,
        p_g,
        d,
        out_row,
        sxb,
        sxc,
        sxh,
        sxw,
        sgb,
        sgc,
        sgh,
        sgw,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dil_h,
        dil_w,
        KH: tl.constexpr,
        KW: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)  # (example, group)
        b = pid // groups
        j = pid % groups
        tp = tl.program_id(1)
        td = tl.program_id(2)
        rows_p = tp * BLOCK_P + tl.arange(0, BLOCK_P)  # output channel within the group
        cols_d = td * BLOCK_D + tl.arange(0, BLOCK_D)  # patch feature (c, kh, kw)
        mask_p = rows_p < p_g
        mask_d = cols_d < d
        ch_out = (j * p_g + rows_p).to(tl.int64)
        ch_in = (j * cin_g + cols_d // (KH * KW)).to(tl.int64)
        kh = (cols_d // KW) % KH
        kw = cols_d % KW
        offs_l = tl.arange(0, BLOCK_L)

        acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            ls = l0 + offs_l
            lmask = ls < L
            oh = ls // Wo
            ow = ls % Wo
            # G tile, transposed: (BLOCK_P, BLOCK_L)
            gt = tl.load(
                g_ptr + b * sgb + ch_out[:, None] * sgc + (oh * sgh + ow * sgw).to(tl.int64)[None, :],
                mask=mask_p[:, None] & lmask[None, :],
                other=0.0,
            )
            # U tile (BLOCK_L, BLOCK_D) gathered from the input; the padding reads 0
            hh = oh[:, None] * stride_h - pad_h + kh[None, :] * dil_h
            ww = ow[:, None] * stride_w - pad_w + kw[None, :] * dil_w
            inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W) & lmask[:, None] & mask_d[None, :]
            ut = tl.load(
                x_ptr + b * sxb + ch_in[None, :] * sxc + hh.to(tl.int64) * sxh + ww.to(tl.int64) * sxw,
                mask=inside,
                other=0.0,
            )
            acc = dot_acc(acc, gt, ut, IEEE, UPCAST)

        n_tiles_d = tl.cdiv(d, BLOCK_D)
        tl.store(out_ptr + pid * out_row + tp * n_tiles_d + td, tl.sum(tl.sum(acc * acc, axis=1), axis=0))

    _conv_direct_launch = TunedLaunch(
        _conv_direct_kernel,
        gemm_tile_configs("BLOCK_P", "BLOCK_D", "BLOCK_L"),
        key=["L", "d", "p_g"],
        reset_to_zero=["out_ptr"],
    )


def conv_weight_sq_norms_triton(x: torch.Tensor, grad_output: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """float32 (B,): Σ_j ‖G_ijᵀ U_ij‖² (no bias term). ``x``: the input after ``pad_for_conv``
    (only symmetric zero padding left, which the kernel reads as 0); any strides."""
    xp, conv_padding = pad_for_conv(x, geometry)
    if geometry.spatial_dims == 1:  # as 2-D with H = 1
        xp, g4, (pad_h, pad_w) = xp.unsqueeze(2), grad_output.unsqueeze(2), (0, conv_padding[0])
    else:
        g4, (pad_h, pad_w) = grad_output, conv_padding
    B, _, H, W = xp.shape
    Ho, Wo = g4.shape[2], g4.shape[3]
    groups = geometry.groups
    p_g = geometry.out_channels // groups
    d = geometry.patch_features
    kh, kw = geometry.kernel
    # a slot per (p, d) tile of any tiling with blocks of 32 or more; unused slots stay zero
    out_row = triton.cdiv(p_g, 32) * triton.cdiv(d, 32)
    out = torch.zeros((B * groups, out_row), dtype=torch.float32, device=x.device)
    args = (
        xp,
        g4,
        out,
        groups,
        geometry.in_channels // groups,
        H,
        W,
        Wo,
        Ho * Wo,
        p_g,
        d,
        out_row,
        *xp.stride(),
        *g4.stride(),
        *geometry.stride,
        pad_h,
        pad_w,
        *geometry.dilation,
    )

    def grid(meta):
        return (B * groups, triton.cdiv(p_g, meta["BLOCK_P"]), triton.cdiv(d, meta["BLOCK_D"]))

    fixed = dict(BLOCK_P=32 if p_g > 16 else 16, BLOCK_D=64 if d > 32 else 32, BLOCK_L=32)
    _conv_direct_launch(grid, args, dict(KH=kh, KW=kw, **dot_flags(x.dtype)), fixed=fixed)
    return out.sum(dim=1).view(B, groups).sum(dim=1)


# ---------------------------------------------------------------- the op ------------------


def _conv_sq_norms(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    geometry: ConvGeometry,
    bias: bool,
    method: str,
    choose: Callable,
    direct: Callable,
    linear: Callable,
) -> torch.Tensor:
    """The composition of the module docstring, with one backend's method choice and kernels."""
    L = math.prod(grad_output.shape[2:])
    p_g = geometry.out_channels // geometry.groups
    if method == "auto" and L > 1:
        method = choose(L, geometry.patch_features, p_g)
    if method == "direct" and L > 1:  # no patches: the kernel indexes them, torch convolves per example
        norms = direct(x, grad_output, geometry)
        if bias:
            norms = norms + grad_output.sum(dim=tuple(range(2, grad_output.dim())), dtype=torch.float32).square().sum(1)
        return norms
    patches = _patches.input_patches(x, geometry)  # (g, B, L, d)
    rows = _patches.output_gradient_rows(grad_output, geometry)  # (g, B, L, C_out/g)
    g, B, L, d = patches.shape
    # the g groups of B examples as g·B independent linear layers, then summed per example
    norms = linear(
        patches.reshape(g * B, L, d), rows.view(g * B, L, rows.shape[-1]), bias, "rowwise" if L == 1 else method
    )
    return norms.view(g, B).sum(dim=0)


def conv_sq_norms_torch(
    x: torch.Tensor, grad_output: torch.Tensor, geometry: List[int], padding_mode: str, bias: bool, method: str
) -> torch.Tensor:
    """The op on the torch backend (its own method choice: full Gram matrices, per-example convolutions)."""
    return _conv_sq_norms(
        x,
        grad_output,
        ConvGeometry.from_list(geometry, padding_mode),
        bias,
        method,
        choose_method_torch,
        conv_weight_sq_norms_reference,
        linear_sq_norms_reference,
    )


def conv_sq_norms_fused(
    x: torch.Tensor, grad_output: torch.Tensor, geometry: List[int], padding_mode: str, bias: bool, method: str
) -> torch.Tensor:
    """The op on the Triton backend (implicit patches for the direct method)."""
    return _conv_sq_norms(
        x,
        grad_output,
        ConvGeometry.from_list(geometry, padding_mode),
        bias,
        method,
        choose_method,
        conv_weight_sq_norms_triton,
        linear_sq_norms_triton,
    )


def _conv_sq_norms_fake(
    x: torch.Tensor, grad_output: torch.Tensor, geometry: List[int], padding_mode: str, bias: bool, method: str
) -> torch.Tensor:
    return x.new_empty(x.shape[0], dtype=torch.float32)


# dpkernels::conv_sq_norms (ops/_library.py)
OP = kernel_op(
    "conv_sq_norms",
    "(Tensor x, Tensor grad_output, int[] geometry, str padding_mode, bool bias, str method) -> Tensor",
    torch=conv_sq_norms_torch,
    triton=conv_sq_norms_fused,
    fake=_conv_sq_norms_fake,
)
