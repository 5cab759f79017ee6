"""DPConv1d / DPConv2d end to end: patches, norms, clipped sum and noise against the torch.func
oracle (the torch layer itself differentiated per example, in float64), the modules, and private
steps through make_private.

A convolution is a linear layer on patches; what can go wrong is the patch matrix (a padding side,
a stride or dilation, the group split, the 1-d ↔ 2-d mapping) and the noise indexing of grouped
weights. The cases cover B = 1, one output position, kernels 1 and 3 (and even kernels with
asymmetric 'same' padding), stride 2, dilation 2 and 3, groups 2 and depthwise, every padding mode,
odd channel counts and non-contiguous inputs. Shapes are small: the Triton kernels run in the
interpreter on the CPU.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpkernels
from dpkernels import functional
from dpkernels.nn import DPConv1d, DPConv2d, convert
from dpkernels.ops import conv_patches
from dpkernels.ops.philox import PhiloxKey
from helpers import assert_close_scaled, philox_noise, random_clip_factors
from conftest import triton_runnable
from oracle import batch_loss, conv_per_example_grads, flat_clipped_mean, model_per_example_grads

# name: (dims, B, C_in, C_out, spatial size, nn.ConvNd keyword arguments)
CASES = {
    "2d": (2, 3, 3, 5, (6, 7), dict(kernel_size=3, padding=1)),
    "2d_b1_one_position": (2, 1, 2, 3, (3, 3), dict(kernel_size=3)),
    "2d_k1_odd_channels": (2, 2, 5, 7, (4, 5), dict(kernel_size=1, bias=False)),
    "2d_stride2": (2, 2, 3, 4, (7, 8), dict(kernel_size=3, stride=2, padding=1)),
    "2d_dilation2": (2, 2, 3, 2, (7, 7), dict(kernel_size=3, dilation=2, padding=2)),
    "2d_same_even_kernel": (2, 2, 3, 4, (5, 6), dict(kernel_size=(2, 4), padding="same")),  # odd pad after
    "2d_valid_rect": (2, 2, 3, 3, (5, 4), dict(kernel_size=(3, 1), padding="valid")),
    "2d_groups2": (2, 2, 4, 6, (5, 5), dict(kernel_size=3, padding=1, groups=2)),
    "2d_depthwise": (2, 2, 3, 6, (6, 6), dict(kernel_size=3, padding="same", groups=3)),
    "2d_reflect_stride": (2, 2, 3, 4, (6, 7), dict(kernel_size=3, padding=1, stride=(1, 2), padding_mode="reflect")),
    "2d_circular_groups": (2, 2, 4, 2, (5, 5), dict(kernel_size=3, padding=(1, 2), groups=2, padding_mode="circular")),
    "2d_replicate": (2, 2, 2, 3, (4, 5), dict(kernel_size=3, padding=2, padding_mode="replicate", bias=False)),
    "1d": (1, 3, 3, 5, (9,), dict(kernel_size=3, padding=1)),
    "1d_same_even_kernel": (1, 2, 2, 3, (8,), dict(kernel_size=4, padding="same")),
    "1d_reflect_groups_stride": (
        1,
        2,
        6,
        3,
        (11,),
        dict(kernel_size=3, stride=2, padding=2, groups=3, padding_mode="reflect"),
    ),
    "1d_circular_dilation": (1, 2, 5, 7, (10,), dict(kernel_size=3, dilation=2, padding=3, padding_mode="circular")),
    "1d_b1_one_position": (1, 1, 3, 2, (5,), dict(kernel_size=5, bias=False)),
    "1d_depthwise_same_dilation3": (1, 2, 4, 4, (9,), dict(kernel_size=3, dilation=3, padding="same", groups=4)),
}
HALF_CASES = ["2d", "2d_groups2", "1d_reflect_groups_stride"]
METHODS = ["auto", "ghost", "direct"]
# torch's own note that it pads a copy for an even kernel with padding='same' (as the patches do)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


def make_case(name: str, dtype=torch.float32, layout: str = "contiguous", device="cpu"):
    """(torch conv layer, x, grad_output) for a named case, on ``device``; layout "channels_last" or
    "sliced" gives a non-contiguous x of the same shape and values, "expanded" a stride-0 grad_output."""
    dims, B, cin, cout, size, kw = CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    torch.manual_seed(zlib.crc32(name.encode()))
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(cin, cout, **kw)
    scale = torch.linspace(0.5, 2.0, B).view(B, *([1] * (dims + 1)))  # examples differ in size
    x = torch.randn(B, cin, *size, generator=gen) * scale
    with torch.no_grad():
        out_shape = conv(x).shape
    g = torch.randn(out_shape, generator=gen) * scale.flip(0)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "sliced":
        wide = torch.zeros(B, cin, *size[:-1], 2 * size[-1])
        wide[..., ::2] = x
        x = wide[..., ::2]
    x, g = x.to(device=device, dtype=dtype), g.to(device=device, dtype=dtype)
    if layout == "expanded":
        g = g[..., :1].expand(out_shape)
    return conv.to(device), x, g


def conv_args(conv: nn.Module) -> dict:
    return dict(
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        padding_mode=conv.padding_mode,
        bias=conv.bias is not None,
    )


def oracle(conv, x, g):
    grads = conv_per_example_grads(conv, x, g)
    return grads["weight"], grads.get("bias")


def sq_norms_oracle(conv, x, g):
    return sum(v.flatten(1).square().sum(1) for v in conv_per_example_grads(conv, x, g).values())


def clip_factors(B: int, device="cpu") -> torch.Tensor:
    return random_clip_factors(B, device, seed=700)


_close = assert_close_scaled
_noise = philox_noise


# ------------------------------------------------------------------ patches ---------------


@pytest.mark.parametrize("name", CASES)
def test_patches_are_what_f_unfold_gives(name):
    """input_patches equals F.unfold of the input padded as nn.ConvNd pads it, split per group."""
    conv, x, g = make_case(name)
    geometry = conv_patches.ConvGeometry.from_args(
        conv.weight.shape, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode
    )
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    if x.dim() == 3:
        xp, k, s, d = xp.unsqueeze(2), (1, *k), (1, *s), (1, *d)
    cols = F.unfold(xp, k, dilation=d, stride=s)  # (B, C·∏k, L)
    B, L, G = x.shape[0], cols.shape[-1], conv.groups
    expected = cols.view(B, G, -1, L).permute(1, 0, 3, 2)
    patches = conv_patches.input_patches(x, geometry)
    assert patches.is_contiguous() and torch.equal(patches, expected)
    assert geometry.output_size(x.shape[2:]) == tuple(g.shape[2:])
    rows = conv_patches.output_gradient_rows(g, geometry)
    assert rows.shape == (G, B, L, conv.out_channels // G)
    assert torch.equal(rows, g.reshape(B, G, -1, L).permute(1, 0, 3, 2))


def test_conv_padding_split_is_what_the_torch_layer_runs():
    """F.pad first for the padding modes (as nn.ConvNd), only the odd element of 'same' for zeros."""

    def split(**kw):
        conv = nn.Conv2d(2, 2, **kw)
        return conv_patches.ConvGeometry.from_args(
            conv.weight.shape, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode
        ).conv_padding_split()

    assert split(kernel_size=3, padding=1) == (None, (1, 1))
    assert split(kernel_size=(2, 4), padding="same") == ([0, 1, 0, 1], (0, 1))
    assert split(kernel_size=3, padding=(1, 2), padding_mode="reflect") == ([2, 2, 1, 1], (0, 0))
    assert split(kernel_size=3, padding="valid", padding_mode="reflect") == (None, (0, 0))
    conv = nn.Conv1d(2, 2, 4, padding="same", padding_mode="circular")
    geometry = conv_patches.ConvGeometry.from_args(
        conv.weight.shape, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode
    )
    assert geometry.conv_padding_split() == (conv._reversed_padding_repeated_twice, (0,))


# ------------------------------------------------------------------ squared norms ---------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", CASES)
def test_sq_norms_float32_match_oracle(device, backend, name, method):
    conv, x, g = make_case(name, device=device)
    out = functional.conv_sq_norms(x, g, conv.weight.shape, method=method, backend=backend, **conv_args(conv))
    assert out.dtype == torch.float32 and out.shape == (x.shape[0],)
    _close(out, sq_norms_oracle(conv, x, g), 1e-5)


@pytest.mark.parametrize("name", ["2d_groups2", "1d_reflect_groups_stride", "2d_depthwise"])
def test_torch_direct_method_in_chunks_of_examples(monkeypatch, name):
    """The torch backend's direct method convolves per example in chunks bounded by
    PER_EXAMPLE_BUDGET: one example per chunk gives the same norms as one chunk."""
    from dpkernels.ops import conv_sq_norms as conv_norms

    conv, x, g = make_case(name)
    whole = functional.conv_sq_norms(x, g, conv.weight.shape, method="direct", backend="torch", **conv_args(conv))
    monkeypatch.setattr(conv_norms, "PER_EXAMPLE_BUDGET", 1)
    chunked = functional.conv_sq_norms(x, g, conv.weight.shape, method="direct", backend="torch", **conv_args(conv))
    _close(chunked, whole, 1e-6)
    _close(chunked, sq_norms_oracle(conv, x, g), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", HALF_CASES)
def test_sq_norms_half_precision(device, backend, name, dtype):
    # products of half values are exact in float32 and accumulation is float32
    conv, x, g = make_case(name, dtype, device=device)
    out = functional.conv_sq_norms(x, g, conv.weight.shape, backend=backend, **conv_args(conv))
    assert out.dtype == torch.float32
    _close(out, sq_norms_oracle(conv, x, g), 2e-3)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded"])
def test_non_contiguous_inputs(device, backend, layout):
    conv, x, g = make_case("2d_groups2", layout=layout, device=device)
    assert not (x.is_contiguous() and g.is_contiguous())
    out = functional.conv_sq_norms(x, g, conv.weight.shape, backend=backend, **conv_args(conv))
    _close(out, sq_norms_oracle(conv, x, g), 1e-5)
    c = clip_factors(x.shape[0], device)
    gw, gb = functional.conv_clipped_grad(x, g, c, conv.weight.shape, backend=backend, **conv_args(conv))
    rw, rb = oracle(conv, x, g)
    _close(gw, torch.einsum("i,i...->...", c.double(), rw), 1e-5)
    _close(gb, torch.einsum("i,i...->...", c.double(), rb), 1e-5)


def test_bias_term_is_the_difference(device, backend):
    conv, x, g = make_case("2d_depthwise", device=device)
    args = conv_args(conv)
    with_b = functional.conv_sq_norms(x, g, conv.weight.shape, backend=backend, **args)
    args["bias"] = False
    without = functional.conv_sq_norms(x, g, conv.weight.shape, backend=backend, **args)
    _close(with_b - without, g.double().sum(dim=(2, 3)).square().sum(1), 1e-4)


# ------------------------------------------------------------------ clipped sum and noise -


@pytest.mark.parametrize("name", CASES)
def test_clipped_sum_float32_matches_oracle(device, backend, name):
    conv, x, g = make_case(name, device=device)
    c = clip_factors(x.shape[0], device)
    gw, gb = functional.conv_clipped_grad(x, g, c, conv.weight.shape, backend=backend, **conv_args(conv))
    rw, rb = oracle(conv, x, g)
    assert gw.shape == conv.weight.shape and gw.dtype == torch.float32
    _close(gw, torch.einsum("i,i...->...", c.double(), rw), 1e-5)
    if conv.bias is None:
        assert gb is None
    else:
        assert gb.shape == (conv.out_channels,)
        _close(gb, torch.einsum("i,i...->...", c.double(), rb), 1e-5)


@pytest.mark.parametrize("name", HALF_CASES)
def test_clipped_sum_bf16(device, backend, name):
    conv, x, g = make_case(name, torch.bfloat16, device=device)
    c = clip_factors(x.shape[0], device)
    rw, rb = oracle(conv, x, g)
    rw, rb = torch.einsum("i,i...->...", c.double(), rw), torch.einsum("i,i...->...", c.double(), rb)
    gw, gb = functional.conv_clipped_grad(x, g, c, conv.weight.shape, backend=backend, **conv_args(conv))
    assert gw.dtype == gb.dtype == torch.bfloat16
    _close(gw, rw, 2e-2)  # c·G rounded to bf16 before the product, the sum rounded once
    _close(gb, rb, 2e-2)
    gw, gb = functional.conv_clipped_grad(
        x, g, c, conv.weight.shape, backend=backend, out_dtype=torch.float32, **conv_args(conv)
    )
    assert gw.dtype == gb.dtype == torch.float32
    _close(gw, rw, 1e-5 if backend == "torch" else 1e-2)
    _close(gb, rb, 1e-5)


@pytest.mark.parametrize(
    "name", ["2d", "2d_groups2", "2d_depthwise", "1d_reflect_groups_stride", "1d_b1_one_position", "2d_k1_odd_channels"]
)
def test_noise_is_philox_over_the_flat_weight(device, backend, name):
    """grad = clipped sum + σ·z(key), z indexed by the row-major element of the whole weight —
    group j's rows start at element j·(C_out/g)·d, so no two groups share a draw; the bias
    draws from stream + 1."""
    conv, x, g = make_case(name, device=device)
    c = clip_factors(x.shape[0], device)
    key = PhiloxKey(0xFEEDFACECAFEBEEF, 12, 40)
    gw, gb = functional.conv_clipped_grad(
        x, g, c, conv.weight.shape, noise_std=0.37, generator=key, backend=backend, **conv_args(conv)
    )
    rw, rb = oracle(conv, x, g)
    _close(gw, torch.einsum("i,i...->...", c.double(), rw).cpu() + _noise(key, conv.weight.shape, 0.37), 1e-5)
    if conv.bias is not None:
        bias_key = PhiloxKey(key.seed, key.step, key.stream + 1)
        rb = torch.einsum("i,i...->...", c.double(), rb).cpu()
        _close(gb, rb + _noise(bias_key, (conv.out_channels,), 0.37), 1e-5)


def test_zero_clip_factors_give_the_noise_of_every_group(device, backend):
    conv, x, g = make_case("2d_depthwise", device=device)
    key = PhiloxKey(5, 1, 2)
    zero = torch.zeros(x.shape[0], device=device)
    gw, gb = functional.conv_clipped_grad(
        x, g, zero, conv.weight.shape, noise_std=2.0, generator=key, backend=backend, **conv_args(conv)
    )
    _close(gw, _noise(key, conv.weight.shape, 2.0), 1e-6)
    _close(gb, _noise(PhiloxKey(5, 1, 3), gb.shape, 2.0), 1e-6)
    assert len(set(gw.flatten().tolist())) == gw.numel()  # every element its own draw


def test_noise_reproduces_from_a_seeded_generator(device, backend):
    conv, x, g = make_case("2d_groups2", device=device)
    c = clip_factors(x.shape[0], device)

    def run(gen):
        return functional.conv_clipped_grad(
            x, g, c, conv.weight.shape, noise_std=1.0, generator=gen, backend=backend, **conv_args(conv)
        )[0]

    assert torch.equal(run(torch.Generator().manual_seed(3)), run(torch.Generator().manual_seed(3)))
    assert not bool((run(None) == run(None)).any())


def test_does_not_modify_inputs(device, backend):
    conv, x, g = make_case("2d_reflect_stride", layout="channels_last", device=device)
    c = clip_factors(x.shape[0], device)
    before = (x.clone(), g.clone(), c.clone())
    functional.conv_sq_norms(x, g, conv.weight.shape, backend=backend, **conv_args(conv))
    functional.conv_clipped_grad(
        x, g, c, conv.weight.shape, noise_std=1.0, generator=PhiloxKey(1), backend=backend, **conv_args(conv)
    )
    assert all(torch.equal(a, b) for a, b in zip(before, (x, g, c)))


def test_shapes_on_the_meta_device():
    """The memory model runs steps on meta tensors: no data, no data-dependent shapes."""
    x = torch.empty(3, 4, 9, 9, device="meta")
    g = torch.empty(3, 6, 5, 5, device="meta")
    args = dict(stride=2, padding=1, groups=2)
    assert functional.conv_sq_norms(x, g, (6, 2, 3, 3), **args).shape == (3,)
    gw, gb = functional.conv_clipped_grad(
        x, g, torch.empty(3, device="meta"), (6, 2, 3, 3), noise_std=1.0, generator=PhiloxKey(1), **args
    )
    assert gw.shape == (6, 2, 3, 3) and gb.shape == (6,) and gw.device.type == "meta"


# ------------------------------------------------------------------ input errors ----------


def _call(op, x, g, shape=(4, 3, 3, 3), **kw):
    if op == "sq_norms":
        return functional.conv_sq_norms(x, g, shape, **kw)
    return functional.conv_clipped_grad(x, g, torch.ones(x.shape[0] if x.dim() else 1), shape, **kw)


@pytest.mark.parametrize("op", ["sq_norms", "clipped_grad"])
def test_bad_inputs_are_refused_with_clear_errors(op):
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 4, 4)
    _call(op, x, g)  # the good call
    cases = [
        (dict(x=x.double(), g=g.double()), TypeError, "float32, bfloat16 or float16"),
        (dict(g=g.bfloat16()), TypeError, "dtypes must match"),
        (dict(g=torch.empty(2, 4, 4, 4, device="meta")), ValueError, "grad_output is on meta"),
        (dict(x=x[:0], g=g[:0]), ValueError, "empty batch"),
        (dict(x=x[0], g=g[0]), ValueError, r"x must have shape \(B, C_in, H, W\)"),
        (dict(g=torch.randn(2, 4, 5, 4)), ValueError, r"does not match the convolution of x .*gives \(2, 4, 4, 4\)"),
        (dict(g=torch.randn(2, 5, 4, 4)), ValueError, "does not match the convolution"),
        (dict(g=torch.randn(3, 4, 4, 4)), ValueError, "does not match the convolution"),
        (dict(x=torch.randn(2, 5, 6, 6)), ValueError, "x has 5 channels"),
        (dict(x=torch.randn(2, 3, 2, 2), g=torch.randn(2, 4, 0, 0)), ValueError, "smaller than the dilated kernel"),
        (dict(shape=(4, 3, 3)), ValueError, r"x must have shape \(B, C_in, L\)"),
        (dict(shape=(4, 3, 3, 3, 3)), ValueError, "weight_shape must be"),
        (dict(shape=(4, 0, 3, 3)), ValueError, "weight_shape must be"),
        (dict(groups=3), ValueError, "groups must be a positive divisor"),
        (dict(padding="full"), ValueError, "padding must be 'same', 'valid'"),
        (dict(padding=-1), ValueError, "padding must be an int >= 0"),
        (dict(stride=0), ValueError, "stride must be an int >= 1"),
        (dict(dilation=(1, 1, 1)), ValueError, "dilation must be an int >= 1 or 2 of them"),
        (dict(stride=2, padding="same"), ValueError, "'same' is not supported for strided"),
        (dict(padding_mode="mirror"), ValueError, "padding_mode must be one of"),
    ]
    for kw, exc, match in cases:
        xx, gg = kw.pop("x", x), kw.pop("g", g)
        with pytest.raises(exc, match=match):
            _call(op, xx, gg, **kw)
    if op == "sq_norms":
        with pytest.raises(ValueError, match="method must be one of"):
            _call(op, x, g, method="fast")


def test_bad_clip_factors_noise_and_out_dtype():
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"clip_factors must be a tensor of shape \(2,\)"):
        functional.conv_clipped_grad(x, g, torch.ones(3), (4, 3, 3, 3))
    with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
        functional.conv_clipped_grad(x, g, torch.ones(2), (4, 3, 3, 3), noise_std=-1.0)
    with pytest.raises(TypeError, match="out_dtype"):
        functional.conv_clipped_grad(x, g, torch.ones(2), (4, 3, 3, 3), out_dtype=torch.int32)
    with pytest.raises(ValueError, match="stream must be below"):
        functional.conv_clipped_grad(x, g, torch.ones(2), (4, 3, 3, 3), generator=PhiloxKey(1, 0, 2**32 - 1))


# ------------------------------------------------------------------ the modules -----------


@pytest.mark.parametrize(
    "name", ["2d_reflect_stride", "2d_same_even_kernel", "1d_circular_dilation", "2d_k1_odd_channels"]
)
def test_state_dict_repr_and_outside_an_engine(name):
    """Same constructor, repr and state_dict as the torch layer; outside an engine exactly it."""
    dims, _, cin, cout, _, kw = CASES[name]
    torch_cls, dp_cls = (nn.Conv1d, DPConv1d) if dims == 1 else (nn.Conv2d, DPConv2d)
    torch.manual_seed(0)
    ref = torch_cls(cin, cout, **kw)
    torch.manual_seed(0)
    dp = dp_cls(cin, cout, **kw)
    assert repr(dp).replace(dp_cls.__name__, torch_cls.__name__) == repr(ref)
    sd, sd_ref = dp.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref) and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    torch_cls(cin, cout, **kw).load_state_dict(dp.state_dict())
    _, x, _ = make_case(name)
    x = x.requires_grad_()
    out, out_ref = dp(x), ref(x)
    assert torch.equal(out, out_ref)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in dp.parameters()] + [x.grad.clone()]
    x.grad = None
    out_ref.square().sum().backward()
    for a, b in zip(grads, [p.grad for p in ref.parameters()] + [x.grad]):
        torch.testing.assert_close(a, b)
    assert torch.equal(dp(x[0]), ref(x[0]))  # unbatched input, as the torch layer takes it


def test_from_conv_shares_parameters_and_convert_registers_both():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding="valid", groups=2, bias=False, padding_mode="replicate").eval()
    dp = DPConv2d.from_conv(conv)
    assert dp.weight is conv.weight and dp.bias is None and not dp.training
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
        "_reversed_padding_repeated_twice",
        "transposed",
        "output_padding",
    ):
        assert getattr(dp, attr) == getattr(conv, attr)
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(dp(x), conv(x))
    c1 = nn.Conv1d(3, 2, 3)
    model = convert(nn.Sequential(c1, nn.ReLU(), nn.Conv2d(1, 1, 1), nn.Conv3d(1, 1, 1)))
    assert type(model[0]) is DPConv1d and model[0].bias is c1.bias and type(model[2]) is DPConv2d
    assert type(model[3]) is nn.Conv3d  # no clipping path: make_private refuses it by name
    with pytest.raises(TypeError, match="needs an nn.Conv2d"):
        DPConv2d.from_conv(c1)


# ------------------------------------------------------------------ the engine ------------


class SmallCNN(nn.Module):
    """Conv2d → ReLU → GroupNorm → Conv2d(groups=2, stride 2) → average pool → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, groups=2, padding=1, padding_mode="reflect")
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gn(F.relu(self.conv1(x)))
        return self.head(F.adaptive_avg_pool2d(self.conv2(h), 1).flatten(1))


class SmallConv1dNet(nn.Module):
    """Conv1d('same', even kernel) → tanh → depthwise Conv1d(circular, dilation 2) → mean → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, 4, padding="same")
        self.conv2 = nn.Conv1d(4, 4, 3, dilation=2, padding=2, groups=4, padding_mode="circular")
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(torch.tanh(self.conv1(x))).mean(dim=2))


def _private(model, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("noise_multiplier", 0.0)
    kw.setdefault("max_grad_norm", 1.0)
    kw.setdefault("expected_batch_size", 5)
    return dpkernels.make_private(model, opt, **kw)


def _data(net: str, B: int = 5):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(B, 3, 6, 6, generator=gen) if net == "cnn" else torch.randn(B, 2, 9, generator=gen)
    x = x * torch.linspace(0.3, 2.0, B).view(B, *([1] * (x.dim() - 1)))
    return x, torch.randint(0, 3 if net == "cnn" else 2, (B,), generator=gen)


def _median_norm(per_example) -> float:
    _, norms = flat_clipped_mean(per_example, 1.0, 1.0)
    s = norms.sort().values
    return float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2  # some examples clipped, some not


@pytest.mark.parametrize("net", ["cnn", "conv1d"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_private_step_equals_oracle(device, backend, net, loss_reduction):
    torch.manual_seed(0)
    model = SmallCNN() if net == "cnn" else SmallConv1dNet()
    x, y = _data(net)
    per_example = model_per_example_grads(model, x, y, "ce")
    C = _median_norm(per_example)
    expected, _ = flat_clipped_mean(per_example, C, 5)
    model, opt = _private(model.to(device), max_grad_norm=C, loss_reduction=loss_reduction, backend=backend)
    assert isinstance(model.conv1, (DPConv1d, DPConv2d)) and isinstance(model.conv2, (DPConv1d, DPConv2d))
    batch_loss("ce", model(x.to(device)), y.to(device), loss_reduction).backward()
    opt.write_private_grads()
    for name, p in model.named_parameters():
        ref = expected[name]
        torch.testing.assert_close(p.grad.double().cpu(), ref, rtol=2e-4, atol=2e-6 * float(ref.abs().max()), msg=name)


def test_private_step_noise_is_the_counter_scheme(device, backend):
    """σ > 0: each conv parameter's gradient minus the noiseless one is σC/B̄·z(seed, step, stream),
    over the flat weight (the grouped conv2 included), with the stream make_private assigns."""
    x, y = _data("cnn")
    grads = []
    for sigma in (0.0, 1.3):
        torch.manual_seed(0)
        model, opt = _private(
            SmallCNN().to(device), noise_multiplier=sigma, max_grad_norm=0.7, seed=2024, backend=backend
        )
        batch_loss("ce", model(x.to(device)), y.to(device), "sum").backward()
        opt.step()
        grads.append({n: p.grad.double().cpu() for n, p in model.named_parameters()})
    streams = {n: i for i, (n, _) in enumerate(model.named_parameters())}  # every parameter is in a DP layer
    std = 1.3 * 0.7 / 5
    for name in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"):
        diff = grads[1][name] - grads[0][name]
        _close(diff, _noise(PhiloxKey(2024, 0, streams[name]), diff.shape, std), 1e-4)


@pytest.mark.parametrize("style", ["per_layer", "flat"])
def test_clipping_styles_and_accumulation(style):
    """Micro-batches give the step of the whole batch, noise included, under per-layer clipping
    (clipped inside backward) as under flat clipping."""
    x, y = _data("cnn", B=6)

    def run(chunks):
        torch.manual_seed(0)
        model, opt = _private(
            SmallCNN(),
            noise_multiplier=0.7,
            max_grad_norm=0.4,
            expected_batch_size=6,
            seed=8,
            clipping=style,
            backend="torch",
        )
        start = 0
        for i, n in enumerate(chunks):
            batch_loss("ce", model(x[start : start + n]), y[start : start + n], "mean").backward()
            start += n
            if i + 1 < len(chunks):
                opt.accumulate()
        opt.step()
        return {n: p.grad for n, p in model.named_parameters()}

    whole, parts = run((6,)), run((2, 4))
    for n in whole:
        torch.testing.assert_close(parts[n], whole[n], rtol=1e-5, atol=1e-6, msg=n)


def test_autocast_bfloat16_step():
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = _data("cnn")
    expected, _ = flat_clipped_mean(model_per_example_grads(model, x, y, "ce"), 0.5, 5)
    model, opt = _private(model, max_grad_norm=0.5, backend="torch")
    dtypes = []
    model.conv1.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert dtypes[-1] == torch.bfloat16
    batch_loss("ce", out.float(), y, "mean").backward()
    opt.write_private_grads()
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        _close(p.grad, expected[name], 0.1)


def test_refusals_under_private_training():
    model, opt = _private(SmallCNN())
    with pytest.raises(ValueError, match=r"DPConv2d needs batched input of shape \(B, C, H, W\)"):
        model(torch.randn(3, 6, 6))
    with pytest.raises(ValueError, match="empty batch reached DPConv2d"):
        model(torch.randn(0, 3, 6, 6))
    model1, _ = _private(SmallConv1dNet())
    with pytest.raises(ValueError, match=r"DPConv1d needs batched input of shape \(B, C, L\)"):
        model1(torch.randn(2, 9))
    with torch.no_grad():  # not a private forward: the torch layer, unbatched input included
        assert model.conv1(torch.randn(3, 6, 6)).shape == (4, 6, 6)


def test_frozen_weight_with_trainable_bias_is_refused():
    model = SmallCNN()
    model.conv2.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"DPConv2d 'conv2' \(bias\): a trainable bias with a frozen weight"):
        dpkernels.make_private(
            model,
            torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
        )


def test_frozen_conv_and_conv3d():
    """A frozen conv runs as the torch layer and gets no gradient; Conv3d has no clipping path."""
    model = SmallCNN()
    model.conv1.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=5, backend="torch"
    )
    x, y = _data("cnn")
    batch_loss("ce", model(x), y, "mean").backward()
    opt.step()
    assert model.conv1.weight.grad is None and model.conv2.weight.grad is not None
    net = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Flatten(), nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"Conv3d '0' \(weight, bias\): no per-example clipping path"):
        _private(net, fallback=False)  # (by default its 4 parameters run on the torch.func fallback)


def test_triton_direct_norms_never_build_patches(monkeypatch):
    """The direct method on the Triton backend indexes the patches in its kernel: the patch
    matrices (∏k × the input) are never materialised."""
    if not triton_runnable(torch.device("cpu")):
        pytest.skip("Triton cannot run on CPU tensors without TRITON_INTERPRET=1")

    def refuse(*args, **kwargs):
        raise AssertionError("patches were materialised")

    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2)
    x, g = torch.randn(3, 4, 9, 7), torch.randn(3, 6, 5, 4)
    expected = functional.conv_sq_norms(x, g, conv.weight.shape, method="direct", backend="torch", **conv_args(conv))
    monkeypatch.setattr(conv_patches, "input_patches", refuse)
    got = functional.conv_sq_norms(x, g, conv.weight.shape, method="direct", backend="triton", **conv_args(conv))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
