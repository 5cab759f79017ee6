"""linear_clipped_grad: Σ_i c_i g_i (oracle) plus noise_std·z from the Philox counter scheme.

The fused GEMM scales G's rows by the clip factors on load and adds the noise in its
epilogue; a row scaled by the wrong example's factor, a tile dropped at an edge, or noise
drawn from the wrong counter would all break these equalities.
"""

from __future__ import annotations

import pytest
import torch

from dpkernels import functional
from dpkernels.ops.philox import PhiloxKey
from helpers import assert_close_scaled, philox_noise, random_clip_factors
from oracle import LINEAR_CASES as CASES
from oracle import linear_clipped_sum_oracle
from oracle import make_linear_inputs as make_inputs

from conftest import triton_runnable

HALF_CASES = ["2d:3x7x33", "3d:2x70x7x33", "3d:2x5x70x75", "3d_strided:3x9x33x45", "4d_permuted:2x3x5x7x45"]


def clip_factors(B: int, device) -> torch.Tensor:
    return random_clip_factors(B, device, seed=1000)


_close = assert_close_scaled
_noise = philox_noise


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES)
def test_float32_clipped_sum_matches_oracle(device, backend, case, bias):
    torch.manual_seed(0)
    x, g = make_inputs(case, device)
    c = clip_factors(x.shape[0], device)
    gw, gb = functional.linear_clipped_grad(x, g, c, bias=bias, noise_std=0.0, backend=backend)
    rw, rb = linear_clipped_sum_oracle(x, g, c, bias)
    p, d = g.shape[-1], x.shape[-1]
    assert gw.shape == (p, d) and gw.dtype == torch.float32 and gw.device.type == device.type
    _close(gw, rw, 1e-5)
    if bias:
        assert gb.shape == (p,) and gb.dtype == torch.float32
        _close(gb, rb, 1e-5)
    else:
        assert gb is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_half_precision_clipped_sum(device, backend, case, dtype):
    # reference: the oracle on the rounded inputs, in float64; the result is stored in the half
    # dtype (and the kernel rounds c·G to it before the product), hence a percent-level bound
    x, g = make_inputs(case, device, dtype)
    c = clip_factors(x.shape[0], device)
    gw, gb = functional.linear_clipped_grad(x, g, c, bias=True, noise_std=0.0, backend=backend)
    rw, rb = linear_clipped_sum_oracle(x, g, c, True)
    assert gw.dtype == dtype and gb.dtype == dtype
    assert gw.shape == (g.shape[-1], x.shape[-1]) and gb.shape == (g.shape[-1],)
    _close(gw, rw, 2e-2)
    _close(gb, rb, 2e-2)


@pytest.mark.parametrize("case", ["3d:2x70x7x33", "3d_strided:3x9x33x45"])
def test_float32_output_of_half_inputs(device, backend, case):
    """out_dtype=float32 (float32 master weights, bf16 activations): the float32 accumulator is not rounded."""
    x, g = make_inputs(case, device, torch.bfloat16)
    c = clip_factors(x.shape[0], device)
    key = PhiloxKey(4, 0, 0)
    gw, gb = functional.linear_clipped_grad(
        x, g, c, noise_std=0.1, generator=key, backend=backend, out_dtype=torch.float32
    )
    assert gw.dtype == torch.float32 and gb.dtype == torch.float32
    rw, rb = linear_clipped_sum_oracle(x, g, c, True)
    rw = rw.cpu() + _noise(key, gw.shape, 0.1, device).cpu()
    rb = rb.cpu() + _noise(PhiloxKey(4, 0, 1), gb.shape, 0.1, device).cpu()
    # the bf16 rounding of c·G before the product is the only error left (none in the torch reference)
    _close(gw, rw, 1e-5 if backend == "torch" else 1e-2)
    _close(gb, rb, 1e-5)


NOISE_CASES = [
    "2d:1x1x1",
    "3d:3x7x33x45",
    "3d:2x5x70x75",
    "4d_permuted:2x3x5x7x45",
    # d even: the kernel draws whole pairs of elements per Philox call
    "2d:1x4x1",
    "2d:2x12x5",  # one 32-wide d tile, partly masked
    "3d:2x3x36x45",  # one 64-wide d tile, partly masked
    "2d:3x66x33",  # two d tiles, the second holding a single pair
]


@pytest.mark.parametrize("case", NOISE_CASES)
def test_noise_is_philox_of_the_key(device, backend, case):
    """grad_W = clipped sum + σ·z(key), grad_b = clipped sum + σ·z(key with stream + 1)."""
    x, g = make_inputs(case, device)
    c = clip_factors(x.shape[0], device)
    std = 0.37
    key = PhiloxKey(0xFEEDFACECAFEBEEF, 12, 40)
    gw, gb = functional.linear_clipped_grad(x, g, c, bias=True, noise_std=std, generator=key, backend=backend)
    rw, rb = linear_clipped_sum_oracle(x, g, c, True)
    p, d = gw.shape
    exp_w = rw.cpu() + _noise(key, (p, d), std, device).cpu()
    exp_b = rb.cpu() + _noise(PhiloxKey(key.seed, key.step, key.stream + 1), (p,), std, device).cpu()
    _close(gw, exp_w, 1e-5)
    _close(gb, exp_b, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backends_draw_the_same_noise(device, dtype):
    if not triton_runnable(device):
        pytest.skip("Triton cannot run here")
    x, g = make_inputs("3d:2x5x70x75", device, dtype)
    c = clip_factors(2, device)
    key = PhiloxKey(2**63 + 12345, 3, 6)
    outs = {
        b: functional.linear_clipped_grad(x, g, c, noise_std=1.5, generator=key, backend=b) for b in ("torch", "triton")
    }
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(outs["torch"], outs["triton"]):
        _close(b, a.double(), tol)


def test_noise_only_when_factors_are_zero(device, backend):
    """c = 0 for every example: the output is exactly the noise term (no data leaks in)."""
    x, g = make_inputs("3d:3x7x33x45", device)
    key = PhiloxKey(5, 0, 2)
    gw, gb = functional.linear_clipped_grad(
        x, g, torch.zeros(3, device=device), noise_std=2.0, generator=key, backend=backend
    )
    _close(gw, _noise(key, gw.shape, 2.0, device), 1e-6)
    _close(gb, _noise(PhiloxKey(5, 0, 3), gb.shape, 2.0, device), 1e-6)
    gw0, gb0 = functional.linear_clipped_grad(x, g, torch.zeros(3, device=device), backend=backend)
    assert not bool(gw0.any()) and not bool(gb0.any())


def test_weight_and_bias_noise_differ(device, backend):
    x, g = make_inputs("3d:1x1x33x45", device)
    zero = torch.zeros(1, device=device)
    gw, gb = functional.linear_clipped_grad(x, g, zero, noise_std=1.0, generator=PhiloxKey(9), backend=backend)
    # the bias's noise is not a copy of the weight's first elements (or of any of its rows)
    assert not bool((gb == gw.flatten()[: gb.numel()]).any())
    assert not bool((gw == gb[:, None]).all(dim=0).any())


def test_fresh_noise_without_a_key(device, backend):
    x, g = make_inputs("2d:3x7x33", device)
    c = clip_factors(3, device)
    a, _ = functional.linear_clipped_grad(x, g, c, noise_std=1.0, backend=backend)
    b, _ = functional.linear_clipped_grad(x, g, c, noise_std=1.0, backend=backend)
    assert not bool((a == b).any())
    # a seeded torch.Generator reproduces
    a, ab = functional.linear_clipped_grad(
        x, g, c, noise_std=1.0, generator=torch.Generator().manual_seed(3), backend=backend
    )
    b, bb = functional.linear_clipped_grad(
        x, g, c, noise_std=1.0, generator=torch.Generator().manual_seed(3), backend=backend
    )
    assert torch.equal(a, b) and torch.equal(ab, bb)


def test_clip_factors_of_other_float_dtypes(device, backend):
    x, g = make_inputs("3d:3x7x33x45", device)
    c = clip_factors(3, device)
    a, _ = functional.linear_clipped_grad(x, g, c, backend=backend)
    b, _ = functional.linear_clipped_grad(x, g, c.double(), backend=backend)
    torch.testing.assert_close(a, b)


def test_does_not_modify_inputs(device, backend):
    x, g = make_inputs("3d_strided:3x9x33x45", device)
    c = clip_factors(3, device)
    x0, g0, c0 = x.clone(), g.clone(), c.clone()
    functional.linear_clipped_grad(x, g, c, noise_std=1.0, generator=PhiloxKey(1), backend=backend)
    assert torch.equal(x, x0) and torch.equal(g, g0) and torch.equal(c, c0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(4, 300, 512, 384), (3, 130, 96, 200)])
def test_autotuned_clipped_grad_on_gpu(shape, dtype, monkeypatch):
    """GPU only: the autotuned GEMM (every config) gives the clipped sum plus the key's noise."""
    monkeypatch.setenv("DPKERNELS_AUTOTUNE", "1")
    B, T, d, p = shape
    gen = torch.Generator().manual_seed(B * T)
    x = (torch.randn(B, T, d, generator=gen) / d**0.5).to("cuda", dtype)
    g = (torch.randn(B, T, p, generator=gen) / T).to("cuda", dtype)
    c = clip_factors(B, "cuda")
    key = PhiloxKey(77, 1, 2)
    rw, rb = linear_clipped_sum_oracle(x, g, c, True)
    rw = rw + _noise(key, (p, d), 0.01, "cuda")
    rb = rb + _noise(PhiloxKey(77, 1, 3), (p,), 0.01, "cuda")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for _ in range(2):
        gw, gb = functional.linear_clipped_grad(x, g, c, noise_std=0.01, generator=key, backend="triton")
        _close(gw, rw, tol)
        _close(gb, rb, tol)
