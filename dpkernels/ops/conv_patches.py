"""A convolution as a linear layer on patches: the patch matrices its per-example gradients are made of.

Math
----
A convolution with weight W (C_out, C_in/g, *k), g groups, stride, padding and dilation sees
example i as L output positions l, each reading one patch of the (padded) input: the
C_in/g·∏k values under the kernel at l, for each group's input channels. Unfold x_i into the
patch matrix U_ij (L × d, d = C_in/g·∏k, features ordered (channel, *kernel offsets) like W's
row-major layout) for each group j, and let G_ij (L × C_out/g) be the output gradient of the
group's output channels at those positions. The convolution is then the linear layer
Y_ij = U_ij W_jᵀ + b_j, where W_j is the (C_out/g × d) block of rows j·C_out/g .. of W viewed as
(C_out, d), so example i's gradients are

    ∇W_j (example i) = G_ijᵀ U_ij          ∇b (example i) = Σ_l G_il

and everything the linear layer computes carries over:

    ‖g_i‖²     = Σ_j ‖G_ijᵀ U_ij‖²_F + ‖Σ_l G_il‖²
                 (``linear_sq_norms`` on (U_ij, G_ij), any method; the groups are folded into the
                 batch axis as g·B independent "examples" and summed per example afterwards)
    clipped W   = Σ_i c_i ∇W_i = the weight gradient of the convolution for the output gradient
                 c∘G (example i's rows scaled by c_i), since the weight gradient is linear in G:
                 torch's own convolution backward computes it (``clipped_weight_sum``: cuDNN on
                 a GPU, all groups in one call, no patches), in float32.

A 1-D convolution is the 2-D one with H = 1 (kernel, stride, dilation 1 and no padding on H).

Padding: a padding mode other than zeros (reflect, replicate, circular) is applied with F.pad
first, as nn.Conv1d/nn.Conv2d do; padding="same" pads dilation·(k − 1) in total per dimension,
the odd element on the right/bottom (as torch does); "valid" is no padding.

Memory
------
The patches are materialised: U is B·L·C_in·∏k elements in x's dtype, about ∏k times the input
(∏k / stride² for strided convolutions), per layer. They are built from a strided window view
of the padded input by one copy into the (g, B, L, d) layout the linear kernels read, so that
copy is the only one (a 1×1 convolution of a channels-last input needs none). They exist only
for the ghost method and the torch backend's norms, in backward, and are freed there (the
Triton direct method indexes them inside its kernel: ``conv_sq_norms.py``); the engine keeps
only (x, G). G is copied
once into (g, B, L, C_out/g), the size of the layer's output. The clipped sum needs no patches:
it holds c∘G in float32 (and x in float32 when x is not) while torch's conv backward runs.
Future work (DESIGN.md): the ghost method with implicit patches too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

IntOrTuple = Union[int, Sequence[int]]


def _tuple(value: IntOrTuple, n: int, name: str, minimum: int) -> Tuple[int, ...]:
    """``value`` (an int, or n ints) as an n-tuple of ints >= minimum."""
    items = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(items) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in items):
        raise ValueError(f"{name} must be an int >= {minimum} or {n} of them, got {value!r}")
    return items


@dataclass(frozen=True)
class ConvGeometry:
    """A Conv1d/Conv2d's shape parameters, normalised to 2-D (1-D: H = 1).

    ``pads`` are (top, bottom, left, right) in input elements; ``spatial_dims`` is 1 or 2.
    """

    spatial_dims: int
    out_channels: int
    in_channels: int
    groups: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    pads: Tuple[int, int, int, int]
    padding_mode: str

    @classmethod
    def from_args(
        cls,
        weight_shape: Sequence[int],
        stride: IntOrTuple = 1,
        padding: Union[str, IntOrTuple] = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> "ConvGeometry":
        """Check and normalise the arguments of F.conv1d / F.conv2d (and nn.ConvNd's padding_mode).

        Cached by argument (a layer asks for its geometry several times a step)."""
        args = (weight_shape, stride, padding, dilation, groups, padding_mode)
        if torch.compiler.is_compiling():  # traced once per graph: no cache (the compiler does not see through it)
            return cls._from_args(*args)
        if all(_plain(a) for a in args):  # not bools or floats, which would hash equal to ints
            return _geometry_cached(cls, *(tuple(a) if isinstance(a, (list, tuple)) else a for a in args))
        return cls._from_args(*args)

    @classmethod
    def _from_args(cls, weight_shape, stride, padding, dilation, groups, padding_mode) -> "ConvGeometry":
        shape = tuple(weight_shape) if isinstance(weight_shape, (tuple, list, torch.Size)) else None
        if (
            shape is None
            or len(shape) not in (3, 4)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            raise ValueError(
                "weight_shape must be (C_out, C_in/groups, k) for a 1-d or (C_out, C_in/groups, kH, kW) for a 2-d "
                f"convolution, positive ints; got {weight_shape!r}"
            )
        n = len(shape) - 2
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or shape[0] % groups:
            raise ValueError(f"groups must be a positive divisor of C_out = {shape[0]}, got {groups!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        kernel = shape[2:]
        stride_t = _tuple(stride, n, "stride", 1)
        dilation_t = _tuple(dilation, n, "dilation", 1)
        if isinstance(padding, str):
            if padding == "valid":
                sides = [(0, 0)] * n
            elif padding == "same":
                if any(s != 1 for s in stride_t):
                    raise ValueError("padding='same' is not supported for strided convolutions")
                totals = [d * (k - 1) for d, k in zip(dilation_t, kernel)]
                sides = [(t // 2, t - t // 2) for t in totals]  # the odd element after, as torch
            else:
                raise ValueError(f"padding must be 'same', 'valid', an int or {n} ints, got {padding!r}")
        else:
            sides = [(p, p) for p in _tuple(padding, n, "padding", 0)]
        if n == 1:
            return cls(
                1,
                shape[0],
                shape[1] * groups,
                groups,
                (1, kernel[0]),
                (1, stride_t[0]),
                (1, dilation_t[0]),
                (0, 0, *sides[0]),
                padding_mode,
            )
        return cls(
            2,
            shape[0],
            shape[1] * groups,
            groups,
            tuple(kernel),
            stride_t,
            dilation_t,
            (*sides[0], *sides[1]),
            padding_mode,
        )

    def as_list(self) -> List[int]:
        """The geometry as the ints a dpkernels op takes (with ``padding_mode`` beside it):
        spatial_dims, out_channels, in_channels, groups, kernel (2), stride (2), dilation (2), pads (4)."""
        return [
            self.spatial_dims,
            self.out_channels,
            self.in_channels,
            self.groups,
            *self.kernel,
            *self.stride,
            *self.dilation,
            *self.pads,
        ]

    @classmethod
    def from_list(cls, values: Sequence[int], padding_mode: str) -> "ConvGeometry":
        """The geometry ``as_list`` gave (cached: an op asks for it at every call)."""
        return _geometry_from_list(cls, tuple(int(v) for v in values), padding_mode)

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        """(C_out, C_in/g, *kernel) in the layer's own dimensions."""
        return (self.out_channels, self.in_channels // self.groups, *self._native(self.kernel))

    @property
    def patch_features(self) -> int:
        """d = C_in/g · ∏k: the columns of a group's patch matrix."""
        return self.in_channels // self.groups * self.kernel[0] * self.kernel[1]

    def _native(self, pair: Tuple[int, ...]) -> Tuple[int, ...]:
        return pair[1:] if self.spatial_dims == 1 else pair

    def output_size(self, spatial: Sequence[int]) -> Tuple[int, ...]:
        """The output's spatial size for an input of spatial size ``spatial`` (native dims);
        entries below 1 mean the input is smaller than the dilated kernel."""
        sizes = (1, *spatial) if self.spatial_dims == 1 else tuple(spatial)
        out = tuple(
            (n + lo + hi - dil * (k - 1) - 1) // s + 1
            for n, lo, hi, k, s, dil in zip(
                sizes, self.pads[0::2], self.pads[1::2], self.kernel, self.stride, self.dilation
            )
        )
        return self._native(out)

    def _fpad(self, pads: Sequence[Tuple[int, int]]) -> List[int]:
        """Per-dimension (before, after) pads of the native dims in F.pad's order (last dim first)."""
        native = self._native(tuple(pads))
        return [v for lo_hi in reversed(native) for v in lo_hi]

    def conv_padding_split(self) -> Tuple[Optional[List[int]], Tuple[int, ...]]:
        """How F.conv{1,2}d runs this convolution: (F.pad amounts to apply to the input first,
        in F.pad's order, or None; the symmetric zero padding the conv itself then takes).

        As nn.Conv1d/nn.Conv2d: a padding mode other than zeros pads everything with F.pad;
        zero padding is the conv's own, except the odd element of an asymmetric 'same' padding.
        """
        sides = list(zip(self.pads[0::2], self.pads[1::2]))
        if self.padding_mode != "zeros":
            return (self._fpad(sides) if any(self.pads) else None), self._native((0, 0))
        extra = [(0, hi - lo) for lo, hi in sides]
        conv = self._native(tuple(lo for lo, _ in sides))
        return (self._fpad(extra) if any(e for _, e in extra) else None), conv


def _plain(arg) -> bool:
    """An int, a str, or a tuple/list/torch.Size of ints: an argument the geometry cache may key on."""
    if type(arg) in (int, str):
        return True
    return isinstance(arg, (tuple, list)) and all(type(v) is int for v in arg)


@functools.lru_cache(maxsize=1024)
def _geometry_cached(cls, weight_shape, stride, padding, dilation, groups, padding_mode) -> ConvGeometry:
    return cls._from_args(weight_shape, stride, padding, dilation, groups, padding_mode)


@functools.lru_cache(maxsize=1024)
def _geometry_from_list(cls, v: Tuple[int, ...], padding_mode: str) -> ConvGeometry:
    if len(v) != 14:
        raise ValueError(f"a convolution geometry is 14 ints (ConvGeometry.as_list), got {len(v)}")
    return cls(v[0], v[1], v[2], v[3], v[4:6], v[6:8], v[8:10], v[10:14], padding_mode)


def pad_input(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """x (B, C, *spatial) padded on every side by ``geometry.pads`` with its padding mode."""
    if not any(geometry.pads):
        return x
    sides = list(zip(geometry.pads[0::2], geometry.pads[1::2]))
    mode = "constant" if geometry.padding_mode == "zeros" else geometry.padding_mode
    return F.pad(x, geometry._fpad(sides), mode=mode)


def pad_for_conv(x: torch.Tensor, geometry: ConvGeometry) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """(the input F.conv{1,2}d gets, the padding it gets): ``conv_padding_split`` applied to x."""
    fpad, conv_padding = geometry.conv_padding_split()
    if fpad is None:
        return x, conv_padding
    mode = "constant" if geometry.padding_mode == "zeros" else geometry.padding_mode
    return F.pad(x, fpad, mode=mode), conv_padding


def clipped_weight_sum(
    x: torch.Tensor, grad_output: torch.Tensor, clip_factors: torch.Tensor, geometry: ConvGeometry
) -> torch.Tensor:
    """Σ_i c_i ∇W_i, float32, in the weight's shape: the weight gradient torch's convolution
    backward computes for the output gradient c∘G (each example's rows scaled by its factor),
    since that gradient is linear in G. No patches; every group in one call. Operands in
    float32, so the sum is accumulated in float32 (on a GPU with cuDNN's TF32 setting,
    ``torch.backends.cudnn.allow_tf32``, as the non-private conv backward is)."""
    B = x.shape[0]
    scaled = grad_output.float() * clip_factors.view(B, *([1] * (grad_output.dim() - 1)))
    xp, conv_padding = pad_for_conv(x, geometry)
    weight = torch.empty(geometry.weight_shape, device=x.device)  # for its shape: the values are not read
    return torch.ops.aten.convolution_backward(
        scaled,
        xp.float(),
        weight,
        None,
        list(geometry._native(geometry.stride)),
        list(conv_padding),
        list(geometry._native(geometry.dilation)),
        False,
        [0] * geometry.spatial_dims,
        geometry.groups,
        [False, True, False],
    )[1]


def input_patches(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """The patch matrices U of every group and example, (g, B, L, d), contiguous.

    x: (B, C_in, L_in) for a 1-d, (B, C_in, H, W) for a 2-d convolution, any strides.
    ``U[j, i, l]`` holds the d = C_in/g·∏k input values group j's kernel reads at output
    position l (row-major over the output's spatial dims), ordered like a row of the weight
    viewed as (C_out, d). On CPU tensors csrc/patches_cpu.cpp writes them (where the compiled CPU
    kernels are available), elsewhere one copy from a strided window view of the padded input.
    """
    if x.device.type == "cpu" and _compiled_patches():
        return _compiled_input_patches(x, geometry)
    return input_patches_reference(x, geometry)


def _compiled_patches() -> bool:
    from .. import _cpu

    return _cpu.available()


def _compiled_input_patches(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """``input_patches`` by csrc/patches_cpu.cpp: zero padding inside the kernel, other modes padded first."""
    from .. import _cpu

    out = geometry.output_size(x.shape[2:])
    out = (1, *out) if geometry.spatial_dims == 1 else out
    if geometry.padding_mode != "zeros":
        x, pads = pad_input(x, geometry), (0, 0)
    else:
        pads = (geometry.pads[0], geometry.pads[2])  # top, left: bottom and right follow from the output size
    if geometry.spatial_dims == 1:
        x = x.unsqueeze(2)
    return _cpu.conv_patches(x, geometry.groups, geometry.kernel, geometry.stride, pads, geometry.dilation, out)


def input_patches_reference(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """``input_patches`` in torch ops (any device): one copy from a strided window view."""
    B = x.shape[0]
    xp = pad_input(x, geometry)
    if geometry.spatial_dims == 1:
        xp = xp.unsqueeze(2)
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.stride, geometry.dilation
    windows = xp.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # (B, C, Ho, Wo, ·, ·)
    if dh > 1 or dw > 1:
        windows = windows[..., ::dh, ::dw]  # (B, C, Ho, Wo, kh, kw)
    g = geometry.groups
    Ho, Wo = windows.shape[2], windows.shape[3]
    windows = windows.unflatten(1, (g, geometry.in_channels // g))  # (B, g, C/g, Ho, Wo, kh, kw)
    patches = windows.permute(1, 0, 3, 4, 2, 5, 6).reshape(g, B, Ho * Wo, geometry.patch_features)
    return patches.contiguous()  # reshape may have returned a strided view (1×1 kernels): at most one copy


def output_gradient_rows(grad_output: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """G of every group and example, (g, B, L, C_out/g), contiguous, positions ordered as in
    ``input_patches``. grad_output: (B, C_out, *output spatial), any strides."""
    B, g = grad_output.shape[0], geometry.groups
    rows = grad_output.reshape(B, g, geometry.out_channels // g, -1)
    return rows.permute(1, 0, 3, 2).contiguous()
